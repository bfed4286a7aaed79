"""launch/gke/render.py: the TPU and GPU JobSet manifests, rendered and read back as YAML."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--name", "mlcd-l14", "--image", "us-docker.pkg.dev/p/r/mlcd:1", "--config", "configs/vitl14.py",
       "--workdir", "gs://b/runs/l14", "--", "--config.data.shards=gs://b/mlcd_cluster", "--config.note=a b"]
COMMAND = ["python", "-m", "mlcd_jax.main", "--config=configs/vitl14.py", "--workdir=gs://b/runs/l14",
           "--config.data.shards=gs://b/mlcd_cluster", "--config.note=a b"]


def _render(kind: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / "gke" / "render.py"), kind, *args],
                          capture_output=True, text=True, timeout=120)


def _job(manifest: dict, name: str) -> tuple[dict, dict, dict]:
    """The replicated job, its pod spec and its one container."""
    assert (manifest["apiVersion"], manifest["kind"]) == ("jobset.x-k8s.io/v1alpha2", "JobSet")
    [job] = manifest["spec"]["replicatedJobs"]
    assert job["name"] == name
    pod = job["template"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == "us-docker.pkg.dev/p/r/mlcd:1" and container["command"] == COMMAND
    return job, pod, container


@pytest.mark.parametrize("slice_type, slices, accelerator, topology, hosts, chips", [
    ("v5p-64", 2, "tpu-v5p-slice", "2x4x4", 8, 4),
    ("v4-32", 1, "tpu-v4-podslice", "2x2x4", 4, 4),
    ("v5litepod-16", 1, "tpu-v5-lite-podslice", "4x4", 4, 4),
    ("v6e-8", 1, "tpu-v6e-slice", "2x4", 1, 8),
])
def test_tpu_jobset(slice_type, slices, accelerator, topology, hosts, chips):
    out = _render("tpu", "--type", slice_type, "--num-slices", str(slices), *RUN)
    assert out.returncode == 0, out.stderr
    manifest = yaml.safe_load(out.stdout)
    assert manifest["metadata"]["name"] == "mlcd-l14"
    job, pod, container = _job(manifest, "slice")
    assert job["replicas"] == slices  # one Job per slice
    spec = job["template"]["spec"]
    assert spec["parallelism"] == spec["completions"] == hosts and spec["completionMode"] == "Indexed"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": accelerator,
                                   "cloud.google.com/gke-tpu-topology": topology}
    assert container["resources"]["limits"] == {"google.com/tpu": chips}
    assert "env" not in container  # JAX finds its TPU peers itself


def test_gpu_jobset():
    out = _render("gpu", "--nodes", "4", "--gpus-per-node", "8", *RUN)
    assert out.returncode == 0, out.stderr
    manifest = yaml.safe_load(out.stdout)
    job, pod, container = _job(manifest, "workers")
    spec = job["template"]["spec"]
    assert job["replicas"] == 1 and spec["parallelism"] == spec["completions"] == 4
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}, "requests": {"cpu": 64}}
    env = {e["name"]: e for e in container["env"]}
    assert env["JAX_COORDINATOR_ADDRESS"]["value"] == "mlcd-l14-workers-0-0.mlcd-l14:1234"
    assert env["JAX_NUM_PROCESSES"]["value"] == "4"
    assert env["JAX_PROCESS_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert container["ports"] == [{"containerPort": 1234}] and manifest["spec"]["network"]["enableDNSHostnames"]


def test_a_cpu_type_is_one_line():
    out = _render("tpu", "--type", "cpu:8", *RUN)
    assert out.returncode == 1
    assert out.stderr.strip() == "error: --type cpu:8: name a TPU slice (v4-N, v5p-N, v5e-N, v6e-N)"

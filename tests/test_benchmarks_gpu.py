"""The GPU run's one command, rehearsed on the CPU: ``QUICK=1 bash benchmarks/gpu.sh`` runs the same steps
(setup check, benchmarks/train_step.py, benchmarks/vit.py, benchmarks/embed.py, benchmarks/kmeans_device.py)
at their --quick sizes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~80 CPU-seconds: `pytest -m slow`
def test_gpu_script_quick_rehearsal(tmp_path):
    env = {
        **os.environ,
        "QUICK": "1",
        "OUT": str(tmp_path),
        "PYTHON": sys.executable,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",  # sharded head, cheaper than 8
    }
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"setup.log", "train_step.log", "train_step.json",
                                                    "vit.log", "vit.json", "embed_quick.log", "embed_quick.json",
                                                    "kmeans.log", "kmeans.json"}

    r = json.loads((tmp_path / "train_step.json").read_text())
    assert r["num_devices"] == 2 and r["model"] == "tiny" and r["dtype"] == "bfloat16"
    assert r["attention"] == "xla" and r["k"] == 65_536
    assert r["global_batch"] == 2 * r["batch_per_device"] > 0 and r["did_not_fit"] == []
    for part in ("full", "tiny_head", "head_only"):
        assert r[part]["step_s"] > 0, part
    assert r["tiny_head"]["k"] == 16
    assert r["images_per_s"] > 0 and r["model_flops_per_step"] > 0 and r["model_tflops_per_s"] > 0
    assert r["mfu"] is None and r["peak_tflops_per_device"] is None  # no peak for a CPU
    assert r["xla_flops_per_step"] > 0
    assert 0 < r["full"]["memory_per_device_gib"] < 4
    assert 0.0 <= r["head_share"] <= 1.0 and r["head_only_share"] > 0
    assert r["full"]["loss"] > 0
    assert "head share of step" in (tmp_path / "train_step.log").read_text()

    (vit,) = json.loads((tmp_path / "vit.json").read_text())
    assert vit["model"] == "tiny" and vit["fwd_bwd_ms_per_image"] > 0

    embed = json.loads((tmp_path / "embed_quick.json").read_text())
    assert embed["images"] == 3 * 128 and embed["host_cores"] >= 1
    assert embed["teacher_images_per_s"] > 0 and len(embed["host_images_per_s"]) == 4
    assert all(rate > 0 for rate in embed["host_images_per_s"].values())
    assert len(embed["job_embed_images_per_s"]) == 2 and all(r > 0 for r in embed["job_embed_images_per_s"].values())

    kmeans = json.loads((tmp_path / "kmeans.json").read_text())
    assert kmeans["k"] == 4096 and {r["dtype"] for r in kmeans["rows"]} == {"bfloat16", "float32"}
    assert all(r["lloyd_points_per_s"] > 0 and r["assign_points_per_s"] > 0 for r in kmeans["rows"])

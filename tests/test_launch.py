"""Launch scripts: --dry-run prints the commands they would run; missing arguments fail clearly."""

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


GCLOUD = "gcloud-in-dry-runs-only"
IMAGES = {"v4-32": "tpu-ubuntu2204-base", "v5litepod-16": "v2-alpha-tpuv5-lite", "v5p-64": "v2-alpha-tpuv5",
          "v6e-16": "v2-alpha-tpuv6e"}


def _tpu_dry_run(*args: str) -> list[list[str]]:
    """tpu_pod.sh --dry-run's commands, each split back into its arguments. $GCLOUD names no program: a
    command that ran instead of being printed would fail."""
    at = args.index("--") if "--" in args else len(args)
    out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), *args[:at], "--dry-run", *args[at:]],
                         capture_output=True, text=True, env={**os.environ, "GCLOUD": GCLOUD})
    assert out.returncode == 0, out.stderr
    return [shlex.split(cmd) for cmd in _commands(out.stdout)]


def _commands(text: str) -> list[str]:
    """Printed shell commands, one per logical line (quoted newlines belong to their command)."""
    commands, current = [], ""
    for line in text.splitlines(keepends=True):
        current += line
        try:
            shlex.split(current)
        except ValueError:  # an open quote: the command goes on
            continue
        commands.append(current.strip())
        current = ""
    return commands


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.parametrize("accelerator", sorted(IMAGES))
def test_tpu_pod_dry_run_queues_installs_and_runs_detached(accelerator, slices):
    cmds = _tpu_dry_run("run", "--name", "mlcd", "--zone", "us-east5-a", "--type", accelerator,
                        f"--num-slices={slices}", "--spot", "--config", "configs/vitl14.py",
                        "--workdir", "gs://bucket/run", "--", "--config.batch_size=1024")
    nodes = ["mlcd"] if slices == 1 else ["mlcd-0", "mlcd-1"]
    create = next(c for c in cmds if c[1:5] == ["compute", "tpus", "queued-resources", "create"])
    assert create[:6] == [GCLOUD, "compute", "tpus", "queued-resources", "create", "mlcd"]
    assert create[create.index("--accelerator-type") + 1] == accelerator
    assert create[create.index("--runtime-version") + 1] == IMAGES[accelerator]
    assert "--spot" in create and "--reserved" not in create
    if slices == 1:
        assert create[create.index("--node-id") + 1] == "mlcd" and "--node-count" not in create
    else:
        assert create[create.index("--node-count") + 1] == "2" and create[create.index("--node-prefix") + 1] == "mlcd"
    polls = [c for c in cmds if c[1:5] == ["compute", "tpus", "queued-resources", "describe"]]
    assert polls and all("--format=value(state.state)" in c for c in polls)  # waits until ACTIVE
    archive = next(c for c in cmds if c[:1] == ["git"] and "archive" in c)
    assert archive[-4:] == ["setup.py", "README.md", "mlcd_jax", "configs"]  # the package, never a venv
    ssh = [c for c in cmds if c[1:5] == ["compute", "tpus", "tpu-vm", "ssh"]]
    scp = [c for c in cmds if c[1:5] == ["compute", "tpus", "tpu-vm", "scp"]]
    assert [c[6].split(":")[0] for c in scp] == nodes and all("--worker=all" in c for c in ssh + scp)
    install, start = ssh[:len(nodes)], ssh[len(nodes):]
    assert [c[5] for c in install] == nodes and [c[5] for c in start] == nodes
    for c in install:
        script = c[c.index("--command") + 1]
        assert "python3.12 python3.11" in script and "uv python install 3.11" in script
        assert '"mlcd_jax[tpu] @ file://$HOME/mlcd_jax_package.tar.gz"' in script
    for c in start:
        script = c[c.index("--command") + 1]
        assert "setsid nohup" in script and "</dev/null &" in script and '"$HOME/mlcd_jax_run/train.log"' in script
        assert "-m mlcd_jax.main --config=../mlcd_jax/configs/vitl14.py --workdir=gs://bucket/run " \
               "--config.batch_size=1024" in script


def test_tpu_pod_runtime_override_reserved_and_unknown_types():
    create = next(c for c in _tpu_dry_run("create", "--name", "x", "--zone", "z", "--type", "v5p-8", "--reserved",
                                          "--version", "my-image") if "create" in c)
    assert create[create.index("--runtime-version") + 1] == "my-image" and "--reserved" in create
    bad = _run("tpu_pod.sh", "create", "--name", "x", "--zone", "z", "--type", "v9-8", "--dry-run")
    assert bad.returncode != 0 and "pass --version" in bad.stderr


def test_tpu_pod_override_with_a_space_arrives_as_one_argument(tmp_path):
    """The printed start command, run by bash as a worker's login shell would, hands the trainer (here a
    stub that records its arguments) every override as the argument it was."""
    overrides = ["--config.data.cache_dir=/data/cluster cache", "--config.name=it's \"quoted\" $HOME"]
    cmds = _tpu_dry_run("run", "--name", "mlcd", "--zone", "z", "--type", "v4-8", "--config", "configs/demo.py:digits",
                        "--workdir", "gs://b/run", "--", *overrides)
    start = [c for c in cmds if c[1:5] == ["compute", "tpus", "tpu-vm", "ssh"]][-1]
    stub = tmp_path / "mlcd_jax_venv" / "bin" / "python"
    stub.parent.mkdir(parents=True)
    stub.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open('argv.json', 'w'))\n")
    stub.chmod(0o755)
    out = subprocess.run(["bash", "-c", start[start.index("--command") + 1]], cwd=tmp_path, capture_output=True,
                         text=True, env={**os.environ, "HOME": str(tmp_path), "HOSTNAME": "w0"})
    assert out.returncode == 0 and "w0: training (pid" in out.stdout, out.stderr
    argv = tmp_path / "mlcd_jax_run" / "argv.json"
    for _ in range(100):
        if (tmp_path / "mlcd_jax_run" / "train.rc").exists():
            break
        time.sleep(0.1)
    assert json.loads(argv.read_text()) == ["-m", "mlcd_jax.main", "--config=../mlcd_jax/configs/demo.py:digits",
                                            "--workdir=gs://b/run", *overrides]


def test_main_takes_multiprocess_settings_from_the_environment():
    code = ("from absl import flags; from mlcd_jax import cli; "
            "flags.FLAGS(['main', '--config=configs/vitb32.py', '--workdir=/tmp/x', *__import__('sys').argv[1:]]); "
            "print(cli.distributed_settings())")
    env = {**os.environ, "JAX_COORDINATOR_ADDRESS": "host0:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}

    def settings(*flags: str, environ: dict[str, str] = env) -> str:
        out = subprocess.run([sys.executable, "-c", code, *flags], cwd=ROOT, env=environ, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert settings() == "{'coordinator_address': 'host0:1234', 'num_processes': 4, 'process_id': 3}"
    assert settings("--process_id=0") == "{'coordinator_address': 'host0:1234', 'num_processes': 4, 'process_id': 0}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("JAX_") or k.startswith("JAX_PLATFORMS")}
    assert settings(environ=clean) == "{}"


def test_slurm_dry_run_prints_batch_script(tmp_path):
    out = _run("slurm_gpu.sh", "--nodes", "10", "--gpus-per-node", "8", "--config", "configs/vitl14.py",
               "--workdir", "/shared/run", "--partition", "gpu", "--venv", "/shared/envs/mlcd jax", "--dry-run",
               "--", "--config.data.shards=/shared/my shards")
    assert out.returncode == 0, out.stderr
    for expected in ("#SBATCH --nodes=10", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                     "#SBATCH --cpus-per-task=64", "source /shared/envs/mlcd\\ jax/bin/activate",
                     "srun --cpus-per-task=64 python -m mlcd_jax.main --config=configs/vitl14.py "
                     "--workdir=/shared/run --config.data.shards=/shared/my\\ shards",
                     "sbatch /shared/run/slurm.sbatch", "if [ $rc -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi"):
        assert expected in out.stdout
    default = _run("slurm_gpu.sh", "--nodes", "1", "--gpus-per-node", "4", "--cpus-per-task", "48", "--config", "c.py",
                   "--workdir", "/w", "--dry-run")
    assert f"source {ROOT}/.venv/bin/activate" in default.stdout and "srun --cpus-per-task=48 " in default.stdout
    missing = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sh"), "--nodes", "1", "--config", "c.py",
                              "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                             env={**os.environ, "MLCD_JAX_VENV": str(tmp_path / "none")})
    assert missing.returncode == 2 and f"no virtual environment at {tmp_path / 'none'}" in missing.stderr


def test_single_host_dry_run_and_missing_arguments():
    out = _run("single_host.sh", "--config", "configs/demo.py", "--workdir", "/tmp/x", "--dry-run")
    assert out.returncode == 0 and "-m mlcd_jax.main --config=configs/demo.py --workdir=/tmp/x" in out.stdout
    for script in ("single_host.sh", "tpu_pod.sh", "slurm_gpu.sh"):
        bad = _run(script, "--dry-run")
        assert bad.returncode == 2 and any(word in bad.stderr for word in ("missing", "need", "required"))


def test_vitl14_without_data_names_the_keys_and_the_recipe(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mlcd_jax.main", "--config=configs/vitl14.py",
                          f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("config error:")]
    assert out.returncode == 2 and len(errors) == 1, out.stderr[-3000:]
    assert "--config.data.shards=" in errors[0] and "--config.data.cluster.source=" in errors[0]
    section = errors[0].split('launch/README.md, "', 1)[1].rstrip('"')
    assert f"\n## {section}\n" in (ROOT / "launch" / "README.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["--type", "v5p-7x"], "--type 'v5p-7x' is not an accelerator type"),
    (["--type", "tpu-8"], "--type 'tpu-8' is not an accelerator type"),
    (["--type", "v5p-64", "--num-slices", "0"], "--num-slices 0 must be at least 1"),
    (["--type", "v5p-64", "--config", "configs/nope.py", "--workdir", "gs://b/r"], "--config configs/nope.py is not a file"),
    (["--type", "v5p-64"], "run needs --config and --workdir"),
])
def test_launcher_mistakes_are_one_line_with_status_2_before_any_gcloud_call(args, message):
    """$GCLOUD names no program: a mistake that reached gcloud would fail with its error, not this line."""
    out = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "run", "--name", "n", "--zone", "z", *args],
                         capture_output=True, text=True, env={**os.environ, "GCLOUD": GCLOUD})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"tpu_pod: {message}"), out.stderr

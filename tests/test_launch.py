"""Launch scripts: --dry-run prints the commands they would run; missing arguments fail clearly."""

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "launch" / script), *args], capture_output=True, text=True)


def test_tpu_pod_dry_run_creates_installs_and_runs_on_all_workers():
    out = _run("tpu_pod.sh", "--name", "mlcd", "--zone", "us-east5-a", "--type", "v5p-64",
               "--config", "configs/vitl14.py", "--workdir", "gs://bucket/run", "--spot", "--dry-run",
               "--", "--config.batch_size=1024")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("gcloud compute tpus tpu-vm create mlcd --zone us-east5-a --accelerator-type v5p-64")
    assert "--spot" in lines[0]
    assert all("--worker=all" in line for line in lines[1:])
    assert "mlcd_jax.main" in lines[-1] and "gs://bucket/run" in lines[-1] and "batch_size=1024" in lines[-1]


def test_slurm_dry_run_prints_batch_script():
    out = _run("slurm_gpu.sh", "--nodes", "10", "--gpus-per-node", "8", "--config", "configs/vitl14.py",
               "--workdir", "/shared/run", "--partition", "gpu", "--dry-run")
    assert out.returncode == 0, out.stderr
    for expected in ("#SBATCH --nodes=10", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                     "srun python3 -m mlcd_jax.main --config=configs/vitl14.py --workdir=/shared/run",
                     "sbatch /shared/run/slurm.sbatch", "if [ $rc -eq 75 ]; then scontrol requeue $SLURM_JOB_ID; fi"):
        assert expected in out.stdout


def test_single_host_dry_run_and_missing_arguments():
    out = _run("single_host.sh", "--config", "configs/demo.py", "--workdir", "/tmp/x", "--dry-run")
    assert out.returncode == 0 and "-m mlcd_jax.main --config=configs/demo.py --workdir=/tmp/x" in out.stdout
    for script in ("single_host.sh", "tpu_pod.sh", "slurm_gpu.sh"):
        bad = _run(script, "--dry-run")
        assert bad.returncode == 2 and ("missing" in bad.stderr or "need" in bad.stderr)

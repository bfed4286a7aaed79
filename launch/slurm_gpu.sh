#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, all local GPUs per task; jax discovers the
# processes from SLURM's environment (jax.distributed.initialize() in mlcd_jax.main).
#
#   launch/slurm_gpu.sh --nodes 10 --gpus-per-node 8 --config configs/vitl14.py \
#       --workdir /shared/runs/vitl14 [--venv DIR] [--cpus-per-task N] [--partition gpu] [--time 72:00:00] \
#       [--dry-run] [-- --config.key=value ...]
#
# --venv: a virtual environment on the shared file system with `pip install -e '.[gpu]'` done in it
# (default $MLCD_JAX_VENV, else this checkout's .venv). --cpus-per-task: cores per node for host-side JPEG
# decoding and augmentation (default 8 per GPU).
# Writes the batch script to WORKDIR/slurm.sbatch and submits it; --dry-run prints it and the sbatch line.
set -euo pipefail

NODES="" GPUS="8" CPUS="" CONFIG="" WORKDIR="" PARTITION="" TIME="72:00:00" DRY=""
VENV="${MLCD_JAX_VENV:-$(cd "$(dirname "$0")/.." && pwd)/.venv}"
EXTRA=()
usage() { sed -n '2,13p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
    --cpus-per-task) CPUS="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --partition) PARTITION="$2"; shift 2 ;;
    --time) TIME="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
for v in NODES CONFIG WORKDIR; do
  [ -n "${!v}" ] || { echo "missing --$(echo "$v" | tr 'A-Z' 'a-z')" >&2; exit 2; }
done
CPUS="${CPUS:-$((GPUS * 8))}"
if [ -z "$DRY" ] && [ ! -f "$VENV/bin/activate" ]; then
  echo "no virtual environment at $VENV: create one with pip install -e '.[gpu]', then pass --venv DIR or set MLCD_JAX_VENV" >&2
  exit 2
fi

TRAIN=$(printf '%q ' python -m mlcd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=mlcd_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --cpus-per-task=$CPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
${PARTITION:+#SBATCH --partition=$PARTITION}
source $(printf '%q' "$VENV")/bin/activate
# srun does not inherit sbatch's --cpus-per-task (SLURM >= 22.05): the decode threads need every core.
srun --cpus-per-task=$CPUS ${TRAIN% }
rc=\$?
# 75: stopped by SIGTERM with a checkpoint (the time limit is near): queue again; the rerun resumes.
if [ \$rc -eq 75 ]; then scontrol requeue \$SLURM_JOB_ID; fi
exit \$rc"

if [ -n "$DRY" ]; then
  echo "$SCRIPT"
  echo "sbatch $WORKDIR/slurm.sbatch"
else
  mkdir -p "$WORKDIR"
  echo "$SCRIPT" > "$WORKDIR/slurm.sbatch"
  sbatch "$WORKDIR/slurm.sbatch"
fi

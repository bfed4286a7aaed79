#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one task per node, all local GPUs per task; jax discovers the
# processes from SLURM's environment (jax.distributed.initialize() in mlcd_jax.main).
#
#   launch/slurm_gpu.sh --nodes 10 --gpus-per-node 8 --config configs/vitl14.py \
#       --workdir /shared/runs/vitl14 [--partition gpu] [--time 72:00:00] [--dry-run] [-- --config.key=value ...]
#
# Writes the batch script to WORKDIR/slurm.sbatch and submits it; --dry-run prints it and the sbatch line.
set -euo pipefail

NODES="" GPUS="8" CONFIG="" WORKDIR="" PARTITION="" TIME="72:00:00" DRY=""
PYTHON="${PYTHON:-python3}"
EXTRA=()
usage() { sed -n '2,9p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --gpus-per-node) GPUS="$2"; shift 2 ;;
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

SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=mlcd_jax
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --output=$WORKDIR/slurm-%j.out
#SBATCH --signal=TERM@120
#SBATCH --requeue
${PARTITION:+#SBATCH --partition=$PARTITION}
srun $PYTHON -m mlcd_jax.main --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}
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

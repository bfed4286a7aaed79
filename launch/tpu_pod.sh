#!/usr/bin/env bash
# Train on a GCP TPU VM slice: create (or reuse) the slice, install mlcd_jax on every worker, run the
# same `python -m mlcd_jax.main` on all workers at once (jax discovers its peers on a TPU slice).
#
#   launch/tpu_pod.sh --name mlcd-v5p --zone us-east5-a --type v5p-64 \
#       --config configs/vitl14.py --workdir gs://BUCKET/runs/vitl14 [--version tpu-ubuntu2204-base]
#       [--spot] [--dry-run] [-- --config.batch_size=32768 ...]
#
# --dry-run prints every command instead of running it.
set -euo pipefail

NAME="" ZONE="" TYPE="" CONFIG="" WORKDIR="" VERSION="tpu-ubuntu2204-base" SPOT="" DRY=""
REPO="${MLCD_JAX_REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
EXTRA=()
usage() { sed -n '2,11p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --type) TYPE="$2"; shift 2 ;;
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --spot) SPOT="--spot"; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
for v in NAME ZONE TYPE CONFIG WORKDIR; do
  [ -n "${!v}" ] || { echo "missing --$(echo "$v" | tr 'A-Z' 'a-z')" >&2; exit 2; }
done
case "$WORKDIR" in gs://*) ;; *) echo "warning: --workdir $WORKDIR is not gs://; TPU workers do not share local disks" >&2 ;; esac

run() { if [ -n "$DRY" ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
ssh_all() { run gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"; }

if [ -n "$DRY" ] || ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" --accelerator-type "$TYPE" --version "$VERSION" $SPOT
fi
run gcloud compute tpus tpu-vm scp --recurse "$REPO" "$NAME:~/mlcd_jax" --zone "$ZONE" --worker=all
ssh_all "cd ~/mlcd_jax && python3 -m pip install -q -e . 'jax[tpu]'"
ssh_all "cd ~/mlcd_jax && python3 -m mlcd_jax.main --config=$CONFIG --workdir=$WORKDIR ${EXTRA[*]:-}"

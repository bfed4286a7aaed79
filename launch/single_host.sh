#!/usr/bin/env bash
# One machine, all its accelerators (or fake CPU devices): the plain entry point, with a log file.
#
#   launch/single_host.sh --config configs/demo.py --workdir /tmp/mlcd_demo [--dry-run] [-- --config.key=value ...]
set -euo pipefail

CONFIG="" WORKDIR="" DRY=""
PYTHON="${PYTHON:-python3}"
EXTRA=()
usage() { sed -n '2,5p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --config) CONFIG="$2"; shift 2 ;;
    --workdir) WORKDIR="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
done
[ -n "$CONFIG" ] && [ -n "$WORKDIR" ] || { echo "need --config and --workdir" >&2; exit 2; }
CMD=("$PYTHON" -m mlcd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [ -n "$DRY" ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
mkdir -p "$WORKDIR"
"${CMD[@]}" 2>&1 | tee -a "$WORKDIR/train.log"

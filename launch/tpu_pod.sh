#!/usr/bin/env bash
# Train on Cloud TPU VM slices (queued resources; multislice with --num-slices): see launch/README.md.
#
#   launch/tpu_pod.sh {create|run|status|logs|stop|delete} --name NAME --zone ZONE --type TYPE
#       [--num-slices N] [--spot|--reserved] [--version IMAGE] [--config FILE --workdir DIR] [--dry-run]
#       [-- --config.key=value ...]
#
# create: queue the slice(s), wait until ACTIVE, install this checkout into ~/mlcd_jax_venv on every worker.
# run:    create if needed (a preempted spot slice is deleted and recreated), then train detached; the same
#         --workdir resumes. stop: SIGTERM (checkpoint, exit 75). status, logs, delete: as named.
# gcloud comes from $GCLOUD (default gcloud); the launcher needs python3 (stdlib) from $PYTHON.
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/tpu_launcher.py" "$@"

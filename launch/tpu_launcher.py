"""Cloud TPU VM slices for mlcd_jax: create, train detached, watch, stop, resume, delete.

``launch/tpu_pod.sh`` runs this file (stdlib only; it needs no jax). Every cloud call goes through the
gcloud binary named by ``$GCLOUD`` (default ``gcloud``); ``--dry-run`` prints each command, shell-quoted,
and runs none (queries are assumed to find no slice, so the whole path from nothing is printed).

On each worker, under its HOME:
  ``mlcd_jax/``        the shipped tree (``git archive`` of setup.py, README.md, mlcd_jax/, configs/)
  ``mlcd_jax_venv/``   a Python >= 3.11 venv with the package's ``[tpu]`` extra, outside the tree
  ``mlcd_jax_run/``    the detached trainer's pid (``train.pid``), exit status (``train.rc``) and log
                       (``train.log``; ``WORKDIR/logs/$HOSTNAME.log`` for a local workdir), named in ``log_path``
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ("setup.py", "README.md", "mlcd_jax", "configs")  # what workers get of the checkout
PACKAGE = "mlcd_jax_package.tar.gz"  # in each worker's HOME
RUNTIMES = {  # accelerator generation -> TPU VM runtime image (Cloud TPU docs)
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# States of a queued resource, or of a node of an ACTIVE one, that pass by themselves: wait for ACTIVE.
WAITING = {"ACCEPTED", "CREATING", "PROVISIONING", "WAITING_FOR_RESOURCES", "STARTING", "RESTARTING", "REPAIRING"}
POLL_SECONDS = float(os.environ.get("MLCD_JAX_POLL_SECONDS", "30"))

# Refused while the trainer runs. Python >= 3.11 for the venv: python3.12 / python3.11 / python3 on PATH,
# else one installed by uv. The tree is unpacked again and the package reinstalled on every call.
INSTALL = r"""
set -euo pipefail
cd "$HOME"
if [ -s mlcd_jax_run/train.pid ] && kill -0 "$(cat mlcd_jax_run/train.pid)" 2>/dev/null; then
  echo "mlcd_jax: $HOSTNAME is training (pid $(cat mlcd_jax_run/train.pid)); stop it first" >&2; exit 1
fi
ok() { "$1" -c "import sys; assert sys.version_info >= (3, 11)" 2>/dev/null; }
if [ ! -x mlcd_jax_venv/bin/python ] || ! ok mlcd_jax_venv/bin/python; then
  PY=""
  for c in python3.12 python3.11 python3; do
    if command -v "$c" >/dev/null && ok "$c"; then PY="$(command -v "$c")"; break; fi
  done
  if [ -z "$PY" ]; then
    python3 -m pip install --user -q uv >/dev/null 2>&1 && "$HOME/.local/bin/uv" python install -q 3.11 >/dev/null 2>&1 \
      && PY="$("$HOME/.local/bin/uv" python find 3.11)" || PY=""
  fi
  if [ -z "$PY" ]; then
    echo "mlcd_jax: $HOSTNAME has no Python >= 3.11 (looked for python3.12, python3.11, python3 on PATH) and pip install --user uv + uv python install 3.11 failed; install one and re-run" >&2
    exit 1
  fi
  rm -rf mlcd_jax_venv
  "$PY" -m venv mlcd_jax_venv
fi
rm -rf mlcd_jax && mkdir mlcd_jax && tar -xzf PACKAGE -C mlcd_jax --strip-components=1
mlcd_jax_venv/bin/python -m pip uninstall -q -y mlcd_jax >/dev/null 2>&1 || true
mlcd_jax_venv/bin/python -m pip install -q "mlcd_jax[tpu] @ file://$HOME/PACKAGE"
echo "$HOSTNAME: mlcd_jax installed in ~/mlcd_jax_venv ($(mlcd_jax_venv/bin/python --version))"
""".replace("PACKAGE", PACKAGE)

# The trainer, detached (setsid + nohup, stdin closed; after INSTALL, which refuses while one runs): it
# survives the ssh session; its pid and exit status land in ~/mlcd_jax_run. Placeholders: LOG (log file), ARGS (the quoted trainer arguments).
START = r"""
set -euo pipefail
mkdir -p "$HOME/mlcd_jax_run" && cd "$HOME/mlcd_jax_run"
rm -f train.rc train.pid
log=LOG; mkdir -p "$(dirname "$log")"; echo "$log" > log_path
setsid nohup bash -c "\"\$@\" & echo \$! > train.pid; wait \$!; echo \$? > train.rc" trainer \
  "$HOME/mlcd_jax_venv/bin/python" -m mlcd_jax.main ARGS >>"$log" 2>&1 </dev/null &
for _ in $(seq 50); do [ -s train.pid ] && break; sleep 0.1; done
echo "$HOSTNAME: training (pid $(cat train.pid)), log $log"
"""

# SIGTERM to the trainer (it checkpoints and exits 75), then wait for it to exit.
STOP = r"""
cd "$HOME/mlcd_jax_run" 2>/dev/null && [ -s train.pid ] && kill -TERM "$(cat train.pid)" 2>/dev/null \
  || { echo "$HOSTNAME: not training"; exit 0; }
while kill -0 "$(cat train.pid)" 2>/dev/null; do sleep 1; done
for _ in $(seq 50); do [ -s train.rc ] && break; sleep 0.1; done
echo "$HOSTNAME: trainer exited with status $(cat train.rc 2>/dev/null || echo unknown)"
"""

STATUS = r"""
cd "$HOME/mlcd_jax_run" 2>/dev/null || { echo "$HOSTNAME: never trained"; exit 0; }
if [ -s train.pid ] && kill -0 "$(cat train.pid)" 2>/dev/null; then echo "$HOSTNAME: training (pid $(cat train.pid))"
elif [ "$(cat train.rc 2>/dev/null)" = 75 ]; then echo "$HOSTNAME: stopped with a checkpoint (status 75); run resumes"
elif [ -s train.rc ]; then echo "$HOSTNAME: exited with status $(cat train.rc)"
else echo "$HOSTNAME: not training"; fi
"""


def runtime_version(accelerator_type: str) -> str:
    """The TPU VM runtime image for an accelerator type such as ``v5p-64`` or ``v5litepod-16``."""
    generation = accelerator_type.split("-", 1)[0].lower()
    if generation not in RUNTIMES:
        raise SystemExit(f"tpu_pod: no runtime image known for --type {accelerator_type}; pass --version")
    return RUNTIMES[generation]


class Slice:
    """One queued resource ``name`` holding ``num_slices`` TPU VM slices, driven through gcloud."""

    def __init__(self, args: argparse.Namespace, overrides: list[str]) -> None:
        self.args, self.overrides = args, overrides
        self.gcloud = [os.environ.get("GCLOUD", "gcloud")]
        self.zone = ["--zone", args.zone]
        self.nodes = ([args.name] if args.num_slices == 1
                      else [f"{args.name}-{i}" for i in range(args.num_slices)])

    # -- running commands -------------------------------------------------------------------------
    def call(self, cmd: list[str], query: bool = False) -> subprocess.CompletedProcess | None:
        """Runs ``cmd`` (its output captured when ``query``), or prints it under --dry-run (None)."""
        if self.args.dry_run:
            print(shlex.join(cmd), flush=True)
            return None
        if query:
            return subprocess.run(cmd, capture_output=True, text=True)
        out = subprocess.run(cmd)
        if out.returncode:
            raise SystemExit(f"tpu_pod: failed (status {out.returncode}): {shlex.join(cmd)}")
        return out

    def on_workers(self, script: str) -> None:
        """Runs ``script`` (bash, the TPU VM login shell) on every worker of every slice, the slices in
        parallel."""
        cmds = [[*self.gcloud, "compute", "tpus", "tpu-vm", "ssh", node, *self.zone, "--worker=all",
                 "--command", script.strip()] for node in self.nodes]
        if self.args.dry_run:
            for cmd in cmds:
                print(shlex.join(cmd), flush=True)
            return
        procs = [subprocess.Popen(cmd) for cmd in cmds]
        failed = [node for node, p in zip(self.nodes, procs) if p.wait()]
        if failed:
            raise SystemExit(f"tpu_pod: failed on a worker of {', '.join(failed)} (its output is above)")

    # -- the slice --------------------------------------------------------------------------------
    def state(self) -> str | None:
        """The queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...), None when absent;
        a slice whose nodes are not all READY (a preempted spot slice) is reported as its node's state."""
        qr = self.call([*self.gcloud, "compute", "tpus", "queued-resources", "describe", self.args.name,
                        *self.zone, "--format=value(state.state)"], query=True)
        if qr is None or qr.returncode:
            return None
        state = qr.stdout.strip()
        if state != "ACTIVE":
            return state
        for node in self.nodes:
            out = self.call([*self.gcloud, "compute", "tpus", "tpu-vm", "describe", node, *self.zone,
                             "--format=value(state)"], query=True)
            node_state = out.stdout.strip() if out and not out.returncode else "MISSING"
            if node_state != "READY":
                return node_state
        return state

    def request(self) -> None:
        """Requests the slice(s) as a queued resource, waits until ACTIVE and installs every worker."""
        args = self.args
        nodes = (["--node-id", args.name] if args.num_slices == 1
                 else ["--node-count", str(args.num_slices), "--node-prefix", args.name])
        tier = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
        self.call([*self.gcloud, "compute", "tpus", "queued-resources", "create", args.name, *self.zone,
                   "--accelerator-type", args.type, "--runtime-version", args.version or runtime_version(args.type),
                   *nodes, *tier])
        self.wait_active()
        self.install()

    def wait_active(self) -> None:
        """Polls the queued resource until it is ACTIVE with every node READY."""
        while (state := self.state()) != "ACTIVE" and not self.args.dry_run:
            if state is not None and state not in WAITING:
                raise SystemExit(f"tpu_pod: queued resource {self.args.name} is {state}")
            print(f"{self.args.name}: {state or 'not visible yet'}; waiting", flush=True)
            time.sleep(POLL_SECONDS)

    def create(self) -> None:
        """Makes the slice usable and installs the current checkout on it: requests it if absent, waits if
        queued, and deletes and requests it again if it was preempted or failed."""
        state = self.state()
        if state is not None and state != "ACTIVE" and state not in WAITING:
            print(f"{self.args.name} is {state} (preempted or failed): deleting and recreating it", flush=True)
            self.delete()
            state = None
        if state is None:
            self.request()
            return
        self.wait_active()
        self.install()

    def install(self) -> None:
        """Ships the package (``git archive``: tracked files, uncommitted edits included; never a venv or a
        cache) to every worker and installs it with its ``[tpu]`` extra into ``~/mlcd_jax_venv``."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = os.path.join(tmp, PACKAGE)
            git = ["git", "-C", str(REPO)]
            stash = self.call([*git, "stash", "create"], query=True)  # a commit of the edited tree, or ""
            ref = (stash.stdout.strip() if stash and not stash.returncode else "") or "HEAD"
            self.call([*git, "archive", "--format=tar.gz", "--prefix=mlcd_jax/", "-o", archive, ref, *SHIPPED])
            for node in self.nodes:
                self.call([*self.gcloud, "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:{PACKAGE}",
                           *self.zone, "--worker=all"])
            self.on_workers(INSTALL)

    def delete(self) -> None:
        """Deletes the queued resource and its TPU VMs."""
        self.call([*self.gcloud, "compute", "tpus", "queued-resources", "delete", self.args.name, *self.zone,
                   "--force", "--quiet"])

    # -- training ---------------------------------------------------------------------------------
    def log_file(self) -> str:
        """The worker's log path as a bash word: in a local workdir, else in ~/mlcd_jax_run."""
        workdir = self.args.workdir
        if workdir and "://" not in workdir:
            return shlex.quote(os.path.join(workdir, "logs")) + '/"$HOSTNAME.log"'
        return '"$HOME/mlcd_jax_run/train.log"'

    def trainer_args(self) -> list[str]:
        """``mlcd_jax.main``'s arguments on a worker (run from ~/mlcd_jax_run; configs from ~/mlcd_jax)."""
        path, sep, variant = self.args.config.partition(":")
        local = (Path(path) if Path(path).exists() else REPO / path).resolve()
        try:
            path = "../mlcd_jax/" + local.relative_to(REPO).as_posix()
        except ValueError:
            raise SystemExit(f"tpu_pod: --config {path} is outside {REPO}; put it under configs/ (it is shipped)")
        return [f"--config={path}{sep}{variant}", f"--workdir={self.args.workdir}", *self.overrides]

    def run(self) -> None:
        """Ensures the slice (recreating a preempted one) and starts the trainer detached on every worker;
        with the same --workdir it resumes from the newest checkpoint."""
        if not (self.args.config and self.args.workdir):
            raise SystemExit("tpu_pod: run needs --config and --workdir")
        if "://" not in self.args.workdir:
            print(f"warning: --workdir {self.args.workdir} is not gs://; TPU workers do not share local disks",
                  file=sys.stderr)
        command = " ".join(shlex.quote(a) for a in self.trainer_args())
        script = START.replace("LOG", self.log_file()).replace("ARGS", command)
        self.create()
        self.on_workers(script)

    def status(self) -> None:
        """The queued resource's state and, when ACTIVE, whether each worker trains."""
        state = self.state()
        print(f"{self.args.name}: {state or 'absent'}", flush=True)
        if state == "ACTIVE" or self.args.dry_run:
            self.on_workers(STATUS)

    def logs(self) -> None:
        """The last 100 lines of every worker's log of its latest run, each prefixed with its host name."""
        self.on_workers('tail -n 100 "$(cat "$HOME/mlcd_jax_run/log_path")" | sed "s/^/$HOSTNAME: /"')

    def stop(self) -> None:
        """SIGTERM to every worker's trainer, which checkpoints and exits 75; waits until they exited."""
        self.on_workers(STOP)


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """The launcher's arguments and the trainer overrides after ``--`` (each kept as one argument)."""
    overrides: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, overrides = argv[:at], argv[at + 1:]
    p = argparse.ArgumentParser(prog="launch/tpu_pod.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["create", "run", "status", "logs", "stop", "delete"])
    p.add_argument("--name", required=True, help="queued resource (and node) name")
    p.add_argument("--zone", required=True)
    p.add_argument("--type", required=True, help="accelerator type, e.g. v5p-64, v5litepod-16, v4-32, v6e-16")
    p.add_argument("--num-slices", type=int, default=1, help="slices of --type (multislice when > 1)")
    tier = p.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity (may be preempted)")
    tier.add_argument("--reserved", action="store_true", help="the project's reservation")
    p.add_argument("--version", help="runtime image (default: the one for --type's generation)")
    p.add_argument("--config", help="config file in this checkout, e.g. configs/vitl14.py")
    p.add_argument("--workdir", help="gs://BUCKET/run: checkpoints, metrics (shared by all workers)")
    p.add_argument("--dry-run", action="store_true", help="print every command, run none")
    return p.parse_args(argv), overrides


def check(args: argparse.Namespace) -> None:
    """The arguments' mistakes, before any gcloud call: an accelerator type not named as Cloud TPU names
    slices (``v5p-64``, ``v5litepod-16``), fewer than one slice, a config file that is not there."""
    if not re.fullmatch(r"v\d+[a-z]*-[1-9]\d*", args.type):  # a newer generation needs --version
        raise SystemExit(f"tpu_pod: --type {args.type!r} is not an accelerator type such as v5p-64, v5litepod-16, "
                         "v4-32 or v6e-16")
    if args.num_slices < 1:
        raise SystemExit(f"tpu_pod: --num-slices {args.num_slices} must be at least 1")
    if args.version is None:
        runtime_version(args.type)  # an unknown generation
    path = (args.config or "").partition(":")[0]
    if path and not (Path(path).is_file() or (REPO / path).is_file()):
        raise SystemExit(f"tpu_pod: --config {path} is not a file in this checkout (e.g. configs/vitl14.py)")


def main(argv: list[str]) -> None:
    """Runs one launcher command; a mistake is one ``tpu_pod:`` line on stderr and exit status 2."""
    args, overrides = parse(argv)
    try:
        check(args)
        getattr(Slice(args, overrides), args.command)()
    except SystemExit as stop:
        if isinstance(stop.code, str):  # a message: this launcher's one-line errors
            print(stop.code, file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main(sys.argv[1:])

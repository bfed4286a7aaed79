"""A fake ``gcloud`` for the TPU launcher's rehearsal: a slice is N local workers (``$GCLOUD`` names it).

Environment:
  FAKE_GCLOUD_DIR      its state: ``state.json`` (queued resources, nodes) and each worker's HOME,
                       ``nodes/NODE/worker-I`` (wiped when the node is deleted, as a VM's disk)
  FAKE_GCLOUD_WORKERS  workers per slice (default 2); FAKE_GCLOUD_DEVICES: CPU devices each (default 4)
  FAKE_GCLOUD_PYTHON   ``3.11`` (default): python3 and python3.11 on the workers' PATH are this
                       interpreter's base; ``3.10``: only a ``python3`` that reports 3.10 (Ubuntu 22.04's),
                       whose ``-m pip install --user uv`` installs an emulated ``uv`` (``uv python install
                       3.11`` / ``uv python find 3.11`` give the same base interpreter)

``compute tpus tpu-vm ssh NODE --worker=all --command CMD`` runs ``bash -c CMD`` in every worker at once,
in its HOME, with what a TPU runtime gives a JAX process (here: ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``XLA_FLAGS`` with the fake devices, ``JAX_PLATFORMS=cpu``), a
system PATH without this machine's Pythons, and ``HOSTNAME=NODE-w-I``.

Offline installs: workers have no package index. pip runs with PIP_NO_INDEX / PIP_NO_DEPS /
PIP_NO_BUILD_ISOLATION, so it installs only the shipped package into the worker's venv, and a
``sitecustomize`` puts this interpreter's site-packages, less mlcd_jax itself, on the workers' ``sys.path``
(much as ``--system-site-packages`` would): jax and the other dependencies come from there, mlcd_jax only
from the venv.

``queued-resources create`` makes the nodes at once; its first ``describe`` reports WAITING_FOR_RESOURCES,
then ACTIVE. Extra commands for tests: ``fake preempt NODE`` kills the node's processes (SIGKILL) and marks
it PREEMPTED (its queued resource SUSPENDED).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

STATE_DIR = Path(os.environ["FAKE_GCLOUD_DIR"])
STATE = STATE_DIR / "state.json"
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
HIDDEN = ("python", "pip", "pydoc", "idle", "uv")  # this machine's Pythons and tools are not the workers'
REAL_PYTHON = getattr(sys, "_base_executable", sys.executable)


def load() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {"queued_resources": {}, "nodes": {}}


def save(state: dict) -> None:
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps(state, indent=1))


def option(args: list[str], name: str, default: str | None = None) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``args``."""
    for i, a in enumerate(args):
        if a == name:
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def fail(message: str, code: int = 1) -> NoReturn:
    print(f"ERROR: (gcloud) {message}", file=sys.stderr)
    sys.exit(code)


def script(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/bash\n" + text)
    path.chmod(0o755)


def worker_bin() -> Path:
    """A directory standing for the workers' system PATH: this machine's system tools without its Pythons,
    plus the Python of FAKE_GCLOUD_PYTHON."""
    mode = os.environ.get("FAKE_GCLOUD_PYTHON", "3.11")
    bin_dir = STATE_DIR / f"bin-python{mode}"
    if bin_dir.exists():
        return bin_dir
    bin_dir.mkdir(parents=True)
    for directory in SYSTEM_PATH:
        for tool in Path(directory).glob("*") if Path(directory).is_dir() else ():
            if not tool.name.startswith(HIDDEN) and not (bin_dir / tool.name).exists():
                (bin_dir / tool.name).symlink_to(tool)
    if mode == "3.11":
        for name in ("python3", "python3.11"):
            script(bin_dir / name, f'exec {REAL_PYTHON} "$@"\n')
        return bin_dir
    uv_python = '"$HOME/.local/share/uv/python/cpython-3.11/bin/python3.11"'
    uv = f"""case "$*" in
  *"python install"*) mkdir -p "$(dirname {uv_python})"
    printf '#!/bin/bash\\nexec {REAL_PYTHON} "$@"\\n' > {uv_python}; chmod +x {uv_python} ;;
  *"python find"*) [ -x {uv_python} ] && echo {uv_python} || exit 2 ;;
  *) echo "fake uv: $* is not emulated" >&2; exit 2 ;;
esac
"""
    script(STATE_DIR / "uv", uv)
    script(bin_dir / "python3", f"""# Ubuntu 22.04's python3 (3.10), as far as a launcher asks it
if [ "$1 $2 $3" = "-m pip install" ] && [[ " $* " == *" uv "* ]]; then
  mkdir -p "$HOME/.local/bin" && cp {STATE_DIR / "uv"} "$HOME/.local/bin/uv"; exit 0
fi
if [ "$1" = "-c" ]; then
  exec {REAL_PYTHON} -c "import sys; sys.version_info = (3, 10, 12, 'final', 0); exec(sys.argv.pop(1))" "$2"
fi
echo "fake python3 (3.10): $* is not emulated" >&2; exit 1
""")
    return bin_dir


def site_dir() -> Path:
    """A sitecustomize that puts this interpreter's site-packages, less mlcd_jax, first on a worker's
    sys.path (its setuptools builds the package: the venv's may be too old to build wheels)."""
    custom = STATE_DIR / "sitecustomize"
    if custom.exists():
        return custom
    deps = STATE_DIR / "site-packages"
    deps.mkdir(parents=True)
    for directory in site.getsitepackages():
        for entry in Path(directory).iterdir():
            if not entry.name.startswith(("mlcd_jax", "__editable__")) and not (deps / entry.name).exists():
                (deps / entry.name).symlink_to(entry)
    custom.mkdir()
    (custom / "sitecustomize.py").write_text(
        f"import site, sys\nsite.addsitedir({str(deps)!r})  # and its .pth files\n"
        f"sys.path.remove({str(deps)!r})\nsys.path.insert(0, {str(deps)!r})  # its setuptools, not the venv's\n")
    return custom


def worker_env(node: str, worker: int, workers: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_COMPILATION", "JAX_PERSISTENT", "LANG", "LC_"))}
    home = STATE_DIR / "nodes" / node / f"worker-{worker}"
    env.update(
        HOME=str(home), HOSTNAME=f"{node}-w-{worker}", PATH=f"{home}/.local/bin:{worker_bin()}",
        PYTHONPATH=str(site_dir()), PIP_NO_INDEX="1", PIP_NO_DEPS="1", PIP_NO_BUILD_ISOLATION="0",  # pip reads "0" as --no-build-isolation
        PIP_DISABLE_PIP_VERSION_CHECK="1", FAKE_GCLOUD_WORKER=f"{node}/{worker}",
        JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(workers), JAX_PROCESS_ID=str(worker),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={os.environ.get('FAKE_GCLOUD_DEVICES', '4')}",
        JAX_PLATFORMS="cpu",
    )
    return env


def kill_node(node: str) -> None:
    """SIGKILL to every process started on ``node``'s workers (found by their environment)."""
    tag = f"FAKE_GCLOUD_WORKER={node}/".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(v.startswith(tag) for v in (proc / "environ").read_bytes().split(b"\0")):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def queued_resources(verb: str, name: str, args: list[str]) -> None:
    state = load()
    qrs, nodes = state["queued_resources"], state["nodes"]
    if verb == "create":
        if name in qrs:
            fail(f"queued resource {name} already exists", 1)
        if option(args, "--node-count", "1") != "1":
            fail("the fake emulates one slice (no --node-count)", 2)
        node = option(args, "--node-id")
        workers = int(os.environ.get("FAKE_GCLOUD_WORKERS", "2"))
        qrs[name] = {"state": "ACTIVE", "waits": 1, "nodes": [node], "args": args}
        nodes[node] = {"state": "READY", "workers": workers, "queued_resource": name}
        for i in range(workers):
            (STATE_DIR / "nodes" / node / f"worker-{i}").mkdir(parents=True)
    elif name not in qrs:
        fail(f"NOT_FOUND: queued resource {name}", 1)
    elif verb == "describe":
        qr = qrs[name]
        if qr["waits"]:
            qr["waits"] -= 1
            print("WAITING_FOR_RESOURCES")
        else:
            print(qr["state"])
    elif verb == "delete":
        if "--force" not in args and qrs[name]["nodes"]:
            fail("queued resource has nodes; use --force", 1)
        for node in qrs.pop(name)["nodes"]:
            kill_node(node)
            nodes.pop(node, None)
            shutil.rmtree(STATE_DIR / "nodes" / node, ignore_errors=True)
    save(state)


def ssh(node: str, args: list[str]) -> None:
    info = load()["nodes"].get(node) or fail(f"NOT_FOUND: node {node}")
    if info["state"] != "READY":
        fail(f"node {node} is {info['state']}", 255)
    command, port, workers = option(args, "--command"), free_port(), info["workers"]
    procs = [subprocess.Popen(["bash", "-c", command], cwd=STATE_DIR / "nodes" / node / f"worker-{i}",
                              env=worker_env(node, i, workers, port), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
             for i in range(workers)]
    outs = [p.communicate() for p in procs]
    for out, err in outs:
        sys.stdout.write(out)
        sys.stderr.write(err)
    sys.exit(max(p.returncode for p in procs))


def scp(args: list[str]) -> None:
    src, dst = [a for a in args if not a.startswith("--") and a != option(args, "--zone")][:2]
    node, _, path = dst.partition(":")
    info = load()["nodes"].get(node) or fail(f"NOT_FOUND: node {node}")
    path = path.removeprefix("~/")
    if os.path.isabs(path):
        fail("the fake takes home-relative destinations only", 2)
    for i in range(info["workers"]):
        target = STATE_DIR / "nodes" / node / f"worker-{i}" / path
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, target)


def main(argv: list[str]) -> None:
    if argv[:2] == ["fake", "preempt"]:
        state = load()
        kill_node(argv[2])
        state["nodes"][argv[2]]["state"] = "PREEMPTED"
        state["queued_resources"][state["nodes"][argv[2]]["queued_resource"]]["state"] = "SUSPENDED"
        save(state)
        return
    if argv[:3] == ["compute", "tpus", "queued-resources"]:
        return queued_resources(argv[3], argv[4], argv[5:])
    if argv[:3] != ["compute", "tpus", "tpu-vm"]:
        fail(f"the fake does not emulate: {' '.join(argv)}", 2)
    verb, rest = argv[3], argv[4:]
    if verb == "ssh":
        return ssh(rest[0], rest[1:])
    if verb == "scp":
        return scp(rest)
    if verb == "describe":
        info = load()["nodes"].get(rest[0]) or fail(f"NOT_FOUND: node {rest[0]}")
        print(info["state"])
        return
    fail(f"the fake does not emulate: tpu-vm {verb}", 2)


if __name__ == "__main__":
    main(sys.argv[1:])

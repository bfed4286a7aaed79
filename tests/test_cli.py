"""``python -m mlcd_jax COMMAND``: the one command line lists its commands, runs each command's module
with that module's flags, and refuses an unknown command in one line with status 2."""

import subprocess
import sys
from pathlib import Path

from mlcd_jax.__main__ import COMMANDS

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcd_jax", *args], capture_output=True, text=True, cwd=ROOT)


def test_the_commands_are_listed_and_an_unknown_one_is_one_line():
    assert set(COMMANDS) == {"train", "eval", "cluster", "study", "aot", "export"}
    bare = _run()
    assert bare.returncode == 2 and all(f"  {name} " in bare.stdout for name in COMMANDS), bare.stdout
    assert _run("--help").returncode == 0
    unknown = _run("fit")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("config error: unknown command 'fit': choose one of "
                                      "train, eval, cluster, study, aot, export")


def test_a_command_runs_its_module_with_its_flags():
    out = _run("aot", "--help")
    assert "--topology" in out.stdout, out.stderr[-2000:]  # absl prints the help, exits 1
    out = _run("cluster", "--config=configs/cluster/default.py", "--config.source=digits:train",
               "--config.num_clusters=100000", "--dry-run")
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith("config error: "), out.stderr[-2000:]

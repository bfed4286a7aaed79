"""``python -m mlcd_jax COMMAND [flags]``: one command line for every job of the package.

=========  =====================================  ==============================================
command    runs                                   what it does
=========  =====================================  ==============================================
train      ``python -m mlcd_jax.main``            cluster if needed, train, evaluate
eval       ``python -m mlcd_jax.evaluate``        evaluate a trained run (or a released model)
cluster    ``python -m mlcd_jax.cluster``         the offline clustering job
study      ``python -m mlcd_jax.study``           a seeded config sweep, mean ± std
aot        ``python -m mlcd_jax.aot``             compile for a TPU slice: the memory plan
export     ``python -m mlcd_jax.export``          a trained run as a Hugging Face model
=========  =====================================  ==============================================

Each command takes the flags of the module it runs (``python -m mlcd_jax train --help``) and exits as
that module does; the statuses are :mod:`mlcd_jax.cli`'s: 0 done, 2 a configuration or input error (one
``config error:`` line), 3 training diverged, 75 stopped by a signal (re-run the same command to resume).
"""

from __future__ import annotations

import runpy
import sys

COMMANDS = {
    "train": ("mlcd_jax.main", "cluster if needed, train, evaluate"),
    "eval": ("mlcd_jax.evaluate", "evaluate a trained run (or a released model: --model=hf-hub:ORG/NAME)"),
    "cluster": ("mlcd_jax.cluster", "the offline clustering job"),
    "study": ("mlcd_jax.study", "a seeded config sweep, mean ± std"),
    "aot": ("mlcd_jax.aot", "compile for a TPU slice: the memory plan"),
    "export": ("mlcd_jax.export", "a trained run as a Hugging Face model"),
}


def usage() -> str:
    """The command list, as ``python -m mlcd_jax`` prints it."""
    lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: python -m mlcd_jax COMMAND [flags]   (COMMAND --help: its flags)\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str]) -> None:
    """Runs ``argv[1]``'s module as ``__main__`` with the remaining arguments."""
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0 if len(argv) >= 2 else 2)
    if argv[1] not in COMMANDS:
        print(f"config error: unknown command {argv[1]!r}: choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        sys.exit(2)
    module = COMMANDS[argv[1]][0]
    sys.argv = [f"python -m mlcd_jax {argv[1]}", *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv)

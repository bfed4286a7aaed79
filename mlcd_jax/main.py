"""Entry point: ``python -m mlcd_jax.main --config=configs/<name>.py --workdir=DIR [--config.key=value ...]``.

Initialises multi-process JAX first (explicit flags, the ``JAX_COORDINATOR_ADDRESS`` /
``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` environment, or discovered on TPU pods and SLURM), then runs the
experiment of ``config.mode`` (``train``: cluster if needed, train, evaluate; ``eval``: evaluate a
trained workdir). Configuration errors are printed as one line and exit with status 2. The flags and the
run are :mod:`mlcd_jax.cli`'s (shared with ``python -m mlcd_jax.evaluate`` and ``mlcd_jax.study``).
"""

from absl import app, flags

from mlcd_jax import cli

if __name__ == "__main__":
    flags.adopt_module_key_flags(cli)  # --help lists the run's flags, as when they were defined here
    flags.mark_flags_as_required(["config"])
    app.run(cli.main, flags_parser=cli.parse_flags)

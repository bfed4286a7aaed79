"""``python -m mlcd_jax.evaluate --config=configs/<name>.py --workdir=DIR``: evaluate a trained run.

The same as ``python -m mlcd_jax.main ... --config.mode=eval``: kNN and linear probe of the newest
checkpoint's frozen features (and the configured baselines) on ``config.eval.source``; writes
``DIR/results.json`` and prints the table.
"""

from absl import app

from mlcd_jax import main as main_lib


def _main(argv: list[str]) -> None:
    with main_lib.FLAGS.config.unlocked():
        main_lib.FLAGS.config.mode = "eval"
    main_lib.main(argv)


if __name__ == "__main__":
    app.run(_main)

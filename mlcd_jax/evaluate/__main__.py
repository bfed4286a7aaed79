"""``python -m mlcd_jax.evaluate --workdir=DIR [--config=configs/<name>.py --config.eval.source=...]``: evaluate
a trained run.

The same as ``python -m mlcd_jax.main ... --config.mode=eval``: the evaluators of ``config.evals`` on the
newest checkpoint's frozen features (and the configured baselines) on ``config.eval.source``; writes
``DIR/results.json`` and prints the table. The run is evaluated as its ``DIR/config.json`` says; a
``--config`` may change only evaluation keys (``eval.*``, ``evals.*``, devices).
"""

import functools

from absl import app

from mlcd_jax import cli

if __name__ == "__main__":
    app.run(functools.partial(cli.main, mode="eval"), flags_parser=cli.parse_flags)

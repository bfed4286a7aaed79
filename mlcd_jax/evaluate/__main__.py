"""``python -m mlcd_jax.evaluate --workdir=DIR [--config=configs/<name>.py --config.eval.source=...]``: evaluate
a trained run; ``--model=hf-hub:ORG/NAME[@REV]`` (or ``hf:DIR``): evaluate a released model instead.

For a run, the same as ``python -m mlcd_jax.main ... --config.mode=eval``: the evaluators of ``config.evals``
on the newest checkpoint's frozen features (and the configured baselines) on ``config.eval.source``;
writes ``DIR/results.json`` and prints the table. The run is evaluated as its ``DIR/config.json`` says; a
``--config`` may change only evaluation keys (``eval.*``, ``evals.*``, devices).

With ``--model``, an HF CLIP / MLCD checkpoint (a hub id through the hub cache, offline with
``HF_HUB_OFFLINE=1``) is evaluated as ``--config`` says (default ``configs/released.py``: kNN, the linear
probe on the devices, zero-shot when the checkpoint has a text tower) and ``DIR`` receives its
``results.json``, e.g. ``python -m mlcd_jax.evaluate --model=hf-hub:DeepGlint-AI/mlcd-vit-large-patch14-336
--config=configs/released.py:tfds:imagenet2012 --workdir=/tmp/mlcd_l14_336``.
"""

from absl import app, flags

from mlcd_jax import cli

_MODEL = flags.DEFINE_string("model", None, "A released model to evaluate instead of a run: hf-hub:ORG/NAME[@REV] "
                             "or hf:DIR (an HF CLIP / MLCD checkpoint); --workdir receives results.json.")


def main(argv: list[str]) -> None:
    cli.main(argv, mode="eval", model=_MODEL.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)

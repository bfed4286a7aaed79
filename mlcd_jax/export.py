"""``python -m mlcd_jax.export --workdir=DIR --out=DIR [--push=ORG/NAME]``: a trained run as a Hugging Face
model folder (safetensors, ``config.json``, ``preprocessor_config.json``, a model card; after CLIP / LiT a
full ``CLIPModel`` with tokenizer files), optionally uploaded to the hub. See :mod:`mlcd_jax.interop.export`.

Mistakes (not a run, no checkpoint, an unreachable or refusing hub) are one ``config error:`` line on stderr
and exit status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """The CLI's flags, defined only when run as a program (``mlcd_jax.cli`` defines its own ``--workdir``)."""
    flags.DEFINE_string("workdir", None, "The trained run's directory (local or gs://).")
    flags.DEFINE_string("out", None, "The folder to write the Hugging Face model into.")
    flags.DEFINE_string("push", None, "Also upload the folder to this hub model repository (ORG/NAME).")
    flags.mark_flags_as_required(["workdir", "out"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
    from mlcd_jax.config_lib import ConfigError
    from mlcd_jax.interop import export

    try:
        done = export.export_run(FLAGS.workdir, FLAGS.out, FLAGS.push)
        print(f"wrote {done.architecture} (step {done.step}, pipeline {done.task!r}) to {done.out}", flush=True)
        if FLAGS.push:
            print(f"pushed: {export.push(FLAGS.out, FLAGS.push)}", flush=True)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)

"""Evaluating a released image tower (an HF CLIP / MLCD checkpoint) with ``--model``, no training run:

``python -m mlcd_jax.evaluate --model=hf-hub:DeepGlint-AI/mlcd-vit-large-patch14-336 --workdir=DIR
--config=configs/released.py:tfds:imagenet2012``

The argument is ``eval.source`` (default ``fashion_mnist``); ``data.image_size`` 0 means the checkpoint's
own. kNN (k = 20) and the linear probe, on the devices (``on_device``, for sets of ImageNet's size), and
zero-shot with CLIP's 80 templates when the checkpoint is a full ``CLIPModel`` (it has a text tower);
``--config.evals.zero_shot.class_names=imagenet`` for ImageNet-1K's class names. Without ``--config``,
``python -m mlcd_jax.evaluate --model=...`` uses this file's default.
"""

import ml_collections

from mlcd_jax.config_lib import base_config


def get_config(source: str = "fashion_mnist") -> ml_collections.ConfigDict:
    c = base_config()
    c.mode = "eval"
    c.data.image_size = 0  # the checkpoint's own
    c.eval.source = source
    c.evals.linear.on_device = True
    c.evals.zero_shot = dict(type="zero_shot", every=0, templates="clip80")
    del c.evals["pictures"]  # patch-PCA pictures are drawn into a training run's workdir
    return c

"""The embedded demo: Fashion-MNIST (Debian's dataset-fashion-mnist; digits as fallback) on a CPU.

First use clusters the 60,000 training images with the pixel teacher (PCA of the pixels) into a cache,
then trains a small ViT with MLCD on all local devices (8 fake CPU devices on a CPU-only machine), then
evaluates kNN / linear probe on frozen features against raw pixels, the teacher, a random-init ViT and
the single-label (UNICOM-style) baseline trained the same way. All keys are the trainer's, so
``--config.num_train_steps=...`` etc. work. ``get_config("digits")`` forces the digits fallback.
"""

import os

import ml_collections

from mlcd_jax.cluster import default_config as cluster_config
from mlcd_jax.config_lib import base_config

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def get_config(arg: str = ""):
    c = base_config()
    fashion = arg != "digits" and os.path.isdir(FASHION_MNIST_DIR)
    if arg != "digits" and not fashion:
        print(f"notice: {FASHION_MNIST_DIR} not found (apt-get install dataset-fashion-mnist); "
              "the demo uses scikit-learn's bundled digits instead")
    source = "fashion_mnist" if fashion else "digits"

    c.model.name = "tiny"
    c.model.overrides = ml_collections.ConfigDict({"patch_size": 4})
    c.model.dtype = "float32"  # bf16 is slower than fp32 on most CPUs
    c.data.image_size = 28 if fashion else 16
    c.data.augment = True

    c.data.cluster = cluster_config()
    c.data.cluster.source = f"{source}:train"
    c.data.cluster.teacher = "pixels"
    c.data.cluster.num_clusters = 1024
    c.data.cluster.top_l = 8
    c.data.cluster.progress = False

    c.loss.num_classes = 1024
    c.loss.top_l = 8
    c.loss.sample_ratio = 0.5

    c.batch_size = 256
    c.num_train_steps = 400
    c.learning_rate = 2e-3
    c.weight_decay = 0.05
    c.warmup_steps = 40
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200

    c.eval.source = source
    c.eval.train_limit = 10_000
    c.eval.test_limit = 2_000
    c.eval.baselines = "pixels,teacher,random_init,single_label"
    return c

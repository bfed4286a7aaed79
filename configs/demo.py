"""The embedded demo: Fashion-MNIST (Debian's dataset-fashion-mnist, or its IDX files fetched with tfds's
download manager when online; scikit-learn's digits as the offline fallback) on a CPU, sized for its data.

First use clusters the training images with the pixel teacher (PCA of the pixels) into a cache, then
trains a small ViT with MLCD on all local devices (8 fake CPU devices on a CPU-only machine), then
evaluates kNN / linear probe on frozen features against raw pixels, the teacher, a random-init ViT and
the single-label (UNICOM-style) baseline trained the same way. All keys are the trainer's, so
``--config.num_train_steps=...`` etc. work. ``get_config("digits")`` forces the digits fallback.

Sizing (per dataset, below): k keeps ~60 images per prototype on Fashion-MNIST (60,000 images) and
~6 on digits (1,437), fine-grained against the 10 classes as in the paper (1M prototypes for 400M
images); the random-resized crop keeps at least 40 % of a 28- or 8-pixel image (0.08, the ImageNet
default, leaves a few pixels of a digit, and the teacher labelled the whole image); the prototypes
start at N(0, 0.01^2) and learn at the backbone's rate, as PartialFC's (config_lib; docs/results.md,
"The MLCD demo", has the seeded ablation). Digits trains 2,000 steps: its loss still fell at 1,000, and
on held-out train images (never the test split) kNN rose from 94.4 to 96.9 % between 1,000 and 2,000
steps (the 2026-11-27 study, with that day's head: git show 720a1f1:benchmarks/RESULTS.md).
"""

import ml_collections

from mlcd_jax.cluster.config import default_config as cluster_config
from mlcd_jax.config_lib import base_config
from mlcd_jax.data.sources import fashion_mnist

# Per dataset: image size, k, steps (batch 256).
SIZING = {
    "fashion_mnist": dict(image_size=28, num_clusters=1024, steps=500),
    "digits": dict(image_size=16, num_clusters=256, steps=2000),
}


def get_config(arg: str = ""):
    c = base_config()
    source = "digits" if arg == "digits" else fashion_mnist.demo_source()
    sizing = SIZING["digits" if source == "digits" else "fashion_mnist"]

    c.model.name = "tiny"
    c.model.overrides = ml_collections.ConfigDict({"patch_size": 4, "depth": 2})
    c.model.dtype = "float32"  # bf16 is slower than fp32 on most CPUs
    c.data.image_size = sizing["image_size"]
    c.data.augment = True
    c.data.crop_scale = (0.4, 1.0)

    c.data.cluster = cluster_config()
    c.data.cluster.source = f"{source}:train"
    c.data.cluster.teacher = "pixels"
    c.data.cluster.num_clusters = sizing["num_clusters"]
    c.data.cluster.top_l = 8
    c.data.cluster.progress = False

    c.loss.num_classes = sizing["num_clusters"]
    c.loss.top_l = 8
    c.loss.sample_ratio = 0.5

    c.batch_size = 256
    c.num_train_steps = sizing["steps"]
    c.learning_rate = 2e-3
    c.weight_decay = 0.05
    c.warmup_steps = 50
    c.log_every_steps = 100
    c.checkpoint_every_steps = 500

    c.eval.source = source
    c.eval.train_limit = 10_000
    c.eval.test_limit = 2_000
    c.eval.baselines = "pixels,teacher,random_init,single_label"
    return c

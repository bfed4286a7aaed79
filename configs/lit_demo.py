"""The offline image-text demo: a CLIP text tower trained with LiT (or CLIP / FLIP from scratch) on the
demo's images and their captions, evaluated by zero-shot classification and image<->text retrieval.

``get_config()`` / ``get_config("digits")``: the MLCD demo's data (Fashion-MNIST, else digits), whose
records carry templated class captions ("a photo of a sneaker.", ``mlcd_jax.data.sources``); the same
cluster cache as ``configs/demo.py``. ``get_config("emoji")``: Debian's ``fonts-noto-color-emoji`` rendered
with Pillow, each emoji captioned by its Unicode name ("sunrise over mountains"): the train split to
train on, retrieval on the test split.

``loss.kind``: ``lit`` (default) trains the text tower against the image tower of ``loss.image_tower``
(``workdir:DIR`` of an MLCD demo run with the same model; "" = the random-init ViT of ``seed``); ``clip``
trains both towers from scratch (add ``--config.data.patch_drop=0.5`` for FLIP); ``protoclip`` is CLIP plus
ProtoCLIP's episodic prototype losses (TF-IDF captions as the external teacher). The text tower is CLIP's
layout at the demo's size (width 64, 2 layers), context 16 tokens (the captions are short); LiT's
recipe (AdamW, lr 1e-3, weight decay 0.2, as the MLCD paper's text tower).
"""

import importlib.util
import os

import ml_collections


def _demo_config(arg: str) -> ml_collections.ConfigDict:
    """configs/demo.py's config (the same model, data and cluster cache)."""
    spec = importlib.util.spec_from_file_location("demo_config", os.path.join(os.path.dirname(__file__), "demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


# emoji: ~1,000 training images, 32 px colour; k keeps ~10 images per prototype.
EMOJI = dict(image_size=32, num_clusters=100, steps=600)


def get_config(arg: str = ""):
    c = _demo_config("digits" if arg == "digits" else "")
    c.loss.kind = "lit"
    c.loss.image_tower = ""
    c.text.name = "tiny"
    c.text.overrides = ml_collections.ConfigDict({"width": 64, "depth": 2, "num_heads": 4, "mlp_dim": 256})
    c.text.context_length = 16
    c.learning_rate = 1e-3
    c.weight_decay = 0.2
    c.eval.baselines = ""
    c.evals = ml_collections.ConfigDict()
    c.evals.zero_shot = dict(type="zero_shot", every=0, templates="captions")
    c.evals.knn = dict(type="knn", every=0, k=20)
    c.evals.linear = dict(type="linear_probe", every=0)
    c.evals.retrieval = dict(type="retrieval", every=-1, source="", split="test", limit=0)
    # loss.kind=protoclip: 50-batch episodes (12,800 pairs at batch 256: 10 episodes in Fashion-MNIST's 500
    # steps), k = 256 per modality (the released 10 pairs per prototype would be 1,280 clusters of 60
    # distinct captions here).
    c.protoclip.episode_size = 50 * c.batch_size
    c.protoclip.num_clusters = 256
    c.protoclip.head_hidden = 256
    if arg == "emoji":
        c.data.image_size = EMOJI["image_size"]
        c.data.cluster.source = "emoji:train"
        c.data.cluster.num_clusters = c.loss.num_classes = EMOJI["num_clusters"]
        c.num_train_steps = EMOJI["steps"]
        c.batch_size = 128
        c.protoclip.episode_size = 50 * c.batch_size
        c.eval.source = "emoji"  # captions, no class labels: retrieval only
        for name in ("zero_shot", "knn", "linear"):
            c.evals[name]["every"] = -1
        c.evals.retrieval["every"] = 0
    return c

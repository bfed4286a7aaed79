"""Vision Transformer family (CLIP layout, optional 2-D RoPE), CLIP's text tower, and their size presets.

Frozen features of either tower in batches (evaluation, clustering teachers) are in
:mod:`mlcd_jax.models.features`, imported from there (it loads the data pipeline's eval preprocessing)."""

from mlcd_jax.models.presets import (
    PRESETS,
    TEXT_PRESETS,
    TextConfig,
    ViTConfig,
    flops_per_image,
    get_preset,
    get_text_preset,
    macs_per_image,
)
from mlcd_jax.models.text import TextTransformer
from mlcd_jax.models.vit import VisionTransformer

__all__ = [
    "PRESETS",
    "TEXT_PRESETS",
    "TextConfig",
    "TextTransformer",
    "ViTConfig",
    "VisionTransformer",
    "flops_per_image",
    "get_preset",
    "get_text_preset",
    "macs_per_image",
]

"""Vision Transformer family (CLIP layout, optional 2-D RoPE) and its size presets."""

from mlcd_jax.models.presets import PRESETS, ViTConfig, flops_per_image, get_preset, macs_per_image
from mlcd_jax.models.vit import VisionTransformer

__all__ = ["PRESETS", "ViTConfig", "VisionTransformer", "flops_per_image", "get_preset", "macs_per_image"]

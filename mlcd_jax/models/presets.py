"""Model sizes: ViT widths/depths composed with patch sizes and resolutions (and their FLOPs), and
CLIP's text towers (:class:`TextConfig`, :data:`TEXT_PRESETS`).

Sizes follow OpenCLIP's model configs (B, L, H, g, bigG); ``bigG/14`` is the released MLCD-bigG layout
(2-D RoPE instead of an absolute position table, exact GELU, no projection, as ``MLCDVisionModel``).
The CLIP-layout presets use QuickGELU like OpenAI CLIP and the released ``mlcd-vit-large-patch14-336``.

FLOPs convention: :func:`flops_per_image` counts 2 FLOPs per multiply-accumulate of every matmul
(patch embedding, q/k/v/out projections, the two attention products, the MLP, the projection). That
is what OpenCLIP's ``docs/model_profile.csv`` lists as ``image_gflops`` (its default profiler,
``torch.utils.flop_counter``, counts 2 per MAC): 8.82 / 35.13 / 162.03 GFLOPs for B/32, B/16, L/14
at 224 px; ours agree within 0.01 % for every preset here (tests/test_vit.py). Its older fvcore profiler
reports multiply-adds ("GMACs", half of that): :func:`macs_per_image`. Use the 2 x MAC figure for
MFU (x3 for a training step). LayerNorm, softmax, activations and RoPE (elementwise, < 1 %) are
not counted, as in both profilers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal, TypeVar

Activation = Literal["gelu", "quick_gelu"]
ACTIVATIONS: tuple[str, ...] = ("gelu", "quick_gelu")


class _Tower:
    """What both towers' shapes derive the same way (mixed into the config dataclasses)."""

    width: int
    num_heads: int
    proj_dim: int | None

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def embed_dim(self) -> int:
        """Size of the pooled output: the projection's width, or the model width without one."""
        return self.proj_dim or self.width


@dataclasses.dataclass(frozen=True)
class ViTConfig(_Tower):
    """Shape of a CLIP-layout ViT (optionally with MLCD's 2-D RoPE instead of the position table)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: int
    image_size: int
    num_channels: int = 3
    act: Activation = "quick_gelu"
    rope: bool = False
    proj_dim: int | None = None
    layer_norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_heads", "mlp_dim", "patch_size", "image_size", "num_channels"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"ViTConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(
                f"ViTConfig width {self.width} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the width"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"ViTConfig image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"ViTConfig.act {self.act!r} is not one of {ACTIVATIONS}")
        if self.rope and self.head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head dim divisible by 4 (rows and columns each rotate a quarter "
                f"pair); width {self.width} / {self.num_heads} heads = {self.head_dim}"
            )
        if self.proj_dim is not None and self.proj_dim <= 0:
            raise ValueError(f"ViTConfig.proj_dim must be positive or None, got {self.proj_dim}")


    @property
    def grid_size(self) -> int:
        """Patches per side at ``image_size``."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2



@dataclasses.dataclass(frozen=True)
class TextConfig(_Tower):
    """Shape of CLIP's text transformer (causal, pooled at the first ``eos_token_id``)."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    proj_dim: int | None
    vocab_size: int = 49408
    context_length: int = 77
    act: Activation = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        for name in ("width", "depth", "num_heads", "mlp_dim", "vocab_size", "context_length"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"TextConfig.{name} must be positive, got {getattr(self, name)}")
        if self.width % self.num_heads:
            raise ValueError(
                f"TextConfig width {self.width} is not divisible by num_heads {self.num_heads}; "
                "pick a head count that divides the width"
            )
        if self.act not in ACTIVATIONS:
            raise ValueError(f"TextConfig.act {self.act!r} is not one of {ACTIVATIONS}")
        if self.proj_dim is not None and self.proj_dim <= 0:
            raise ValueError(f"TextConfig.proj_dim must be positive or None, got {self.proj_dim}")
        if not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(
                f"TextConfig.eos_token_id {self.eos_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )



_Config = TypeVar("_Config", ViTConfig, TextConfig)


# One table: size -> shape (OpenCLIP widths; "bigG" is the MLCD-bigG RoPE layout).
_SIZES: dict[str, dict[str, object]] = {
    "tiny": dict(width=64, depth=2, num_heads=4, mlp_dim=256, proj_dim=None, act="quick_gelu"),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072, proj_dim=512, act="quick_gelu"),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096, proj_dim=768, act="quick_gelu"),
    "H": dict(width=1280, depth=32, num_heads=16, mlp_dim=5120, proj_dim=1024, act="gelu"),
    "g": dict(width=1408, depth=40, num_heads=16, mlp_dim=6144, proj_dim=1024, act="gelu"),
    "bigG": dict(width=1664, depth=48, num_heads=16, mlp_dim=8192, proj_dim=None, act="gelu", rope=True),
}

# (preset name, size, patch, image size)
_VARIANTS: tuple[tuple[str, str, int, int], ...] = (
    ("tiny", "tiny", 8, 32),
    ("B/32", "B", 32, 224),
    ("B/16", "B", 16, 224),
    ("L/14", "L", 14, 224),
    ("L/14-336", "L", 14, 336),
    ("H/14", "H", 14, 224),
    ("g/14", "g", 14, 224),
    ("bigG/14", "bigG", 14, 224),
)

PRESETS: dict[str, ViTConfig] = {
    name: ViTConfig(patch_size=patch, image_size=res, **_SIZES[size])  # type: ignore[arg-type]
    for name, size, patch, res in _VARIANTS
}
PRESETS["tiny-rope"] = dataclasses.replace(PRESETS["tiny"], rope=True, act="gelu")

# CLIP's text towers (OpenCLIP text_cfg: B and L as OpenAI's, QuickGELU; bigG as LAION's, exact GELU),
# and a tiny one for tests.
TEXT_PRESETS: dict[str, TextConfig] = {
    "tiny": TextConfig(width=64, depth=2, num_heads=4, mlp_dim=128, proj_dim=32),
    "B": TextConfig(width=512, depth=12, num_heads=8, mlp_dim=2048, proj_dim=512),
    "L": TextConfig(width=768, depth=12, num_heads=12, mlp_dim=3072, proj_dim=768),
    "bigG": TextConfig(width=1280, depth=32, num_heads=20, mlp_dim=5120, proj_dim=1280, act="gelu"),
}


def _replace(presets: Mapping[str, _Config], kind: str, name: str, overrides: Mapping[str, object]) -> _Config:
    """``presets[name]`` with fields replaced; unknown names and fields raise naming what is known."""
    if name not in presets:
        raise KeyError(f"unknown {kind} preset {name!r}; known: {sorted(presets)}")
    config = presets[name]
    fields = {f.name for f in dataclasses.fields(config)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise TypeError(
            f"unknown {type(config).__name__} field(s) {bad} for preset {name!r}; fields: {sorted(fields)}"
        )
    return dataclasses.replace(config, **overrides)  # type: ignore[arg-type]


def get_preset(name: str, **overrides: object) -> ViTConfig:
    """The preset ``name`` with fields replaced by ``overrides`` (e.g. ``image_size=336, rope=False``)."""
    return _replace(PRESETS, "ViT", name, overrides)


def get_text_preset(name: str, **overrides: object) -> TextConfig:
    """The text preset ``name`` with fields replaced by ``overrides`` (e.g. ``act="gelu", proj_dim=None``)."""
    return _replace(TEXT_PRESETS, "text", name, overrides)


def _layer_macs(tokens: int, width: int, mlp_dim: int) -> int:
    """Matmul multiply-accumulates of one transformer block on ``tokens`` tokens: the q/k/v/out
    projections, the MLP, and the attention scores and weighted sum (shared by image and text towers)."""
    t, w = tokens, width
    return 4 * t * w * w + 2 * t * w * mlp_dim + 2 * t * t * w


def macs_per_image(cfg: ViTConfig, image_size: int | None = None) -> float:
    """Matmul multiply-accumulates of one forward pass on one square image (fvcore's "GMACs" x 1e9)."""
    size = cfg.image_size if image_size is None else image_size
    n = (size // cfg.patch_size) ** 2
    w = cfg.width
    patch = n * cfg.num_channels * cfg.patch_size**2 * w
    proj = w * cfg.proj_dim if cfg.proj_dim else 0
    return float(patch + cfg.depth * _layer_macs(n + 1, w, cfg.mlp_dim) + proj)


def flops_per_image(cfg: ViTConfig, image_size: int | None = None) -> float:
    """Forward FLOPs of one image (2 x matmul MACs, OpenCLIP's ``image_gflops``; x3 for a training step)."""
    return 2.0 * macs_per_image(cfg, image_size)


def num_params(cfg: ViTConfig) -> int:
    """Parameter count of :class:`~mlcd_jax.models.vit.VisionTransformer` built from ``cfg``."""
    w, m = cfg.width, cfg.mlp_dim
    block = 4 * w * w + 4 * w + 2 * w * m + m + w + 4 * w
    pos = cfg.head_dim // 2 if cfg.rope else (cfg.num_patches + 1) * w
    embed = cfg.num_channels * cfg.patch_size**2 * w + w + pos
    return embed + 4 * w + cfg.depth * block + (w * cfg.proj_dim if cfg.proj_dim else 0)



def text_flops(cfg: TextConfig) -> float:
    """Forward FLOPs of one caption at the full context (2 x matmul MACs, as :func:`flops_per_image`)."""
    w = cfg.width
    proj = w * cfg.proj_dim if cfg.proj_dim else 0
    return 2.0 * float(cfg.depth * _layer_macs(cfg.context_length, w, cfg.mlp_dim) + proj)

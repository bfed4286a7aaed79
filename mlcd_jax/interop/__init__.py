"""Checkpoint interop: Hugging Face CLIP / MLCD vision models <-> our ViT."""

from mlcd_jax.interop.hf import load_vision, save_vision

__all__ = ["load_vision", "save_vision"]

"""Checkpoint interop: Hugging Face CLIP / MLCD vision models and CLIP text models <-> our towers."""

from mlcd_jax.interop.hf import load_vision, save_vision
from mlcd_jax.interop.hf_text import load_text, save_text

__all__ = ["load_text", "load_vision", "save_text", "save_vision"]

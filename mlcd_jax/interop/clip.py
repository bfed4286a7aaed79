"""A full transformers ``CLIPModel`` (both towers, both projections, the temperature) and CLIP's tokenizer
files, written from a trained CLIP / LiT run's :class:`VisionTransformer` and :class:`TextTransformer`.

Structure: our towers are transformers' CLIP towers layer for layer (:mod:`mlcd_jax.interop.hf`,
:mod:`mlcd_jax.interop.hf_text`). ``CLIPModel`` always projects both towers (bias-free, to
``projection_dim``); a tower of ours without a projection is written with the identity there, which is the
same function. A RoPE image tower (``MLCDVisionModel``'s layout) has no place in ``CLIPModel``: refused.
The temperature is written as ``logit_scale`` (log space, as ours), capped as training caps it
(``exp`` at most 100), so ``logits_per_image`` are the logits the run trained with.

Tokenizer: the byte-pair encoding is ``instant-clip-tokenizer``'s built-in ``bpe_simple_vocab_16e6``
(OpenAI CLIP's); its 48,894 merges are read from the installed package and the 49,408-token vocabulary is
built from them as CLIP's ``SimpleTokenizer`` does (256 byte symbols, the same with ``</w>``, one token per
merge, then ``<|startoftext|>``, ``<|endoftext|>``). ``CLIPTokenizer`` / ``AutoTokenizer`` read the
written ``vocab.json`` + ``merges.txt``; ids equal :func:`mlcd_jax.data.tokenizer.tokenize`'s except the
padding (transformers pads with ``<|endoftext|>``, we with 0: the pooled EOT position is the same, and the
causal mask keeps the padding out of it).
"""

from __future__ import annotations

import functools
import glob
import json
import math
import os

import numpy as np

from mlcd_jax.interop.files import write_checkpoint
from mlcd_jax.interop.hf import _numpy_params, config_to_hf, hf_tensors
from mlcd_jax.interop.hf_text import text_config_to_hf, text_params_to_hf
from mlcd_jax.losses.contrastive import MAX_LOGIT_SCALE
from mlcd_jax.models.text import TextTransformer
from mlcd_jax.models.vit import VisionTransformer

_BPE_HEADER = b"#version: 0.2\n"
_NUM_MERGES = 49152 - 256 - 2  # CLIP's SimpleTokenizer: merges[1 : 49152 - 256 - 2 + 1]
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")
_VISION_PROJ, _TEXT_PROJ = "visual_projection.weight", "text_projection.weight"


def clip_tensors(
    image: VisionTransformer, text: TextTransformer, log_scale: float
) -> tuple[dict[str, np.ndarray], dict]:
    """``CLIPModel``'s tensors and ``config.json`` dict for the two towers and the (log) temperature."""
    vcfg, tcfg = image.config, text.config
    if vcfg.rope:
        raise ValueError("the image tower uses 2-D RoPE (MLCDVisionModel's layout), which CLIPModel cannot hold")
    if vcfg.embed_dim != tcfg.embed_dim:
        raise ValueError(f"the towers' embeddings differ in width (image {vcfg.embed_dim}, text {tcfg.embed_dim})")
    tensors, vision_cfg, _ = hf_tensors(image)
    text_tower = text_params_to_hf(_numpy_params(text), tcfg)
    tensors.update({f"text_model.{k}": v for k, v in text_tower.items() if k != _TEXT_PROJ})
    for key, tower, width in ((_VISION_PROJ, tensors, vcfg.width), (_TEXT_PROJ, text_tower, tcfg.width)):
        tensors[key] = tower.get(key, np.eye(width, dtype=np.float32))  # no projection: the identity
    scale = min(float(log_scale), math.log(MAX_LOGIT_SCALE))
    tensors["logit_scale"] = np.asarray(scale, np.float32)
    vision_config, text_config = config_to_hf(vision_cfg, "CLIPVisionModel"), text_config_to_hf(tcfg)
    for sub in (vision_config, text_config):
        sub.pop("architectures")
        sub.pop("projection_dim", None)
    hf_config = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": vcfg.embed_dim,
        "logit_scale_init_value": scale, "vision_config": vision_config, "text_config": text_config,
    }
    return {k: np.asarray(v, order="C") for k, v in tensors.items()}, hf_config


def save_clip(
    image: VisionTransformer, text: TextTransformer, log_scale: float, path: str, *,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes the towers and temperature as a transformers ``CLIPModel`` directory (config + safetensors,
    all in fp32: ``logit_scale`` and an identity projection are, and one checkpoint holds one dtype)."""
    tensors, hf_config = clip_tensors(image, text, log_scale)
    tensors = {k: np.asarray(v, np.float32, order="C") for k, v in tensors.items()}
    write_checkpoint(tensors, hf_config, path, max_shard_bytes)


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table of the byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


@functools.cache
def clip_bpe() -> tuple[dict[str, int], tuple[str, ...]]:
    """CLIP's vocabulary (token -> id) and its merges (``"a b"`` lines), as ``instant-clip-tokenizer`` has them."""
    import instant_clip_tokenizer

    libraries = glob.glob(os.path.join(os.path.dirname(instant_clip_tokenizer.__file__), "*.so"))
    blob = open(libraries[0], "rb").read() if libraries else b""
    start = blob.find(_BPE_HEADER)
    if start < 0:
        raise ValueError("instant-clip-tokenizer's library holds no CLIP BPE merges (bpe_simple_vocab_16e6)")
    lines = blob[start + len(_BPE_HEADER):].split(b"\n", _NUM_MERGES)[:_NUM_MERGES]
    merges = tuple(line.decode("utf-8") for line in lines)
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges] + list(_SPECIAL)
    return {t: i for i, t in enumerate(tokens)}, merges


def save_clip_tokenizer(path: str, context_length: int) -> None:
    """Writes ``vocab.json``, ``merges.txt`` and the ``CLIPTokenizer`` config (``model_max_length`` =
    the text tower's context length) into ``path``."""
    vocab, merges = clip_bpe()
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(path, "merges.txt"), "w", encoding="utf-8") as f:
        f.write(_BPE_HEADER.decode() + "\n".join(merges) + "\n")
    bos, eos = _SPECIAL
    config = {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": context_length, "bos_token": bos,
        "eos_token": eos, "unk_token": eos, "pad_token": eos, "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(path, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token": bos, "eos_token": eos, "unk_token": eos, "pad_token": eos}, f, indent=2)

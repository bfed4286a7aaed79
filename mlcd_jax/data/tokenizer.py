"""CLIP's BPE tokenizer, offline: :func:`tokenize` gives the int32 ``[N, context_length]`` ids of open_clip.

The byte-pair encoding is ``instant-clip-tokenizer``'s (Rust, numpy only, CLIP's
``bpe_simple_vocab_16e6`` built in, so nothing is downloaded). Rows are ``SOT ids... EOT`` then zeros,
SOT = 49406, EOT = 49407; longer texts are cut to ``context_length`` with EOT kept last, as
open_clip's ``tokenize`` (``truncate=True``).

Text is cleaned as open_clip's default (``clean="lower"``) except for ftfy: HTML entities unescaped
(twice, as open_clip), Unicode NFC (the normalisation ``ftfy.fix_text`` ends with), whitespace collapsed,
lowercased. ftfy's other repairs (mojibake, ligatures such as "ﬁ", full-width letters, curly quotes)
are not applied, so such text can get other ids than open_clip gives (transformers' ``CLIPTokenizer``
skips them too).
"""

from __future__ import annotations

import functools
import html
import unicodedata
from collections.abc import Sequence

import numpy as np

try:
    import instant_clip_tokenizer
except ImportError:  # wheels exist for CPython 3.11 and 3.12 only
    raise ImportError(
        "mlcd_jax.data.tokenizer needs the instant-clip-tokenizer package (wheels for CPython 3.11/3.12): "
        "pip install 'instant-clip-tokenizer>=0.1.1'"
    ) from None

SOT: int = 49406
EOT: int = 49407
VOCAB_SIZE: int = 49408
CONTEXT_LENGTH: int = 77


@functools.cache
def _bpe() -> instant_clip_tokenizer.Tokenizer:
    """The tokenizer, built once per process (building parses the 49,152 merges)."""
    return instant_clip_tokenizer.Tokenizer()


def clean(text: str) -> str:
    """open_clip's ``clean="lower"`` without ftfy: HTML unescaped, NFC, whitespace collapsed, lowercased."""
    text = unicodedata.normalize("NFC", html.unescape(html.unescape(text)))
    return " ".join(text.split()).lower()


def tokenize(texts: Sequence[str], context_length: int = CONTEXT_LENGTH) -> np.ndarray:
    """int32 ``[len(texts), context_length]`` CLIP token ids: SOT, the text's BPE ids, EOT, zero padding."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of strings; wrap a single text in a list")
    if context_length < 3:
        raise ValueError(f"context_length must be at least 3 (SOT, one token, EOT), got {context_length}")
    ids = _bpe().tokenize_batch([clean(t) for t in texts], context_length)
    return np.asarray(ids, np.int32)

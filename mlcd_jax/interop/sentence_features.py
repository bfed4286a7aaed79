"""Mean-pooled sentence features of an HF text encoder (``hf:DIR`` or ``hf-hub:ORG/NAME[@REV]``, any
``AutoModel`` with its tokenizer), computed by transformers on torch: ProtoCLIP's external teacher as
released (RoBERTa-large, mean-pooled over the tokens, issue 32). torch and transformers are needed only
here (``pip install 'mlcd_jax[test]'`` brings both)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mlcd_jax.config_lib import ConfigError
from mlcd_jax.evaluate.progress import progress
from mlcd_jax.interop import hub


def mean_pooled(texts: Sequence[str], spec: str, batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    """float32 [N, hidden]: each text's last hidden states averaged over its tokens (padding masked),
    each distinct text embedded once, in batches, on a GPU when torch sees one. A checkpoint that
    does not load is a one-line :class:`ConfigError`."""
    try:
        import torch
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ConfigError(f"{spec}: a text teacher needs torch and transformers ({err})") from None
    try:
        directory = hub.snapshot_dir(spec)
        tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{spec}: not a text model with its tokenizer ({str(err).splitlines()[0][:200]})") from None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).eval()
    distinct, inverse = np.unique(np.asarray(list(texts), dtype=object), return_inverse=True)
    out = []
    with torch.no_grad(), progress(len(distinct), "text teacher", "text") as bar:
        for start in range(0, len(distinct), batch_size):
            batch = tokenizer([str(t) for t in distinct[start : start + batch_size]], padding=True,
                              truncation=True, max_length=max_length, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu().numpy())
            bar.update(len(out[-1]))
    return np.concatenate(out)[inverse.reshape(-1)].astype(np.float32)

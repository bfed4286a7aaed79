"""Released checkpoints by name: ``hf-hub:ORG/NAME[@REVISION]`` wherever ``hf:DIR`` is taken (the clustering
teacher, LiT's towers, evaluation), e.g. ``hf-hub:DeepGlint-AI/mlcd-vit-large-patch14-336``.

The id resolves to a snapshot directory in huggingface_hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``),
downloaded once with only the files a checkpoint needs (config, weights, tokenizer and preprocessor
files). With ``HF_HUB_OFFLINE=1`` it is read from the cache alone: a machine without the hub, or a
pod whose workers share a pre-populated cache, resolves the same id without a request.
"""

from __future__ import annotations

PREFIX = "hf-hub:"
CHECKPOINT_FILES = ("*.json", "*.safetensors", "*.txt", "*.model")  # configs, weights, tokenizers


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a hub checkpoint (``hf-hub:ORG/NAME[@REVISION]``)."""
    return spec.startswith(PREFIX)


def snapshot_dir(spec: str) -> str:
    """The local directory holding the checkpoint ``spec`` names: ``hf:DIR`` is ``DIR``; ``hf-hub:ID[@REV]``
    is its snapshot in the hub cache (downloaded when missing, unless offline). An id that cannot be
    resolved is a ValueError whose one line says why."""
    if not is_hub_id(spec):
        return spec.removeprefix("hf:")
    repo_id, _, revision = spec.removeprefix(PREFIX).partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{spec}: name a hub model as hf-hub:ORG/NAME[@REVISION]")
    import huggingface_hub
    from huggingface_hub import errors

    try:
        return huggingface_hub.snapshot_download(repo_id, revision=revision or None,
                                                 allow_patterns=list(CHECKPOINT_FILES))
    except errors.LocalEntryNotFoundError:
        raise ValueError(f"{spec}: not in the hub cache ({huggingface_hub.constants.HF_HUB_CACHE}) and the hub "
                         "cannot be reached (HF_HUB_OFFLINE, or no network): download it once where it can") from None
    except (errors.HfHubHTTPError, OSError) as err:  # no such repository or revision, network errors
        raise ValueError(f"{spec}: {type(err).__name__}: {str(err).splitlines()[0][:200]}") from None

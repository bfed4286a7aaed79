"""What the source modules share (:mod:`mlcd_jax.data.sources` and the ones it opens, e.g.
:mod:`mlcd_jax.data.emoji`): the error, the split names and the cache root. A leaf module, so a source
module imports it without importing the spec parser that imports the source modules."""

from __future__ import annotations

import os

SPLITS = ("train", "test", "all")


class SourceError(ValueError):
    """A source spec is malformed or points at nothing usable."""


def cache_root() -> str:
    """Where downloaded and rendered data is kept: ``$MLCD_JAX_CACHE`` (default ``~/.cache/mlcd_jax``)."""
    return os.environ.get("MLCD_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mlcd_jax"))

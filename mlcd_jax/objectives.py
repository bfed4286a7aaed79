"""What each ``loss.kind`` trains: the state keys it optimises or holds fixed, and what its batches carry.

One trainer (:mod:`mlcd_jax.train`) serves every objective; this table is where they differ.

- ``mlcd`` / ``mlc`` / ``softmax``: cluster discrimination (MLCD Eq. 5, Eq. 4, single label as UNICOM)
  of the image tower (``params``) against the prototype matrix (``proto``); batches carry cluster labels.
- ``clip``: CLIP from scratch, both towers (``params``, ``text``) and the temperature (``logit_scale``)
  with symmetric InfoNCE over the global batch; FLIP is ``clip`` with ``data.patch_drop = 0.5``.
- ``lit``: LiT, the text tower and temperature trained against a locked image tower (``params``,
  loaded from ``loss.image_tower``: a workdir, an HF checkpoint, or random init).
- ``protoclip``: ProtoCLIP, CLIP plus prototype losses in episodes: projection heads (``heads``) and
  their temperature (``logit_scale_proto``) are trained too; the current episode's cluster labels and
  prototypes (``episode``) are state the trainer rebuilds at each episode start, never optimised.
"""

from __future__ import annotations

import dataclasses

from mlcd_jax.losses.core import KINDS as CLUSTER_KINDS


@dataclasses.dataclass(frozen=True)
class Objective:
    """``trainable``: state keys the optimizer updates; ``frozen``: keys kept in the state unchanged."""

    kind: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()

    @property
    def clusters(self) -> bool:
        """Trains against prototypes (batches carry cluster labels)."""
        return "proto" in self.trainable

    @property
    def text(self) -> bool:
        """Has a text tower (batches carry tokenised captions)."""
        return "text" in self.trainable or "text" in self.frozen

    @property
    def episodes(self) -> bool:
        """Trains in ProtoCLIP's episodes (batches carry ``episode_pos``)."""
        return "episode" in self.frozen

    @property
    def state_keys(self) -> tuple[str, ...]:
        return self.trainable + self.frozen


OBJECTIVES: dict[str, Objective] = {
    **{kind: Objective(kind, ("params", "proto")) for kind in CLUSTER_KINDS},
    "clip": Objective("clip", ("params", "text", "logit_scale")),
    "lit": Objective("lit", ("text", "logit_scale"), frozen=("params",)),
    "protoclip": Objective(
        "protoclip", ("params", "text", "logit_scale", "heads", "logit_scale_proto"), frozen=("episode",)
    ),
}


def objective(kind: str) -> Objective:
    """The objective of ``loss.kind``; an unknown kind is a one-line ValueError."""
    if kind not in OBJECTIVES:
        raise ValueError(f"loss.kind={kind!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[kind]

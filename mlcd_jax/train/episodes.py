"""ProtoCLIP's episodes in the trainer: the batch loss over the episode state, the episode's feature pass
and the building of an episode (k-means of each modality, back-translated prototypes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mlcd_jax import sharding
from mlcd_jax.losses import l2_normalize
from mlcd_jax.losses.protoclip import EpisodePrototypes, cluster_features, episode_prototypes, protoclip_loss
from mlcd_jax.runs import DTYPES
from mlcd_jax.train.state import EPISODE_EXTERNAL, EPISODE_PROTOS, TrainSetup


def protoclip_batch_loss(
    setup: TrainSetup, tensors: dict[str, Any], image: jax.Array, text: jax.Array, episode_pos: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """ProtoCLIP's loss for a batch: InfoNCE, plus the prototype terms once an episode is built."""
    p = setup.config.protoclip
    heads, ep = setup.heads.merge(tensors["heads"]), tensors["episode"]
    external = bool(p.external)
    protos = EpisodePrototypes(*(ep[name] for name in EPISODE_PROTOS),
                               *((ep[name] for name in EPISODE_EXTERNAL) if external else ()))
    loss, metrics = protoclip_loss(
        image, text, tensors["logit_scale"], heads.image(image), heads.text(text), tensors["logit_scale_proto"],
        protos, ep["image_labels"][episode_pos], ep["text_labels"][episode_pos],
        ep["external_labels"][episode_pos] if external else None,
        w_proto=p.w_proto, w_ext=p.w_external if external else 0.0, temperature=p.temperature,
    )
    active = (ep["index"] >= 0).astype(jnp.float32)  # the first episode trains InfoNCE only
    loss = metrics["loss_clip"] + active * (loss - metrics["loss_clip"])
    return loss, {**metrics, "loss": loss}


def make_episode_features(setup: TrainSetup) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
    """The jitted feature pass of an episode: ``(state, canvas batch) -> (image, text)`` L2-normalised
    head outputs [B, head_dim], eval-time preprocessing (centre, no flip), no dropout."""
    from mlcd_jax.data.pipeline import canvas_to_inputs

    config, mesh = setup.config, setup.mesh
    compute_dtype = DTYPES[config.model.dtype]

    def features(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        inputs = canvas_to_inputs({**batch, "seed": jnp.zeros((batch["image"].shape[0], 2), jnp.uint32)},
                                  image_size=config.data.image_size, augment=False)
        heads = setup.heads.merge(state["heads"])
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(setup.rules):
            image, _ = setup.merge(state["params"])(inputs["image"].astype(compute_dtype))
            text = setup.text_model.merge(state["text"])(batch["tokens"])
        return l2_normalize(heads.image(image)), l2_normalize(heads.text(text))

    return jax.jit(features)


def build_episode(
    setup: TrainSetup, state: dict[str, Any], loader: Any, index: int, external: np.ndarray | None,
    features_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]],
) -> dict[str, jax.Array]:
    """Episode ``index``'s state: its pairs' head features under the current weights, k-means of each
    modality (and of the external teacher's features), and the back-translated prototypes. A function of
    the state and the episode number, so a resumed run rebuilds the same episode."""
    p, b = setup.config.protoclip, setup.config.batch_size
    rows = loader.decoded.episode_rows(index)
    image_f, text_f = [], []
    for start in range(0, len(rows), b):  # one batch of the episode's records gathered at a time
        chunk = loader.decoded.gather(rows[start:start + b])
        fi, ft = features_fn(state, sharding.host_to_global(chunk, setup.mesh, setup.rules))
        image_f.append(np.asarray(fi))
        text_f.append(np.asarray(ft))
    image_f, text_f = np.concatenate(image_f), np.concatenate(text_f)
    seed = (setup.config.seed * 1_000_003 + index) % 2**30  # faiss takes a C int (restarts add to it)

    def kmeans(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return cluster_features(x.astype(np.float32), p.num_clusters, iterations=p.kmeans_iterations,
                                nredo=p.kmeans_nredo, seed=seed)

    (image_c, image_l), (text_c, text_l) = kmeans(image_f), kmeans(text_f)
    external_l = kmeans(external[rows])[1] if external is not None else None
    protos = episode_prototypes(image_f, text_f, image_l, text_l, image_c, text_c, p.num_clusters,
                                external_l, p.num_clusters if external is not None else None)
    episode = {"index": np.int32(index), "image_labels": image_l, "text_labels": text_l,
               **({"external_labels": external_l} if external is not None else {}),
               **{name: value for name, value in protos._asdict().items() if value is not None}}
    return jax.device_put(jax.tree.map(jnp.asarray, episode), setup.state_shardings["episode"])

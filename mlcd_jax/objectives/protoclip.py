"""ProtoCLIP (``loss.kind=protoclip``, Chen et al. 2022): CLIP plus prototype losses in episodes, and
its episodes: the feature pass, the k-means of each modality, the back-translated prototypes.

Projection heads (``heads``) and their temperature (``logit_scale_proto``) train with both towers; the
current episode's cluster labels and prototypes (``episode``) are state the loop rebuilds at each
episode start (:meth:`ProtoCLIP.step_hook`), never optimised. The loss math is
:mod:`mlcd_jax.losses.protoclip`.

Each episode samples ``episode_size`` pairs with replacement (:func:`mlcd_jax.data.order.sample_episode`,
as the released ``main.py``: ``np.random.choice(dataset_size, episode_size, replace=True)``); its
projected features are clustered per modality (released ``Clustering.kmeans``: faiss k-means, 20
iterations, nredo 3, top-1 assignment), and an external text-only teacher's features are clustered the
same way (NumPy, faiss, scikit-learn). The k-means is the clustering job's (``mlcd_jax.cluster.kmeans``,
faiss primitives, imported when an episode is clustered); nothing else of the job is used.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError, train_augment
from mlcd_jax.data import order
from mlcd_jax.losses import l2_normalize
from mlcd_jax.losses.contrastive import INIT_LOG_SCALE
from mlcd_jax.losses.protoclip import EpisodePrototypes, episode_prototypes, protoclip_loss
from mlcd_jax.models.heads import ProjectionHead
from mlcd_jax.objectives.base import StepHook, register
from mlcd_jax.objectives.contrastive import ImageText
from mlcd_jax.runs import DTYPES, AbstractModel, filled, vit_config

# The episode state's per-cluster arrays, as EpisodePrototypes names them (the external ones only with a teacher).
EPISODE_PROTOS = ("image_prototypes", "image_mask", "text_prototypes", "text_mask", "text_centroids",
                  "image_centroids")
EPISODE_EXTERNAL = ("image_ext_prototypes", "image_ext_mask", "text_ext_prototypes", "text_ext_mask")
FEATURE_PASS_EPOCH = 2**31  # episode e's feature pass draws its augmentation as epoch 2^31 + e


class ProtoHeads(nnx.Module):
    """ProtoCLIP's two projection heads (``image``, ``text``), one module so they train and save together;
    they start equal (the released image head is a copy of the text head)."""

    def __init__(self, config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> None:
        d, p = vit_config(config).embed_dim, config.protoclip
        self.text = ProjectionHead(d, p.head_hidden, p.head_dim, rngs=rngs)
        self.image = nnx.clone(self.text)


class HeadsSplit:
    """:class:`ProtoHeads` as two pure dicts of state, its parameters (``heads``, trained) and its
    BatchNorm running averages (``head_stats``, renewed by each step's loss), and back."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.graphdef, self.params, self.stats = nnx.split(nnx.eval_shape(lambda: ProtoHeads(config, nnx.Rngs(0))),
                                                           nnx.Param, nnx.BatchStat)

    @staticmethod
    def running_averages(heads: ProtoHeads) -> dict[str, Any]:
        """The BatchNorm running averages of ``heads`` as a pure dict."""
        return nnx.state(heads, nnx.BatchStat).to_pure_dict()

    @staticmethod
    def split(heads: ProtoHeads) -> tuple[dict[str, Any], dict[str, Any]]:
        """(parameters, running averages) of ``heads`` as pure dicts."""
        return nnx.state(heads, nnx.Param).to_pure_dict(), HeadsSplit.running_averages(heads)

    def merge(self, params: dict[str, Any], stats: dict[str, Any]) -> ProtoHeads:
        """The heads module of pure-dict ``params`` and ``stats`` (inside or outside jit)."""
        return nnx.merge(self.graphdef, filled(self.params, params), filled(self.stats, stats))


def empty_episode(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """The episode state before the first episode is built (``index`` -1: prototype losses off)."""
    p = config.protoclip
    k, d, n = p.num_clusters, p.head_dim, p.episode_size
    zeros = {"prototypes": jnp.zeros((k, d), jnp.float32), "mask": jnp.zeros((k,), bool),
             "centroids": jnp.zeros((k, d), jnp.float32)}
    names = EPISODE_PROTOS + (EPISODE_EXTERNAL if p.external else ())
    episode = {name: zeros[name.rsplit("_", 1)[1]] for name in names}
    labels = ("image_labels", "text_labels") + (("external_labels",) if p.external else ())
    return {"index": jnp.asarray(-1, jnp.int32), **{name: jnp.zeros((n,), jnp.int32) for name in labels}, **episode}


@register
class ProtoCLIP(ImageText):
    """InfoNCE + ``w_proto``·½(i→t + t→i) + ``w_external``·½(ext_i + ext_t); InfoNCE alone in episode 0."""

    kinds = ("protoclip",)
    trainable = ("params", "text", "logit_scale", "heads", "logit_scale_proto")
    frozen = ("episode", "head_stats")
    statistics = ("head_stats",)
    no_decay = ("heads",)  # the released optimizer excludes the projection heads from weight decay
    groups = {"params": "backbone", "text": "backbone", "logit_scale": "scale", "heads": "backbone",
              "logit_scale_proto": "scale"}
    bounds = {**ImageText.bounds, "logit_scale_proto": ImageText.bounds["logit_scale"]}

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
                 image: AbstractModel) -> None:
        super().__init__(config, mesh, rules, image)
        self.heads = HeadsSplit(config)

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """The text tower's, then the episode sizes (whole batches, enough pairs to cluster) and teacher."""
        super().validate(config)
        p = config.protoclip
        if p.episode_size <= 0 or p.episode_size % config.batch_size:
            raise ConfigError(f"protoclip.episode_size={p.episode_size} must be a positive multiple of "
                              f"batch_size={config.batch_size}")
        if not 0 < p.num_clusters <= p.episode_size:
            raise ConfigError(f"protoclip.num_clusters={p.num_clusters} must be in [1, episode_size={p.episode_size}]")
        if p.external not in ("", "tfidf") and not p.external.startswith(("hf:", "hf-hub:")):
            raise ConfigError(f"protoclip.external={p.external!r}: use tfidf, hf:DIR or hf-hub:ORG/NAME (a text "
                              "model, mean-pooled) or '' (none)")
        if jax.process_count() > 1:
            raise ConfigError("loss.kind=protoclip runs in one process (its episode pass reads the whole episode)")

    @classmethod
    def loader_options(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        return {**super().loader_options(config), "episode_size": config.protoclip.episode_size}

    @classmethod
    def input_specs(cls, config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        return {**super().input_specs(config), "episode_pos": ((), jnp.int32)}

    @classmethod
    def row_name(cls, config: ml_collections.ConfigDict) -> str:
        return "ProtoCLIP ViT"

    def init(self, keys: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        params, stats = HeadsSplit.split(ProtoHeads(self.config, nnx.Rngs(keys[0])))
        return {**super().init(keys), "heads": params, "head_stats": stats,
                "logit_scale_proto": jnp.asarray(INIT_LOG_SCALE, jnp.float32), "episode": empty_episode(self.config)}

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """InfoNCE, plus the prototype terms once an episode is built."""
        text = self.encode_text(tensors, batch)
        p, episode_pos = self.config.protoclip, batch["episode_pos"]
        heads, ep = self.heads.merge(tensors["heads"], tensors["head_stats"]), tensors["episode"]
        external = bool(p.external)
        protos = EpisodePrototypes(*(ep[name] for name in EPISODE_PROTOS),
                                   *((ep[name] for name in EPISODE_EXTERNAL) if external else ()))
        loss, metrics = protoclip_loss(
            image, text, tensors["logit_scale"], heads.image(image, train=True), heads.text(text, train=True),
            tensors["logit_scale_proto"],
            protos, ep["image_labels"][episode_pos], ep["text_labels"][episode_pos],
            ep["external_labels"][episode_pos] if external else None,
            w_proto=p.w_proto, w_ext=p.w_external if external else 0.0, temperature=p.temperature,
        )
        active = (ep["index"] >= 0).astype(jnp.float32)  # the first episode trains InfoNCE only
        loss = metrics["loss_clip"] + active * (loss - metrics["loss_clip"])
        return loss, {**metrics, "loss": loss, "statistics": {"head_stats": HeadsSplit.running_averages(heads)}}

    def log_terms(self, scalars: dict[str, Any]) -> str:
        return super().log_terms(scalars) + f", proto {scalars['loss_proto']:.3f} ext {scalars['loss_ext']:.3f}"

    def step_hook(self, state: dict[str, Any], loader: Any, state_shardings: dict[str, Any]) -> StepHook:
        """Rebuilds the episode state when a step starts a new episode (episode 0 trains InfoNCE only)."""
        config = self.config
        steps_per_episode = config.protoclip.episode_size // config.batch_size
        p = config.protoclip
        external = external_teacher(list(loader.decoded.captions), p.external, p.external_dim, config.seed)
        features_fn = self._features_fn()
        built = int(state["episode"]["index"])  # the episode whose labels the state holds

        def hook(step: int, state: dict[str, Any]) -> dict[str, Any]:
            nonlocal built
            if (step - 1) // steps_per_episode == built or step <= steps_per_episode:
                return state
            built = (step - 1) // steps_per_episode
            t0 = time.perf_counter()
            episode = self._build_episode(state, loader, built, external, features_fn)
            print(f"episode {built}: clustered {config.protoclip.episode_size} pairs into "
                  f"{config.protoclip.num_clusters} prototypes per modality in {time.perf_counter() - t0:.1f} s",
                  flush=True)
            return {**state, "episode": jax.device_put(episode, state_shardings["episode"])}

        return hook

    def _features_fn(self) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]]:
        """The jitted feature pass of an episode: ``(state, canvas batch) -> (image, text)`` L2-normalised
        head outputs [B, head_dim]. As released: the training augmentation (``data.augment``,
        ``light_augment``; the batch's ``seed`` draws it), the heads' BatchNorm on its running averages,
        no dropout."""
        from mlcd_jax.data.pipeline import canvas_to_inputs

        config = self.config
        compute_dtype = DTYPES[config.model.dtype]

        def features(state: dict[str, Any], batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
            inputs = canvas_to_inputs(batch, image_size=config.data.image_size, augment=train_augment(config),
                                      crop_scale=tuple(config.data.crop_scale))
            heads = self.heads.merge(state["heads"], state["head_stats"])
            with self.on_mesh():
                image, _ = self.image.merge(state["params"])(inputs["image"].astype(compute_dtype))
                text = self.models["text"].merge(state["text"])(batch["tokens"])
            return l2_normalize(heads.image(image, train=False)), l2_normalize(heads.text(text, train=False))

        return jax.jit(features)

    def _build_episode(
        self, state: dict[str, Any], loader: Any, index: int, external: np.ndarray | None,
        features_fn: Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, jax.Array]],
    ) -> dict[str, jax.Array]:
        """Episode ``index``'s state: its pairs' head features under the current weights, k-means of each
        modality (and of the external teacher's features), and the back-translated prototypes. A function
        of the state and the episode number, so a resumed run rebuilds the same episode."""
        p, b = self.config.protoclip, self.config.batch_size
        rows = loader.decoded.episode_rows(index)
        # the augmentation's per-example seeds: a stream of their own (no train epoch reaches 2^31)
        seeds = order.example_seeds(self.config.seed, FEATURE_PASS_EPOCH + index, np.arange(len(rows)))
        image_f, text_f = [], []
        for start in range(0, len(rows), b):  # one batch of the episode's records gathered at a time
            chunk = {**loader.decoded.gather(rows[start:start + b]), "seed": seeds[start:start + b]}
            fi, ft = features_fn(state, sharding.host_to_global(chunk, self.mesh, self.rules))
            image_f.append(np.asarray(fi))
            text_f.append(np.asarray(ft))
        image_f, text_f = np.concatenate(image_f), np.concatenate(text_f)
        seed = (self.config.seed * 1_000_003 + index) % 2**30  # faiss takes a C int (restarts add to it)

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
        return jax.tree.map(jnp.asarray, episode)


def cluster_features(
    features: np.ndarray, k: int, *, iterations: int = 20, nredo: int = 3, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means of ``features`` [N, d]; returns unit ``centroids`` [k, d] float32 and top-1
    ``labels`` [N] int32 (the nearest centroid by cosine).

    Rows are L2-normalised first (NaNs become 0, as the released code does). Uses the project's
    :func:`mlcd_jax.cluster.kmeans.spherical_kmeans` (faiss, inner product, empty clusters re-seeded);
    it has no ``nredo``, so each of the ``nredo`` runs starts from its own seed (``seed + r *
    iterations``, iteration i of run r using ``seed + r * iterations + i``) and the run with the highest
    mean cosine to the nearest centroid is kept (as faiss's ``nredo``). Deterministic for a given seed.
    """
    from mlcd_jax.cluster import kmeans  # faiss: loaded when an episode is clustered

    if features.ndim != 2:
        raise ValueError(f"features must be [N, d]; got shape {features.shape}")
    if nredo < 1 or iterations < 1:
        raise ValueError(f"iterations and nredo must be >= 1; got {iterations} and {nredo}")
    x = kmeans.l2_normalize(np.nan_to_num(np.asarray(features, np.float32)))
    best, best_quality = None, -np.inf
    for r in range(nredo):
        centroids, _ = kmeans.spherical_kmeans(x, k, iterations, seed + r * iterations)
        quality = kmeans.mean_cosine_to_nearest(x, centroids)
        if quality > best_quality:
            best, best_quality = centroids, quality
    _, nearest = kmeans.build_index(best, "flat").search(np.ascontiguousarray(x), 1)
    return np.ascontiguousarray(best, np.float32), nearest[:, 0].astype(np.int32)


def tfidf_teacher(captions: Sequence[str], dim: int = 64, seed: int = 0) -> np.ndarray:
    """An offline external teacher: TF-IDF of ``captions`` reduced to ``dim`` by truncated SVD (LSA),
    rows L2-normalised, float32 [N, dim'].

    Fit on the given captions. ``dim' = min(dim, vocabulary - 1, N)`` (truncated SVD needs fewer
    components than terms, and yields at most N); when that is < 1, the TF-IDF rows themselves are
    returned.
    Identical captions get identical rows.
    """
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    from mlcd_jax.cluster import kmeans

    if len(captions) == 0:
        raise ValueError("tfidf_teacher needs at least one caption")
    tfidf = TfidfVectorizer().fit_transform(list(captions))  # raises on an empty vocabulary
    n, vocab = tfidf.shape
    components = min(dim, vocab - 1, n)
    if components < 1:
        return kmeans.l2_normalize(tfidf.toarray())
    reduced = TruncatedSVD(n_components=components, random_state=seed).fit_transform(tfidf)
    return kmeans.l2_normalize(reduced)


def hf_text_teacher(captions: Sequence[str], spec: str, dim: int = 64, seed: int = 0) -> np.ndarray:
    """ProtoCLIP's released external teacher: ``captions`` embedded by the HF text model ``spec``
    (mean-pooled, :func:`mlcd_jax.interop.sentence_features.mean_pooled`), reduced to ``min(dim, N, hidden)`` by
    PCA fitted on them, rows L2-normalised, float32 [N, dim']."""
    from sklearn.decomposition import PCA

    from mlcd_jax.cluster import kmeans
    from mlcd_jax.interop.sentence_features import mean_pooled

    features = mean_pooled(captions, spec)
    pca = PCA(n_components=min(dim, *features.shape), random_state=seed).fit(features)
    reduced = pca.transform(features)  # not fit_transform (U·S): identical captions keep identical rows
    return kmeans.l2_normalize(reduced.astype(np.float32))


def external_teacher(captions: Sequence[str], spec: str, dim: int, seed: int) -> np.ndarray | None:
    """The features of ``protoclip.external``: ``tfidf`` (offline), an HF text model (``hf:`` /
    ``hf-hub:``), or None for ``''`` (no external teacher)."""
    if not spec:
        return None
    if spec == "tfidf":
        return tfidf_teacher(captions, dim, seed)
    return hf_text_teacher(captions, spec, dim, seed)

"""What an objective is to the trainer (:class:`Objective`) and the registry of ``loss.kind`` names.

The trainer (:mod:`mlcd_jax.train`) holds one image tower (``params``) and whatever an objective adds:
the objective says which state keys it trains or holds fixed, creates and shards its own entries, owns
the loss of a batch, its optimizer groups, its log line, its config checks and what its batches carry.
A module of this package registers its class with :func:`register`; the package imports every module,
so a new objective is one new file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mlcd_jax import sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.models import flops_per_image
from mlcd_jax.models.presets import text_flops
from mlcd_jax.runs import AbstractModel, text_config, vit_config

# A hook the loop calls before each train step: ``(step, state) -> state`` (e.g. ProtoCLIP's episodes).
StepHook = Callable[[int, dict[str, Any]], dict[str, Any]]

# The optimizer groups a trainable key can belong to (mlcd_jax.train.optimizer): the towers and heads,
# the prototype matrix, a temperature or bias (no weight decay, not clipped).
GROUPS = ("backbone", "proto", "scale")


class Objective:
    """One ``loss.kind`` family, bound to a run: ``Objective(config, mesh, rules, image)`` with the image
    tower's abstract model. Class attributes and class methods need only the config.

    ``trainable``: state keys the optimizer updates (``groups`` names each one's optimizer group);
    ``frozen``: keys the optimizer leaves alone; ``statistics``: those of them the loss renews each step
    (BatchNorm's running averages), returned in its metrics as ``statistics={key: value}``; ``no_decay``:
    ``backbone`` keys AdamW never decays (ProtoCLIP's heads); ``bounds``: trainable scalars the train
    step clips into ``[low, high]`` after each update (CLIP's temperature clamp); ``text``: the run has
    a text tower (batches carry ``tokens``, checkpoints hold ``text``); ``sampled``: a ``proto``-group
    key whose rows a step samples (``select`` / ``take`` / ``put``, and the loss's ``selection``), so
    that ``loss.proto_update=lazy`` can update only those rows ("": none).
    """

    kinds: ClassVar[tuple[str, ...]] = ()
    trainable: ClassVar[tuple[str, ...]] = ()
    frozen: ClassVar[tuple[str, ...]] = ()
    statistics: ClassVar[tuple[str, ...]] = ()
    no_decay: ClassVar[tuple[str, ...]] = ()
    groups: ClassVar[dict[str, str]] = {}
    bounds: ClassVar[dict[str, tuple[float, float]]] = {}
    text: ClassVar[bool] = False
    sampled: ClassVar[str] = ""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, rules: sharding.Rules,
                 image: AbstractModel) -> None:
        self.config, self.mesh, self.rules, self.image = config, mesh, rules, image
        self.embed_dim = vit_config(config).embed_dim
        self.models: dict[str, AbstractModel] = {}  # the state key of each further module (e.g. a text tower)
        self.num_classes = 0  # prototype rows a checkpoint must hold (checkpointing.restore); 0: none

    @classmethod
    def state_keys(cls) -> tuple[str, ...]:
        return cls.trainable + cls.frozen

    @classmethod
    def validate(cls, config: ml_collections.ConfigDict) -> None:
        """One-line :class:`ConfigError` for settings this objective cannot run (none by default)."""

    @classmethod
    def check_shards(cls, config: ml_collections.ConfigDict, manifest: dict[str, Any]) -> None:
        """One-line :class:`ConfigError` when the clustering output cannot feed this objective (none by default)."""

    @classmethod
    def loader_options(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
        """Keyword arguments of ``make_train_loader`` beyond the shared ones (what the batches carry)."""
        return {}

    @classmethod
    def input_specs(cls, config: ml_collections.ConfigDict) -> dict[str, tuple[tuple[int, ...], Any]]:
        """The batch arrays beyond ``image`` and ``labels``: name -> (per-example shape, dtype)."""
        return {}

    @classmethod
    def row_name(cls, config: ml_collections.ConfigDict) -> str:
        """The trained model's row in ``results.json``, e.g. ``MLCD ViT``."""
        return f"{config.loss.kind.upper()} ViT"

    @classmethod
    def flops_per_example(cls, config: ml_collections.ConfigDict) -> float:
        """Training FLOPs per example: forward + backward (3x forward) of each trained tower, forward only of
        a locked one (LiT's image tower); FLIP's patch drop scales a trained image tower's share."""
        trained = "params" in cls.trainable
        image = flops_per_image(vit_config(config)) * (3 if trained else 1)
        if trained:  # FLIP's patch drop: the blocks see ~(1 - rate) of the tokens
            image *= 1.0 - float(config.data.get("patch_drop", 0.0))
        return image + (3 * text_flops(text_config(config)) if cls.text else 0.0)

    def bounded(self, trainable: dict[str, Any]) -> dict[str, Any]:
        """``trainable`` after an update, its :attr:`bounds` keys clipped into their ranges."""
        return {k: jnp.clip(v, *self.bounds[k]) if k in self.bounds else v for k, v in trainable.items()}

    def init(self, keys: tuple[jax.Array, jax.Array]) -> dict[str, Any]:
        """This objective's initial state entries besides ``params`` (unsharded, inside ``jit``), from two
        keys of its own."""
        return {}

    def shardings(self, abstract: dict[str, Any]) -> dict[str, Any]:
        """The shardings of this objective's state entries (``abstract``: the whole state, shapes only);
        the default: each model's own, anything else replicated."""
        replicated = NamedSharding(self.mesh, P())

        def of(key: str) -> Any:
            return self.models[key].shardings if key in self.models else jax.tree.map(lambda _: replicated, abstract[key])

        return {key: of(key) for key in self.state_keys() if key != "params"}

    def load_weights(self, state: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
        """``state`` with towers read from the configured checkpoints (none by default)."""
        return state

    def loss(self, tensors: dict[str, Any], image: jax.Array, batch: dict[str, jax.Array],
             key: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)`` of a batch; ``tensors``: the state's trainable and frozen entries, ``image``:
        the image tower's pooled embeddings [B, d], ``key``: this step's sampling key. Metrics include
        ``mean_pos_cos`` / ``mean_neg_cos``. An objective with an :meth:`exact_check` also takes
        ``exact=True``: the variant for the batches that check flags."""
        raise NotImplementedError

    def exact_check(self) -> Callable[[dict[str, jax.Array]], jax.Array] | None:
        """A jittable ``batch -> bool``: whether a batch needs the loss's ``exact`` variant, compiled as a
        second step (e.g. the prototype head when a batch's positives overflow its row budget); None:
        every batch runs the one step."""
        return None

    def plan(self) -> dict[str, Any] | None:
        """Static sizes worth reporting before a run (``python -m mlcd_jax.aot``'s ``head``), or None."""
        return None

    def log_terms(self, scalars: dict[str, Any]) -> str:
        """The loss terms of a step's log line, e.g. ``pos 1.234 neg 0.567``."""
        raise NotImplementedError

    def describe(self) -> str:
        """What the run's first line says about this objective's state, e.g. ``prototypes 1024 x 64``."""
        raise NotImplementedError

    def text_model(self, state: dict[str, Any]) -> Any:
        """The text tower of ``state`` as a module, or None (for evaluators)."""
        return self.models["text"].merge(state["text"]) if self.text else None

    def step_hook(self, state: dict[str, Any], loader: Any, state_shardings: dict[str, Any]) -> StepHook | None:
        """What the loop runs before each step to rebuild state outside the jitted step (none by default)."""
        return None

    @contextlib.contextmanager
    def on_mesh(self) -> Iterator[None]:
        """Model calls inside it pin their activations on the run's mesh, through its rules."""
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), sharding.use_rules(self.rules):
            yield


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: ``cls`` serves each of its ``kinds``."""
    unknown = set(cls.groups.values()) - set(GROUPS)
    if unknown or set(cls.groups) != set(cls.trainable):
        raise ValueError(f"{cls.__name__}.groups must map each trainable key to one of {GROUPS}")
    if not set(cls.statistics) <= set(cls.frozen) or any(cls.groups.get(k) != "backbone" for k in cls.no_decay):
        raise ValueError(f"{cls.__name__}: statistics must be frozen keys, no_decay backbone keys")
    for kind in cls.kinds:
        if kind in REGISTRY:
            raise ValueError(f"loss.kind={kind!r} is registered twice ({REGISTRY[kind].__name__}, {cls.__name__})")
        REGISTRY[kind] = cls
    return cls


def get(kind: str) -> type[Objective]:
    """The objective class of ``loss.kind``; an unknown kind is a one-line ConfigError."""
    if kind not in REGISTRY:
        raise ConfigError(f"loss.kind={kind!r}: choose one of {', '.join(REGISTRY)}")
    return REGISTRY[kind]

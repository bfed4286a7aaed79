"""Export a trained run as a Hugging Face model folder: what ``python -m mlcd_jax.export`` writes.

From ``WORKDIR`` (its ``config.json``, newest checkpoint and ``results.json``) into ``OUT``:

- an image-only run (MLCD, MLC, single-label): the image tower as transformers' vision model
  (``CLIPVisionModel``, ``CLIPVisionModelWithProjection`` with a projection, ``MLCDVisionModel`` with 2-D
  RoPE; :func:`mlcd_jax.interop.hf.save_vision`), which ``AutoModel`` loads;
- an image-text run (CLIP, FLIP, LiT, ProtoCLIP): a full ``CLIPModel`` (:mod:`mlcd_jax.interop.clip`) and
  CLIP's tokenizer files;
- both: ``preprocessor_config.json`` (:func:`preprocessor_config`) and a model card ``README.md`` with the
  training config, the data and the run's results table.

:func:`push` uploads the folder to the hub (``huggingface_hub.HfApi``). Mistakes (not a run, no
checkpoint, an unreachable or refusing hub) are one-line :class:`~mlcd_jax.config_lib.ConfigError`\\ s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from mlcd_jax import checkpointing, objectives, runs, sharding
from mlcd_jax.config_lib import ConfigError
from mlcd_jax.data.augment import CLIP_MEAN, CLIP_STD
from mlcd_jax.evaluate.report import markdown_table
from mlcd_jax.interop.clip import save_clip, save_clip_tokenizer
from mlcd_jax.interop.hf import save_vision
from mlcd_jax.models.presets import ViTConfig


@dataclasses.dataclass(frozen=True)
class Exported:
    """What :func:`export_run` wrote: the folder, its architecture, the checkpoint step and the pipeline task."""

    out: str
    architecture: str
    step: int
    task: str  # the transformers pipeline it runs in


def preprocessor_config(cfg: ViTConfig) -> dict[str, Any]:
    """``CLIPImageProcessor``'s settings for the model's own eval preprocessing
    (:func:`mlcd_jax.data.pipeline.eval_pixels` and :func:`mlcd_jax.data.augment.normalize`): grey images
    repeated to RGB, the shorter side resized to ``image_size`` (bicubic), a centre crop, /255, CLIP's
    mean and std."""
    size = cfg.image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": CLIP_MEAN.tolist(), "image_std": CLIP_STD.tolist(),
    }


def _checkpoint_scalar(workdir: str, config: ml_collections.ConfigDict, key: str | None) -> tuple[float | None, int]:
    """``state[key]`` (a scalar such as ``logit_scale``; None for no key) of the newest checkpoint, and its step."""
    manager = checkpointing.create_manager(workdir, keep=1, async_save=False)
    try:
        if key is None:
            return None, int(manager.latest_step())
        whole = NamedSharding(sharding.make_mesh(dict(config.mesh)), P())
        restored = checkpointing.restore_params(manager, jax.ShapeDtypeStruct((), jnp.float32, sharding=whole), key=key)
    finally:
        manager.close()
    return float(restored[0]), restored[1]


def _results(workdir: str) -> list[dict[str, Any]]:
    """The run's ``results.json`` rows (empty when it was not evaluated)."""
    path = epath.Path(workdir) / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def export_run(workdir: str, out: str, name: str | None = None) -> Exported:
    """Writes the run in ``workdir`` into the local folder ``out`` as the module docstring says; returns what it
    wrote. ``name`` is how the model card's usage example names the model (the hub repository; default
    ``out``). One process: the towers are read onto this process's devices."""
    try:
        config = runs.load_run_config(workdir)
        goal = objectives.get(config.loss.kind)
        image = runs.load_model(workdir, config)
        text = runs.load_model(workdir, config, text=True) if goal.text else None
        log_scale, step = _checkpoint_scalar(workdir, config, "logit_scale" if goal.text else None)
    except (OSError, ValueError, KeyError) as err:  # not a run, no checkpoint, a mesh these devices cannot make
        raise ConfigError(f"--workdir={workdir}: {type(err).__name__}: {str(err).splitlines()[0][:300]}") from None
    cfg = image.config
    if cfg.num_channels != 3:
        raise ConfigError(f"--workdir={workdir}: the model takes {cfg.num_channels}-channel images; the export's "
                          "preprocessing (CLIPImageProcessor) writes RGB")
    if text is not None:
        try:
            save_clip(image, text, log_scale, out)
        except ValueError as err:  # a RoPE image tower, or towers of different widths
            raise ConfigError(f"--workdir={workdir}: no CLIPModel of this run: {err}") from None
        save_clip_tokenizer(out, text.config.context_length)
        done = Exported(out, "CLIPModel", step, "zero-shot-image-classification")
    else:
        save_vision(image, out, drop_projection=cfg.rope)
        with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
            done = Exported(out, json.load(f)["architectures"][0], step, "image-feature-extraction")
    with open(os.path.join(out, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessor_config(cfg), f, indent=2)
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, cfg, done, _results(workdir), name or out))
    return done


_USAGE = {
    "image-feature-extraction": """```python
from transformers import pipeline

extract = pipeline("image-feature-extraction", model="{name}")
features = extract("image.png", pool=True)  # the pooled embedding (pooler_output)
```""",
    "zero-shot-image-classification": """```python
from transformers import pipeline

classify = pipeline("zero-shot-image-classification", model="{name}")
classify("image.png", candidate_labels=["sneaker", "ankle boot"], hypothesis_template="a photo of a {{}}.")
```""",
}


def _features_note(cfg: ViTConfig, done: Exported) -> list[str]:
    """What the image-feature pipeline's pooled output is, against mlcd_jax's features of the run."""
    if done.task != "image-feature-extraction":
        return []
    if not cfg.proj_dim:
        note = "`pool=True` gives `pooler_output`: mlcd_jax's features of this run (the post-LayerNorm class token)."
    elif cfg.rope:
        note = (f"`MLCDVisionModel` has no projection: it is left out, and `pooler_output` is the {cfg.width}-wide "
                f"feature before the run's projection to {cfg.proj_dim}.")
    else:
        note = (f"`AutoModel` loads `CLIPVisionModel`, whose `pooler_output` is the {cfg.width}-wide feature before "
                f"the projection; `CLIPVisionModelWithProjection.from_pretrained(...)`'s `image_embeds` are mlcd_jax's "
                f"{cfg.proj_dim}-wide features of this run.")
    return [note, ""]


def model_card(config: ml_collections.ConfigDict, cfg: ViTConfig, done: Exported, rows: list[dict[str, Any]],
               name: str) -> str:
    """The model card (``README.md``): what the model is, how to use it, its preprocessing, the training
    config and data, and the run's results table."""
    data, goal = config.data, objectives.get(config.loss.kind)
    cluster = data.get("cluster") or {}
    source = cluster.get("source") or data.get("shards") or "?"
    clusters = "proto" in goal.trainable  # trained against prototypes of a clustering
    teacher = cluster.get("teacher") if clusters else None
    lines = [
        "---", "library_name: transformers", f"pipeline_tag: {done.task}", "tags: [mlcd_jax, mlcd, vision]", "---",
        f"# {done.architecture} trained with {config.loss.kind.upper()} (mlcd_jax)", "",
        f"A ViT trained by mlcd_jax with `loss.kind={config.loss.kind}`, exported from step "
        f"{done.step} as transformers' `{done.architecture}`.", "", "## Use", "",
        _USAGE[done.task].format(name=name), "", *_features_note(cfg, done),
        "## Preprocessing", "",
        f"`preprocessor_config.json` is the run's eval preprocessing: grey images repeated to RGB, the shorter side "
        f"resized to {cfg.image_size} px (bicubic), a {cfg.image_size} px centre crop, /255, CLIP's mean "
        f"{[round(x, 4) for x in CLIP_MEAN.tolist()]} and std {[round(x, 4) for x in CLIP_STD.tolist()]}. "
        "transformers' PIL backend (`AutoImageProcessor.from_pretrained(..., backend=\"pil\")`, the one used without "
        "torchvision) gives mlcd_jax's pixels exactly for square images; for others mlcd_jax resamples the centred "
        "square in one step where transformers resizes, then crops at whole pixels (sub-pixel differences), and the "
        "torchvision backend resamples with torch's bicubic.", "",
        "## Training", "",
        f"- model: `{config.model.name}` {dict(config.model.get('overrides') or {})}, {cfg.width} wide, "
        f"{cfg.depth} layers, patch {cfg.patch_size}, {cfg.image_size} px"
        f"{', 2-D RoPE' if cfg.rope else ''}{f', projection to {cfg.proj_dim}' if cfg.proj_dim else ''}",
        f"- objective: `{config.loss.kind}`" + (
            f", {config.loss.num_classes:,} prototypes, top-{config.loss.top_l} positives" if clusters else ""),
        f"- data: `{source}`" + (f", clustered by the `{teacher}` teacher" if teacher else ""),
        f"- {config.num_train_steps:,} steps at batch {config.batch_size:,}, learning rate {config.learning_rate:g}, "
        f"weight decay {config.weight_decay:g}, warm-up {config.warmup_steps:,} steps, seed {config.seed}", "",
        "<details><summary>The run's full config.json</summary>", "", "```json", config.to_json(indent=2), "```",
        "", "</details>", "", "## Results", "",
    ]
    if rows:
        columns = ["model"] + list(dict.fromkeys(k for r in rows for k in r if k != "model"))
        lines += [f"On `{config.eval.source}` (frozen features; the run's `results.json`):", "",
                  markdown_table(rows, columns)]
    else:
        lines.append("The run was not evaluated (no `results.json`).")
    return "\n".join(lines) + "\n"


def push(out: str, repo_id: str, api: Any = None) -> str:
    """Uploads the folder ``out`` to the hub model repository ``repo_id`` (created when missing) with
    ``api`` (default ``huggingface_hub.HfApi()``, its token and offline mode); returns the commit's URL."""
    from huggingface_hub import HfApi, errors

    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ConfigError(f"--push={repo_id}: name the hub repository as ORG/NAME")
    api = HfApi() if api is None else api
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(folder_path=out, repo_id=repo_id, repo_type="model",
                                   commit_message="Upload a model exported by mlcd_jax")
    except (errors.HfHubHTTPError, OSError, ValueError) as err:  # offline, no token, refused, no such org
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise ConfigError(f"--push={repo_id}: {type(err).__name__}: {message} (the folder is written: {out})") from None
    return str(getattr(commit, "commit_url", commit))

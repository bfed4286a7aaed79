"""Shared parts of every training config (configs/*.py compose these): the paper's recipe.

Defaults follow the MLCD paper (k = 1M prototypes, l = 8 positives, r = 0.1, AdamW wd 0.2, batch 32K,
32 epochs, 2,000 warm-up steps, 224 px, bf16 compute). The learning rate follows the paper's Table 9
(5e-4 for B/32 and B/16, 4e-4 for L/14); its §4.1 says 1e-3. Scale 32 and cosine margin 0.3 follow the
appendix and UNICOM's released code (the paper gives no scale).

Negative sampling (``loss.sampling``): ``"paper"`` (default) is the paper's definition, |N'| = r·|N|:
each device keeps every positive of the global batch among its rows plus ``ceil(r · negatives)``
uniform negatives. ``"partial_fc"`` is PartialFC's: positives count toward a per-device budget of
``ceil(r·k/N)`` rows, the rest random negatives; once B·l ≥ r·k the positives can fill the budget and r
stops mattering (the trainer warns).

The prototype head's optimizer group follows PartialFC / UNICOM, which put the head in the backbone's
AdamW with the same learning rate and weight decay: ``loss.proto_lr_mult`` = 1 and
``loss.proto_weight_decay`` = None (= ``weight_decay``). The head is not gradient-clipped (PartialFC
clips only the backbone); ``grad_clip`` applies to the backbone's own global norm. With
``grad_accum_steps`` = a, ``num_train_steps`` and ``warmup_steps`` stay in train steps and the schedule
runs over their optimizer updates (steps // a).
"""

from __future__ import annotations

import ml_collections

class ConfigError(ValueError):
    """A configuration that cannot run; the message is one line that names the key and the fix."""


class ResumeMismatch(ValueError):
    """A checkpoint's data order is not this run's (other shards, seed, batch size or process count).

    Raised by the data loader's restore, caught by the checkpoint reader (the run's fault, not the
    checkpoint's) and reported by the trainer as a :class:`ConfigError`; here so both import it."""


# Table 9 of the paper.
PAPER_LEARNING_RATE = {"B/32": 5e-4, "B/16": 5e-4, "L/14": 4e-4, "L/14-336": 4e-4, "bigG/14": 4e-4}


def base_config() -> ml_collections.ConfigDict:
    """Every key the trainer reads, at the paper's values."""
    c = ml_collections.ConfigDict()
    c.mode = "train"  # or "eval"
    c.seed = 0
    c.cpu_devices = 8  # fake CPU devices on a machine without an accelerator (XLA_FLAGS wins)
    # KEY[,KEY...] (or prefixes, e.g. model): training settings a re-run of a workdir may change; config.json
    # keeps each change with the step it took effect at (mlcd_jax.identity). Others are refused.
    c.allow_changes = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "B/16"
    c.model.overrides = ml_collections.ConfigDict()  # any ViTConfig field, e.g. depth=2
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    c.model.attention = ""  # "" = cudnn on GPU with bf16/fp16 compute, else jax's default; "xla", "cudnn"
    c.model.remat = ""  # "" = none, "full", "dots"
    c.model.scan_layers = False
    c.model.drop_path = 0.0

    # The text tower of the image-text objectives (loss.kind = clip / lit): CLIP's text transformer.
    c.text = ml_collections.ConfigDict()
    c.text.name = "B"  # preset: B, L, bigG (CLIP's text widths)
    c.text.overrides = ml_collections.ConfigDict()  # any TextConfig field; embed_dim defaults to the image tower's
    c.text.context_length = 77

    c.loss = ml_collections.ConfigDict()
    # mlcd (Eq. 5), mlc (Eq. 4), softmax (single label, UNICOM); clip (both towers, InfoNCE; FLIP with
    # data.patch_drop); lit (text tower against the locked image tower of loss.image_tower); protoclip;
    # siglip (both towers, sigmoid loss with a learnable bias).
    c.loss.kind = "mlcd"
    # lit: workdir:DIR (a trained run), hf:DIR or hf-hub:ORG/NAME (a CLIP/MLCD checkpoint), "" = random init
    c.loss.image_tower = ""
    c.loss.text_tower = ""  # clip / lit / protoclip: start the text tower from workdir:DIR or hf:DIR ("" = random)
    # The image-text objectives' initial log temperature; None = the objective's own (ln(1/0.07) = 2.659, CLIP's;
    # ln 10 for siglip).
    c.loss.init_logit_scale = ml_collections.config_dict.placeholder(float)
    c.loss.init_logit_bias = -10.0  # siglip: the sigmoid loss's initial bias (big_vision's SigLIP)
    c.loss.scale = 32.0
    c.loss.margin = 0.3
    c.loss.margin_type = ""  # "" = cosine for mlcd/mlc, angular (ArcFace) for softmax
    c.loss.num_classes = 1_000_000
    c.loss.top_l = 8
    c.loss.sample_ratio = 0.1
    c.loss.sampling = "paper"  # "paper": r of the negatives; "partial_fc": r·k/N rows incl. positives
    c.loss.proto_lr_mult = 1.0  # prototype learning rate = learning_rate x this
    # prototype rows: normal, N(0, 0.01^2) as PartialFC / UNICOM (the default since 2026-12-07: it ties unit rows
    # at a 10x learning rate, 3 seeds each on Fashion-MNIST and digits, benchmarks/RESULTS.md), or unit (unit-norm)
    c.loss.proto_init = "normal"
    # "dense": AdamW on every prototype row each step; "lazy": on the rows the step sampled only (PartialFC
    # v1's sparse update: untouched rows keep their moments and skip weight decay). mlcd / mlc / softmax.
    c.loss.proto_update = "dense"
    c.loss.proto_weight_decay = ml_collections.config_dict.placeholder(float)  # None = weight_decay
    # Rows each prototype shard reserves for a batch's positives: "expected" (from B·l and k, about 4
    # standard deviations above the mean; a batch beyond it runs an exact step instead) or "all".
    c.loss.positive_budget = "expected"
    # The head's cosine GEMM: "" = float32 against the float32 prototypes; "bfloat16" = both sides in
    # bfloat16 with float32 accumulation (half the prototype bytes read, the MXU's fast path).
    c.loss.head_dtype = ""
    c.loss.histograms = True  # log 40-bin histograms of positive / negative cosine

    # loss.kind = protoclip (ProtoCLIP's released defaults: 200K-pair episodes, k = 20,000, 20 k-means
    # iterations x 3 restarts, 128-d heads, target temperature 0.01, loss weights 1 / 1 / 1).
    c.protoclip = ml_collections.ConfigDict()
    c.protoclip.episode_size = 200_000  # pairs per episode, drawn with replacement (a multiple of batch_size)
    c.protoclip.num_clusters = 20_000  # k of each modality's (and the external teacher's) k-means
    c.protoclip.kmeans_iterations = 20
    c.protoclip.kmeans_nredo = 3
    c.protoclip.head_dim = 128  # projection heads: embedding -> head_hidden -> head_dim
    c.protoclip.head_hidden = 2048
    c.protoclip.w_proto = 1.0
    c.protoclip.w_external = 1.0
    c.protoclip.temperature = 0.01  # of the soft targets
    # the external teacher: "tfidf" (TF-IDF + SVD of the captions, offline), "hf:DIR" / "hf-hub:ORG/NAME" (a text
    # model's mean-pooled features, PCA to external_dim: the release used hf-hub:FacebookAI/roberta-large), "" (none)
    c.protoclip.external = "tfidf"
    c.protoclip.external_dim = 64

    c.data = ml_collections.ConfigDict()
    c.data.shards = ""  # clustering output dir (with manifest.json) or a glob of ArrayRecord shards
    c.data.image_size = 224
    c.data.augment = True
    # ProtoCLIP's "light augmentation" on top of the crop and flip: colour jitter, grey and a Gaussian blur,
    # each with p 0.2 (its release pairs it with data.crop_scale=(0.5, 1.0)); needs data.augment.
    c.data.light_augment = False
    # Random-resized-crop area range (torchvision's / the paper's default); tiny images need less.
    c.data.crop_scale = (0.08, 1.0)
    c.data.patch_drop = 0.0  # FLIP: the fraction of patch tokens dropped per image in training (0.5 in FLIP)
    c.data.patch_drop_until_step = 0  # FLIP's unmasked tuning: no patch drop after this step (0: drop throughout)
    c.data.num_workers = 0  # grain worker processes per host (0 = in the main process)
    # When `shards` is empty and this is set, the clustering job (mlcd_jax.cluster) builds the shards
    # into `cache_dir` first (a finished cache is reused).
    c.data.cluster = ml_collections.ConfigDict()
    c.data.cache_dir = ""  # default: ~/.cache/mlcd_jax/<hash of the cluster config>

    c.batch_size = 32_768
    c.num_train_steps = -1  # > 0 overrides num_epochs
    c.num_epochs = 32
    # End this launch after this many total steps (with a checkpoint), keeping the schedule of the
    # full run: for time-boxed jobs; re-running resumes. 0 = run to the end.
    c.stop_after_steps = 0
    c.learning_rate = 5e-4
    c.weight_decay = 0.2
    c.warmup_steps = 2000
    c.grad_clip = 1.0
    c.grad_accum_steps = 1
    c.b1 = 0.9
    c.b2 = 0.98
    c.eps = 1e-6
    c.mu_dtype = ""  # AdamW's first moments: "" = the parameters' float32, or "bfloat16" (half their memory)

    c.log_every_steps = 100
    c.checkpoint_every_steps = 1000
    c.keep_checkpoints = 3
    # A jax.profiler trace of this many steps (from the 5th step of a launch, after compiling) under
    # workdir/plugins/profile, for TensorBoard's profile tab; 0 = none.
    c.profile_steps = 0

    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
    # Overrides of the logical-axis -> mesh-axes table (mlcd_jax.sharding.LOGICAL_RULES), e.g.
    # "embed=;proto=data,fsdp": parameters' embed dim replicated, prototype rows split over data x fsdp.
    c.mesh_rules = ""

    c.eval = ml_collections.ConfigDict()
    c.eval.source = ""  # e.g. "fashion_mnist": the labelled images (train -> test split) evaluators use
    c.eval.train_limit = 0
    c.eval.test_limit = 0
    c.eval.batch_size = 256  # images read, decoded and embedded at a time (device memory: one batch's inputs)
    # Evaluators with every > 0 score, during training, this fraction of the train split held out (a fixed
    # draw, the same for every run and seed) against the rest; the test split is read after training only.
    c.eval.heldout_fraction = 0.1
    # Extra rows of the results table: pixels, teacher, random_init, single_label (trains a second
    # model with loss.kind = softmax, the UNICOM baseline, under workdir/single_label).
    c.eval.baselines = ""
    # Evaluators (mlcd_jax.evaluate.evaluators): every > 0 also during training every that many steps,
    # 0 = after training only, < 0 = off. They run when eval.source is set.
    c.evals = ml_collections.ConfigDict()
    c.evals.knn = dict(type="knn", every=0, k=20)
    c.evals.linear = dict(type="linear_probe", every=0)
    c.evals.pictures = dict(type="pictures", every=0)
    return c


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
    """The base config for the ViT preset ``name`` at the paper's settings, ready for a TPU slice: the
    paper's learning rate for it, and what lets the paper's batch of 32,768 fit on its recommended slice
    (``python -m mlcd_jax.aot``; launch/README.md): blocks rematerialised whole and scanned, and FSDP over
    every device (weights, AdamW state and prototype rows split over all chips, the batch too)."""
    c = base_config()
    c.model.name = name
    c.learning_rate = PAPER_LEARNING_RATE.get(name, c.learning_rate)
    c.model.remat, c.model.scan_layers = "full", True
    c.mesh.data, c.mesh.fsdp = 1, -1
    for key, value in overrides.items():
        target = c
        *path, leaf = key.split(".")
        for part in path:
            target = target[part]
        target[leaf] = value
    return c


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    """``eval.batch_size``: images embedded at a time (256 for a run recorded before the key existed); a
    value below 1 is a one-line :class:`ConfigError`."""
    size = int(config.eval.get("batch_size", 256))
    if size < 1:
        raise ConfigError(f"eval.batch_size={size} must be positive")
    return size


def train_augment(config: ml_collections.ConfigDict) -> bool | str:
    """The training augmentation ``augment_batch`` takes: ``"light"`` with ``data.light_augment``, else
    ``data.augment`` (True: crop and flip; False: centre crop)."""
    return "light" if config.data.get("light_augment") and config.data.augment else bool(config.data.augment)

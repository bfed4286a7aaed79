"""The image-text side in the one trainer: CLIP's InfoNCE against a NumPy reference and across devices,
``loss.kind=clip|lit`` training with exact resume (LiT's image tower really locked), FLIP's patch drop,
captions -> tokens in the input pipeline, and zero-shot / retrieval evaluation."""

import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections.config_flags import config_path

from mlcd_jax import checkpointing, experiment, runs, sharding, train
from mlcd_jax.config_lib import ConfigError, base_config
from mlcd_jax.data import records
from mlcd_jax.data.pipeline import make_train_loader
from mlcd_jax.data.tokenizer import tokenize
from mlcd_jax.evaluate import zero_shot
from mlcd_jax.losses.contrastive import LOG_SCALE_RANGE, contrastive_loss
from mlcd_jax.models import VisionTransformer, get_preset

ROOT = Path(__file__).resolve().parents[1]
STEPS, STOP = 6, 3


def _reference(img: np.ndarray, txt: np.ndarray, scale: float) -> float:
    """CLIP's symmetric cross-entropy written out in float64."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = scale * img @ txt.T

    def xent(z: np.ndarray) -> float:
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-np.mean(np.diag(logp)))

    return (xent(logits) + xent(logits.T)) / 2


def test_contrastive_loss_matches_numpy_with_a_gradient_at_the_cap():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(16, 8)), rng.normal(size=(16, 8))
    for log_scale in (np.log(1 / 0.07), LOG_SCALE_RANGE[1]):
        loss, metrics = contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                                         jnp.asarray(log_scale, jnp.float32))
        np.testing.assert_allclose(float(loss), _reference(img, txt, np.exp(log_scale)), rtol=1e-5)
        np.testing.assert_allclose(float(metrics["logit_scale"]), np.exp(log_scale), rtol=1e-6)
    # at ln 100, where the trainer clips the parameter, the loss still pulls it (back down, if it must)
    grad = jax.grad(lambda s: contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32), s)[0])
    assert float(grad(jnp.float32(LOG_SCALE_RANGE[1]))) != 0.0
    # matched pairs (text = image) are retrieved perfectly
    _, metrics = contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(img, jnp.float32), jnp.asarray(3.0))
    assert float(metrics["i2t_top1"]) == float(metrics["t2i_top1"]) == 1.0
    np.testing.assert_allclose(float(metrics["mean_pos_cos"]), 1.0, rtol=1e-6)


def _tiny_image_text(kind: str, **overrides) -> tuple[train.TrainSetup, dict]:
    """A tiny ``kind`` run's TrainSetup on the default mesh, and one random global batch of 16."""
    c = base_config()
    c.model.name, c.model.dtype, c.data.image_size, c.model.overrides = "tiny", "float32", 16, {"patch_size": 8}
    c.text.name, c.text.context_length = "tiny", 8
    c.text.overrides = {"width": 32, "depth": 1, "num_heads": 2, "mlp_dim": 64}
    c.loss.kind, c.batch_size, c.warmup_steps, c.learning_rate = kind, 16, 0, 1e-3
    c.protoclip.episode_size, c.protoclip.num_clusters = 16, 4
    for key, value in overrides.items():
        config_path.set_value(key, c, value)
    mesh = sharding.make_mesh(dict(c.mesh))
    train.validate(c, mesh)
    setup = train.TrainSetup.create(c, mesh, num_train_steps=10)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32), "labels": np.zeros((16, 1), np.int32),
             "tokens": rng.integers(1, 100, (16, 8)).astype(np.int32), "episode_pos": np.zeros(16, np.int32)}
    batch = {k: batch[k] for k in ("image", "labels", *setup.objective.input_specs(c))}
    return setup, sharding.host_to_global(batch, mesh, setup.rules)


@pytest.mark.parametrize("kind", ["clip", "protoclip"])
def test_the_trainer_clips_the_log_temperatures_into_0_ln100_after_each_update(kind):
    """CLIP's clamp: a log temperature driven past ln 100 (or below 0) is clipped back after the update,
    however far past it started (an old checkpoint); inside the range the update is AdamW's."""
    setup, batch = _tiny_image_text(kind)
    c = setup.config
    step, (low, high) = train.make_train_step(setup), map(float, np.float32(LOG_SCALE_RANGE))
    keys = sorted(setup.objective.bounds)
    assert keys == (["logit_scale"] if kind == "clip" else ["logit_scale", "logit_scale_proto"])
    for start, allowed in ((high + 1.0, {high}), (low - 1.0, {low}), (high - 1e-4, None)):
        state = setup.init_state(0)
        for key in keys:
            state[key] = jax.device_put(jnp.float32(start), setup.state_shardings[key])
        new, _ = step(state, batch)
        for key in keys:
            value = float(new[key])
            if allowed is not None:
                assert value in allowed, (key, start, value)
            elif key == "logit_scale_proto":  # episode 0 has no prototype term: no gradient, no move
                assert value == pytest.approx(start, abs=1e-6), value
            else:  # AdamW's first step is about lr x sign(gradient): up is clipped at ln 100, down is not
                assert value in {high} or value == pytest.approx(start - 1e-3, abs=1e-5), (key, value)
    with pytest.raises(ConfigError, match="init_logit_scale"):
        c.loss.init_logit_scale = 5.0
        train.validate(c, setup.mesh)


def test_flip_tunes_unmasked_after_patch_drop_until_step():
    """FLIP's last phase: steps up to data.patch_drop_until_step drop half the patches, later steps see
    them all (the same program as a run without patch drop); a bad setting is one line."""
    setup, batch = _tiny_image_text("clip", **{"data.patch_drop": 0.5, "data.patch_drop_until_step": 2})
    from mlcd_jax.train.step import GuardedStep

    guarded = GuardedStep(setup)
    assert [guarded.patch_drop(step) for step in (1, 2, 3, 10)] == [0.5, 0.5, 0.0, 0.0]
    losses = {}
    masked, unmasked = (train.make_train_step(setup, patch_drop=rate) for rate in (0.5, 0.0))
    for name, run in (("step 2", lambda s: guarded(s, batch, 2)), ("step 3", lambda s: guarded(s, batch, 3)),
                      ("masked", lambda s: masked(s, batch)), ("unmasked", lambda s: unmasked(s, batch))):
        losses[name] = float(run(setup.init_state(0))[1]["loss"])
    assert losses["step 2"] == losses["masked"] != losses["unmasked"] == losses["step 3"]
    for bad in ({"data.patch_drop": 0.0}, {"data.patch_drop_until_step": 10}, {"data.patch_drop_until_step": -1}):
        with pytest.raises(ConfigError, match="patch_drop_until_step"):
            _tiny_image_text("clip", **{"data.patch_drop": 0.5, "data.patch_drop_until_step": 2,
                                        "num_train_steps": 10, **bad})


def test_contrastive_loss_uses_the_global_batch_on_8_devices():
    """Split over 8 devices, every row still sees the whole batch's texts: loss and gradient as on one."""
    mesh = sharding.make_mesh({"data": 8, "fsdp": 1, "model": 1})
    rng = np.random.default_rng(1)
    img, txt = (jnp.asarray(rng.normal(size=(32, 8)), jnp.float32) for _ in range(2))

    def loss(i, t):
        return contrastive_loss(i, t, jnp.asarray(2.0))[0]

    def sharded_loss(i, t):  # as the train step runs it: activations pinned to the batch split
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), sharding.use_rules(sharding.parse_rules("")):
            return loss(i, t)

    want, want_grad = jax.value_and_grad(loss)(img, txt)
    split = NamedSharding(mesh, P("data"))
    got, got_grad = jax.jit(jax.value_and_grad(sharded_loss), in_shardings=(split, split))(
        jax.device_put(img, split), jax.device_put(txt, split))
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_grad), np.asarray(want_grad), rtol=1e-5, atol=1e-7)


def test_patch_drop_keeps_a_random_subset_per_image_only_in_training():
    from mlcd_jax.models.vit import _drop_patches

    model = VisionTransformer(get_preset("tiny-rope", image_size=32), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

    @nnx.jit(static_argnames="deterministic")
    def forward(model, x, deterministic):
        return model(x, deterministic=deterministic, rngs=nnx.Rngs(patch_drop=1), patch_drop=0.5)

    _, tokens = forward(model, x, False)
    assert tokens.shape == (4, 1 + 8, 64)  # class token + half of the 16 patches
    _, full = forward(model, x, True)  # deterministic: nothing dropped
    assert full.shape == (4, 17, 64)
    # the kept tokens: class token first, original order, a different subset per image, RoPE angles with them
    seq = jnp.broadcast_to(jnp.arange(17.0)[None, :, None], (4, 17, 1))
    kept, angles = _drop_patches(seq, jnp.arange(17.0)[:, None] * 10, 0.5, jax.random.key(3))
    kept = np.asarray(kept)[:, :, 0]
    assert (kept[:, 0] == 0).all() and (np.diff(kept, axis=1) > 0).all()
    assert len({tuple(row) for row in kept}) > 1
    np.testing.assert_array_equal(np.asarray(angles)[:, :, 0], kept * 10)


def test_zero_shot_and_retrieval_metrics_on_known_geometry():
    names = ["cat", "dog", "car"]
    basis = np.eye(3)

    def encode_text(prompts):  # each prompt's class direction, with template-dependent noise
        return np.stack([basis[[n in p for n in names].index(True)] + 0.1 * (len(p) % 3) for p in prompts])

    classes = zero_shot.class_embeddings(encode_text, names, zero_shot.TEMPLATES["clip7"])
    assert classes.shape == (3, 3)
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1), 1.0)
    images, labels = basis[[0, 1, 2, 2]] + 0.05, np.array([0, 1, 2, 1])
    assert zero_shot.zero_shot_top1(images, labels, classes) == 0.75
    feats = np.random.default_rng(0).normal(size=(20, 6))
    perfect = zero_shot.retrieval_recall(feats, feats)
    assert all(v == 1.0 for v in perfect.values()) and set(perfect) == {
        f"{d}_r@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    shifted = zero_shot.retrieval_recall(feats, np.roll(feats, 1, axis=0), ks=(1,))
    assert shifted == {"i2t_r@1": 0.0, "t2i_r@1": 0.0}
    collapsed = zero_shot.retrieval_recall(np.ones((20, 6)), np.ones((20, 6)), ks=(1, 20))  # ties count against
    assert collapsed == {"i2t_r@1": 0.0, "i2t_r@20": 1.0, "t2i_r@1": 0.0, "t2i_r@20": 1.0}


def test_the_loader_feeds_each_records_caption_as_clip_tokens(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    rng = np.random.default_rng(0)
    captions = [f"a photo of item number {i}." for i in range(24)]
    path = str(tmp_path / "shard-00000.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i, caption in enumerate(captions):
        from mlcd_jax.data.augment import encode_png

        image = encode_png(rng.integers(0, 255, (12 + i % 3, 12, 3), np.uint8))  # mixed sizes: streamed
        writer.write(records.encode(image, np.array([i % 5]), np.array([1.0], np.float32), f"k{i}", caption))
    writer.close()
    for in_memory in (0, 2**30):
        loader = make_train_loader(path, global_batch_size=8, image_size=8, top_l=1, seed=0, augment=False,
                                   context_length=16, in_memory_bytes=in_memory, num_epochs=1)
        seen = [row for batch in loader for row in batch["tokens"]]
        assert len(seen) == 24
        want = {tuple(t) for t in tokenize(captions, 16)}
        assert {tuple(t) for t in seen} == want


def test_in_memory_decoding_keeps_each_records_caption_with_its_tokens(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    from mlcd_jax.data.augment import encode_png
    from mlcd_jax.data.pipeline import ShardSource, decode_all

    rng = np.random.default_rng(0)
    captions = [f"a photo of item number {i}." if i != 2 else None for i in range(6)]  # record 2: no caption
    path = str(tmp_path / "shard-00000.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    for i, caption in enumerate(captions):
        image = encode_png(rng.integers(0, 255, (12, 12, 3), np.uint8))
        writer.write(records.encode(image, np.array([i]), np.array([1.0], np.float32), f"k{i}", caption))
    writer.close()
    images, size, targets, errors = decode_all(ShardSource([path]), top_l=1, num_channels=3, max_bytes=2**30,
                                               context_length=16)
    kept = [c for c in captions if c is not None]
    assert len(images) == 5 and list(size) == [12, 12] and list(targets["labels"][:, 0]) == [0, 1, 3, 4, 5]
    assert list(targets["captions"]) == kept
    np.testing.assert_array_equal(targets["tokens"], tokenize(kept, 16))
    assert list(errors) == [2] and errors[2][1] == "record has no caption"


def test_shards_without_captions_are_one_config_error(tmp_path):
    c = experiment.with_shards(_config(tmp_path, "mlcd"))  # digits clustered with templated captions
    from array_record.python.array_record_module import ArrayRecordWriter

    path = str(tmp_path / "bare-00000.array_record")
    writer = ArrayRecordWriter(path, "group_size:1")
    writer.write(records.encode(b"not read", np.array([0]), np.array([1.0], np.float32), "k", None))
    writer.close()
    c.loss.kind, c.data.shards = "clip", path
    with pytest.raises(ConfigError, match=r"data.shards: .* has no caption: the image-text objectives need"):
        train.train_and_evaluate(c, str(tmp_path / "bare_run"))


def _config(tmp_path: Path, kind: str, **overrides):
    spec = importlib.util.spec_from_file_location("lit_demo", ROOT / "configs" / "lit_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("digits")
    settings = {
        "loss.kind": kind, "num_train_steps": STEPS, "batch_size": 32, "log_every_steps": 1,
        "checkpoint_every_steps": 3, "warmup_steps": 2, "loss.num_classes": 32, "data.cluster.num_clusters": 32,
        "loss.top_l": 2, "data.cluster.top_l": 2, "data.cache_dir": str(tmp_path.parent / "cache"),
        "eval.train_limit": 300, "eval.test_limit": 100, "evals.knn.every": -1, "evals.linear.every": -1,
        **overrides,
    }
    for key, value in settings.items():
        config_path.set_value(key, c, value)
    return c


def _losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("clip")
    c = experiment.with_shards(_config(base / "x", "clip", **{"data.patch_drop": 0.5, "data.patch_drop_until_step": 4}))
    train.train_and_evaluate(c, str(base / "straight"))
    return c, base


def test_clip_trains_both_towers_and_resumes_exactly(clip_run):
    c, base = clip_run
    straight = _losses(base / "straight")
    assert sorted(straight) == list(range(1, STEPS + 1))
    row = json.loads((base / "straight" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("loss_i2t", "loss_t2i", "i2t_top1", "logit_scale", "mean_pos_cos", "grad_norm"):
        assert key in row
    c.stop_after_steps = STOP
    train.train_and_evaluate(c, str(base / "resumed"))
    c.stop_after_steps = 0
    train.train_and_evaluate(c, str(base / "resumed"))
    assert _losses(base / "resumed") == straight  # exact: same data order, patch drop and updates


@pytest.mark.slow  # ~85 s on 2 cores: three LiT trainings
def test_lit_keeps_the_image_tower_locked_resumes_exactly_and_evaluates_zero_shot(clip_run, tmp_path):
    clip_config, base = clip_run
    c = _config(base / "x", "lit", **{"loss.image_tower": f"workdir:{base / 'straight'}",
                                      "data.shards": clip_config.data.shards})
    workdir = tmp_path / "lit"
    train.train_and_evaluate(c, str(workdir))
    c.stop_after_steps = STOP  # stopped and resumed: the same losses (the locked tower comes from the checkpoint)
    train.train_and_evaluate(c, str(tmp_path / "lit_resumed"))
    c.stop_after_steps = 0
    train.train_and_evaluate(c, str(tmp_path / "lit_resumed"))
    assert _losses(tmp_path / "lit_resumed") == _losses(workdir)
    tower = runs.load_model(str(base / "straight"))
    locked = runs.load_model(str(workdir), c)
    for a, b in zip(jax.tree.leaves(nnx.state(tower)), jax.tree.leaves(nnx.state(locked))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text_before = runs.load_model(str(base / "straight"), clip_config, text=True)
    text_after = runs.load_model(str(workdir), c, text=True)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(nnx.state(text_before)), jax.tree.leaves(nnx.state(text_after))))
    rows = experiment.evaluate_workdir(c, str(workdir))
    assert rows[-1]["model"] == "LiT ViT" and 0.0 <= rows[-1]["zero_shot_top1"] <= 1.0
    assert json.loads((workdir / "results.json").read_text())[-1]["zero_shot_top1"] == rows[-1]["zero_shot_top1"]


def test_objective_mistakes_are_one_line(clip_run, tmp_path):
    clip_config, base = clip_run
    c = _config(base / "x", "mlcd", **{"data.shards": clip_config.data.shards})
    # A CLIP workdir resumed as MLCD: refused by the run's identity (config.json) before any restore
    with pytest.raises(ConfigError, match=r"holds a run trained with other settings: .*loss.kind \("):
        train.train_and_evaluate(c, str(base / "straight"))
    c = _config(base / "x", "lit", **{"loss.image_tower": "s3:bucket"})
    with pytest.raises(ConfigError, match=r"loss.image_tower='s3:bucket': use workdir:DIR, hf:DIR"):
        train.checked_mesh(c)
    c = _config(base / "x", "lit")
    c.text.overrides = {"proj_dim": 32}
    with pytest.raises(ConfigError, match=r"text.overrides.proj_dim=32 but the image tower embeds into 64"):
        train.checked_mesh(c)
    c = _config(base / "x", "lit", **{"model.overrides.depth": 1, "loss.image_tower": f"workdir:{base / 'straight'}",
                                      "data.shards": clip_config.data.shards})
    with pytest.raises(ConfigError, match=r"loss.image_tower=workdir:.*: the tower is .* but config.model describes"):
        train.train_and_evaluate(c, str(tmp_path / "wrong_tower"))
    c = _config(base / "x", "clipp")
    with pytest.raises(ConfigError, match=r"loss.kind='clipp': choose one of mlcd, mlc, softmax, clip, lit"):
        train.checked_mesh(c)


@pytest.mark.slow  # three trainings with an episode pass and k-means each (~3 min on 2 cores)
def test_protoclip_builds_episodes_and_resumes_mid_episode_exactly(clip_run, tmp_path):
    """Episodes of 4 steps: episode 1 is clustered at step 5; a run stopped at step 6 (its labels and
    prototypes in the checkpoint) resumes to the losses of the run that was never stopped."""
    clip_config, base = clip_run
    c = _config(base / "x", "protoclip", **{
        "data.shards": clip_config.data.shards, "num_train_steps": 10, "checkpoint_every_steps": 3,
        "protoclip.episode_size": 4 * 32, "protoclip.num_clusters": 16, "protoclip.head_hidden": 32,
        "evals.zero_shot.every": -1})
    train.train_and_evaluate(c, str(tmp_path / "straight"))
    straight = _losses(tmp_path / "straight")
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # InfoNCE only in episode 0, the prototype terms from episode 1 on
        assert (row["loss"] == pytest.approx(row["loss_clip"])) == (row["step"] <= 4), row["step"]
    c.stop_after_steps = 6
    train.train_and_evaluate(c, str(tmp_path / "resumed"))
    c.stop_after_steps = 0
    train.train_and_evaluate(c, str(tmp_path / "resumed"))
    assert _losses(tmp_path / "resumed") == straight


def test_towers_load_from_hf_checkpoints_and_a_wrong_shape_is_one_line(tmp_path):
    """loss.image_tower=hf:DIR / loss.text_tower=hf:DIR: random-weight transformers checkpoints of the
    demo's shapes load as the towers (the interop tests check their outputs); another shape is refused."""
    transformers = pytest.importorskip("transformers")
    c = _config(tmp_path, "lit")
    vit, text = runs.vit_config(c), runs.text_config(c)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=vit.width, intermediate_size=vit.mlp_dim, num_hidden_layers=vit.depth,
        num_attention_heads=vit.num_heads, image_size=vit.image_size, patch_size=vit.patch_size,
        hidden_act="quick_gelu")).save_pretrained(tmp_path / "vision")
    transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        hidden_size=text.width, intermediate_size=text.mlp_dim, num_hidden_layers=text.depth,
        num_attention_heads=text.num_heads, projection_dim=text.proj_dim, max_position_embeddings=text.context_length,
        hidden_act="quick_gelu")).save_pretrained(tmp_path / "text")
    assert runs.load_tower(f"hf:{tmp_path / 'vision'}", c).config == vit
    assert runs.load_tower(f"hf:{tmp_path / 'text'}", c, text=True).config == text
    c.text.context_length = 8
    with pytest.raises(ConfigError, match=r"loss.text_tower=hf:.*: the tower is .* but config.text describes"):
        runs.load_tower(f"hf:{tmp_path / 'text'}", c, text=True)

"""ProtoCLIP's building blocks: Prototypical Back Translation, soft targets and the prototype loss against a
NumPy float64 reference (empty clusters included), the composed loss and its gradient, and the host
side (episode sampling, per-episode spherical k-means, the TF-IDF external teacher)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlcd_jax.data import order
from mlcd_jax.losses import protoclip
from mlcd_jax.losses.contrastive import LOG_SCALE_RANGE, MAX_LOGIT_SCALE
from mlcd_jax.objectives import protoclip as episodes

TOL = 1e-5
BACK_TRANSLATE = jax.jit(protoclip.back_translate, static_argnums=2)
SOFT_TARGETS = jax.jit(protoclip.soft_targets, static_argnums=2)


# --- NumPy float64 references, written out plainly -------------------------------------------------


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def ref_back_translate(features, other_labels, k):
    d = features.shape[1]
    prototypes, mask = np.zeros((k, d)), np.zeros(k, bool)
    for c in range(k):
        rows = features[other_labels == c].astype(np.float64)
        if len(rows):
            mean = rows.mean(axis=0)
            prototypes[c], mask[c] = mean / np.linalg.norm(mean), True
    return prototypes, mask


def ref_soft_targets(centroids, labels, temperature, mask):
    centroids = centroids.astype(np.float64)
    out = np.zeros((len(labels), len(centroids)))
    for b, label in enumerate(labels):
        scores = np.array([centroids[label] @ centroids[c] / temperature for c in range(len(centroids))])
        scores = np.where(mask, scores, -np.inf)
        e = np.exp(scores - scores[mask].max())
        out[b] = e / e.sum()
    return out


def ref_proto_loss(features, prototypes, targets, log_scale, mask):
    """Soft targets [B, k] or hard labels [B] (-1 and empty-cluster labels ignored)."""
    scale = np.exp(log_scale)
    f = _normalize(features.astype(np.float64))
    losses = []
    for b in range(len(f)):
        logits = {c: scale * f[b] @ prototypes[c] for c in range(len(prototypes)) if mask[c]}
        lse = np.log(sum(np.exp(v) for v in logits.values()))
        if targets.ndim == 1:
            if targets[b] >= 0 and mask[targets[b]]:
                losses.append(lse - logits[targets[b]])
        else:
            losses.append(-sum(targets[b, c] * (v - lse) for c, v in logits.items()))
    return np.mean(losses)


def ref_info_nce(img, txt, log_scale):
    scale = np.exp(log_scale)
    logits = scale * _normalize(img.astype(np.float64)) @ _normalize(txt.astype(np.float64)).T
    def ce(z):
        return np.mean(np.log(np.exp(z).sum(axis=1)) - np.diag(z))
    return (ce(logits) + ce(logits.T)) / 2


def _labels_with_gaps(rng, n, k):
    """Labels in [0, k) that leave about a third of the clusters empty (at least one)."""
    used = rng.choice(k, size=max(1, (2 * k) // 3), replace=False)
    return rng.choice(used, size=n).astype(np.int32)


# --- losses -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 7, 40])
def test_back_translate_matches_reference(k):
    rng = np.random.default_rng(k)
    features = rng.normal(size=(60, 16)).astype(np.float32)
    labels = _labels_with_gaps(rng, 60, k)
    labels[:3] = -1  # ignored ids
    prototypes, mask = BACK_TRANSLATE(jnp.asarray(features), jnp.asarray(labels), k)
    want, want_mask = ref_back_translate(features, labels, k)
    np.testing.assert_array_equal(np.asarray(mask), want_mask)
    np.testing.assert_allclose(np.asarray(prototypes), want, atol=TOL)
    assert k == 1 or not want_mask.all()  # empty clusters were exercised
    np.testing.assert_array_equal(np.asarray(prototypes)[~want_mask], 0.0)


@pytest.mark.parametrize("k", [3, 7, 40])
@pytest.mark.parametrize("hard", [False, True])
def test_proto_loss_matches_reference(k, hard):
    rng = np.random.default_rng(100 + k)
    b, n, d = 12, 80, 8
    episode_features = rng.normal(size=(n, d)).astype(np.float32)
    other_labels = _labels_with_gaps(rng, n, k)
    centroids = _normalize(rng.normal(size=(k, d))).astype(np.float32)
    prototypes, mask = BACK_TRANSLATE(jnp.asarray(episode_features), jnp.asarray(other_labels), k)
    ref_protos, ref_mask = ref_back_translate(episode_features, other_labels, k)
    features = rng.normal(size=(b, d)).astype(np.float32)
    labels = rng.choice(np.flatnonzero(ref_mask), size=b).astype(np.int32)
    log_scale = np.float32(np.log(1 / 0.07))
    if hard:
        labels[0] = -1  # ignored, as torch's ignore_index=-1
        labels[1] = np.flatnonzero(~ref_mask)[0]  # an empty cluster: no prototype to hit, ignored too
        targets, ref_targets = jnp.asarray(labels), labels
    else:
        targets = SOFT_TARGETS(jnp.asarray(centroids), jnp.asarray(labels), 0.01, mask)
        ref_targets = ref_soft_targets(centroids, labels, 0.01, ref_mask)
        np.testing.assert_allclose(np.asarray(targets), ref_targets, atol=TOL)
        np.testing.assert_array_equal(np.asarray(targets)[:, ~ref_mask], 0.0)

    fn = jax.jit(jax.value_and_grad(protoclip.proto_loss, argnums=(0, 3), has_aux=True))
    (loss, metrics), grads = fn(jnp.asarray(features), prototypes, targets, jnp.asarray(log_scale), mask)
    want = ref_proto_loss(features, ref_protos, ref_targets, log_scale, ref_mask)
    assert abs(float(loss) - want) < TOL * max(1.0, abs(want)), (float(loss), want)
    assert int(metrics["active_prototypes"]) == ref_mask.sum()
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert float(jnp.abs(grads[0]).max()) > 0 and float(grads[1]) != 0


def test_proto_loss_scale_has_a_gradient_at_the_cap():
    """At ln 100, where the trainer clips the parameter (CLIP's clamp), the scale still has a gradient,
    so the parameter can come back down (a cap on the scale itself would leave it stuck there)."""
    rng = np.random.default_rng(0)
    features = jnp.asarray(rng.normal(size=(4, 8)), jnp.float32)
    prototypes = jnp.asarray(_normalize(rng.normal(size=(5, 8))), jnp.float32)
    labels = jnp.array([0, 1, 2, 3])
    fn = jax.jit(jax.value_and_grad(protoclip.proto_loss, argnums=3, has_aux=True))
    (loss, metrics), grad_scale = fn(features, prototypes, labels, jnp.float32(LOG_SCALE_RANGE[1]))
    assert float(metrics["logit_scale"]) == pytest.approx(MAX_LOGIT_SCALE, rel=1e-6)
    want = ref_proto_loss(np.asarray(features), np.asarray(prototypes, np.float64), np.asarray(labels),
                          LOG_SCALE_RANGE[1], np.ones(5, bool))
    assert abs(float(loss) - want) < TOL * max(1.0, want)
    assert float(grad_scale) != 0.0


def test_protoclip_loss_composes_the_terms():
    rng = np.random.default_rng(7)
    n, b, big_d, d, k, k_ext = 64, 10, 12, 8, 9, 5
    img_ep, txt_ep = rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(n, d)).astype(np.float32)
    img_lab, txt_lab = _labels_with_gaps(rng, n, k), _labels_with_gaps(rng, n, k)
    ext_lab = rng.integers(0, k_ext, n).astype(np.int32)
    img_cent = _normalize(rng.normal(size=(k, d))).astype(np.float32)
    txt_cent = _normalize(rng.normal(size=(k, d))).astype(np.float32)
    episode = jax.jit(protoclip.episode_prototypes, static_argnums=(6, 8))(
        img_ep, txt_ep, img_lab, txt_lab, img_cent, txt_cent, k, ext_lab, k_ext
    )
    batch = rng.choice(n, b, replace=False)  # the batch's pairs come from the episode
    img_emb, txt_emb = rng.normal(size=(b, big_d)).astype(np.float32), rng.normal(size=(b, big_d)).astype(np.float32)
    img_proj, txt_proj = img_ep[batch] + 0.1 * rng.normal(size=(b, d)), txt_ep[batch] + 0.1 * rng.normal(size=(b, d))
    img_proj, txt_proj = img_proj.astype(np.float32), txt_proj.astype(np.float32)
    log_scale, log_scale_proto = np.float32(np.log(20.0)), np.float32(np.log(1 / 0.07))
    weights = dict(w_clip=1.0, w_proto=0.7, w_ext=0.3)

    def total(img_emb, txt_emb, s, img_proj, txt_proj, sp):
        return protoclip.protoclip_loss(img_emb, txt_emb, s, img_proj, txt_proj, sp, episode,
                                        img_lab[batch], txt_lab[batch], ext_lab[batch], **weights)

    args = tuple(map(jnp.asarray, (img_emb, txt_emb, log_scale, img_proj, txt_proj, log_scale_proto)))
    (loss, metrics), grads = jax.jit(jax.value_and_grad(total, argnums=tuple(range(6)), has_aux=True))(*args)

    # reference: image prototypes from text clusters (teacher: text centroids, label: text cluster), and back
    img_protos, img_mask = ref_back_translate(img_ep, txt_lab, k)
    txt_protos, txt_mask = ref_back_translate(txt_ep, img_lab, k)
    targets_i2t = ref_soft_targets(txt_cent, txt_lab[batch], 0.01, img_mask)
    targets_t2i = ref_soft_targets(img_cent, img_lab[batch], 0.01, txt_mask)
    i2t = ref_proto_loss(img_proj, img_protos, targets_i2t, log_scale_proto, img_mask)
    t2i = ref_proto_loss(txt_proj, txt_protos, targets_t2i, log_scale_proto, txt_mask)
    img_ext, img_ext_mask = ref_back_translate(img_ep, ext_lab, k_ext)
    txt_ext, txt_ext_mask = ref_back_translate(txt_ep, ext_lab, k_ext)
    ext_i = ref_proto_loss(img_proj, img_ext, ext_lab[batch], log_scale_proto, img_ext_mask)
    ext_t = ref_proto_loss(txt_proj, txt_ext, ext_lab[batch], log_scale_proto, txt_ext_mask)
    clip = ref_info_nce(img_emb, txt_emb, log_scale)
    want = clip + 0.7 * (i2t + t2i) / 2 + 0.3 * (ext_i + ext_t) / 2
    for name, value in dict(loss_clip=clip, loss_proto_i2t=i2t, loss_proto_t2i=t2i, loss_ext_image=ext_i,
                            loss_ext_text=ext_t, loss=want).items():
        assert abs(float(metrics[name]) - value) < TOL * max(1.0, abs(value)), (name, float(metrics[name]), value)
    assert abs(float(loss) - want) < TOL * max(1.0, want)

    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert all(float(jnp.abs(g).max()) > 0 for g in grads)

    without_ext = jax.jit(lambda *a: protoclip.protoclip_loss(*a, w_proto=0.7))
    no_ext, m = without_ext(*args, episode, img_lab[batch], txt_lab[batch])
    assert abs(float(no_ext) - (clip + 0.7 * (i2t + t2i) / 2)) < TOL * want and float(m["loss_ext"]) == 0.0
    with pytest.raises(ValueError, match="w_ext"):
        protoclip.protoclip_loss(*args, episode, img_lab[batch], txt_lab[batch], w_ext=1.0)


# --- host side ----------------------------------------------------------------------------------------


def test_sample_episode_deterministic_with_replacement():
    a = order.sample_episode(50, 200, seed=3, episode=1)
    assert a.dtype == np.int64 and a.shape == (200,) and a.min() >= 0 and a.max() < 50
    np.testing.assert_array_equal(a, order.sample_episode(50, 200, seed=3, episode=1))
    assert len(np.unique(a)) < len(a)  # with replacement
    assert not np.array_equal(a, order.sample_episode(50, 200, seed=3, episode=2))
    assert not np.array_equal(a, order.sample_episode(50, 200, seed=4, episode=1))
    small = order.sample_episode(10_000, 100, seed=0, episode=0)
    assert len(np.unique(small)) > 90  # not a fixed prefix or a degenerate draw


def test_cluster_features_recovers_blobs_deterministically():
    rng = np.random.default_rng(0)
    centers = _normalize(rng.normal(size=(5, 16)))
    truth = np.repeat(np.arange(5), 40)
    x = (centers[truth] + 0.08 * rng.normal(size=(200, 16))).astype(np.float32)
    centroids, labels = episodes.cluster_features(x, 5, iterations=8, nredo=2, seed=1)
    assert centroids.shape == (5, 16) and centroids.dtype == np.float32 and labels.shape == (200,)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # each blob is one cluster and the clusters are distinct
    mapping = {t: set(labels[truth == t]) for t in range(5)}
    assert all(len(v) == 1 for v in mapping.values()) and len(set.union(*mapping.values())) == 5
    again_c, again_l = episodes.cluster_features(x, 5, iterations=8, nredo=2, seed=1)
    np.testing.assert_array_equal(again_c, centroids)
    np.testing.assert_array_equal(again_l, labels)


def test_tfidf_teacher_groups_identical_captions():
    topics = ["a red car parked on the street", "a small brown dog playing in the park",
              "a bowl of fresh fruit on a table", "snowy mountains under a blue sky"]
    captions = [topics[i % 4] for i in range(24)] + ["a red car on the road", "a dog in the park"]
    teacher = episodes.tfidf_teacher(captions, dim=64, seed=0)
    assert teacher.dtype == np.float32 and teacher.shape[0] == len(captions) and 1 <= teacher.shape[1] < 64
    np.testing.assert_allclose(np.linalg.norm(teacher, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(teacher[0], teacher[4], atol=1e-5)  # identical captions, identical rows
    _, labels = episodes.cluster_features(teacher, 4, iterations=5, nredo=2, seed=0)
    for t in range(4):
        assert len(set(labels[t:24:4])) == 1
    assert len(set(labels[:4])) == 4
    np.testing.assert_array_equal(teacher, episodes.tfidf_teacher(captions, dim=64, seed=0))
    tiny = episodes.tfidf_teacher(["red car", "red car", "blue sky"], dim=64)
    assert tiny.shape == (3, 3) and np.allclose(tiny[0], tiny[1])


def _tiny_text_model(directory, words):
    """A random-weight BERT (2 layers, width 32) and a WordPiece tokenizer over ``words``, saved as a
    local HF checkpoint: a text model the external teacher loads offline, as it would RoBERTa-large."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)


def test_hf_text_teacher_mean_pools_a_local_text_model_then_pca(tmp_path):
    """protoclip.external=hf:DIR: each caption's token states averaged without its batch's padding (a
    caption alone gives the same features), PCA to the requested width, unit rows; identical captions
    identical rows; a directory that holds no text model is one config error."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from mlcd_jax.config_lib import ConfigError, base_config
    from mlcd_jax.interop.sentence_features import mean_pooled

    captions = ["a red car parked on the street", "a dog", "a bowl of fresh fruit on a table", "a dog",
                "snowy mountains under a blue sky", "a red car"] * 3
    _tiny_text_model(tmp_path / "bert", " ".join(captions).split())
    spec = f"hf:{tmp_path / 'bert'}"
    features = mean_pooled(captions, spec, batch_size=4)  # batches of mixed lengths: padding in each
    tokenizer, model = AutoTokenizer.from_pretrained(tmp_path / "bert"), AutoModel.from_pretrained(tmp_path / "bert")
    with torch.no_grad():
        alone = model(**tokenizer([captions[2]], return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(features[2], alone, rtol=1e-4, atol=1e-5)
    assert features.shape == (18, 32) and features.dtype == np.float32
    teacher = episodes.external_teacher(captions, spec, dim=4, seed=0)
    assert teacher.shape == (18, 4)
    np.testing.assert_allclose(np.linalg.norm(teacher, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(teacher[1], teacher[3])
    np.testing.assert_array_equal(teacher, episodes.hf_text_teacher(captions, spec, dim=4, seed=0))
    assert episodes.external_teacher(captions, "", 4, 0) is None
    with pytest.raises(ConfigError, match="not a text model"):
        mean_pooled(captions, f"hf:{tmp_path}")
    config = base_config()
    config.loss.kind, config.batch_size = "protoclip", 256
    config.protoclip.episode_size, config.protoclip.num_clusters = 2560, 100
    for good in ("tfidf", "", spec, "hf-hub:FacebookAI/roberta-large"):
        config.protoclip.external = good
        episodes.ProtoCLIP.validate(config)
    config.protoclip.external = "roberta"
    with pytest.raises(ConfigError, match="use tfidf, hf:DIR or hf-hub:ORG/NAME"):
        episodes.ProtoCLIP.validate(config)


# --- the projection heads as released: Linear -> BatchNorm -> ReLU -> Linear, no weight decay ----------


def _protoclip_setup(batch: int = 16):
    """A ProtoCLIP TrainSetup: the image-text demo's towers at 16 px, on the fake devices."""
    from mlcd_jax import sharding, train
    from mlcd_jax.configs import lit_demo

    c = lit_demo.get_config()
    c.loss.kind, c.data.image_size, c.batch_size, c.warmup_steps = "protoclip", 16, batch, 0
    c.model.overrides = {"patch_size": 8}
    c.protoclip.episode_size, c.protoclip.num_clusters, c.protoclip.head_hidden = 2 * batch, 4, 32
    return train.TrainSetup.create(c, sharding.make_mesh(dict(c.mesh)), num_train_steps=10)


def test_heads_normalise_by_the_batch_and_renew_their_running_averages_in_the_step():
    """One train step: each head's BatchNorm statistics move by a tenth towards the global batch's
    (PyTorch's momentum 0.1), and the head's training output is the NumPy Linear-BN-ReLU-Linear of them."""
    from mlcd_jax import train

    setup = _protoclip_setup()
    goal, state = setup.objective, setup.init_state(0)
    assert set(state["head_stats"]["image"]["bn"]) == {"mean", "var"}
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 16, 16, 3)).astype(np.float32), "labels": np.zeros((16, 8), np.int32),
             "tokens": rng.integers(1, 100, (16, 16)).astype(np.int32), "episode_pos": np.arange(16, dtype=np.int32)}
    before = jax.device_get({k: state[k] for k in ("params", "text", "heads", "head_stats")})
    # the embeddings the step's heads see, from the towers before the update
    image = np.asarray(setup.merge(before["params"])(jnp.asarray(batch["image"]), deterministic=True)[0])
    text = np.asarray(goal.models["text"].merge(before["text"])(jnp.asarray(batch["tokens"])))
    state, _ = train.make_train_step(setup)(state, batch)
    after = jax.device_get(state["head_stats"])
    for name, x in (("image", image), ("text", text)):
        p = before["heads"][name]
        h = x.astype(np.float64) @ p["fc1"]["kernel"] + p["fc1"]["bias"]
        mean, var = h.mean(0), h.var(0)
        np.testing.assert_allclose(after[name]["bn"]["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(after[name]["bn"]["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
        heads = goal.heads.merge(*jax.tree.map(jnp.asarray, (before["heads"], before["head_stats"])))
        z = np.maximum((h - mean) / np.sqrt(var + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"], 0)
        want = z @ p["fc2"]["kernel"] + p["fc2"]["bias"]
        np.testing.assert_allclose(np.asarray(getattr(heads, name)(jnp.asarray(x), train=True)), want, atol=1e-4)
    # the image head starts as a copy of the text head (the released deepcopy)
    jax.tree.map(np.testing.assert_array_equal, before["heads"]["image"], before["heads"]["text"])


def test_heads_are_excluded_from_weight_decay_and_the_towers_are_not():
    """With zero gradients AdamW's first update is its weight decay alone: none on the heads."""
    setup = _protoclip_setup()
    trainable = {k: jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), setup.abstract_state[k])
                 for k in setup.objective.trainable}
    zeros = jax.tree.map(jnp.zeros_like, trainable)
    updates, _ = jax.jit(setup.tx.update)(zeros, setup.tx.init(trainable), trainable)
    assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates["heads"]))
    for key in ("params", "text"):  # their matrix weights decay
        assert any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates[key]))

"""CLIP text side: tokenizer against an independent BPE, text tower and its HF interop against transformers.

The reference tokenizer is transformers' ``CLIPTokenizer`` (the Rust ``tokenizers`` BPE) built offline
from vocab and merges derived, as open_clip derives them, from OpenAI's ``bpe_simple_vocab_16e6.txt.gz``
(tests/data/README.md says where it came from). Models are random tiny transformers ones saved locally.
"""

import gzip
import html
import importlib
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlcd_jax import sharding  # noqa: E402
from mlcd_jax.data.tokenizer import EOT, SOT, tokenize  # noqa: E402
from mlcd_jax.interop import load_text, save_text  # noqa: E402
from mlcd_jax.interop.files import InteropError  # noqa: E402
from mlcd_jax.models import TEXT_PRESETS, TextTransformer, get_text_preset  # noqa: E402

BPE_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

# Tokenized the same by the wheel (after our cleaning) and by the reference.
STRINGS = [
    "a photo of a cat.",
    "a photo of a dog",
    "A  Photo\tof a CAT.",
    "sunrise over mountains",
    "🌅 sunrise over mountains",
    "a photo of a t-shirt/top.",
    "it's 3.14159 o'clock",
    "I'll be there at 10:30pm, won't I?",
    "they're sure we've met; you'd know",
    "naïve café résumé",
    "cafe\u0301 au lait",  # decomposed accent: NFC makes it "café" (the wheel alone does not normalise)
    "l'été à Paris",
    "Straße",
    "İstanbul",
    "日本語のテキスト",
    "Привет, мир",
    "مرحبا بالعالم",
    "emoji 👍🏽 and 👨\u200d👩\u200d👧",
    "supercalifragilisticexpialidocious",
    "pneumonoultramicroscopicsilicovolcanoconiosis",
    "x² + y² = z²",
    "$19.99 (50% off!!!)",
    "user@example.com https://example.com/a?b=c#d",
    "#hashtag @mention",
    "a\nmulti-line\r\ncaption",
    "   leading and trailing   ",
    "",
    "   ",
    "\u00a0non-breaking\u00a0space",
    "ALL CAPS SHOUTING",
    "MiXeD CaSe WoRdS",
    "1234567890",
    # ftfy (open_clip's first cleaning step, not applied here nor by the reference) would turn these into
    # "fine ligature", "don't stop" and "fullwidth", so open_clip's ids differ for them.
    "ﬁne ligature",
    "don’t stop",
    "ＦＵＬＬＷＩＤＴＨ",
    "a photo of a " + "very " * 100 + "long caption",  # > 77 tokens: truncated, EOT kept last
    "word" * 200,  # one word of many BPE pieces, cut inside it
]

# HTML entities: open_clip unescapes them (twice) and so do we; the reference does not.
HTML_STRINGS = ["fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot;", "tom &amp;amp; jerry"]


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's byte -> printable character table (the BPE's alphabet)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def reference():
    """transformers' CLIPTokenizer with open_clip's vocab derivation: bytes, bytes + </w>, merges, specials."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    return transformers.CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=merges)


def _reference_row(reference, text: str, context_length: int = 77) -> np.ndarray:
    """The reference's ids, truncated and padded as open_clip's ``tokenize``."""
    ids = reference(text)["input_ids"]
    if len(ids) > context_length:
        ids = ids[:context_length]
        ids[-1] = EOT
    return np.pad(np.asarray(ids, np.int32), (0, context_length - len(ids)))


def test_tokenizer_matches_reference(reference):
    ours = tokenize(STRINGS)
    assert ours.dtype == np.int32 and ours.shape == (len(STRINGS), 77)
    ref = np.stack([_reference_row(reference, s) for s in STRINGS])
    differ = [(s, ours[i].tolist(), ref[i].tolist()) for i, s in enumerate(STRINGS) if (ours[i] != ref[i]).any()]
    assert not differ, differ
    long = STRINGS.index("word" * 200)
    assert ours[long, 0] == SOT and ours[long, -1] == EOT and np.count_nonzero(ours[long] == EOT) == 1
    short = tokenize(STRINGS, context_length=12)
    np.testing.assert_array_equal(short, np.stack([_reference_row(reference, s, 12) for s in STRINGS]))


def test_tokenizer_known_ids_and_documented_differences(reference):
    cat, dog = tokenize(["a photo of a cat.", "a photo of a dog"])
    np.testing.assert_array_equal(cat[:9], [49406, 320, 1125, 539, 320, 2368, 269, 49407, 0])
    np.testing.assert_array_equal(dog[:8], [49406, 320, 1125, 539, 320, 1929, 49407, 0])
    # HTML entities are unescaped as open_clip does; the reference keeps "&amp;" as text.
    for text in HTML_STRINGS:
        unescaped = html.unescape(html.unescape(text))
        np.testing.assert_array_equal(tokenize([text])[0], _reference_row(reference, unescaped))
        assert (_reference_row(reference, text) != tokenize([text])[0]).any()
    # Special-token markup in the text: the wheel follows open_clip 2.x/3.x, whose special tokens are
    # "<start_of_text>" / "<end_of_text>" (matched in text, like OpenAI's "<|...|>"), while the
    # reference uses OpenAI's names. So "<end_of_text>" in a caption becomes an EOT here, not in the reference.
    np.testing.assert_array_equal(tokenize(["<end_of_text>"])[0, :4], [SOT, EOT, EOT, 0])
    assert reference("<end_of_text>")["input_ids"][1] != EOT
    assert reference("<|endoftext|> x")["input_ids"][1] == EOT and tokenize(["<|endoftext|> x"])[0, 1] != EOT
    assert tokenize([]).shape == (0, 77)
    with pytest.raises(TypeError, match="sequence of strings"):
        tokenize("a photo")


def test_tokenizer_import_error_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "instant_clip_tokenizer", None)  # import fails as if not installed
    monkeypatch.delitem(sys.modules, "mlcd_jax.data.tokenizer")
    with pytest.raises(ImportError, match=r"needs the instant-clip-tokenizer package .*pip install"):
        importlib.import_module("mlcd_jax.data.tokenizer")


# ------------------------------------------------------------------------------------- the tower

TEXT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408,
    projection_dim=32,
)
CAPTIONS = ["a photo of a cat.", "sunrise over mountains, long exposure", STRINGS[-2], ""]


@nnx.jit
def embed(model, ids):
    return model(ids)


@nnx.jit
def encode(model, ids):
    return model.encode(ids)


@nnx.jit
def outputs(model, ids):
    """(text embedding, pooled pre-projection, last hidden state), compiled once per model and shape."""
    return model(ids), *model.encode(ids)


def _perturbed(model):
    """Every tensor of a random HF model moved off its init (biases and norms not trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_text(arch: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    if arch == "CLIPModel":
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      image_size=16, patch_size=8)
        text = {k: v for k, v in {**TEXT, **overrides}.items() if k != "projection_dim"}
        return _perturbed(transformers.CLIPModel(
            transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT["projection_dim"])
        ))
    return _perturbed(getattr(transformers, arch)(transformers.CLIPTextConfig(**{**TEXT, **overrides})))


def _hf_outputs(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text embedding, pooled pre-projection, last hidden state) from transformers."""
    tower = model if isinstance(model, transformers.CLIPTextModel) else model.text_model
    with torch.no_grad():
        out = tower(input_ids=torch.from_numpy(ids.astype(np.int64)))
        pooled = out.pooler_output
        embeds = pooled if tower is model else model.text_projection(pooled)
    return embeds.numpy(), pooled.numpy(), out.last_hidden_state.numpy()


def _our_outputs(model, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(np.asarray(x) for x in outputs(model, jnp.asarray(ids)))


def _assert_close(ours, ref, atol=1e-4):
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", ["CLIPTextModelWithProjection", "CLIPTextModel"])
def test_load_matches_transformers(arch, tmp_path):
    ref = _hf_text(arch)
    ref.save_pretrained(tmp_path)
    model, cfg = load_text(str(tmp_path))
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.vocab_size, cfg.context_length) == (64, 2, 4, 49408, 77)
    assert cfg.proj_dim == (32 if arch == "CLIPTextModelWithProjection" else None)
    ids = tokenize(CAPTIONS)
    _assert_close(_our_outputs(model, ids), _hf_outputs(ref, ids))
    short = tokenize(CAPTIONS[:2], context_length=16)  # fewer positions than the table has
    _assert_close(_our_outputs(model, short), _hf_outputs(ref, short))


def test_clip_model_checkpoint_loads_text_tower(tmp_path):
    ref = _hf_text("CLIPModel", hidden_act="gelu")
    ref.save_pretrained(tmp_path)
    model, cfg = load_text(str(tmp_path))
    assert cfg.proj_dim == 32 and cfg.act == "gelu" and cfg.eos_token_id == EOT
    ids = tokenize(CAPTIONS)
    _assert_close(_our_outputs(model, ids), _hf_outputs(ref, ids))
    # A config from before transformers PR #24773 (eos_token_id 2, as OpenAI's): HF pools at argmax(ids).
    config = json.loads((tmp_path / "config.json").read_text())
    config["text_config"]["eos_token_id"] = 2
    (tmp_path / "config.json").write_text(json.dumps(config))
    legacy = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    assert legacy.text_model.eos_token_id == 2
    model, cfg = load_text(str(tmp_path))
    assert cfg.eos_token_id == EOT
    _assert_close(_our_outputs(model, ids), _hf_outputs(legacy, ids))


@pytest.mark.parametrize("proj_dim", [32, None])
def test_export_loads_in_transformers(proj_dim, tmp_path):
    model = TextTransformer(get_text_preset("tiny", proj_dim=proj_dim, act="gelu"), rngs=nnx.Rngs(0))
    save_text(model, str(tmp_path))
    arch = "CLIPTextModelWithProjection" if proj_dim else "CLIPTextModel"
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [arch]
    exported = getattr(transformers, arch).from_pretrained(str(tmp_path)).eval()
    ids = tokenize(CAPTIONS)
    _assert_close(_hf_outputs(exported, ids), _our_outputs(model, ids))
    again, cfg = load_text(str(tmp_path))
    assert cfg == model.config
    _assert_close(_our_outputs(again, ids), _our_outputs(model, ids), atol=0)


def test_not_a_text_checkpoint(tmp_path):
    torch.manual_seed(0)
    transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16, patch_size=8
    )).save_pretrained(tmp_path)
    with pytest.raises(InteropError, match=r"'CLIPVisionModel' in config.json \(not a CLIP/MLCD text model\)"):
        load_text(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["CLIPTextModel"]}))
    with pytest.raises(InteropError, match=r"do not fit its config.json.*missing .*token_embedding"):
        load_text(str(tmp_path))


def test_attention_is_causal():
    model = TextTransformer(get_text_preset("tiny"), rngs=nnx.Rngs(0))
    ids = tokenize(["a photo of a cat on a red sofa", "sunrise over mountains"], context_length=16)
    t = 4
    changed = ids.copy()
    changed[:, t + 1 :] = np.random.RandomState(0).randint(0, EOT, changed[:, t + 1 :].shape)
    _, hidden = encode(model, jnp.asarray(ids))
    _, hidden_changed = encode(model, jnp.asarray(changed))
    np.testing.assert_allclose(hidden_changed[:, : t + 1], hidden[:, : t + 1], atol=1e-6, rtol=0)
    assert not np.allclose(hidden_changed[:, t + 1 :], hidden[:, t + 1 :], atol=1e-3)
    # so whatever follows the EOT (padding id, or anything) leaves the embedding as it is
    eot = int(np.argmax(ids[1] == EOT))
    padded = ids.copy()
    padded[1, eot + 1 :] = EOT
    np.testing.assert_allclose(embed(model, jnp.asarray(padded))[1], embed(model, jnp.asarray(ids))[1], atol=1e-6)


def test_options_and_errors():
    cfg = get_text_preset("tiny")
    ids = jnp.asarray(tokenize(CAPTIONS[:2]))
    ref = embed(TextTransformer(cfg, rngs=nnx.Rngs(0)), ids)
    for kwargs in [dict(attention_impl="xla"), dict(remat="full")]:
        np.testing.assert_allclose(embed(TextTransformer(cfg, rngs=nnx.Rngs(0), **kwargs), ids), ref, atol=1e-6)
    bf16 = TextTransformer(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    out = embed(bf16, ids)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), ref, atol=0.1)
    model = TextTransformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="78 tokens exceed the context length 77"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="ids must be integer"):
        model(jnp.zeros((1, 77)))
    with pytest.raises(ValueError, match="attention_impl 'flash'"):
        TextTransformer(cfg, rngs=nnx.Rngs(0), attention_impl="flash")
    with pytest.raises(KeyError, match="unknown text preset 'XL'"):
        get_text_preset("XL")
    with pytest.raises(TypeError, match="unknown TextConfig field.*'heads'"):
        get_text_preset("B", heads=3)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        get_text_preset("B", num_heads=7)
    with pytest.raises(ValueError, match="eos_token_id 49407 is outside the vocabulary"):
        get_text_preset("tiny", vocab_size=1000)


@pytest.mark.parametrize("name,params", [("B", 63_428_096), ("L", 123_650_304), ("bigG", 694_659_840)])
def test_presets_match_clip(name, params):
    """Text parameter counts of OpenAI CLIP B/32 (151,277,313 - 87,849,216 visual - logit scale), L/14, and
    OpenCLIP bigG/14."""
    cfg = TEXT_PRESETS[name]
    assert (cfg.vocab_size, cfg.context_length, cfg.embed_dim) == (49408, 77, cfg.width)
    model = nnx.eval_shape(lambda: TextTransformer(cfg, rngs=nnx.Rngs(0)))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == params


def test_sharded_matches_unsharded():
    cfg = get_text_preset("tiny")
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "model": 2})

    def create():
        return TextTransformer(cfg, rngs=nnx.Rngs(0))

    abstract = nnx.eval_shape(create)
    shardings = sharding.state_shardings(nnx.state(abstract), mesh)
    state = jax.jit(lambda: nnx.state(create()), out_shardings=shardings)()
    assert state["token_embed"]["embedding"].sharding.spec == P("model", "fsdp")
    assert state["blocks"][0]["attn"]["qkv_kernel"].sharding.spec == P("fsdp", None, "model", None)
    graphdef = nnx.graphdef(abstract)
    ids = tokenize(CAPTIONS)
    sharded_ids = jax.device_put(ids, sharding.batch_sharding(mesh))
    with jax.set_mesh(mesh):
        out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, sharded_ids)
    np.testing.assert_allclose(out, embed(create(), jnp.asarray(ids)), atol=1e-5)

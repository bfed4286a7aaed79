"""HF interop against transformers (CPU torch, random tiny models saved locally; nothing downloaded)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mlcd_jax.interop import files, hf  # noqa: E402
from mlcd_jax.interop.hf import load_vision, save_vision  # noqa: E402
from mlcd_jax.models import VisionTransformer, get_preset  # noqa: E402
from mlcd_jax.models.vit import bicubic_matrix  # noqa: E402

TINY = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
CLASSES = ["CLIPVisionModel", "CLIPVisionModelWithProjection", "MLCDVisionModel"]


@nnx.jit
def run(model, x):
    return model(x)


def _hf_model(arch: str, seed: int = 0, **overrides):
    """A random tiny HF model with every tensor perturbed (so biases and norms are not trivial)."""
    torch.manual_seed(seed)
    kw = {**TINY, **overrides}
    if arch == "MLCDVisionModel":
        model = transformers.MLCDVisionModel(transformers.MLCDVisionConfig(**kw))
    elif arch == "CLIPModel":
        model = transformers.CLIPModel(transformers.CLIPConfig(
            vision_config=kw, projection_dim=16,
            text_config=dict(
                hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, vocab_size=64
            ),
        ))
    else:
        model = getattr(transformers, arch)(transformers.CLIPVisionConfig(**kw, projection_dim=16))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _hf_features(model, pixels_nchw: np.ndarray, interpolate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    kw = {} if isinstance(model, transformers.MLCDVisionModel) else {"interpolate_pos_encoding": interpolate}
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            out = model.vision_model(pixel_values=torch.from_numpy(pixels_nchw), **kw)
            return model.visual_projection(out.pooler_output).numpy(), out.last_hidden_state.numpy()
        out = model(pixel_values=torch.from_numpy(pixels_nchw), **kw)
    pooled = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
    return pooled.numpy(), out.last_hidden_state.numpy()


def _ours(model, pixels_nchw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pooled, tokens = run(model, jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1)))
    return np.asarray(pooled), np.asarray(tokens)


def _pixels(h: int = 32, w: int = 32, n: int = 2, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, 3, h, w).astype(np.float32)


def _assert_close(ours, ref, atol=1e-4):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("arch", CLASSES)
def test_load_matches_transformers(arch, tmp_path):
    ref = _hf_model(arch)
    ref.save_pretrained(tmp_path)
    model, cfg = load_vision(str(tmp_path))
    assert cfg.rope == (arch == "MLCDVisionModel")
    assert cfg.proj_dim == (16 if arch == "CLIPVisionModelWithProjection" else None)
    assert cfg.act == ("gelu" if arch == "MLCDVisionModel" else "quick_gelu")
    _assert_close(_ours(model, _pixels()), _hf_features(ref, _pixels()))
    # another grid, non-square: HF's interpolate_pos_encoding (CLIP) / RoPE on the new grid (MLCD)
    _assert_close(_ours(model, _pixels(48, 40)), _hf_features(ref, _pixels(48, 40), interpolate=True))


@pytest.mark.parametrize("arch", CLASSES)
def test_export_loads_in_transformers(arch, tmp_path):
    ref = _hf_model(arch, seed=2)
    ref.save_pretrained(tmp_path / "src")
    model, _ = load_vision(str(tmp_path / "src"), scan_layers=True)
    save_vision(model, str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        assert json.load(f)["architectures"] == [arch]
    exported = getattr(transformers, arch).from_pretrained(str(tmp_path / "out")).eval()
    np.testing.assert_array_equal(_hf_features(exported, _pixels())[1], _hf_features(ref, _pixels())[1])
    _assert_close(_hf_features(exported, _pixels()), _ours(model, _pixels()))
    again, _ = load_vision(str(tmp_path / "out"))  # and back, into the unscanned layout
    _assert_close(_ours(again, _pixels()), _ours(model, _pixels()), atol=1e-5)


def test_own_model_exports_sharded(tmp_path):
    model = VisionTransformer(get_preset("tiny-rope"), rngs=nnx.Rngs(0))
    save_vision(model, str(tmp_path), max_shard_bytes=200_000)  # ~450 kB of fp32 tensors
    shards = [n for n in os.listdir(tmp_path) if n.startswith("model-")]
    assert len(shards) > 1 and "model.safetensors" not in os.listdir(tmp_path)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(shards)
    exported = transformers.MLCDVisionModel.from_pretrained(str(tmp_path)).eval()
    x = np.random.RandomState(0).randn(1, 3, 32, 32).astype(np.float32)
    _assert_close(_hf_features(exported, x), _ours(model, x))
    loaded, cfg = load_vision(str(tmp_path))
    assert cfg == model.config
    _assert_close(_ours(loaded, x), _ours(model, x), atol=0)


def test_projection_export_choices(tmp_path):
    with_proj = VisionTransformer(get_preset("tiny-rope", proj_dim=16), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="MLCDVisionModel has no projection.*drop_projection=True"):
        save_vision(with_proj, str(tmp_path / "a"))
    clip = VisionTransformer(get_preset("tiny", proj_dim=16), rngs=nnx.Rngs(0))
    save_vision(clip, str(tmp_path / "b"), drop_projection=True)
    tower = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "b")).eval()
    x = _pixels()
    np.testing.assert_allclose(_hf_features(tower, x)[1], _ours(clip, x)[1], atol=1e-4)


def test_clip_model_checkpoint_loads_vision_tower(tmp_path):
    ref = _hf_model("CLIPModel")
    ref.save_pretrained(tmp_path)
    model, cfg = load_vision(str(tmp_path))
    assert cfg.proj_dim == 16
    _assert_close(_ours(model, _pixels()), _hf_features(ref, _pixels()))


def test_bf16_checkpoint_and_retarget_image_size(tmp_path):
    ref = _hf_model("CLIPVisionModel")
    ref.to(torch.bfloat16).save_pretrained(tmp_path)
    ref = ref.float()  # the bf16-rounded weights, in fp32: what our fp32 params hold
    model, cfg = load_vision(str(tmp_path), image_size=48)
    assert cfg.image_size == 48 and model.pos_embed.shape == (1 + 36, 32)
    _assert_close(_ours(model, _pixels(48, 48)), _hf_features(ref, _pixels(48, 48), interpolate=True))


def test_bicubic_matches_torch():
    table = np.random.RandomState(0).randn(1, 5, 7, 7).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(table), size=(11, 4), mode="bicubic", align_corners=False)
    ours = np.einsum("hi,wj,ncij->nchw", bicubic_matrix(7, 11), bicubic_matrix(7, 4), table)
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)


def test_errors_name_the_problem(tmp_path):
    ref = _hf_model("CLIPVisionModel")
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    (tmp_path / "config.json").write_text(json.dumps({**config, "architectures": ["SiglipVisionModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture 'SiglipVisionModel'.*MLCDVisionModel"):
        load_vision(str(tmp_path))

    (tmp_path / "config.json").write_text(json.dumps(config))
    tensors = hf._strip(files.read_safetensors(str(tmp_path)))
    cfg, _ = hf.config_from_hf(config)
    incomplete = {k: v for k, v in tensors.items() if "layers.1.mlp.fc2" not in k}
    with pytest.raises(KeyError, match=r"missing 2 tensor\(s\).*encoder.layers.1.mlp.fc2.bias"):
        hf.params_from_hf(incomplete, cfg)
    with pytest.raises(ValueError, match="does not use.*encoder.layers.7.extra"):
        hf.params_from_hf({**tensors, "encoder.layers.7.extra": np.zeros(1)}, cfg)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vision(str(tmp_path / "nowhere"))

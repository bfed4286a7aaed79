"""``python -m mlcd_jax.export``: tiny trained demo runs (digits, a few steps) exported as Hugging Face model
folders, loaded back with transformers (CPU torch; nothing downloaded) and compared with our own features
and zero-shot ranking."""

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ml_collections.config_flags import config_path
from PIL import Image

transformers = pytest.importorskip("transformers")
pytest.importorskip("torch")

from mlcd_jax import experiment, runs  # noqa: E402
from mlcd_jax.config_lib import ConfigError  # noqa: E402
from mlcd_jax.data.tokenizer import tokenize  # noqa: E402
from mlcd_jax.evaluate import zero_shot  # noqa: E402
from mlcd_jax.interop import clip, export  # noqa: E402
from mlcd_jax.models.features import FeatureExtractor, TextEncoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LABELS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _config(name: str, cache: Path, **overrides):
    """configs/<name>.py on digits, trained 4 steps at batch 32 with 32 prototypes; evaluated by kNN (and zero-shot)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("digits")
    settings = {
        "num_train_steps": 4, "batch_size": 32, "warmup_steps": 1, "checkpoint_every_steps": 4,
        "log_every_steps": 2, "loss.num_classes": 32, "data.cluster.num_clusters": 32, "loss.top_l": 2,
        "data.cluster.top_l": 2, "data.cache_dir": str(cache), "eval.train_limit": 200, "eval.test_limit": 50,
        "eval.baselines": "", **overrides,
    }
    for key, value in settings.items():
        config_path.set_value(key, c, value)
    for name in list(c.evals):
        c.evals[name]["every"] = 0 if name in ("knn", "zero_shot") else -1
    return c


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One clustering of digits for both runs (the same cluster settings)."""
    return tmp_path_factory.mktemp("cluster_cache")


@pytest.fixture(scope="module")
def mlcd_run(cache, tmp_path_factory) -> Path:
    """An MLCD run of the demo's tiny ViT (CLIP layout, depth 2), trained and evaluated (kNN)."""
    workdir = tmp_path_factory.mktemp("mlcd") / "run"
    experiment.run(_config("demo", cache), str(workdir))
    return workdir


@pytest.fixture(scope="module")
def clip_run(cache, tmp_path_factory) -> Path:
    """A CLIP run of the same image tower and LiT demo's text tower, trained and evaluated (kNN, zero-shot)."""
    workdir = tmp_path_factory.mktemp("clip") / "run"
    experiment.run(_config("lit_demo", cache, **{"loss.kind": "clip"}), str(workdir))
    return workdir


def _images(n: int = 6, size: int = 24) -> list[Image.Image]:
    """Grey and colour test images, square (the case where transformers' resize + crop is ours exactly)."""
    rng = np.random.default_rng(0)
    out = [Image.fromarray(rng.integers(0, 256, (size, size), np.uint8)) for _ in range(n // 2)]
    return out + [Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)) for _ in range(n - n // 2)]


def _ours(images: list[Image.Image], model, image_size: int) -> np.ndarray:
    """Our features of each image (as uint8 pixels, grey ones [H, W, 1] as our decoder gives them)."""
    extract = FeatureExtractor(model, image_size, batch_size=8)
    return np.concatenate([extract(np.atleast_3d(np.asarray(image))[None]) for image in images])


def test_mlcd_run_loads_with_automodel_and_pipeline_with_our_features(mlcd_run, tmp_path):
    out = tmp_path / "hf"
    done = export.export_run(str(mlcd_run), str(out))
    assert (done.architecture, done.step, done.task) == ("CLIPVisionModel", 4, "image-feature-extraction")
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md"} <= set(os.listdir(out))
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.crop_size == {"height": 16, "width": 16}
    model = transformers.AutoModel.from_pretrained(out)
    assert type(model).__name__ == "CLIPVisionModel"
    extract = transformers.pipeline("image-feature-extraction", model=model, image_processor=processor)
    images = _images() + [Image.fromarray(np.full((16, 16), 200, np.uint8))]  # one already at the model's size
    theirs = np.asarray([np.asarray(f)[0] for f in extract(images, pool=True)])
    ours = _ours(images, runs.load_model(str(mlcd_run)), 16)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    card = (out / "README.md").read_text()
    rows = json.loads((mlcd_run / "results.json").read_text())
    assert "pipeline_tag: image-feature-extraction" in card and "`digits:train`" in card
    assert f"| {rows[-1]['model']} |" in card and "knn_top1" in card and '"num_train_steps": 4' in card


@pytest.mark.slow  # ~70 s on 2 cores: a second training (CLIP's text tower)
def test_clip_run_is_a_clip_model_whose_zero_shot_ranks_as_ours(clip_run, tmp_path):
    out = tmp_path / "hf"
    done = export.export_run(str(clip_run), str(out))
    assert (done.architecture, done.task) == ("CLIPModel", "zero-shot-image-classification")
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.model_max_length == 16 and len(tokenizer) == 49408
    eot = clip.clip_bpe()[0]["<|endoftext|>"]
    # CLIP's 1,000 ImageNet class names in its templates, and one caption cut at the context length
    templates = itertools.cycle(zero_shot.TEMPLATES["clip80"])
    prompts = [t.format(name) for name, t in zip(zero_shot.CLASS_NAMES["imagenet"], templates)]
    prompts.append("This is a photo of an ankle boot, and more words than sixteen tokens hold.")
    for length in (16, 77):
        ours = tokenize(prompts, length)
        theirs = tokenizer(prompts, padding="max_length", truncation=True, max_length=length)["input_ids"]
        np.testing.assert_array_equal(theirs, np.where(ours == 0, eot, ours))  # the padding differs, only
    classify = transformers.pipeline("zero-shot-image-classification", model=str(out))
    template = "a photo of a {}."
    images = _images(4)
    ranked = classify(images, candidate_labels=LABELS, hypothesis_template=template)
    config = runs.load_run_config(str(clip_run))
    image_features = _ours(images, runs.load_model(str(clip_run), config), 16)
    text_features = TextEncoder(runs.load_model(str(clip_run), config, text=True))(
        [template.format(label) for label in LABELS])
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (image_features, text_features)]
    scores = unit[0] @ unit[1].T
    log_scale = json.loads((out / "config.json").read_text())["logit_scale_init_value"]
    assert log_scale == pytest.approx(float(np.asarray(export._checkpoint_scalar(
        str(clip_run), config, "logit_scale")[0])))
    for got, row in zip(ranked, scores):  # each label's probability as ours, in decreasing order
        want = np.exp(np.exp(log_scale) * row)
        want /= want.sum()
        np.testing.assert_allclose([r["score"] for r in got], [want[LABELS.index(r["label"])] for r in got],
                                   atol=1e-5)
        assert np.all(np.diff([r["score"] for r in got]) <= 0) and len(got) == len(LABELS)


def test_push_uploads_the_folder_and_hub_errors_are_one_line(tmp_path):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", sorted(os.listdir(kw["folder_path"])), kw))
            return type("Commit", (), {"commit_url": f"https://huggingface.co/{kw['repo_id']}/commit/1"})()

    (tmp_path / "config.json").write_text("{}")
    assert export.push(str(tmp_path), "org/name", FakeApi()) == "https://huggingface.co/org/name/commit/1"
    assert calls[0] == ("create_repo", "org/name", {"repo_type": "model", "exist_ok": True})
    assert calls[1][:2] == ("upload_folder", ["config.json"])
    assert calls[1][2]["repo_id"] == "org/name" and calls[1][2]["folder_path"] == str(tmp_path)

    class Refusing(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise PermissionError("401 Client Error: Unauthorized\nmore detail")

    with pytest.raises(ConfigError, match=r"^--push=org/name: PermissionError: 401 Client Error: Unauthorized \("):
        export.push(str(tmp_path), "org/name", Refusing())
    with pytest.raises(ConfigError, match="name the hub repository as ORG/NAME"):
        export.push(str(tmp_path), "name", FakeApi())


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlcd_jax.export", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **env}, timeout=300)


def test_cli_exports_and_mistakes_are_one_line_with_status_2(mlcd_run, tmp_path):
    bad = _cli(f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        f"config error: --workdir={tmp_path / 'nothing'}: FileNotFoundError: {tmp_path / 'nothing' / 'config.json'} "
        f"is missing: {tmp_path / 'nothing'} is not a mlcd_jax training workdir"]
    offline = _cli(f"--workdir={mlcd_run}", f"--out={tmp_path / 'hf'}", "--push=org/name", HF_HUB_OFFLINE="1")
    assert "wrote CLIPVisionModel (step 4" in offline.stdout
    assert offline.returncode == 2 and len(offline.stderr.strip().splitlines()) == 1, offline.stderr
    assert offline.stderr.startswith("config error: --push=org/name: ")
    assert (tmp_path / "hf" / "model.safetensors").exists()


def test_a_rope_tower_exports_as_mlcd_vision_model_that_the_pipeline_runs(tmp_path):
    """The released MLCD layout (2-D RoPE, exact GELU), as an image-only run with it would be written."""
    from flax import nnx

    from mlcd_jax.interop.hf import save_vision
    from mlcd_jax.models import VisionTransformer, get_preset

    model = VisionTransformer(get_preset("tiny-rope", image_size=16, patch_size=4), rngs=nnx.Rngs(3))
    save_vision(model, str(tmp_path))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(export.preprocessor_config(model.config)))
    extract = transformers.pipeline("image-feature-extraction", model=str(tmp_path))
    assert type(extract.model).__name__ == "MLCDVisionModel"
    images = _images(4)
    theirs = np.asarray([np.asarray(f)[0] for f in extract(images, pool=True)])
    np.testing.assert_allclose(theirs, _ours(images, model, 16), atol=1e-4, rtol=0)


def test_clip_model_projections_and_temperature_match_our_towers(tmp_path):
    """Both towers with their own projections (the demo's image tower has none: the identity), the
    temperature capped at 100 as training caps it, and a RoPE image tower refused."""
    import torch
    from flax import nnx

    from mlcd_jax.models import TextTransformer, VisionTransformer, get_preset, get_text_preset

    image = VisionTransformer(get_preset("tiny", image_size=16, patch_size=4, proj_dim=32), rngs=nnx.Rngs(1))
    text = TextTransformer(get_text_preset("tiny", context_length=16), rngs=nnx.Rngs(2))
    clip.save_clip(image, text, np.log(200.0), str(tmp_path))
    model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    assert float(model.logit_scale.detach().exp()) == pytest.approx(100.0, rel=1e-5)
    images = _images(2)
    pixels = np.stack([np.asarray(i.convert("RGB").resize((16, 16)), np.float32) / 255 for i in images])
    ids = tokenize(["a photo of a seven.", "two"], 16)
    with torch.no_grad():
        theirs_image = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
        theirs_text = model.get_text_features(input_ids=torch.from_numpy(ids.astype(np.int64)))
    theirs_image, theirs_text = (getattr(t, "pooler_output", t).numpy() for t in (theirs_image, theirs_text))
    np.testing.assert_allclose(theirs_image, np.asarray(image(pixels)[0]), atol=1e-4, rtol=0)
    np.testing.assert_allclose(theirs_text, np.asarray(text(ids)), atol=1e-4, rtol=0)
    rope = VisionTransformer(get_preset("tiny-rope", proj_dim=32), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="2-D RoPE .* CLIPModel cannot hold"):
        clip.clip_tensors(rope, text, 0.0)

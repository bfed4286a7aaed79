"""The Colab notebooks run top to bottom, headless (nbclient), on small settings and real images."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def _run(name: str, env: dict[str, str]) -> nbformat.NotebookNode:
    notebook = nbformat.read(ROOT / "colabs" / f"{name}.ipynb", as_version=4)
    saved = dict(os.environ)
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend draws the figures into the outputs
    os.environ.update(env, MLCD_JAX_ROOT=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=8")
    try:  # the kernel inherits this process's environment
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(ROOT / "colabs")}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("nb") / "run"
    notebook = _run("quickstart", {"MLCD_NB_STEPS": "20", "MLCD_NB_SOURCE": "digits", "MLCD_NB_SMALL": "1",
                                   "MLCD_NB_WORKDIR": str(workdir)})
    return workdir, notebook


def test_quickstart_trains_evaluates_and_plots(quickstart):
    workdir, notebook = quickstart
    text = _outputs(notebook)
    assert "MLCD ViT" in text and "random-init ViT" in text and "raw pixels" in text
    assert "LiT ViT" in text and "zero_shot_top1" in text  # the text tower on the locked MLCD encoder
    images = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # training curves, patch PCA, cosine curves
    assert (workdir / "results.json").exists()


def test_visualize_on_the_quickstart_run(quickstart):
    workdir, _ = quickstart
    notebook = _run("visualize", {"MLCD_NB_WORKDIR": str(workdir), "MLCD_NB_SOURCE": "digits"})
    assert "(8, 17, 64)" in _outputs(notebook)  # 8 images x (1 + 4x4 patches) x width 64


def test_released_weights_notebook_on_a_local_hf_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    notebook = _run("released_weights", {"MLCD_NB_HF": str(tmp_path / "clip"), "MLCD_NB_SOURCE": "digits",
                                         "MLCD_NB_LIMIT": "300"})
    assert "kNN top-1 on digits" in _outputs(notebook)

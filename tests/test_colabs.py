"""The Colab notebooks (colabs/).

Quick: each opens with the same install cell, which names the repository once; no other cell reads the
checkout by path or sets the devices; each is committed executed, with its pictures.

Slow: each runs top to bottom as on a fresh Colab runtime: a fresh venv that has the package's
dependencies but not the package, the kernel of that venv, a temporary working directory, an environment
with none of the suite's variables; the first notebook's install cell installs a copy of this checkout
(``MLCD_NB_INSTALL``), the later ones find it installed.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("quickstart", "visualize", "released_weights")
REPO_LINE = re.compile(r'^REPO = "(https://github\.com/[^"]+)"$', re.M)
MAX_BYTES = 1_500_000  # a committed notebook, outputs included
KERNEL = "mlcd-nb"
# What a notebook's kernel keeps of this process's environment: a shell's basics and how pip reaches its index.
KEPT = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE")
KEPT_PREFIXES = ("PIP_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def _notebook(name: str) -> nbformat.NotebookNode:
    return nbformat.read(ROOT / "colabs" / f"{name}.ipynb", as_version=4)


def _code(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in notebook.cells if c.cell_type == "code"]


def _outputs(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(o.get("text", "") for c in _code(notebook) for o in c.outputs)


def _images(notebook: nbformat.NotebookNode) -> int:
    return sum("image/png" in o.get("data", {}) for c in _code(notebook) for o in c.outputs)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_opens_with_the_install_cell_and_reads_no_checkout(name):
    install, *later = (c.source for c in _code(_notebook(name)))
    assert install == _code(_notebook(NOTEBOOKS[0]))[0].source  # one install cell, the same in all
    assert len(REPO_LINE.findall(install)) == 1 and 'git+{REPO}' in install and "MLCD_NB_INSTALL" in install
    assert "xla_force_host_platform_device_count" in install and "nvidia-smi" in install
    assert "size_cpu_thread_pool()" in install  # else a collective over the fake devices can starve (PJRT_NPROC)
    rest = "\n".join(later)
    for banned in ("REPO", "XLA_FLAGS", "MLCD_JAX_ROOT", "sys.path", "..", "configs/", "spec_from_file_location"):
        assert banned not in rest, (name, banned)


def test_readme_names_the_notebooks_repository():
    repo = REPO_LINE.findall(_code(_notebook(NOTEBOOKS[0]))[0].source)[0]
    assert repo in (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed_with_its_pictures(name):
    cells = _code(_notebook(name))
    assert all(c.execution_count for c in cells)
    assert not [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert "device(s)" in "".join(o.get("text", "") for o in cells[0].outputs)
    assert _images(_notebook(name)) >= {"quickstart": 3, "visualize": 1, "released_weights": 1}[name]
    assert (ROOT / "colabs" / f"{name}.ipynb").stat().st_size < MAX_BYTES


def _venv(checkout: Path) -> Path:
    """A venv with the package's dependencies, ipykernel and a kernel spec for it, but not the package.

    Made once per setup.py and Python (kept in the temp dir across sessions: installing it takes minutes);
    the package is uninstalled at each use, so the install cell runs on the current checkout."""
    key = hashlib.sha256((ROOT / "setup.py").read_bytes() + sys.version.encode()).hexdigest()[:12]
    venv = Path(tempfile.gettempdir()) / f"mlcd_jax_notebook_venv_{key}"
    python = venv / "bin" / "python"
    if not (venv / "ready").exists():
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", "ipykernel", str(checkout)], check=True)
        subprocess.run([python, "-m", "ipykernel", "install", "--prefix", str(venv), "--name", KERNEL], check=True)
        (venv / "ready").touch()
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "mlcd_jax"], check=True)
    return venv


@pytest.fixture(scope="session")
def fresh(tmp_path_factory) -> tuple[Path, Path]:
    """The venv, and a copy of the checkout's files for the install cell (no build leftovers, no .git)."""
    checkout = tmp_path_factory.mktemp("checkout") / "mlcd_jax"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    return _venv(checkout), checkout


def _run(name: str, fresh: tuple[Path, Path], cwd: Path, settings: dict[str, str]) -> nbformat.NotebookNode:
    """Executes the notebook in the venv's kernel, in ``cwd``, with a clean environment plus ``settings``."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    from nbclient import NotebookClient

    venv, checkout = fresh
    env = {k: v for k, v in os.environ.items() if k in KEPT or k.startswith(KEPT_PREFIXES)}
    env.update(settings, MLCD_NB_INSTALL=str(checkout))
    specs = KernelSpecManager(kernel_dirs=[str(venv / "share" / "jupyter" / "kernels")])
    notebook = _notebook(name)
    cwd.mkdir(parents=True, exist_ok=True)
    NotebookClient(notebook, timeout=900, km=KernelManager(kernel_name=KERNEL, kernel_spec_manager=specs),
                   resources={"metadata": {"path": str(cwd)}}).execute(env=env)
    return notebook


@pytest.fixture(scope="session")
def quickstart(fresh, tmp_path_factory) -> tuple[Path, nbformat.NotebookNode]:
    tmp = tmp_path_factory.mktemp("quickstart")
    workdir = tmp / "run"
    notebook = _run("quickstart", fresh, tmp / "cwd", {
        "MLCD_NB_STEPS": "20", "MLCD_NB_SOURCE": "digits", "MLCD_NB_SMALL": "1", "MLCD_NB_WORKDIR": str(workdir)})
    return workdir, notebook


@pytest.mark.slow
def test_quickstart_installs_trains_evaluates_and_plots(quickstart):
    workdir, notebook = quickstart
    text = _outputs(notebook)
    assert "installing" in text and "8 cpu device(s)" in text  # the first notebook installs; no accelerator here
    assert "MLCD ViT" in text and "random-init ViT" in text and "raw pixels" in text
    assert "LiT ViT" in text and "zero_shot_top1" in text  # the text tower on the locked MLCD encoder
    assert _images(notebook) >= 3  # training curves, patch PCA, cosine curves
    assert (workdir / "results.json").exists()


@pytest.mark.slow
def test_visualize_on_the_quickstart_run(fresh, quickstart, tmp_path):
    workdir, _ = quickstart
    notebook = _run("visualize", fresh, tmp_path, {"MLCD_NB_WORKDIR": str(workdir), "MLCD_NB_SOURCE": "digits"})
    assert "(8, 17, 64)" in _outputs(notebook)  # 8 images x (1 + 4x4 patches) x width 64
    assert _images(notebook) >= 2  # patch PCA, cosine curves


@pytest.mark.slow
def test_released_weights_notebook_on_a_local_hf_checkpoint(fresh, tmp_path):
    transformers = pytest.importorskip("transformers")  # the suite's: the notebook's venv has no torch
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=32, patch_size=8)
    transformers.CLIPVisionModel(config).save_pretrained(tmp_path / "clip")
    notebook = _run("released_weights", fresh, tmp_path / "cwd", {
        "MLCD_NB_HF": str(tmp_path / "clip"), "MLCD_NB_SOURCE": "digits", "MLCD_NB_LIMIT": "300"})
    assert "kNN top-1 on digits" in _outputs(notebook)

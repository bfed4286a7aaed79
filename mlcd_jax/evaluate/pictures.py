"""Pictures to look at instead of numbers to read: patch-feature PCA (MLCD Fig. 6) and cosine curves (Fig. 3).

- :func:`patch_pca_image`: the first three principal components of a ViT's patch tokens as RGB, as in
  DINOv2 and MLCD Fig. 6; :func:`pca_grid_png` draws the input images in a row above their pictures,
  scaled up to legible tiles and labelled.
- :func:`cosine_curves_png`: the MLCD loss terms, the mean positive / negative cosine over training and
  the positive / negative cosine histograms at a few steps, from a run's ``metrics.jsonl`` (for the
  image-text objectives, the mean cosine of matched / unmatched image-text pairs).

Matplotlib is used through its object API with the Agg canvas, so importing this module never changes
the global pyplot backend of a notebook.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
from etils import epath
from PIL import Image
from sklearn.decomposition import PCA

from mlcd_jax import fileio
from mlcd_jax.fileio import PathLike
from mlcd_jax.losses.core import COS_HIST_BINS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Bin edges of the cosine histograms the loss logs (``pos_cos_hist`` / ``neg_cos_hist``): equal bins on [-1, 1].
COS_HIST_EDGES: np.ndarray = np.linspace(-1.0, 1.0, COS_HIST_BINS + 1)


def _minmax(x: np.ndarray) -> np.ndarray:
    """Each column scaled to [0, 1] (a constant column becomes 0)."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    return (x - lo) / np.where(hi > lo, hi - lo, 1.0)


def _pca(x: np.ndarray, n: int) -> np.ndarray:
    return PCA(n_components=n, random_state=0).fit_transform(x)


def patch_pca_image(
    tokens: np.ndarray,
    grid: tuple[int, int],
    *,
    has_class_token: bool = True,
    upscale: int = 8,
    foreground: bool = False,
) -> np.ndarray:
    """RGB pictures uint8 [n, h*upscale, w*upscale, 3] of patch tokens [n, (1+)h*w, d].

    PCA is fitted on all patches of the batch together (as DINOv2 does), so one colour means the same
    direction in every picture; the first three components, each min-max scaled over the batch, become
    R, G and B. Each patch is drawn as an ``upscale``-pixel square (nearest neighbour, no smoothing).

    ``foreground=True`` follows MLCD Fig. 6: threshold the first component at 0 and keep the positive
    side, then fit the 3-component PCA on the kept patches only; the rest is drawn black. The sign of a
    principal component is arbitrary, so it is oriented to make the side holding most of the grid's
    border patches the background (a heuristic: it assumes objects are not mostly at the border).
    """
    tokens = np.asarray(tokens, np.float32)
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"grid={grid} must be two positive sizes (patch rows, patch columns)")
    if upscale < 1:
        raise ValueError(f"upscale={upscale} must be >= 1")
    expected = h * w + int(has_class_token)
    if tokens.ndim != 3 or tokens.shape[0] == 0 or tokens.shape[1] != expected:
        raise ValueError(
            f"tokens of shape {tokens.shape} do not match grid {grid} with has_class_token={has_class_token}: "
            f"expected [n > 0, {expected}, d]"
        )
    n, _, d = tokens.shape
    patches = (tokens[:, 1:] if has_class_token else tokens).reshape(n * h * w, d)
    if d < 3 or len(patches) < 3:
        raise ValueError(f"need at least 3 patches and 3 feature dimensions for 3 components, got {patches.shape}")

    if foreground:
        first = _pca(patches, 1)[:, 0]
        border = np.ones((h, w), bool)
        border[1:-1, 1:-1] = False
        if np.mean(first.reshape(n, h, w)[:, border] > 0) > 0.5:
            first = -first
        keep = first > 0
        colours = np.zeros((len(patches), 3))
        if keep.sum() >= 3:  # fewer kept patches than components: nothing to colour
            colours[keep] = _minmax(_pca(patches[keep], 3))
    else:
        colours = _minmax(_pca(patches, 3))
    rgb = np.round(colours * 255).astype(np.uint8).reshape(n, h, w, 3)
    return rgb.repeat(upscale, axis=1).repeat(upscale, axis=2)


def save_png(array: np.ndarray, path: PathLike) -> None:
    """Writes a uint8 picture [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] as PNG, atomically (local or gs://)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"save_png needs uint8 pixels, got {array.dtype}; scale to 0..255 and cast first")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))) or 0 in array.shape:
        raise ValueError(f"save_png needs a non-empty [H, W] or [H, W, 1|3|4] picture, got shape {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    fileio.write_atomic(path, buffer.getvalue())


def _to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def new_figure(figsize: tuple[float, float], dpi: int = 100) -> Figure:
    """A matplotlib Figure on its own Agg canvas: drawing it never touches pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, path: PathLike) -> None:
    """Writes ``fig`` as PNG at its own size and dpi, atomically (local or gs://)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    fileio.write_atomic(path, buffer.getvalue())


# Layout of :func:`pca_grid_png`, in pixels: the title band, the row-label margin and the gap between tiles.
_GRID_TITLE_PX, _GRID_LABEL_PX, _GRID_GAP_PX = 48, 110, 8


def pca_grid_png(
    images: np.ndarray, pca: np.ndarray, path: PathLike, *, columns: int = 8, tile: int = 160
) -> np.ndarray:
    """Saves (and returns, uint8 [H, W, 3]) a titled sheet: a row of input images above a row of their
    patch-PCA pictures, rows labelled; more than ``columns`` images wrap into further pairs of rows.

    ``images`` uint8 [n, H, W, 1|3] and ``pca`` uint8 [n, h', w', 3] (from :func:`patch_pca_image`) are
    both scaled with nearest neighbour, so patches stay crisp squares, to tiles whose shorter side is
    ``tile`` pixels (or their own size when larger): a 4x4-patch map of a 16-pixel digit is legible.
    """
    images, pca = np.asarray(images), np.asarray(pca)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be uint8 [n, H, W, 1|3], got {images.dtype} {images.shape}")
    if pca.dtype != np.uint8 or pca.ndim != 4 or pca.shape[-1] != 3:
        raise ValueError(f"pca must be uint8 [n, h, w, 3] (patch_pca_image's output), got {pca.dtype} {pca.shape}")
    if len(images) != len(pca) or len(images) == 0:
        raise ValueError(f"need as many images as PCA pictures (and at least one), got {len(images)} and {len(pca)}")
    if columns < 1 or tile < 1:
        raise ValueError(f"columns={columns} and tile={tile} must be >= 1")
    cell_h, cell_w = max(images.shape[1], pca.shape[1]), max(images.shape[2], pca.shape[2])
    zoom = max(1.0, tile / min(cell_h, cell_w))
    cell_h, cell_w = round(cell_h * zoom), round(cell_w * zoom)
    gap, cols = _GRID_GAP_PX, min(columns, len(images))
    bands = -(-len(images) // cols)
    width = max(_GRID_LABEL_PX + cols * (cell_w + gap), 560)
    height = _GRID_TITLE_PX + bands * 2 * (cell_h + gap)
    sheet = np.full((height, width, 3), 255, np.uint8)
    for i, pair in enumerate(zip(_to_rgb(images), pca)):
        left = _GRID_LABEL_PX + (i % cols) * (cell_w + gap)
        for row, picture in enumerate(pair):
            top = _GRID_TITLE_PX + ((i // cols) * 2 + row) * (cell_h + gap)
            scaled = Image.fromarray(picture).resize((cell_w, cell_h), Image.Resampling.NEAREST)
            sheet[top : top + cell_h, left : left + cell_w] = np.asarray(scaled)

    dpi = 100
    fig = new_figure((width / dpi, height / dpi), dpi)
    fig.figimage(sheet, 0, 0, origin="upper")
    fig.text(0.5, 1 - _GRID_TITLE_PX / 2 / height, "patch-feature PCA (first 3 components as RGB)",
             ha="center", va="center", fontsize=14)
    for band in range(bands):
        for row, label in enumerate(("input", "patch PCA")):
            centre = _GRID_TITLE_PX + (band * 2 + row) * (cell_h + gap) + cell_h / 2
            fig.text((_GRID_LABEL_PX - 10) / width, 1 - centre / height, label, ha="right", va="center",
                     fontsize=12)
    fig.canvas.draw()
    rendered = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    save_png(rendered, path)
    return rendered


def read_metrics(path: PathLike) -> list[dict]:
    """The rows of a ``metrics.jsonl``; lines that are not a JSON object with a ``step`` are skipped."""
    rows = []
    with epath.Path(path).open(encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a hard kill
            if isinstance(row, dict) and "step" in row:
                rows.append(row)
    return rows


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    kept = [r for r in rows if r.get(key) is not None]
    return [r["step"] for r in kept], [r[key] for r in kept]


def _histograms(rows: Sequence[dict], key: str, count: int) -> list[tuple[int, np.ndarray]]:
    """(step, fraction per bin) at ``count`` steps spread evenly over the rows that logged ``key``."""
    kept = [r for r in rows if r.get(key) is not None]
    picked = np.unique(np.linspace(0, len(kept) - 1, count).round().astype(int)) if kept else []
    out = []
    for i in picked:
        counts = np.asarray(kept[i][key], np.float64)
        if counts.shape != (COS_HIST_BINS,):
            raise ValueError(f"{key} at step {kept[i]['step']} has {counts.size} bins; expected {COS_HIST_BINS}")
        out.append((kept[i]["step"], counts / max(counts.sum(), 1.0)))
    return out


# Legend suffixes of an image-text run's cosine curves (panel b), which are not prototype cosines.
_PAIR_LABELS = {"mean_pos_cos": " (matched pairs)", "mean_neg_cos": " (unmatched pairs)"}


def _logs_pair_cosines(rows: Sequence[dict]) -> bool:
    """Whether a run's ``mean_pos_cos`` / ``mean_neg_cos`` are the cosines of matched / unmatched image-text
    pairs of the batch (CLIP's InfoNCE, the only loss that logs ``loss_i2t``: clip, lit, protoclip) rather
    than of each image's positive / negative prototypes (mlcd, mlc, softmax)."""
    return any(r.get("loss_i2t") is not None for r in rows)


def cosine_curves_png(
    metrics_jsonl_path: PathLike | Mapping[str, PathLike],
    path: PathLike,
    *,
    hist_steps: int = 3,
    figsize: tuple[float, float] = (12.0, 8.0),
    dpi: int = 100,
) -> None:
    """Fig. 3-style panels from ``metrics.jsonl``, saved as a ``figsize * dpi`` pixel PNG.

    (a) ``loss_pos`` and ``loss_neg`` over steps, (b) ``mean_pos_cos`` and ``mean_neg_cos`` over steps
    (cosines to positive / negative prototypes; for runs of the image-text objectives, of matched /
    unmatched image-text pairs, as panel (b)'s title and legend then say), (c) / (d) ``pos_cos_hist`` /
    ``neg_cos_hist`` (fraction per bin of :data:`COS_HIST_EDGES`) at ``hist_steps`` steps spread from the
    first to the last one logged, early steps light, late dark. Rows missing a key are left out of that
    panel. Pass ``{"MLC": path_a, "MLCD": path_b}`` to compare runs as the paper does (one line style per
    run).
    """
    from matplotlib import colormaps

    runs = dict(metrics_jsonl_path) if isinstance(metrics_jsonl_path, Mapping) else {"": metrics_jsonl_path}
    if not runs:
        raise ValueError("cosine_curves_png needs at least one metrics.jsonl")
    if hist_steps < 1:
        raise ValueError(f"hist_steps={hist_steps} must be >= 1")
    keys = ("loss_pos", "loss_neg", "mean_pos_cos", "mean_neg_cos", "pos_cos_hist", "neg_cos_hist")
    data = {name: read_metrics(p) for name, p in runs.items()}
    for name, rows in data.items():
        if not any(r.get(k) is not None for r in rows for k in keys):
            raise ValueError(f"{runs[name]} has no rows with any of {keys}; is it a training run's metrics.jsonl?")

    fig = new_figure(figsize, dpi)
    fig.set_layout_engine("constrained")
    axes = fig.subplots(2, 2)
    styles = ("-", "--", ":", "-.")
    pair_runs = {name for name, rows in data.items() if _logs_pair_cosines(rows)}
    for run, (name, rows) in enumerate(data.items()):
        style = styles[run % len(styles)]
        prefix = f"{name}: " if name else ""
        suffixes = _PAIR_LABELS if name in pair_runs else {}
        for ax, pair in ((axes[0, 0], ("loss_pos", "loss_neg")), (axes[0, 1], ("mean_pos_cos", "mean_neg_cos"))):
            for key, colour in zip(pair, ("tab:blue", "tab:red")):
                steps, values = _series(rows, key)
                if steps:
                    ax.plot(steps, values, style, color=colour, label=prefix + key + suffixes.get(key, ""))
        for ax, key in ((axes[1, 0], "pos_cos_hist"), (axes[1, 1], "neg_cos_hist")):
            hists = _histograms(rows, key, hist_steps)
            shades = np.linspace(0.35, 1.0, len(hists)) if len(hists) > 1 else [1.0]
            cmap = colormaps["Blues" if key.startswith("pos") else "Reds"]
            for (step, fraction), shade in zip(hists, shades):
                ax.stairs(fraction, COS_HIST_EDGES, color=cmap(shade), linestyle=style, label=f"{prefix}step {step}")
    if not pair_runs:
        cosines = "(b) mean cosine to positive / negative prototypes"
    elif len(pair_runs) == len(data):
        cosines = "(b) mean cosine of matched / unmatched image-text pairs"
    else:  # prototype and image-text runs: the legend says which is which
        cosines = "(b) mean positive / negative cosine"
    titles = {
        (0, 0): ("(a) MLCD loss terms", "step", "loss"),
        (0, 1): (cosines, "step", "cosine"),
        (1, 0): ("(c) positive cosine $s_i$", "cosine", "fraction"),
        (1, 1): ("(d) negative cosine $s_j$", "cosine", "fraction"),
    }
    for (i, j), (title, xlabel, ylabel) in titles.items():
        ax = axes[i, j]
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    for ax in axes[1]:
        ax.set_xlim(-1, 1)

    save_figure(fig, path)

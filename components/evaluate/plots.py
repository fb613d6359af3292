"""PNG plots of an evaluation (confusion matrix, ROC and precision-recall curves, reliability
diagram, robustness heat map) and of a training run (loss/accuracy curves).

Figures are drawn with matplotlib's object API on an Agg canvas, never through ``pyplot``:
no global backend switch, no figure registry to leak, safe in Ray workers, Prefect threads and
on machines without a display.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

_DPI = 100
# Above this many classes the per-cell count labels become unreadable; the colours still speak.
_MAX_ANNOTATED_CLASSES = 30


def plot_confusion_matrix(
    cm: np.ndarray,
    classes: Sequence[str],
    path: Path,
    *,
    normalize: bool = True,
    totals: np.ndarray | None = None,
    axis_labels: tuple[str, str] = ("true", "predicted"),
) -> Path:
    """Draw a confusion matrix as a heat map and save it as PNG at ``path``.

    cm: (K, K) counts, rows = true class, columns = predicted class; classes: the K names.
    normalize: colour and annotate each cell with its share of the true class's row (recall on
    the diagonal), so rare classes are as visible as common ones; else raw counts.
    totals: (K,) what each row is a share of (default: the row sums; multi-label: each label's
    support). axis_labels: (rows, columns).
    """
    counts = np.asarray(cm)
    n_classes = len(classes)
    if counts.shape != (n_classes, n_classes):
        raise ValueError(f"cm must have shape (K, K) = ({n_classes}, {n_classes}), got {counts.shape}")
    shown = _row_normalise(counts, totals) if normalize else counts.astype(np.float64)

    side = max(4.0, 0.55 * n_classes + 2.5)
    fig = Figure(figsize=(side + 1.0, side), dpi=_DPI)
    ax = fig.add_subplot()
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    share = (
        "fraction of true class" if axis_labels[0] == "true" else f"fraction of the {axis_labels[0]}'s images"
    )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=share if normalize else "count")
    ticks = np.arange(n_classes)
    ax.set_xticks(ticks, labels=[str(c) for c in classes], rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=[str(c) for c in classes])
    ax.set_ylabel(axis_labels[0])
    ax.set_xlabel(axis_labels[1])
    ax.set_title("confusion matrix" + (f" (share of each {axis_labels[0]})" if normalize else " (counts)"))
    if n_classes <= _MAX_ANNOTATED_CLASSES:
        _annotate(ax, shown if normalize else counts, shown / (float(shown.max()) or 1.0))
    fig.tight_layout()
    return _save(fig, path)


def _row_normalise(counts: np.ndarray, totals: np.ndarray | None = None) -> np.ndarray:
    """(K, K) counts -> row fractions (of ``totals``, default the row sums); an empty row (class absent
    from the test set) stays 0."""
    rows = counts.sum(axis=1) if totals is None else np.asarray(totals)
    rows = rows.reshape(-1, 1).astype(np.float64)
    return np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)


def _annotate(ax: Any, values: np.ndarray, shade: np.ndarray) -> None:
    """Write each cell's value (counts as integers, shares with 2 decimals), white on dark cells.
    shade: (K, K) in [0, 1], the cell colours' position on the colour map."""
    fontsize = 9 if values.shape[0] <= 12 else 7
    integral = np.issubdtype(values.dtype, np.integer)
    for (i, j), v in np.ndenumerate(values):
        colour = "white" if shade[i, j] > 0.5 else "black"
        text = str(int(v)) if integral else ("0" if v == 0 else f"{v:.2f}")
        ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=fontsize)


def plot_reliability_diagram(
    bins_before: Sequence[Any],
    bins_after: Sequence[Any] | None,
    path: Path,
    *,
    temperature: float = 1.0,
    axis_labels: tuple[str, str] = ("confidence", "accuracy"),
) -> Path:
    """Reliability diagram: accuracy against confidence per equal-width bin, before and after
    temperature scaling, with the diagonal of perfect calibration; save as PNG at ``path``.

    bins_*: :class:`components.evaluate.calibration.ReliabilityBin` (``lower``, ``upper``, ``count``,
    ``confidence``, ``accuracy``); empty bins are not drawn. axis_labels: (x, y), e.g. predicted
    probability against observed frequency for multi-label bins.
    """
    xlabel, ylabel = axis_labels
    panels = [("before scaling", bins_before)] + (
        [(f"after scaling (T = {temperature:.3f})", bins_after)] if bins_after is not None else []
    )
    fig = Figure(figsize=(5.0 * len(panels), 4.6), dpi=_DPI)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, bins) in zip(axes, panels, strict=True):
        filled = [b for b in bins if b.count]
        centres = [(b.lower + b.upper) / 2 for b in filled]
        widths = [b.upper - b.lower for b in filled]
        ax.bar(centres, [b.accuracy for b in filled], width=widths, edgecolor="black", color="#4c72b0",
               label=ylabel)  # fmt: skip
        ax.bar(centres, [b.confidence - b.accuracy for b in filled], bottom=[b.accuracy for b in filled],
               width=widths, color="#dd8452", alpha=0.5, label=f"gap to {xlabel}")  # fmt: skip
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_robustness_heatmap(
    accuracy: Mapping[str, Sequence[float]],
    path: Path,
    *,
    clean_accuracy: float | None = None,
    metric: str = "accuracy",
) -> Path:
    """Heat map of accuracy (or ``metric``, e.g. mAP) per corruption family (rows) and severity
    (columns); save as PNG.

    accuracy: family -> the metric at severities 1..S; each cell is annotated with its value.
    """
    if not accuracy:
        raise ValueError("accuracy is empty: no corruption family to plot")
    families = list(accuracy)
    grid = np.asarray([list(accuracy[f]) for f in families], dtype=np.float64)
    fig = Figure(figsize=(2.5 + 0.9 * grid.shape[1], 1.2 + 0.42 * len(families)), dpi=_DPI)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=metric)
    ax.set_xticks(np.arange(grid.shape[1]), labels=[str(s + 1) for s in range(grid.shape[1])])
    ax.set_yticks(np.arange(len(families)), labels=families)
    ax.set_xlabel("severity")
    title = f"{metric} under corruption"
    ax.set_title(title + (f" (clean {clean_accuracy:.3f})" if clean_accuracy is not None else ""))
    for (i, j), v in np.ndenumerate(grid):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black")
    fig.tight_layout()
    return _save(fig, path)


_CURVE_AXES = {
    "roc": ("fpr", "tpr", "false positive rate", "true positive rate", "auc", "ROC-AUC"),
    "pr": ("recall", "precision", "recall", "precision", "ap", "AP"),
}


def plot_curves(curves: Sequence[Mapping[str, Any]], path: Path, *, kind: str) -> Path:
    """All classes' one-vs-rest ROC (``kind="roc"``: ``fpr``/``tpr``) or precision-recall (``"pr"``:
    ``recall``/``precision``) curves in one figure, each labelled with its area; save as PNG.

    curves: :func:`components.task.metrics.one_vs_rest_curves` entries of that kind (may be empty: the
    figure then says that no class had the images to draw one).
    """
    if kind not in _CURVE_AXES:
        raise ValueError(f"kind must be 'roc' or 'pr', got {kind!r}")
    xkey, ykey, xlabel, ylabel, area, area_name = _CURVE_AXES[kind]
    fig = Figure(figsize=(7.5, 6.0), dpi=_DPI)
    ax = fig.add_subplot()
    colours = [_colour(i, len(curves)) for i in range(len(curves))]
    for c, colour in zip(curves, colours, strict=True):
        ax.plot(c[xkey], c[ykey], color=colour, linewidth=1.4, label=f"{c['class']} ({area_name} {c[area]:.3f})",
                drawstyle="steps-post" if kind == "pr" else "default")  # fmt: skip
    if kind == "roc":
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    if not curves:
        ax.text(0.5, 0.5, "no class has the test images for a curve", ha="center", va="center")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("one-vs-rest ROC curves" if kind == "roc" else "precision-recall curves")
    ax.grid(True, alpha=0.3)
    if ax.has_data():
        ax.legend(loc="lower right" if kind == "roc" else "lower left", fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def _colour(i: int, n: int) -> Any:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def plot_training_curves(history: Sequence[dict[str, Any]], path: Path) -> Path:
    """Plot train/val loss and val accuracy against epoch; save as PNG at ``path``.

    history: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss``, ``val_accuracy``
    (other keys ignored; a missing or None value leaves a gap rather than failing the run).
    """
    if not history:
        raise ValueError("history is empty: there is no epoch to plot")
    epochs = [float(row.get("epoch", i + 1)) for i, row in enumerate(history)]

    fig = Figure(figsize=(10.0, 4.0), dpi=_DPI)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for key, label in (("train_loss", "train"), ("val_loss", "val")):
        _plot_series(loss_ax, epochs, _series(history, key), label=label)
    loss_ax.set_title("loss")
    loss_ax.set_ylabel("loss")
    _plot_series(acc_ax, epochs, _series(history, "val_accuracy"), label="val")
    acc_ax.set_title("validation accuracy")
    acc_ax.set_ylabel("accuracy")
    for ax in (loss_ax, acc_ax):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _series(history: Sequence[dict[str, Any]], key: str) -> list[float]:
    """One value per epoch, NaN where the epoch did not record ``key``."""
    values = [row.get(key) for row in history]
    return [math.nan if v is None else float(v) for v in values]


def _plot_series(ax: Any, epochs: list[float], values: list[float], *, label: str) -> None:
    if all(math.isnan(v) for v in values):
        return
    ax.plot(epochs, values, marker="o", markersize=3, label=label)


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(path)
    logger.debug("saved plot %s", path)
    return path

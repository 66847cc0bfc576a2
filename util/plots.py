"""PNG pictures of a run: loss curves, AP history, detections on validation images (Agg)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from util.logging import read_jsonl  # noqa: E402


def save_figure(fig: plt.Figure, path: str | Path) -> Path:
    """Written atomically (temporary file + rename), so a reader never sees half a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def smoothing_window(num_points: int) -> int:
    """Moving-average window for a curve of `num_points` steps: about 5% of the run, at least 3
    (so a 30-step smoke run shows a visibly smoothed line) and at most 500; 1 below 6 points."""
    if num_points < 6:
        return 1
    return int(min(max(3, round(num_points / 20)), 500))


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average ignoring NaN (the first points average what exists so far)."""
    if window <= 1 or len(values) < 2:
        return values
    finite = np.isfinite(values)
    sums = np.convolve(np.where(finite, values, 0.0), np.ones(window))[: len(values)]
    counts = np.convolve(finite.astype(np.float64), np.ones(window))[: len(values)]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# Loss terms get a fixed colour and line style each, so two terms with nearly equal values (the
# UGS two-hot cross-entropy loss_box_ce and the entropy loss_um start equal) stay distinguishable.
_LINE_STYLES = ("-", "--", "-.", ":")


def _term_style(index: int) -> dict:
    return {"color": plt.get_cmap("tab10")(index % 10), "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)]}


def loss_figure(records: Sequence[dict]) -> plt.Figure | None:
    """Three panels against the optimizer step: the weighted total loss, the final decoder layer's
    terms (each its own colour and line style; raw thin, moving average thick) and the lr per
    group. Skipped (non-finite) steps are marked on the first panel's x axis."""
    steps_ok = [r for r in records if not r.get("skipped") and isinstance(r.get("loss"), (int, float))]
    if not steps_ok:
        return None
    step = np.array([r["step"] for r in steps_ok])
    window = smoothing_window(len(step))
    terms = sorted(k for k in steps_ok[-1] if k.startswith("loss_") and
                   not any(c.isdigit() for c in k.split("_")[-1]) and not k.endswith(("_interm", "_dn")))

    def values(key: str) -> np.ndarray:
        return np.array([float(r[key]) if isinstance(r.get(key), (int, float)) else np.nan for r in steps_ok])

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [2, 3, 1.3]})
    smooth_note = f"thick: moving average over {window} steps" if window > 1 else "too few steps to smooth"
    ax = axes[0]
    total = values("loss")
    ax.plot(step, total, color="0.55", alpha=0.6, linewidth=0.8, label="per step")
    if window > 1:
        ax.plot(step, _smooth(total, window), color="black", linewidth=2.0, label=f"mean of {window}")
    skipped = [r["step"] for r in records if r.get("skipped")]
    if skipped:
        ax.plot(skipped, np.full(len(skipped), np.nanmin(total)), "rx",
                label=f"skipped steps ({len(skipped)})")
    ax.set_title("weighted total loss", fontsize=10)
    ax = axes[1]
    for index, key in enumerate(terms):
        style = _term_style(index)
        v = values(key)
        ax.plot(step, v, alpha=0.25, linewidth=0.7, color=style["color"], zorder=2)
        last = v[np.isfinite(v)][-1] if np.isfinite(v).any() else np.nan
        ax.plot(step, _smooth(v, window), linewidth=1.9, zorder=3 + index, label=f"{key} ({last:.3g})",
                **style)
    ax.set_title(f"final-layer loss terms, unweighted ({smooth_note})", fontsize=10)
    for ax in axes[:2]:
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    ax = axes[2]
    for k in sorted(k for k in steps_ok[-1] if k.startswith("lr")):
        ax.plot(step, values(k), label=k)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title("learning rate", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """loss_figure of the run's log.jsonl as a PNG (None when no step has a finite loss yet)."""
    fig = loss_figure(read_jsonl(log_path))
    return None if fig is None else save_figure(fig, out_path)


AP_KEYS = ("AP", "AP50", "AP75", "APs", "AR")


def ap_figure(records: Sequence[dict]) -> plt.Figure | None:
    """AP, AP50, AP75, APs and AR (at the run's max_dets) after each evaluation. The y axis starts
    at 0 and ends a little above the largest value (at most 1.05), so early values of a few
    percent are not a flat line at the bottom of a 0-1 axis."""
    if not records:
        return None
    step = np.array([r["step"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    top = 0.0
    markers = ("o", "s", "^", "v", "D")
    for index, k in enumerate(AP_KEYS):   # own marker and line style: AP and APs often coincide
        v = np.array([float(r[k]) if isinstance(r.get(k), (int, float)) else np.nan for r in records])
        if np.isfinite(v).any():
            top = max(top, float(np.nanmax(v)))
        ax.plot(step, v, marker=markers[index], markersize=7 - index, label=k, zorder=2 + index,
                **_term_style(index))
    cap = records[-1].get("max_dets", "?")
    ax.set_ylim(0.0, min(1.05, max(top * 1.15, 0.01)))   # room above a value of 1.0
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"value at maxDets={cap}")
    ax.set_title("validation metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_ap_history(history_path: str | Path, out_path: str | Path) -> Path | None:
    """ap_figure of the run's metrics_history.jsonl as a PNG."""
    fig = ap_figure(read_jsonl(history_path))
    return None if fig is None else save_figure(fig, out_path)


def place_labels(ax: plt.Axes, items: Sequence[tuple[float, float, str, Any]], fontsize: float,
                 max_labels: int = 300) -> int:
    """Draw box labels `(x0, y0, text, colour)` in the given order (highest score first), leaving
    out any whose text would overlap one already drawn; returns how many were left out. A label
    sits just above its box's top-left corner, or inside the box when there is no room above."""
    ax.apply_aspect()          # imshow's equal aspect moves the axes only at draw time otherwise
    renderer = ax.figure.canvas.get_renderer()
    y_top = min(ax.get_ylim())
    x_left, x_right = sorted(ax.get_xlim())
    right_px = ax.transData.transform((x_right, y_top))[0]
    placed: list = []
    hidden = 0
    for x0, y0, text, color in items:
        if len(placed) >= max_labels:
            hidden += 1
            continue
        t = ax.text(max(x0, x_left), y0, text, color=color, fontsize=fontsize, va="bottom", ha="left",
                    clip_on=True, bbox={"facecolor": "black", "alpha": 0.45, "pad": 0.6, "linewidth": 0})
        extent = t.get_window_extent(renderer)
        if extent.y1 > ax.transData.transform((x0, y_top))[1]:   # no room above the box
            t.set_va("top")
        if extent.x1 > right_px:                                 # keep it inside on the right
            t.set_x(x_right)
            t.set_ha("right")
        extent = t.get_window_extent(renderer)
        if any(extent.overlaps(other) for other in placed):
            t.remove()
            hidden += 1
            continue
        placed.append(extent.expanded(1.04, 1.15))
    return hidden


def plot_detections(samples: Sequence, out_path: str | Path, score_threshold: float = 0.3,
                    class_names: dict[int, str] | None = None, title: str = "") -> Path | None:
    """A row of validation images: ground truth dashed white, detections (score >= threshold)
    coloured by class with their score. Samples are `util.engine.EvalSample`."""
    if not samples:
        return None
    n = len(samples)
    aspect = max(float(s.image.shape[-2]) / float(s.image.shape[-1]) for s in samples)   # h / w
    height = 4.0 * aspect + 0.8                       # the images, then room for the titles above
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, height), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.75 / height, wspace=0.04)
    cmap = plt.get_cmap("tab10")
    for ax, s in zip(axes[0], samples):
        ax.imshow(s.image.permute(1, 2, 0).numpy(), interpolation="nearest")
        for x0, y0, x1, y1 in s.gt_boxes_xyxy.tolist():
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                       linestyle="--", linewidth=0.8))
        keep = s.scores >= score_threshold
        rule = f"dets >= {score_threshold}"
        if not bool(keep.any()) and len(s.scores):
            # a weak (early) model scores nothing above the threshold: show its best guesses
            top = min(len(s.scores), max(len(s.gt_boxes_xyxy), 1))
            keep = torch.zeros_like(keep)
            keep[s.scores.topk(top).indices] = True
            rule = f"top-scored dets (none >= {score_threshold})"
        labels = []
        order = torch.argsort(s.scores[keep], descending=True)
        for (x0, y0, x1, y1), score, label in zip(s.boxes_xyxy[keep][order].tolist(),
                                                  s.scores[keep][order].tolist(),
                                                  s.labels[keep][order].tolist()):
            color = cmap(int(label) % 10)
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                       linewidth=1.2))
            name = class_names.get(int(label), str(label)) if class_names else str(label)
            labels.append((x0, y0, f"{name} {score:.2f}", color))
        hidden = place_labels(ax, labels, fontsize=6)
        ax.set_title(f"image {s.image_id}: {int(keep.sum())} {rule}, {len(s.gt_boxes_xyxy)} GT"
                     + (f"\n({hidden} overlapping labels not drawn)" if hidden else ""), fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, out_path)


def image_detections_figure(image: torch.Tensor, boxes_xyxy: torch.Tensor, scores: torch.Tensor,
                            labels: torch.Tensor, score_threshold: float = 0.3,
                            class_names: dict[int, str] | None = None, max_side_inches: float = 16.0,
                            title: str | None = None) -> tuple[plt.Figure, int]:
    """The figure of draw_image_detections and its dpi: the image fills the canvas; the title is
    drawn inside it (top left, on a dark band); labels that would overlap are left out (counted in
    the title), highest scores labelled first."""
    img = image.float() / 255.0 if not image.is_floating_point() else image.float()
    h, w = img.shape[-2:]
    scale = max_side_inches / max(h, w)
    fig = plt.figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img.clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
    ax.axis("off")
    cmap = plt.get_cmap("tab10")
    keep = scores >= score_threshold
    order = torch.argsort(scores[keep], descending=True)
    items = []
    for (x0, y0, x1, y1), score, label in zip(boxes_xyxy[keep][order].tolist(), scores[keep][order].tolist(),
                                              labels[keep][order].tolist()):
        color = cmap(int(label) % 10)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=0.8))
        name = class_names.get(int(label), str(label)) if class_names else str(label)
        items.append((x0, y0, f"{name} {score:.2f}", color))
    fontsize = 7
    hidden = place_labels(ax, items, fontsize=fontsize)
    text = (title + ": " if title else "") + f"{int(keep.sum())} detections >= {score_threshold}"
    if hidden:
        text += f" ({hidden} overlapping labels not drawn)"
    ax.text(0.004, 0.996, text, transform=ax.transAxes, va="top", ha="left", fontsize=fontsize + 2,
            color="white", zorder=10, bbox={"facecolor": "black", "alpha": 0.65, "pad": 2, "linewidth": 0})
    return fig, max(100, int(max(h, w) / max_side_inches))


def draw_image_detections(image: torch.Tensor, boxes_xyxy: torch.Tensor, scores: torch.Tensor,
                          labels: torch.Tensor, out_path: str | Path, score_threshold: float = 0.3,
                          class_names: dict[int, str] | None = None, max_side_inches: float = 16.0,
                          title: str | None = None) -> Path:
    """One full-resolution image (3, H, W) uint8 or float in [0, 1] with its detections
    (score >= threshold), sized so small boxes stay visible on large images."""
    fig, dpi = image_detections_figure(image, boxes_xyxy, scores, labels, score_threshold, class_names,
                                       max_side_inches, title)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path

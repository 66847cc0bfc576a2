"""PNG pictures of a run: loss curves, AP history, detections on validation images (Agg)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from util.logging import read_jsonl  # noqa: E402


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[: i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot_loss_curves(log_path: str | Path, out_path: str | Path) -> Path | None:
    """Total loss and the final-layer terms (raw, thin; moving average, thick) against the step,
    plus the lr of each group. Skipped steps are marked on the x axis."""
    records = read_jsonl(log_path)
    steps_ok = [r for r in records if not r.get("skipped") and isinstance(r.get("loss"), (int, float))]
    if not steps_ok:
        return None
    step = np.array([r["step"] for r in steps_ok])
    window = max(1, len(step) // 50)
    main_terms = ["loss"] + sorted(k for k in steps_ok[-1] if k.startswith("loss_") and
                                   not any(c.isdigit() for c in k.split("_")[-1]) and
                                   not k.endswith(("_interm", "_dn")))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    ax = axes[0]
    for k in main_terms:
        v = np.array([float(r.get(k, np.nan)) for r in steps_ok])
        line, = ax.plot(step, v, alpha=0.25, linewidth=0.8)
        ax.plot(step, _smooth(v, window), color=line.get_color(), linewidth=1.8,
                label=k + (" (weighted total)" if k == "loss" else ""))
    skipped = [r["step"] for r in records if r.get("skipped")]
    if skipped:
        ax.plot(skipped, np.zeros(len(skipped)), "rx", label=f"skipped steps ({len(skipped)})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("training losses (final decoder layer terms; thick: moving average)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for k in sorted(k for k in steps_ok[-1] if k.startswith("lr")):
        ax.plot(step, [float(r.get(k, np.nan)) for r in steps_ok], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_title("learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_ap_history(history_path: str | Path, out_path: str | Path) -> Path | None:
    """AP, AP50, AP75 and AR (at the run's max_dets) after each evaluation."""
    records = read_jsonl(history_path)
    if not records:
        return None
    step = np.array([r["step"] for r in records])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k in ("AP", "AP50", "AP75", "APs", "AR"):
        v = [float(r[k]) if isinstance(r.get(k), (int, float)) else np.nan for r in records]
        ax.plot(step, v, marker="o", label=k)
    cap = records[-1].get("max_dets", "?")
    ax.set_ylim(0, 1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"value at maxDets={cap}")
    ax.set_title("validation metrics")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_path)


def plot_detections(samples: Sequence, out_path: str | Path, score_threshold: float = 0.3,
                    class_names: dict[int, str] | None = None, title: str = "") -> Path | None:
    """A row of validation images: ground truth dashed white, detections (score >= threshold)
    coloured by class with their score. Samples are `util.engine.EvalSample`."""
    if not samples:
        return None
    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 4.6), squeeze=False)
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
        for (x0, y0, x1, y1), score, label in zip(s.boxes_xyxy[keep].tolist(),
                                                  s.scores[keep].tolist(), s.labels[keep].tolist()):
            color = cmap(int(label) % 10)
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color,
                                       linewidth=1.2))
            name = class_names.get(int(label), str(label)) if class_names else str(label)
            ax.text(x0, y0 - 1, f"{name} {score:.2f}", color=color, fontsize=6,
                    bbox={"facecolor": "black", "alpha": 0.4, "pad": 0.5, "linewidth": 0})
        ax.set_title(f"image {s.image_id}: {int(keep.sum())} {rule}, "
                     f"{len(s.gt_boxes_xyxy)} GT", fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, out_path)


def draw_image_detections(image: "torch.Tensor", boxes_xyxy: "torch.Tensor", scores: "torch.Tensor",
                          labels: "torch.Tensor", out_path: str | Path, score_threshold: float = 0.3,
                          class_names: dict[int, str] | None = None, max_side_inches: float = 16.0) -> Path:
    """One full-resolution image (3, H, W) uint8 or float in [0, 1] with its detections
    (score >= threshold), sized so small boxes stay visible on large images."""
    img = image.float() / 255.0 if not image.is_floating_point() else image.float()
    h, w = img.shape[-2:]
    scale = max_side_inches / max(h, w)
    fig = plt.figure(figsize=(max(w * scale, 2.0), max(h * scale, 2.0)))
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(img.clamp(0, 1).permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
    cmap = plt.get_cmap("tab10")
    keep = scores >= score_threshold
    for (x0, y0, x1, y1), score, label in zip(boxes_xyxy[keep].tolist(), scores[keep].tolist(),
                                              labels[keep].tolist()):
        color = cmap(int(label) % 10)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=color, linewidth=0.8))
        name = class_names.get(int(label), str(label)) if class_names else str(label)
        ax.text(x0, y0 - 1, f"{name} {score:.2f}", color=color, fontsize=5)
    ax.set_title(f"{int(keep.sum())} detections >= {score_threshold}", fontsize=8, y=0.99)
    ax.axis("off")
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=max(100, int(max(h, w) / max_side_inches)))
    plt.close(fig)
    os.replace(tmp, path)
    return path

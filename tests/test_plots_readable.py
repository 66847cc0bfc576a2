"""Run pictures that read well on short and long runs: visible smoothing, terms with equal values
told apart, an AP axis that fits the values, titles inside the canvas, labels that do not pile up."""
from __future__ import annotations

import json
import math

import numpy as np
import torch

from util.plots import (ap_figure, draw_image_detections, image_detections_figure, loss_figure,
                        plot_ap_history, plot_detections, plot_loss_curves, smoothing_window)


def _short_log(n: int = 30) -> list[dict]:
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, n + 1):
        ce = 2.8 * math.exp(-step / 40) + 0.3 * rng.random()
        records.append({"step": step, "epoch": 0, "loss": 10 * ce + rng.random(), "loss_ce": 0.9 * ce,
                        "loss_box_ce": ce, "loss_um": ce * (1 - 1e-3), "loss_giou": 0.5 * ce,
                        "loss_box_ce_0": ce, "loss_um_dn": ce, "lr": 1e-4, "lr_backbone": 1e-5})
    return records


def test_short_run_is_smoothed_and_equal_terms_are_told_apart(tmp_path):
    import matplotlib.pyplot as plt

    assert smoothing_window(30) > 1 and smoothing_window(1450) > smoothing_window(30)
    assert smoothing_window(3) == 1 and smoothing_window(10 ** 6) == 500
    fig = loss_figure(_short_log())
    terms_ax = fig.axes[1]
    thick = {line.get_label().split(" ")[0]: line for line in terms_ax.get_lines()
             if not line.get_label().startswith("_")}
    assert set(thick) == {"loss_ce", "loss_box_ce", "loss_um", "loss_giou"}   # no per-layer / dn terms
    raw = [line for line in terms_ax.get_lines() if line.get_label().startswith("_")]
    assert not np.allclose(thick["loss_box_ce"].get_ydata(), raw[1].get_ydata())   # smoothed differs
    box_ce, um = thick["loss_box_ce"], thick["loss_um"]
    assert (box_ce.get_linestyle(), box_ce.get_color()) != (um.get_linestyle(), um.get_color())
    assert box_ce.get_linestyle() != um.get_linestyle()      # visible even where they coincide
    plt.close(fig)
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in _short_log()))
    assert plot_loss_curves(log, tmp_path / "loss.png").stat().st_size > 10_000


def test_ap_axis_fits_small_values(tmp_path):
    import matplotlib.pyplot as plt

    history = [{"step": s, "AP": 0.01 * i, "AP50": 0.03 * i, "AP75": None, "APs": 0.005 * i, "AR": 0.04 * i,
                "max_dets": 100} for i, s in enumerate((100, 200, 300), start=1)]
    fig = ap_figure(history)
    bottom, top = fig.axes[0].get_ylim()
    assert bottom == 0.0 and 0.12 <= top < 0.2          # 0.12 is the largest value, not a 0-1 axis
    plt.close(fig)
    fig = ap_figure([dict(history[0], AP=0.9, AR=1.0)])
    assert fig.axes[0].get_ylim()[1] == 1.05                 # a value of 1 stays visible
    styles = {(line.get_linestyle(), line.get_marker()) for line in fig.axes[0].get_lines()}
    assert len(styles) == 5                                  # AP and APs apart where they coincide
    plt.close(fig)
    path = tmp_path / "history.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in history))
    assert plot_ap_history(path, tmp_path / "ap.png").stat().st_size > 5_000


def _crowded(n: int = 60, hw: tuple[int, int] = (300, 400)):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([60.0, 40.0]) + 20      # all near one corner
    wh = torch.rand(n, 2, generator=g) * 20 + 6
    boxes = torch.cat([xy, xy + wh], 1)
    scores = torch.linspace(0.99, 0.4, n)
    labels = torch.arange(n) % 3
    image = torch.randint(0, 255, (3, *hw), generator=g, dtype=torch.uint8)
    return image, boxes, scores, labels


def test_inference_picture_has_title_inside_and_labels_apart(tmp_path):
    import matplotlib.pyplot as plt

    image, boxes, scores, labels = _crowded()
    fig, _ = image_detections_figure(image, boxes, scores, labels, 0.3, {0: "car", 1: "van", 2: "bus"},
                                     title="img.jpg")
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    texts = [t for t in ax.texts if t.get_text()]
    title = [t for t in texts if t.get_text().startswith("img.jpg: 60 detections >= 0.3")]
    assert len(title) == 1
    box = title[0].get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.x1 and 0 <= box.y0 and box.y1 <= fig.bbox.y1
    labels_drawn = [t.get_window_extent(renderer) for t in texts if t is not title[0]]
    assert 1 < len(labels_drawn) < 60 and "overlapping labels not drawn" in title[0].get_text()
    for i, a in enumerate(labels_drawn):
        for b in labels_drawn[i + 1:]:
            assert not a.overlaps(b)
    assert texts[0].get_text() == "car 0.99"                  # the best score gets its label
    plt.close(fig)
    path = draw_image_detections(image, boxes, scores, labels, tmp_path / "det.png", 0.3,
                                 {0: "car", 1: "van", 2: "bus"}, title="img.jpg")
    assert path.stat().st_size > 10_000


def test_validation_picture_labels_apart(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from util.engine import EvalSample

    made = []
    real_subplots = plt.subplots

    def spy(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        fig, axes = real_subplots(*args, **kwargs)
        made.append(fig)
        return fig, axes

    monkeypatch.setattr(plt, "subplots", spy)
    image, boxes, scores, labels = _crowded(40, (120, 160))
    sample = EvalSample(image_id=7, image=image.float() / 255, boxes_xyxy=boxes, scores=scores,
                        labels=labels, gt_boxes_xyxy=boxes[:5])
    path = plot_detections([sample, sample], tmp_path / "val.png", 0.3, title="demo: step 10")
    assert path.stat().st_size > 10_000
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = made[0]
    renderer = FigureCanvasAgg(fig).get_renderer()   # the figure is closed after saving
    for ax in fig.axes:
        assert "overlapping labels not drawn" in ax.get_title()
        extents = [t.get_window_extent(renderer) for t in ax.texts]
        assert 1 < len(extents) < 40
        assert not any(a.overlaps(b) for i, a in enumerate(extents) for b in extents[i + 1:])

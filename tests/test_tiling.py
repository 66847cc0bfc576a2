"""Tiled inference geometry and merging (util/tiling.py)."""
from __future__ import annotations

import pytest
import torch

from util.tiling import merge_nms, merge_tile_detections, merge_wbf, tile_grid, tile_starts


@pytest.mark.parametrize("hw,tile,overlap", [((3000, 4000), 1024, 0.2), ((100, 250), 64, 0.5),
                                             ((50, 40), 64, 0.2), ((640, 640), 640, 0.25)])
def test_tile_grid_covers_image_with_overlap(hw, tile, overlap) -> None:
    h, w = hw
    tiles = tile_grid(hw, tile, overlap)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for y0, x0, y1, x1 in tiles:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        assert y1 - y0 == min(tile, h) and x1 - x0 == min(tile, w)  # every tile full size
        covered[y0:y1, x0:x1] += 1
    assert int(covered.min()) >= 1  # nothing left out
    for length in hw:  # neighbours overlap by at least overlap * tile
        starts = tile_starts(length, tile, overlap)
        for a, b in zip(starts, starts[1:]):
            assert a + tile - b >= int(overlap * tile)


def test_tile_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_grid((100, 100), 32, 1.0)
    with pytest.raises(ValueError, match="tile size"):
        tile_grid((100, 100), 0, 0.1)


def _two_tile_duplicate() -> tuple[list[dict], list[tuple[int, int, int, int]]]:
    """One object at x 90..110, y 10..30 seen by two tiles [0, 120) and [80, 200) (overlap 40),
    plus an object of another class at the same place and a lone object."""
    tiles = [(0, 0, 120, 120), (0, 80, 120, 200)]
    left = {"boxes": torch.tensor([[90.0, 10, 110, 30], [90.0, 10, 110, 30], [5.0, 5, 15, 15]]),
            "scores": torch.tensor([0.9, 0.4, 0.7]), "labels": torch.tensor([1, 2, 1])}
    right = {"boxes": torch.tensor([[11.0, 11, 31, 31]]),  # = x 91..111 in the image
             "scores": torch.tensor([0.8]), "labels": torch.tensor([1])}
    return [left, right], tiles


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_duplicate_across_tiles_becomes_one_box(method: str) -> None:
    per_tile, tiles = _two_tile_duplicate()
    out = merge_tile_detections(per_tile, tiles, method=method, iou_threshold=0.5)
    assert len(out["boxes"]) == 3  # duplicate merged; other class and lone object kept
    cls1 = out["labels"] == 1
    near = cls1 & (out["boxes"][:, 0] > 50)
    assert int(near.sum()) == 1
    box = out["boxes"][near][0]
    assert float(out["scores"][near][0]) == pytest.approx(0.9)
    if method == "nms":
        torch.testing.assert_close(box, torch.tensor([90.0, 10, 110, 30]))
    else:  # score-weighted mean of (90, 10, 110, 30) @ 0.9 and (91, 11, 111, 31) @ 0.8
        w = 0.8 / 1.7
        torch.testing.assert_close(box.double(), torch.tensor([90 + w, 10 + w, 110 + w, 30 + w],
                                                              dtype=torch.float64), atol=1e-5, rtol=0)
    assert (out["labels"] == 2).sum() == 1
    assert torch.all(out["scores"][:-1] >= out["scores"][1:])


def test_merges_keep_separate_objects_and_handle_empty() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [20.0, 20, 30, 30]])
    scores, labels = torch.tensor([0.5, 0.6]), torch.tensor([0, 0])
    for merge in (merge_nms, merge_wbf):
        b, s, lab = merge(boxes, scores, labels, 0.5)
        assert len(b) == 2 and s.tolist() == pytest.approx([0.6, 0.5])
        b, s, lab = merge(boxes[:0], scores[:0], labels[:0], 0.5)
        assert b.shape == (0, 4) and s.shape == (0,)
    out = merge_tile_detections([{"boxes": boxes, "scores": scores, "labels": labels}] * 2,
                                [(0, 0, 64, 64), (0, 32, 64, 96)], max_dets=3)
    assert len(out["boxes"]) == 3


@pytest.mark.parametrize("method", ["nms", "wbf"])
def test_per_box_uncertainty_comes_from_the_merged_boxs_source(method: str) -> None:
    """UGS's std_xyxy_px and entropy survive merging: the duplicate seen by both tiles carries the
    values of its higher-scoring view (score 0.9, left tile), every other box its own."""
    per_tile, tiles = _two_tile_duplicate()
    per_tile[0].update(std_xyxy_px=torch.tensor([[1.0, 1, 1, 1], [2.0, 2, 2, 2], [3.0, 3, 3, 3]]),
                       entropy=torch.tensor([0.1, 0.2, 0.3]))
    per_tile[1].update(std_xyxy_px=torch.tensor([[9.0, 9, 9, 9]]), entropy=torch.tensor([0.9]))
    out = merge_tile_detections(per_tile, tiles, method=method, iou_threshold=0.5, max_dets=2)
    assert out["scores"].tolist() == pytest.approx([0.9, 0.7])  # capped: the 0.4 box dropped
    assert out["std_xyxy_px"].tolist() == [[1.0] * 4, [3.0] * 4]
    assert out["entropy"].tolist() == pytest.approx([0.1, 0.3])
    # without them (an L1 model) only boxes, scores and labels come out
    assert set(merge_tile_detections(_two_tile_duplicate()[0], tiles, method=method)) == {"boxes", "scores", "labels"}

"""Tiled (sliced) inference on large images: the tile grid and merging tile detections.

Small objects in 4000 x 3000 drone images shrink below a few pixels when the whole image is
resized to the model's input size; running the model on overlapping tiles at native resolution
keeps them visible. Each tile's detections are shifted into image coordinates, then duplicates
across tiles (an object in an overlap is seen twice) are merged class-wise, by NMS or by weighted
box fusion. All boxes here are `boxes_xyxy` in absolute pixels of the full image.
"""
from __future__ import annotations

import math

import torch
from torchvision.ops import batched_nms, box_iou


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets along one axis: stride = tile * (1 - overlap), the last tile flush with the
    end, so the tiles cover [0, length) and neighbours overlap by at least `overlap * tile`."""
    if tile < 1:
        raise ValueError(f"tile size must be >= 1, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"tile overlap must be in [0, 1), got {overlap}")
    if length <= tile:
        return [0]
    stride = max(1, int(math.floor(tile * (1.0 - overlap))))
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def tile_grid(image_hw: tuple[int, int], tile: int, overlap: float) -> list[tuple[int, int, int, int]]:
    """Tiles `(y0, x0, y1, x1)` (pixels, end exclusive) of an image of size (h, w); a side shorter
    than `tile` gives one tile of that side's length."""
    h, w = image_hw
    return [(y0, x0, min(y0 + tile, h), min(x0 + tile, w))
            for y0 in tile_starts(h, tile, overlap) for x0 in tile_starts(w, tile, overlap)]


def shift_boxes(boxes_xyxy: torch.Tensor, tile: tuple[int, int, int, int]) -> torch.Tensor:
    """Tile-pixel boxes (K, 4) -> full-image pixels."""
    y0, x0 = tile[0], tile[1]
    return boxes_xyxy + boxes_xyxy.new_tensor([x0, y0, x0, y0])


def merge_nms(boxes_xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = 0.5, return_source: bool = False) -> tuple[torch.Tensor, ...]:
    """Class-wise NMS: of detections of one class overlapping by IoU > threshold, keep the
    highest-scoring. Returns (boxes (K', 4), scores (K',), labels (K',)) sorted by score, and with
    `return_source` the index of each kept detection in the input."""
    keep = batched_nms(boxes_xyxy.float(), scores.float(), labels, iou_threshold)
    return (boxes_xyxy[keep], scores[keep], labels[keep]) + ((keep,) if return_source else ())


def merge_wbf(boxes_xyxy: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
              iou_threshold: float = 0.55, return_source: bool = False) -> tuple[torch.Tensor, ...]:
    """Weighted box fusion, class-wise: detections are visited by decreasing score and join the
    first cluster whose fused box they overlap by IoU > threshold; a cluster's box is the
    score-weighted mean of its members, its score the members' maximum (tiles are views of one
    image, not independent models, so agreement does not lower or raise confidence).
    Returns (boxes (K', 4), scores (K',), labels (K',)) sorted by score, and with `return_source`
    the index of each cluster's highest-scoring member in the input."""
    out_boxes, out_scores, out_labels, out_source = [], [], [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.argsort(scores[idx], descending=True)]
        fused: list[torch.Tensor] = []  # current fused box of each cluster
        weighted: list[torch.Tensor] = []  # sum of score * box
        weight: list[torch.Tensor] = []  # sum of scores
        best: list[torch.Tensor] = []
        source: list[int] = []  # the first (highest-scoring) member of each cluster
        for i in idx.tolist():
            box, s = boxes_xyxy[i].double(), scores[i].double()
            j = -1
            if fused:
                ious = box_iou(box[None], torch.stack(fused))[0]
                top = int(torch.argmax(ious))
                if float(ious[top]) > iou_threshold:
                    j = top
            if j < 0:
                fused.append(box.clone())
                weighted.append(box * s)
                weight.append(s.clone())
                best.append(s.clone())
                source.append(i)
            else:
                weighted[j] = weighted[j] + box * s
                weight[j] = weight[j] + s
                fused[j] = weighted[j] / weight[j].clamp_min(1e-12)
                best[j] = torch.maximum(best[j], s)
        if fused:
            out_boxes.append(torch.stack(fused))
            out_scores.append(torch.stack(best))
            out_labels.append(torch.full((len(fused),), int(c), dtype=labels.dtype))
            out_source.append(torch.tensor(source, dtype=torch.long))
    empty_source = (torch.zeros(0, dtype=torch.long),) if return_source else ()
    if not out_boxes:
        return (boxes_xyxy[:0], scores[:0], labels[:0]) + empty_source
    boxes = torch.cat(out_boxes).to(boxes_xyxy.dtype)
    s = torch.cat(out_scores).to(scores.dtype)
    lab = torch.cat(out_labels)
    order = torch.argsort(s, descending=True)
    return (boxes[order], s[order], lab[order]) + ((torch.cat(out_source)[order],) if return_source else ())


def merge_tile_detections(per_tile: list[dict[str, torch.Tensor]], tiles: list[tuple[int, int, int, int]],
                          method: str = "nms", iou_threshold: float = 0.5,
                          max_dets: int | None = None) -> dict[str, torch.Tensor]:
    """Tile detections `{boxes (K, 4) xyxy tile pixels, scores, labels}` -> one set for the image,
    capped at the `max_dets` best scores. Other per-box tensors every tile has (UGS's
    `std_xyxy_px` (K, 4) and `entropy` (K,); a shift does not change them) are carried from each
    merged box's source: the detection NMS kept, or the highest-scoring member of a WBF cluster."""
    if len(per_tile) != len(tiles):
        raise ValueError(f"got detections for {len(per_tile)} tiles but {len(tiles)} tiles")
    if method not in ("nms", "wbf"):
        raise ValueError(f"merge method must be 'nms' or 'wbf', got {method!r}")
    boxes = torch.cat([shift_boxes(d["boxes"], t) for d, t in zip(per_tile, tiles)])
    scores = torch.cat([d["scores"] for d in per_tile])
    labels = torch.cat([d["labels"] for d in per_tile])
    extra_keys = [k for k in per_tile[0] if k not in ("boxes", "scores", "labels")
                  and all(torch.is_tensor(d.get(k)) and len(d[k]) == len(d["scores"]) for d in per_tile)]
    extras = {k: torch.cat([d[k] for d in per_tile]) for k in extra_keys}
    merge = merge_nms if method == "nms" else merge_wbf
    boxes, scores, labels, source = merge(boxes, scores, labels, iou_threshold, return_source=True)
    out = {"boxes": boxes, "scores": scores, "labels": labels, **{k: v[source] for k, v in extras.items()}}
    if max_dets is not None:
        out = {k: v[:max_dets] for k, v in out.items()}
    return out

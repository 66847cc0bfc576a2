"""Box overlaps and the clamped logit with the official DINO numerics (docs/dino.md, "Numerics").

Formats are part of every name: ``boxes_cxcywh`` are (cx, cy, w, h), ``boxes_xyxy`` are
(x0, y0, x1, y1); both may be normalised or absolute, the functions here do not care. All
functions work on the last dimension and follow the input dtype, so a float64 run stays float64.
Format conversions are torchvision's `box_convert` (the official formulas, bit for bit: tested).
GIoU stays hand-written: the official code adds 1e-6 to both of its denominators, torchvision's
`generalized_box_iou` adds none.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = [
    "box_area",
    "check_boxes_xyxy",
    "generalized_box_iou",
    "paired_generalized_box_iou",
    "inverse_sigmoid",
]

# Both denominators of the official IoU / GIoU carry this epsilon (DETR's version has none).
_IOU_EPS = 1e-6


def box_area(boxes_xyxy: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) areas (negative for inverted boxes: callers validate). Hand-written:
    torchvision's box_area takes (N, 4) only, GIoU here broadcasts (..., 4)."""
    return (boxes_xyxy[..., 2] - boxes_xyxy[..., 0]) * (boxes_xyxy[..., 3] - boxes_xyxy[..., 1])


def check_boxes_xyxy(boxes_xyxy: Tensor, name: str) -> None:
    """Raise ValueError naming the first offending rows when x1 < x0 or y1 < y0 (or NaN).

    The official code asserts this; an assert vanishes under ``python -O`` and says nothing
    about which box is wrong, so we raise instead.
    """
    if boxes_xyxy.ndim < 2 or boxes_xyxy.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes_xyxy of shape (..., N, 4), got {tuple(boxes_xyxy.shape)}")
    boxes_xyxy = boxes_xyxy.reshape(-1, 4)  # rows are counted over the leading dimensions
    # `>=` is False for NaN, so NaN boxes are reported here too.
    ok = (boxes_xyxy[:, 2:] >= boxes_xyxy[:, :2]).all(dim=1)
    if not bool(ok.all()):
        bad = torch.nonzero(~ok).flatten()
        shown = ", ".join(f"row {int(i)}: {boxes_xyxy[i].tolist()}" for i in bad[:5])
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise ValueError(
            f"{name}: {len(bad)} box(es) with x1 < x0 or y1 < y0 (or NaN) in xyxy format; "
            f"{shown}{more}"
        )


def generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor, check: bool = True) -> Tensor:
    """Pairwise GIoU (..., N, 4), (..., M, 4) -> (..., N, M) in [-1, 1] (leading dims broadcast).

    Raises ValueError naming the offending boxes if any box is inverted (the GIoU formula would
    silently return nonsense for them). check=False skips that validation (two device syncs) for
    callers that validated the boxes already.
    """
    if check:
        check_boxes_xyxy(boxes1_xyxy, "generalized_box_iou boxes1")
        check_boxes_xyxy(boxes2_xyxy, "generalized_box_iou boxes2")
    return _pairwise_giou(boxes1_xyxy, boxes2_xyxy)


def paired_generalized_box_iou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """GIoU of row i of boxes1 with row i of boxes2: (N, 4), (N, 4) -> (N,).

    Equal, element for element, to ``diag(generalized_box_iou(boxes1, boxes2))`` (the same
    arithmetic), in O(N) instead of O(N^2) time and memory: a dense image's matched pairs
    number in the hundreds. Not validated: the caller's boxes are sigmoid outputs and checked
    targets (an inverted box gives a meaningless value, a NaN gives NaN).
    """
    if boxes1_xyxy.shape != boxes2_xyxy.shape or boxes1_xyxy.shape[-1:] != (4,):
        raise ValueError(f"paired_generalized_box_iou: expected two (N, 4) tensors, got "
                         f"{tuple(boxes1_xyxy.shape)} and {tuple(boxes2_xyxy.shape)}")
    return _broadcast_giou(boxes1_xyxy, boxes2_xyxy)


def _pairwise_giou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """(..., N, 4), (..., M, 4) -> (..., N, M): every row of boxes1 against every row of boxes2."""
    return _giou([c[..., :, None] for c in boxes1_xyxy.unbind(-1)],
                 [c[..., None, :] for c in boxes2_xyxy.unbind(-1)])


def _broadcast_giou(boxes1_xyxy: Tensor, boxes2_xyxy: Tensor) -> Tensor:
    """GIoU of broadcast box pairs (..., 4), (..., 4) -> (...), with the official epsilons."""
    return _giou(boxes1_xyxy.unbind(-1), boxes2_xyxy.unbind(-1))


def _giou(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """GIoU of two boxes given as broadcastable coordinate planes (x0, y0, x1, y1), with the official
    epsilons. One coordinate at a time: (..., N, M) planes, not (..., N, M, 2) ones, halves the
    memory traffic of the matcher's largest cost term."""
    x0a, y0a, x1a, y1a = a
    x0b, y0b, x1b, y1b = b
    area1 = (x1a - x0a) * (y1a - y0a)
    area2 = (x1b - x0b) * (y1b - y0b)
    inter = (torch.min(x1a, x1b) - torch.max(x0a, x0b)).clamp_(min=0)
    inter *= (torch.min(y1a, y1b) - torch.max(y0a, y0b)).clamp_(min=0)
    union = area1 + area2 - inter
    iou = inter.div_(union + _IOU_EPS)
    area_c = (torch.max(x1a, x1b) - torch.min(x0a, x0b)).clamp_(min=0)
    area_c *= (torch.max(y1a, y1b) - torch.min(y0a, y0b)).clamp_(min=0)  # smallest enclosing box
    return iou - (area_c - union) / (area_c + _IOU_EPS)


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """The clamped logit used everywhere in DINO: clamp to [0, 1], then log(max(x, eps) / max(1-x, eps)).

    eps is 1e-3 (official DINO), not Deformable-DETR's 1e-5.
    """
    x = x.clamp(min=0, max=1)
    x1 = x.clamp(min=eps)
    x2 = (1 - x).clamp(min=eps)
    return torch.log(x1 / x2)

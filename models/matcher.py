"""Hungarian matcher of DINO (dino_reference.md section 10).

The cost of assigning query q to target t is

    C[q, t] = cost_bbox * L1(boxes_cxcywh) + cost_class * focal_cost + cost_giou * (-GIoU)

and each image is solved independently with scipy's ``linear_sum_assignment``. Only the target
keys ``labels`` and ``boxes`` are read: crowd regions (``ignore_boxes``) and any other keys are
never matched.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = [
    "HungarianMatcher",
    "MatchIndices",
    "assign",
    "bbox_cost",
    "focal_class_cost",
    "giou_cost",
]

# Per image: (pred_idx, tgt_idx), both int64 of equal length; pred_idx ascending (scipy row order).
MatchIndices = list[tuple[Tensor, Tensor]]


def focal_class_cost(prob: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal classification cost (N, C) sigmoid probabilities x (M,) labels -> (N, M).

    The difference between the focal loss of calling the class positive and of calling it
    negative, with the official +1e-8 inside both logs.
    """
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos[:, labels] - neg[:, labels]


def bbox_cost(pred_boxes_cxcywh: Tensor, tgt_boxes_cxcywh: Tensor) -> Tensor:
    """Pairwise L1 distance of normalised cxcywh boxes: (N, 4), (M, 4) -> (N, M)."""
    return torch.cdist(pred_boxes_cxcywh, tgt_boxes_cxcywh, p=1)


def giou_cost(pred_boxes_cxcywh: Tensor, tgt_boxes_cxcywh: Tensor) -> Tensor:
    """Negative pairwise GIoU: (N, 4), (M, 4) -> (N, M)."""
    return -generalized_box_iou(box_cxcywh_to_xyxy(pred_boxes_cxcywh), box_cxcywh_to_xyxy(tgt_boxes_cxcywh))


def assign(cost: Tensor, image_index: int = 0) -> tuple[Tensor, Tensor]:
    """Minimum-cost assignment of one image's (Q, n) cost matrix (CPU) -> (pred_idx, tgt_idx) int64.

    With n == 0 both index tensors are empty. A non-finite cost is an error naming the image:
    scipy would either raise an opaque message or, for +inf, silently produce a bad matching.
    """
    if cost.ndim != 2:
        raise ValueError(f"image {image_index}: cost matrix must be (num_queries, num_targets), "
                         f"got shape {tuple(cost.shape)}")
    if cost.shape[1] == 0 or cost.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return empty, empty.clone()
    finite = torch.isfinite(cost)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)
        q, t = (int(v) for v in bad[0])
        raise ValueError(
            f"image {image_index}: matching cost has {len(bad)} non-finite entries "
            f"(first at query {q}, target {t}: {cost[q, t].item()}); check the predictions "
            f"(pred_logits / pred_boxes) and the targets of this image for NaN/inf"
        )
    pred_idx, tgt_idx = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)


def _at_least_float32(x: Tensor) -> Tensor:
    """Costs in bf16/fp16 would be too coarse to rank queries (and cdist has no bf16 kernel)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _check_match_inputs(logits: Tensor, boxes: Tensor, targets: list[dict]) -> None:
    """Errors that name the image, instead of an opaque failure deep inside the cost terms."""
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"HungarianMatcher: expected pred_logits (B, Q, C) and pred_boxes (B, Q, 4), got "
                         f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    finite = torch.isfinite(logits).all(dim=(1, 2)) & torch.isfinite(boxes).all(dim=(1, 2))
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise ValueError(f"HungarianMatcher: non-finite pred_logits or pred_boxes in image(s) {bad}")
    for b, t in enumerate(targets):
        tb, tl = t["boxes"], t["labels"]
        if tb.ndim != 2 or tb.shape[-1] != 4 or tl.shape != tb.shape[:1]:
            raise ValueError(f"HungarianMatcher: target {b} needs boxes (n, 4) and labels (n,), got "
                             f"{tuple(tb.shape)} and {tuple(tl.shape)}")
    # One host sync on the happy path; the per-image search only runs to word the error.
    all_boxes = torch.cat([t["boxes"] for t in targets]) if targets else boxes.new_zeros(0, 4)
    if all_boxes.numel() and not bool((torch.isfinite(all_boxes).all() & (all_boxes[:, 2:] >= 0).all())):
        for b, t in enumerate(targets):
            tb = t["boxes"]
            if len(tb) and not bool((torch.isfinite(tb).all() & (tb[:, 2:] >= 0).all())):
                raise ValueError(f"HungarianMatcher: target {b} has non-finite boxes or negative w/h "
                                 f"(boxes must be cxcywh): {tb.tolist()}")


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to targets, per image.

    Args:
        cost_class: weight of the focal classification cost (official 2.0).
        cost_bbox: weight of the L1 cxcywh cost (official 5.0).
        cost_giou: weight of the negative-GIoU cost (official 2.0).
        focal_alpha, focal_gamma: the focal cost's parameters (official 0.25, 2.0).
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0 (cost_class, cost_bbox, cost_giou)")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict]) -> MatchIndices:
        """Match one output set.

        Args:
            outputs: ``pred_logits`` (B, Q, C) raw logits and ``pred_boxes`` (B, Q, 4) cxcywh
                normalised; other keys are ignored.
            targets: B dicts with ``labels`` int64 (n_b,) and ``boxes`` (n_b, 4) cxcywh normalised.

        Returns:
            B pairs ``(pred_idx, tgt_idx)`` of int64 CPU tensors of length min(Q, n_b), pred_idx
            ascending; ``outputs["pred_boxes"][b, pred_idx[k]]`` is matched to target
            ``tgt_idx[k]`` of image b.
        """
        logits, boxes = _at_least_float32(outputs["pred_logits"]), _at_least_float32(outputs["pred_boxes"])
        bs, num_queries = logits.shape[:2]
        if len(targets) != bs:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {bs} predictions")
        _check_match_inputs(logits, boxes, targets)
        sizes = [len(t["boxes"]) for t in targets]
        if sum(sizes) == 0:
            return [assign(logits.new_zeros(num_queries, 0).cpu(), b) for b in range(bs)]

        # All images at once (one device->host copy), then each image's own column block.
        prob = logits.flatten(0, 1).sigmoid()  # (B*Q, C)
        pred_boxes = boxes.flatten(0, 1)  # (B*Q, 4)
        tgt_labels = torch.cat([t["labels"] for t in targets])
        tgt_boxes = torch.cat([t["boxes"] for t in targets]).to(pred_boxes.dtype)
        cost = (
            self.cost_bbox * bbox_cost(pred_boxes, tgt_boxes)
            + self.cost_class * focal_class_cost(prob, tgt_labels, self.focal_alpha, self.focal_gamma)
            + self.cost_giou * giou_cost(pred_boxes, tgt_boxes)
        )
        cost = cost.view(bs, num_queries, -1).cpu()  # (B, Q, sum n_b)
        blocks = cost.split(sizes, dim=-1)
        return [assign(block[b], b) for b, block in enumerate(blocks)]

"""Hungarian matcher of DINO (docs/dino.md, "Matcher").

The cost of assigning query q to target t is

    C[q, t] = cost_bbox * L1(boxes_cxcywh) + cost_class * focal_cost + cost_giou * (-GIoU)

and each image is solved independently with scipy's ``linear_sum_assignment``. Only the target
keys ``labels`` and ``boxes`` are read: crowd regions (``ignore_boxes``) and any other keys are
never matched.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torchvision.ops import box_convert

from util.box_ops import generalized_box_iou
from util.precision import at_least_float32

__all__ = [
    "HungarianMatcher",
    "MatchIndices",
    "assign",
    "assign_all",
    "bbox_cost",
    "default_threads",
    "focal_class_cost",
    "giou_cost",
]

# Per image: (pred_idx, tgt_idx), both int64 of equal length; pred_idx ascending (scipy row order).
MatchIndices = list[tuple[Tensor, Tensor]]


def focal_class_cost(prob: Tensor, labels: Tensor, alpha: float, gamma: float) -> Tensor:
    """Focal classification cost (..., N, C) sigmoid probabilities x (..., M) labels -> (..., N, M).

    The difference between the focal loss of calling the class positive and of calling it
    negative, with the official +1e-8 inside both logs.
    """
    neg = (1 - alpha) * (prob**gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    index = labels[..., None, :].expand(*prob.shape[:-1], labels.shape[-1])
    return pos.gather(-1, index) - neg.gather(-1, index)


def bbox_cost(pred_boxes_cxcywh: Tensor, tgt_boxes_cxcywh: Tensor) -> Tensor:
    """Pairwise L1 distance of normalised cxcywh boxes: (..., N, 4), (..., M, 4) -> (..., N, M)."""
    return torch.cdist(pred_boxes_cxcywh, tgt_boxes_cxcywh, p=1)


def giou_cost(pred_boxes_cxcywh: Tensor, tgt_boxes_cxcywh: Tensor, check: bool = True) -> Tensor:
    """Negative pairwise GIoU: (..., N, 4), (..., M, 4) -> (..., N, M). check=False: the caller has validated the
    boxes (w, h >= 0, finite), which spares two device syncs."""
    return -generalized_box_iou(box_convert(pred_boxes_cxcywh, "cxcywh", "xyxy"),
                                box_convert(tgt_boxes_cxcywh, "cxcywh", "xyxy"), check=check)


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
    cost_np = cost.numpy()
    if not np.isfinite(cost_np).all():  # numpy: a host check, not a dispatched tensor op
        finite = torch.isfinite(cost)
        bad = torch.nonzero(~finite)
        q, t = (int(v) for v in bad[0])
        raise ValueError(
            f"image {image_index}: matching cost has {len(bad)} non-finite entries "
            f"(first at query {q}, target {t}: {cost[q, t].item()}); check the predictions "
            f"(pred_logits / pred_boxes) and the targets of this image for NaN/inf"
        )
    pred_idx, tgt_idx = linear_sum_assignment(cost_np)
    return torch.as_tensor(pred_idx, dtype=torch.int64), torch.as_tensor(tgt_idx, dtype=torch.int64)


_pools: dict[int, ThreadPoolExecutor] = {}


def default_threads() -> int:
    """Host threads for the assignments: the CPUs this process may use, shared with the other
    processes of this node (LOCAL_WORLD_SIZE, set by torchrun / accelerate), at most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


def assign_all(costs: Sequence[Tensor], image_indices: Sequence[int], threads: int = 1) -> list[tuple[Tensor, Tensor]]:
    """`assign` of each cost matrix, on up to `threads` host threads (scipy's solver releases the
    GIL: 14 problems of 900 x 300 take 27 ms on one core, 14 ms on two). Same results, same order;
    the first failing image's error is raised."""
    problems = list(zip(costs, image_indices))
    if threads <= 1 or len(problems) <= 1:
        return [assign(c, b) for c, b in problems]
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="hungarian")
    return list(_pools[threads].map(lambda problem: assign(*problem), problems))


def _check_shapes(logits: Tensor, boxes: Tensor, targets: list[dict]) -> None:
    """Shape errors that name the tensor or image (host-side metadata only, no device sync)."""
    if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[:2] != logits.shape[:2]:
        raise ValueError(f"HungarianMatcher: expected pred_logits (B, Q, C) and pred_boxes (B, Q, 4), got "
                         f"{tuple(logits.shape)} and {tuple(boxes.shape)}")
    if len(targets) != logits.shape[0]:
        raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {logits.shape[0]} predictions")
    for b, t in enumerate(targets):
        tb, tl = t["boxes"], t["labels"]
        if tb.ndim != 2 or tb.shape[-1] != 4 or tl.shape != tb.shape[:1]:
            raise ValueError(f"HungarianMatcher: target {b} needs boxes (n, 4) and labels (n,), got "
                             f"{tuple(tb.shape)} and {tuple(tl.shape)}")


def _valid_boxes(boxes_cxcywh: Tensor) -> Tensor:
    """(..., 4) -> (...) bool: finite, with w, h >= 0 (GIoU is meaningless otherwise)."""
    return torch.isfinite(boxes_cxcywh).all(-1) & (boxes_cxcywh[..., 2:] >= 0).all(-1)


def _raise_for_invalid(set_index: int, logits: Tensor, boxes: Tensor, targets: list[dict]) -> None:
    """Words the error once the host copy showed a problem (off the happy path: syncs are fine)."""
    for b, t in enumerate(targets):
        tb = t["boxes"]
        if len(tb) and not bool(_valid_boxes(tb).all()):
            raise ValueError(f"HungarianMatcher: target {b} has non-finite boxes or negative w/h "
                             f"(boxes must be cxcywh): {tb.tolist()}")
    bad = (~(torch.isfinite(logits).all(-1) & _valid_boxes(boxes)).all(-1)).nonzero().flatten().tolist()
    where = f" (output set {set_index})" if set_index else ""
    raise ValueError(f"HungarianMatcher: non-finite pred_logits or pred_boxes (or boxes with negative "
                     f"w/h) in image(s) {bad}{where}")


class HungarianMatcher(nn.Module):
    """One-to-one matching of queries to targets, per image.

    Args:
        cost_class: weight of the focal classification cost (official 2.0).
        cost_bbox: weight of the L1 cxcywh cost (official 5.0).
        cost_giou: weight of the negative-GIoU cost (official 2.0).
        focal_alpha, focal_gamma: the focal cost's parameters (official 0.25, 2.0).
        threads: host threads solving a call's per-image assignments (0: `default_threads()`);
            the GPU waits for them, and dense images (hundreds of targets) make them costly.

    `forward_sets` matches several output sets of one batch (DINO's decoder layers and encoder
    proposals) with one device->host copy for all of them; the validity checks of predictions and
    targets travel in the same copy, so on a GPU a step's matching waits for the device once.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        threads: int = 0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0 (cost_class, cost_bbox, cost_giou)")
        if threads < 0:
            raise ValueError(f"HungarianMatcher: threads must be >= 0 (0: automatic), got {threads}")
        self.threads = threads or default_threads()
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
        return self.forward_sets([outputs], targets)[0]

    # True where the costs depend on the output set: the criterion then passes `set_names`
    # (its key suffixes: "", "_0", ..., "_interm") to forward_sets.
    costs_by_set = False

    @torch.no_grad()
    def forward_sets(self, output_sets: Sequence[dict], targets: list[dict],
                     set_names: Sequence[str] | None = None) -> list[MatchIndices]:
        """`forward` of each output set (same targets), with one device->host copy in all.
        set_names: each set's key suffix, for `cost_kind` (default "" for every set)."""
        names = [""] * len(output_sets) if set_names is None else list(set_names)
        if len(names) != len(output_sets):
            raise ValueError(f"HungarianMatcher: {len(names)} set_names for {len(output_sets)} output sets")
        sets = [(at_least_float32(o["pred_logits"]), at_least_float32(o["pred_boxes"])) for o in output_sets]
        for logits, boxes in sets:
            _check_shapes(logits, boxes, targets)
        sizes = [len(t["boxes"]) for t in targets]
        if not sets:
            return []
        if sum(sizes) == 0:
            return [[assign(logits.new_zeros(logits.shape[1], 0).cpu(), b) for b in range(len(targets))]
                    for logits, _ in sets]

        # Each image's queries are costed against its own targets only: (B, M_max) padded targets
        # (a query of image b never meets image c's targets, so the full-batch matrix wasted
        # (B-1)/B of the work and of the device->host copy). Pads are a valid box, sliced off below.
        m_max = max(sizes)
        tgt_labels = pad_sequence([t["labels"] for t in targets], batch_first=True, padding_value=0)
        tgt_boxes = pad_sequence([t["boxes"] for t in targets], batch_first=True, padding_value=0.5)
        # Sets of one shape and dtype are costed together (fewer, larger kernels; per element the
        # same arithmetic as one set at a time).
        groups: dict[tuple, list[int]] = {}
        for i, (logits, boxes) in enumerate(sets):
            key = (logits.shape, logits.dtype, boxes.dtype, self.cost_kind(names[i]))
            groups.setdefault(key, []).append(i)
        costs: list[Tensor | None] = [None] * len(sets)
        valid: list[Tensor | None] = [None] * len(sets)
        for key, members in groups.items():
            logits = torch.cat([sets[i][0] for i in members])  # (G*B, Q, C)
            boxes = torch.cat([sets[i][1] for i in members])
            g = len(members)
            cost = self.group_cost(key[-1], [output_sets[i] for i in members], logits, boxes,
                                   tgt_labels.repeat(g, 1), tgt_boxes.to(boxes.dtype).repeat(g, 1, 1))  # (G*B, Q, M_max)
            ok = torch.isfinite(logits).all(-1) & _valid_boxes(boxes)  # (G*B, Q)
            for k, (c, v) in enumerate(zip(cost.chunk(g), ok.chunk(g))):
                costs[members[k]], valid[members[k]] = c, v.all(-1)
        # One copy: every cost matrix, each image's prediction validity, the targets' validity.
        dtype = torch.promote_types(torch.float32, max((c.dtype for c in costs), key=lambda d: d.itemsize))
        host = torch.cat([c.flatten().to(dtype) for c in costs]
                         + [v.to(dtype) for v in valid]
                         + [_valid_boxes(tgt_boxes).all().to(dtype)[None]]).cpu()
        cost_sizes = [c.numel() for c in costs]
        *host_costs, host_valid = host.split(cost_sizes + [host.numel() - sum(cost_sizes)])
        flags = host_valid.numpy()  # host checks below, no dispatched tensor ops
        if not flags[-1]:
            _raise_for_invalid(0, *sets[0], targets)
        problems = []
        for i, ((logits, boxes), cost) in enumerate(zip(sets, host_costs)):
            if not flags[i * len(targets):(i + 1) * len(targets)].all():
                _raise_for_invalid(i, logits, boxes, targets)
            per_image = cost.view(len(targets), logits.shape[1], m_max)
            problems += [per_image[b, :, :n] for b, n in enumerate(sizes)]
        solved = assign_all(problems, list(range(len(targets))) * len(sets), self.threads)
        return [solved[i * len(targets):(i + 1) * len(targets)] for i in range(len(sets))]

    def cost_kind(self, set_name: str) -> str | None:
        """Sets of one kind share a cost function (and are costed together); here a single kind."""
        return None

    def group_cost(self, kind: str | None, output_sets: list[dict], prob_logits: Tensor, pred_boxes: Tensor,
                   tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """The (G*B, Q, M) cost of G output sets of one kind: logits (G*B, Q, C) and boxes
        (G*B, Q, 4) against each image's (G*B, M) labels and (G*B, M, 4) boxes."""
        return self.cost_matrix(prob_logits, pred_boxes, tgt_labels, tgt_boxes)

    def cost_matrix(self, prob_logits: Tensor, pred_boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor,
                    box_cost: Tensor | None = None) -> Tensor:
        """(..., N, C) logits, (..., N, 4) boxes x (..., M) labels, (..., M, 4) boxes -> (..., N, M)
        weighted matching cost. box_cost: a weighted (..., N, M) box term to use in place of the L1 one (models/ugs_matcher.py)."""
        prob = prob_logits.sigmoid()
        if box_cost is None:
            box_cost = self.cost_bbox * bbox_cost(pred_boxes, tgt_boxes)
        return (
            box_cost
            + self.cost_class * focal_class_cost(prob, tgt_labels, self.focal_alpha, self.focal_gamma)
            + self.cost_giou * giou_cost(pred_boxes, tgt_boxes, check=False)
        )

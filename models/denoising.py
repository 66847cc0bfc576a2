"""Contrastive denoising (CDN) queries for training (docs/dino.md, "Denoising").

Ground-truth boxes and labels are noised into G groups of M positive and M negative queries
(M = most GT boxes of any image in the batch). Positives move each box edge by less than
`box_noise_scale` half-sizes and should reconstruct their GT; negatives move by 1-2x that and
should predict "no object". Denoising queries come first in the decoder's query sequence; the
attention mask keeps groups from seeing each other and the matching queries from seeing any
of them.

A batch without any GT box has nothing to denoise: `prepare_denoising` returns None and the
model runs exactly as in evaluation (the official code crashes here).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from torchvision.ops import box_convert

from util.box_ops import inverse_sigmoid


@dataclass
class DenoisingQueries:
    """Inputs for the decoder plus the layout the criterion needs.

    label_queries (B, pad_size, d): label embeddings (zeros on padding slots);
    box_queries_unsig (B, pad_size, 4): inverse-sigmoid noised cxcywh (0 on padding slots);
    attn_mask (pad_size + Q, pad_size + Q) bool, True = may not attend;
    pad_size = 2 * num_groups * max_gt; num_groups = G.
    noised_labels (B, pad_size) int64 (-1 on padding) and noised_boxes_cxcywh (B, pad_size, 4) are
    kept for inspection and tests (None when injected from outside).
    """

    label_queries: Tensor
    box_queries_unsig: Tensor
    attn_mask: Tensor
    pad_size: int
    num_groups: int
    noised_labels: Tensor | None = None
    noised_boxes_cxcywh: Tensor | None = None

    def meta(self) -> dict:
        """The official `dn_meta` (the model adds `output_known_lbs_bboxes` after decoding)."""
        return {"pad_size": self.pad_size, "num_dn_group": self.num_groups}


def num_dn_groups(dn_number: int, max_gt: int) -> int:
    """Official group count: (2*dn_number) // (2*max_gt) when 2*dn_number >= 100, else 2*dn_number.

    (The GT count is ignored below 100 total queries, as in the official code.) At least 1.
    """
    n = 2 * dn_number
    if max_gt == 0:
        return 1
    if n >= 100:
        n = n // (2 * max_gt)
    elif n < 1:
        n = 1
    return max(n, 1)


def dn_attention_mask(max_gt: int, num_groups: int, num_queries: int, device: torch.device) -> Tensor:
    """(T, T) bool, T = pad_size + Q, True = blocked: matching rows block all dn columns; each dn
    group (rows [2gM, 2(g+1)M)) blocks the other groups' dn columns."""
    pad_size = 2 * max_gt * num_groups
    size = pad_size + num_queries
    mask = torch.zeros(size, size, dtype=torch.bool, device=device)
    mask[pad_size:, :pad_size] = True
    group = 2 * max_gt
    for g in range(num_groups):
        rows = slice(g * group, (g + 1) * group)
        mask[rows, (g + 1) * group:pad_size] = True
        mask[rows, :g * group] = True
    return mask


def noise_labels(labels: Tensor, label_noise_ratio: float, num_classes: int) -> Tensor:
    """Each label is replaced with probability ratio/2 by a uniform class in [0, num_classes)."""
    if label_noise_ratio <= 0:
        return labels.clone()
    flip = torch.rand(labels.shape, device=labels.device) < label_noise_ratio * 0.5
    random_labels = torch.randint(0, num_classes, labels.shape, device=labels.device, dtype=labels.dtype)
    return torch.where(flip, random_labels, labels)


def noise_boxes(boxes_cxcywh: Tensor, negative: Tensor, box_noise_scale: float) -> Tensor:
    """Move every xyxy edge by sign * u * half-size * scale, u ~ U(0,1) (+1 for negatives); clamp to [0,1].

    boxes_cxcywh (K, 4); negative (K,) bool. Returns (K, 4) cxcywh.
    """
    if box_noise_scale <= 0:
        return boxes_cxcywh.clone()
    xyxy = box_convert(boxes_cxcywh, "cxcywh", "xyxy")
    half = boxes_cxcywh[:, 2:].repeat(1, 2) / 2  # (w/2, h/2, w/2, h/2)
    sign = torch.randint(0, 2, boxes_cxcywh.shape, device=boxes_cxcywh.device).to(boxes_cxcywh.dtype) * 2 - 1
    part = torch.rand_like(boxes_cxcywh) + negative[:, None].to(boxes_cxcywh.dtype)
    xyxy = (xyxy + sign * part * half * box_noise_scale).clamp(0.0, 1.0)
    return box_convert(xyxy, "xyxy", "cxcywh")


def prepare_denoising(targets: list[dict], dn_number: int, label_noise_ratio: float, box_noise_scale: float,
                      num_classes: int, num_queries: int, label_enc: nn.Embedding) -> DenoisingQueries | None:
    """Build noised queries from `targets` (dicts with `labels` (n,) and `boxes` (n, 4) cxcywh).

    Returns None when `dn_number` is 0 or the batch has no GT box at all.
    """
    counts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(counts, default=0)
    if dn_number <= 0 or max_gt == 0:
        return None
    weight = label_enc.weight
    device, dtype = weight.device, weight.dtype
    groups = num_dn_groups(dn_number, max_gt)
    reps = 2 * groups  # repetition r: group r // 2, negative iff r odd
    labels = torch.cat([t["labels"] for t in targets]).to(device=device, dtype=torch.long)
    boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=dtype)
    batch_idx = torch.cat([torch.full((n,), b, dtype=torch.long, device=device)
                           for b, n in enumerate(counts)])
    slot_in_image = torch.cat([torch.arange(n, device=device) for n in counts])
    total = labels.numel()

    rep = torch.arange(reps, device=device).repeat_interleave(total)  # (reps * total,)
    known_labels = labels.repeat(reps)
    known_boxes = boxes.repeat(reps, 1)
    negative = rep % 2 == 1
    noised_labels = noise_labels(known_labels, label_noise_ratio, num_classes)
    noised_boxes = noise_boxes(known_boxes, negative, box_noise_scale)

    pad_size = reps * max_gt
    b = len(targets)
    rows = batch_idx.repeat(reps)
    cols = slot_in_image.repeat(reps) + rep * max_gt
    label_queries = torch.zeros(b, pad_size, weight.shape[1], device=device, dtype=dtype)
    box_queries = torch.zeros(b, pad_size, 4, device=device, dtype=dtype)
    label_queries[rows, cols] = label_enc(noised_labels)
    box_queries[rows, cols] = inverse_sigmoid(noised_boxes)
    slot_labels = torch.full((b, pad_size), -1, dtype=torch.long, device=device)
    slot_labels[rows, cols] = noised_labels
    return DenoisingQueries(
        label_queries=label_queries,
        box_queries_unsig=box_queries,
        attn_mask=dn_attention_mask(max_gt, groups, num_queries, device),
        pad_size=pad_size,
        num_groups=groups,
        noised_labels=slot_labels,
        noised_boxes_cxcywh=box_queries.sigmoid(),
    )

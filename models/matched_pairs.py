"""Matched (query, target) pairs of the output sets, and how they reach the device.

The criterion matches every output set of a step first, then `indices_to_device` moves all sets'
pairs and their targets to the device with one non-blocking copy (a blocking host->device copy,
or a GPU tensor indexed with CPU indices, makes the host wait for the device), and the loss terms
read them as `MatchedPairs`, one per set. `per_set_sums` / `per_set_normalisers` let a term
compute many sets' losses on their concatenated pairs at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from models.matcher import MatchIndices
from util.precision import at_least_float32

__all__ = [
    "BoxLossTerm",
    "DevicePairs",
    "MatchedPairs",
    "host_to_device",
    "indices_to_device",
    "per_set_normalisers",
    "per_set_sums",
]


@dataclass
class MatchedPairs:
    """The matched (query, target) pairs of one output set: what box-loss terms receive.

    Attributes:
        outputs: the output set (``pred_logits`` (B, Q, C), ``pred_boxes`` (B, Q, 4) cxcywh
            normalised, plus whatever else the model emits per query).
        indices: per image ``(pred_idx, tgt_idx)`` int64.
        batch_idx, query_idx: (N,) int64 on the outputs' device; pair k is query
            ``query_idx[k]`` of image ``batch_idx[k]``.
        src_boxes_cxcywh: (N, 4) ``outputs["pred_boxes"][batch_idx, query_idx]`` (keeps grad).
        target_boxes_cxcywh: (N, 4) the matched ground-truth boxes, in the predictions' dtype.
        target_labels: (N,) their labels (the criterion always fills it; None in hand-made pairs).
        num_boxes: the normaliser (target boxes per process; times the number of denoising
            groups for denoising sets). Losses are sums over pairs divided by it.
        suffix: the set's key suffix ("", "_0", "_interm", "_dn", ...).
    """

    outputs: dict
    indices: MatchIndices
    batch_idx: Tensor
    query_idx: Tensor
    src_boxes_cxcywh: Tensor
    target_boxes_cxcywh: Tensor
    num_boxes: float
    suffix: str = ""
    target_labels: Tensor | None = None  # (N,) int64 on the outputs' device, the matched labels

    def gather(self, key: str) -> Tensor:
        """``outputs[key][batch_idx, query_idx]`` for any per-query tensor (B, Q, ...) -> (N, ...)."""
        if key not in self.outputs:
            raise KeyError(f"output set '{self.suffix or 'final'}' has no '{key}'; "
                           f"available: {sorted(self.outputs)}")
        return at_least_float32(self.outputs[key])[self.batch_idx, self.query_idx]


BoxLossTerm = Callable[[MatchedPairs], dict]


def per_set_sums(values: Tensor, sets: Sequence[MatchedPairs]) -> Tensor:
    """(N_1 + ... + N_S, ...) rows of S sets' pairs, in set order -> (S, ...) the sum of each set's
    rows. Split and sum, so deterministic on every device (an index_add would use atomics)."""
    sizes = [m.batch_idx.numel() for m in sets]
    return torch.stack([chunk.sum(0) for chunk in values.split(sizes)])


def per_set_normalisers(sets: Sequence[MatchedPairs], like: Tensor) -> Tensor:
    """(S,) each set's num_boxes, on `like`'s device and dtype (one non-blocking copy)."""
    return host_to_device(torch.tensor([float(m.num_boxes) for m in sets], dtype=like.dtype), like.device)


class DevicePairs(NamedTuple):
    """One output set's matched pairs on the device, the form the losses read them in."""

    batch_idx: Tensor  # (N,) int64
    query_idx: Tensor  # (N,) int64
    target_boxes: Tensor  # (N, 4) the matched targets' boxes, in the targets' dtype
    target_labels: Tensor  # (N,) their labels


def host_to_device(host: Tensor, device: torch.device) -> Tensor:
    """A CPU tensor on `device` without making the host wait: on CUDA through pinned memory with
    a non-blocking copy (the pinned block is not reused before the copy has run)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def indices_to_device(sets: Sequence[MatchIndices], targets: list[dict], device: torch.device) -> list[DevicePairs]:
    """All output sets' matched pairs on `device`, with their targets: one copy, one gather.

    A blocking host->device copy waits for the device (and indexing a GPU tensor with CPU indices
    makes one); a step has ~13 sets x (2 + 2B) such index tensors. Here they are packed on the host
    and copied once, from pinned memory without blocking on CUDA, so the criterion never waits;
    the matched target boxes and labels of all sets are then gathered at once.
    """
    offsets = [0]
    for t in targets[:-1]:
        offsets.append(offsets[-1] + len(t["labels"]))
    packed, lengths = [], []
    for indices in sets:
        if len(indices) != len(targets):
            raise ValueError(f"SetCriterion: matching has {len(indices)} images, the batch {len(targets)}")
        rows = [torch.stack([torch.full_like(src, b), src, tgt + offsets[b]]).to("cpu", torch.int64)
                for b, (src, tgt) in enumerate(indices)]
        packed += rows
        lengths.append(sum(r.shape[1] for r in rows))
    host = torch.cat(packed, 1) if packed else torch.zeros(3, 0, dtype=torch.int64)
    batch_idx, query_idx, target_idx = host_to_device(host, device)
    if targets:
        boxes = torch.cat([t["boxes"] for t in targets]).to(device)[target_idx]
        labels = torch.cat([t["labels"] for t in targets]).to(device)[target_idx]
    else:
        boxes, labels = torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.int64, device=device)
    return [DevicePairs(*parts) for parts in zip(batch_idx.split(lengths), query_idx.split(lengths),
                                                 boxes.split(lengths), labels.split(lengths))]

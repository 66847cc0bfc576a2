"""Prediction heads and the box-refinement step, kept in one place.

A box head predicts an unsigmoided delta that is added to the inverse sigmoid of a reference
box: `boxes = sigmoid(head(hidden) + inverse_sigmoid(reference))` (docs/dino.md, "Decoder").
The decoder applies it to the un-normalised layer output (the next reference) and `DINO` applies
it to the normalised hidden state (the prediction). Changing how a box head turns features into
a delta (e.g. UGS's per-coordinate bin logits) only touches `build_box_head`;
the arithmetic itself is `apply_box_delta`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import inverse_sigmoid


class MLP(nn.Module):
    """`num_layers` Linear layers (`layers.0 ... layers.{n-1}`), ReLU between them, none at the end."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def build_class_head(hidden_dim: int, num_classes: int, prior_prob: float = 0.01) -> nn.Linear:
    """Linear(d, C) with every bias at the focal-loss prior logit -log((1 - p) / p)."""
    head = nn.Linear(hidden_dim, num_classes)
    nn.init.constant_(head.bias, -math.log((1 - prior_prob) / prior_prob))
    return head


def build_box_head(hidden_dim: int) -> MLP:
    """MLP(d, d, 4, 3) whose last layer starts at zero, so a fresh head keeps its reference box."""
    head = MLP(hidden_dim, hidden_dim, 4, 3)
    nn.init.zeros_(head.layers[-1].weight)
    nn.init.zeros_(head.layers[-1].bias)
    return head


def apply_box_delta(delta: Tensor, reference_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """delta (..., 4) unsigmoided, reference_boxes (..., 4) cxcywh in [0, 1] ->
    (boxes (..., 4) cxcywh = sigmoid(delta + reference_logit), reference_logit (..., 4)).

    The one place the refinement arithmetic lives; `reference_logit` is the clamped
    inverse_sigmoid of the reference (UGS's two-hot targets are measured from it). The sum and
    sigmoid run with autocast off in at least float32: the clamped inverse sigmoid (eps 1e-3) and
    small deltas do not survive bf16 rounding.
    """
    dtype = torch.promote_types(torch.promote_types(delta.dtype, reference_boxes.dtype), torch.float32)
    with torch.autocast(device_type=delta.device.type, enabled=False):
        reference_logit = inverse_sigmoid(reference_boxes.to(dtype))
        return (delta.to(dtype) + reference_logit).sigmoid(), reference_logit


def refine_boxes(box_head: nn.Module, hidden: Tensor, reference_boxes: Tensor) -> Tensor:
    """hidden (..., d), reference_boxes (..., 4) cxcywh in [0, 1] -> refined boxes (..., 4) cxcywh
    (`apply_box_delta` of the head's delta)."""
    return apply_box_delta(box_head(hidden), reference_boxes)[0]

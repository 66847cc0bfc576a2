"""Mixed query selection, two-stage "standard" (docs/dino.md, "Query selection").

Every encoder token proposes a box around its pixel (size 0.05 * 2**level); the top-Q tokens by
their best class logit give the decoder's initial anchors (detached), while the content queries
stay the learned `tgt_embed`. The same selection is the "interm" (encoder) prediction, which is
supervised without detaching.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


def encoder_proposals(memory: Tensor, padding_mask: Tensor,
                      spatial_shapes: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """memory (B, S, d), padding_mask (B, S) True on padding ->
    (output_memory (B, S, d) with masked/invalid tokens zeroed, proposals (B, S, 4) unsigmoided
    cxcywh, +inf where masked or invalid).

    Centres are normalised by the level's *valid* size; a proposal is valid if all four
    coordinates lie strictly inside (0.01, 0.99).
    """
    b = memory.shape[0]
    # proposals in at least float32: bf16 cannot resolve pixel centres of a large level
    dtype, device = torch.promote_types(memory.dtype, torch.float32), memory.device
    proposals = []
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        mask_l = padding_mask[:, start:start + h * w].view(b, h, w)
        valid_h = torch.sum(~mask_l[:, :, 0], 1)
        valid_w = torch.sum(~mask_l[:, 0, :], 1)
        grid_y, grid_x = torch.meshgrid(torch.linspace(0, h - 1, h, dtype=dtype, device=device),
                                        torch.linspace(0, w - 1, w, dtype=dtype, device=device),
                                        indexing="ij")
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)  # (h, w, 2) as (x, y)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(b, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(b, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(b, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
    proposals = proposals.masked_fill(~valid, float("inf"))
    output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0)
    output_memory = output_memory.masked_fill(~valid, 0.0)
    return output_memory, proposals


class SelectedQueries(NamedTuple):
    """Result of the selection, Q = num_queries.

    anchors_unsig (B, Q, 4): detached unsigmoided anchor boxes (decoder's initial references);
    interm_hidden (B, Q, d): gathered encoder features (undetached; the interm logits input);
    interm_boxes (B, Q, 4): sigmoid of the gathered boxes, cxcywh (undetached; interm prediction);
    init_box_proposal (B, Q, 4): sigmoid of the raw gathered proposals, cxcywh;
    topk_index (B, Q): selected token indices;
    proposals_unsig (B, Q, 4): the raw gathered proposals, unsigmoided cxcywh (+inf where the
        token was padding or its proposal invalid): the exact reference that `interm_boxes`
        refines, i.e. interm_boxes = sigmoid(delta + proposals_unsig), without a sigmoid -> logit
        round trip.
    """

    anchors_unsig: Tensor
    interm_hidden: Tensor
    interm_boxes: Tensor
    init_box_proposal: Tensor
    topk_index: Tensor
    proposals_unsig: Tensor


def select_queries(memory: Tensor, padding_mask: Tensor, spatial_shapes: list[tuple[int, int]],
                   enc_output: nn.Linear, enc_output_norm: nn.LayerNorm, class_head: nn.Module,
                   box_head: nn.Module, num_queries: int) -> SelectedQueries:
    """Pick the top `num_queries` encoder tokens by max class logit (not sigmoid, not per class)."""
    output_memory, proposals = encoder_proposals(memory, padding_mask, spatial_shapes)
    output_memory = enc_output_norm(enc_output(output_memory))
    logits = class_head(output_memory)  # (B, S, C)
    # box deltas are added to the (float32 or wider) proposals with autocast off
    delta = box_head(output_memory)
    with torch.autocast(device_type=delta.device.type, enabled=False):
        boxes_unsig = delta.to(torch.promote_types(delta.dtype, proposals.dtype)) + proposals
    if num_queries > logits.shape[1]:
        raise ValueError(f"num_queries ({num_queries}) exceeds the number of encoder tokens "
                         f"({logits.shape[1]}); use a larger input or fewer queries")
    topk_index = torch.topk(logits.max(-1)[0], num_queries, dim=1)[1]  # (B, Q)
    index4 = topk_index.unsqueeze(-1).repeat(1, 1, 4)
    gathered_unsig = torch.gather(boxes_unsig, 1, index4)
    proposals_unsig = torch.gather(proposals, 1, index4)
    return SelectedQueries(
        anchors_unsig=gathered_unsig.detach(),
        interm_hidden=torch.gather(output_memory, 1,
                                   topk_index.unsqueeze(-1).repeat(1, 1, output_memory.shape[-1])),
        interm_boxes=gathered_unsig.sigmoid(),
        init_box_proposal=proposals_unsig.sigmoid(),
        topk_index=topk_index,
        proposals_unsig=proposals_unsig,
    )

"""Per-coordinate uncertainty of the bin distributions (docs/ugs.md, "Uncertainty as an output")."""
from __future__ import annotations

import torch
from torch import Tensor

from ugs.grid import check_bin_logits
from ugs.losses import um_loss
from ugs.targets import compute_dtype


def uncertainty(logits: Tensor, grid: Tensor) -> tuple[Tensor, Tensor]:
    """Standard deviation (grid units) and entropy (nats) of each distribution.

    logits (..., n+1), grid (n+1,) -> (std (...), entropy (...)), both in at least float32.
    std = sqrt(sum_i p_i (g_i - d)^2) with d the expectation (centred form: never negative).
    Entropy lies in [0, log(n+1)]; for DINO boxes the std is in logit space (see box_std_pixels).
    """
    check_bin_logits(logits, grid, "uncertainty")
    dtype = compute_dtype(logits, grid)
    p = torch.softmax(logits.to(dtype), dim=-1)
    g = grid.to(device=logits.device, dtype=dtype)
    mean = (p * g).sum(dim=-1, keepdim=True)
    std = (p * (g - mean).square()).sum(dim=-1).sqrt()
    return std, um_loss(logits.to(dtype))


def box_std_pixels(boxes_cxcywh: Tensor, std_logit: Tensor, sizes_hw: Tensor) -> Tensor:
    """Per-edge standard deviation in pixels of boxes decoded through a sigmoid.

    boxes_cxcywh (..., 4): decoded boxes b = sigmoid(x), normalised to the image;
    std_logit (..., 4): std of each coordinate's distribution in logit space (x = d + logit(r),
    the reference r is a constant, so std(x) = std(d));
    sizes_hw (..., 2): image (h, w) in pixels, broadcastable to boxes.shape[:-1] + (2,)
    (e.g. target_sizes[:, None, :] for boxes (B, K, 4)).
    Returns std_xyxy_px (..., 4) for (x0, y0, x1, y1).

    Delta method (first order): std(b) ~= sigmoid'(x) std(x) = b (1 - b) std(x), evaluated at the
    decoded box rather than at the mean of sigmoid(x); it understates the spread of wide or
    skewed distributions but is exact in the small-std limit. Coordinates are independent under
    the model (one distribution each), so x0 = cx - w/2 has var = var(cx) + var(w) / 4.
    """
    if boxes_cxcywh.shape[-1] != 4 or std_logit.shape != boxes_cxcywh.shape:
        raise ValueError(f"box_std_pixels: boxes_cxcywh {tuple(boxes_cxcywh.shape)} and std_logit "
                         f"{tuple(std_logit.shape)} must both be (..., 4)")
    if sizes_hw.shape[-1] != 2:
        raise ValueError(f"box_std_pixels: sizes_hw must be (..., 2) as (h, w), got {tuple(sizes_hw.shape)}")
    dtype = compute_dtype(boxes_cxcywh, std_logit)
    b = boxes_cxcywh.to(dtype)
    std_norm = b * (1.0 - b) * std_logit.to(dtype)  # (..., 4) cx, cy, w, h, normalised units
    h, w = sizes_hw.to(device=b.device, dtype=dtype).unbind(-1)
    scale = torch.stack([w, h, w, h], dim=-1)
    std_px = std_norm * scale  # (..., 4) cx, cy, w, h in pixels
    s_cx, s_cy, s_w, s_h = std_px.unbind(-1)
    s_x = torch.sqrt(s_cx.square() + 0.25 * s_w.square())
    s_y = torch.sqrt(s_cy.square() + 0.25 * s_h.square())
    return torch.stack([s_x, s_y, s_x, s_y], dim=-1)

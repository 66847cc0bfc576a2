"""Uncertainty-guided refinement (UR): the first-order feature perturbation of the
paper's Eqs. 14-15 (docs/ugs.md), solved in closed form as sharpness-aware minimisation does.

    delta_l = rho * g_l / (||g_l||_2 + eps),   g_l = dL_UM / dF_l (detached)

Layout: one tensor per feature level, (B, S_l, C) -- DINO's encoder `memory` (B, sum S_l, C) split
along dim 1 by level (`memory.split([h_l * w_l for each level], dim=1)`). Norms are per image and
per level, over that level's valid positions and all channels; padded positions get no perturbation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def ur_perturbation(features: Sequence[Tensor], grads: Sequence[Tensor | None], rho: float,
                    masks: Sequence[Tensor | None] | None = None, eps: float = 1e-12) -> list[Tensor]:
    """Return F_l + delta_l per level (same shapes and dtypes as `features`).

    features[l]: (B, S_l, C), may carry autograd history (the perturbed features stay
      differentiable in F; delta is a constant, no second-order terms).
    grads[l]: (B, S_l, C) dL_UM/dF_l, or None to leave level l unperturbed (`ur.levels`).
    masks[l]: (B, S_l) bool, True on padding (the convention for image masks); or None.
    An image whose gradient is zero on a level (e.g. no matched queries) gets delta = 0 there.
    """
    deltas = ur_delta(features, grads, rho, masks, eps)
    return [feat if delta is None else feat + delta for feat, delta in zip(features, deltas)]


def ur_delta(features: Sequence[Tensor], grads: Sequence[Tensor | None], rho: float,
             masks: Sequence[Tensor | None] | None = None, eps: float = 1e-12) -> list[Tensor | None]:
    """The perturbations delta_l themselves (detached, in each feature's dtype; None where grads[l]
    is None), for callers that exploit linearity: a linear map of F_l + delta_l is the map of F_l,
    already computed, plus the map of delta_l. Arguments as for `ur_perturbation`."""
    if not (rho >= 0 and rho == rho and rho != float("inf")):
        raise ValueError(f"ur_perturbation: rho must be a finite number >= 0, got {rho!r}")
    if not eps > 0:
        raise ValueError(f"ur_perturbation: eps must be > 0, got {eps!r}")
    if len(grads) != len(features):
        raise ValueError(f"ur_perturbation: {len(features)} feature levels but {len(grads)} gradients")
    if masks is not None and len(masks) != len(features):
        raise ValueError(f"ur_perturbation: {len(features)} feature levels but {len(masks)} masks")
    out = []
    for level, (feat, grad) in enumerate(zip(features, grads)):
        if feat.dim() != 3:
            raise ValueError(f"ur_perturbation: features[{level}] must be (B, S_l, C), "
                             f"got {tuple(feat.shape)}")
        if grad is None:
            out.append(None)
            continue
        if grad.shape != feat.shape:
            raise ValueError(f"ur_perturbation: grads[{level}] {tuple(grad.shape)} != "
                             f"features[{level}] {tuple(feat.shape)}")
        g = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        mask = None if masks is None else masks[level]
        if mask is not None:
            if mask.shape != feat.shape[:2] or mask.dtype != torch.bool:
                raise ValueError(f"ur_perturbation: masks[{level}] must be bool {tuple(feat.shape[:2])} "
                                 f"(True = padding), got {mask.dtype} {tuple(mask.shape)}")
            g = g.masked_fill(mask.unsqueeze(-1), 0.0)
        norm = torch.linalg.vector_norm(g.flatten(1), dim=1).view(-1, 1, 1)  # (B, 1, 1)
        delta = (rho / (norm + eps)) * g
        out.append(delta.to(feat.dtype))
    return out

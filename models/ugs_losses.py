"""UGS losses for DINO's criterion (docs/ugs.md, "The method"; paper Eqs. 10-16).

- `UGSBoxLoss`: a box-loss term for SetCriterion (see models/criterion.py, "Box-loss hook") that
  returns `loss_box_ce` (two-hot CE) and `loss_um` (entropy) on the matched queries of every output
  set, each the mean over the 4 coordinates, summed over pairs, divided by num_boxes (DINO's
  normalisation; denoising sets get DINO's x num_dn_group normaliser).
- `ugs_weight_dict`: where UGS is on for a set, `loss_box_ce` (ce_weight) replaces `loss_bbox`
  (kept, weight 0, for logging) and `loss_um` gets um_weight; elsewhere DINO's L1 stays.
- `UGSCriterion`: SetCriterion plus `loss_ur`, the UR second pass (section 8), which reuses the
  first pass's matching and runs only when its weight is > 0 and the model attached `ur_context`.
"""
from __future__ import annotations

import re
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.profiler import record_function

import ugs
from models.criterion import SetCriterion
from models.matched_pairs import BoxLossTerm, DevicePairs, MatchedPairs, per_set_normalisers, per_set_sums
from models.matcher import HungarianMatcher
from util.box_ops import inverse_sigmoid

AUX_SET = re.compile(r"^_\d+$")  # an auxiliary decoder layer's key suffix


class UGSBoxLoss(nn.Module):
    """Two-hot CE and entropy of the matched queries' bin distributions (unweighted, named).

    grid (n+1,) for decoder and denoising sets; interm_grid for the encoder proposals (`_interm`).
    Needs `pred_box_logits` (B, T, 4, n+1) and `ref_boxes_logit` (B, T, 4) in every output set.
    """

    names = ("loss_box_ce", "loss_um")

    def __init__(self, grid: Tensor, interm_grid: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("grid", grid.detach().clone(), persistent=False)
        interm_grid = interm_grid if interm_grid is not None else grid
        self.register_buffer("interm_grid", interm_grid.detach().clone(), persistent=False)

    def forward(self, matched: MatchedPairs) -> dict[str, Tensor]:
        return self.forward_sets([matched])[0]

    def forward_sets(self, sets: list[MatchedPairs]) -> list[dict[str, Tensor]]:
        """The losses of many output sets computed on all their pairs at once (per grid): the
        criterion's batched hook. Row for row the same arithmetic as one set at a time."""
        out: list[dict[str, Tensor] | None] = [None] * len(sets)
        for grid, members in ((self.grid, [i for i, m in enumerate(sets) if m.suffix != "_interm"]),
                              (self.interm_grid, [i for i, m in enumerate(sets) if m.suffix == "_interm"])):
            if not members:
                continue
            group = [sets[i] for i in members]
            logits = torch.cat([m.gather("pred_box_logits") for m in group])  # (N, 4, n+1)
            ref_logit = torch.cat([m.gather("ref_boxes_logit") for m in group])  # (N, 4), detached
            target = torch.cat([m.target_boxes_cxcywh for m in group])
            y = inverse_sigmoid(target.to(ref_logit.dtype)) - ref_logit  # (N, 4)
            per_pair = torch.stack([ugs.ce_loss(logits, y, grid), ugs.um_loss(logits)], -1).mean(1)  # (N, 2)
            losses = per_set_sums(per_pair, group) / per_set_normalisers(group, per_pair)[:, None]  # (S, 2)
            for i, (ce, um) in zip(members, losses):
                out[i] = {"loss_box_ce": ce, "loss_um": um}
        return out  # type: ignore[return-value]


def ugs_loss_on(suffix: str, aux_layers: bool, interm: bool, dn: bool) -> bool:
    """Whether UGS's CE/UM losses apply to the output set with this key suffix."""
    if suffix == "":
        return True
    if suffix == "_interm":
        return interm
    if suffix.startswith("_dn"):
        return dn
    return aux_layers if AUX_SET.match(suffix) else False


def _set_multiplier(weight_dict: dict[str, float], suffix: str) -> float:
    """DINO's per-set multiplier of the box terms (interm_loss_coef, 0 with no_interm_box_loss),
    read off a box term whose base weight is not 0 (GIoU may be switched off: giou_loss_coef=0)."""
    for key in ("loss_giou", "loss_bbox"):
        if weight_dict[key]:
            return weight_dict[f"{key}{suffix}"] / weight_dict[key]
    return 1.0


def ugs_weight_dict(weight_dict: dict[str, float], box_loss: str, ce_weight: float, um_weight: float,
                    ur_weight: float, aux_layers: bool = True, interm: bool = True,
                    dn: bool = True, smooth_l1_weight: float = 1.0) -> dict[str, float]:
    """DINO's expanded weight_dict -> the UGS one (adds loss_box_ce*, loss_um*, loss_ur).

    Each set keeps DINO's per-set multiplier (e.g. interm_loss_coef, or 0 with
    no_interm_box_loss). box_loss "ce": CE replaces L1 where UGS is on; "l1": L1 on the decoded
    boxes stays, UM is added; "smooth_l1": `loss_box_sl1` (Smooth-L1 on the offsets,
    models/offset_baseline.py) replaces L1 where on, and there is no UM (no bins).
    """
    if box_loss not in ("ce", "l1", "smooth_l1"):
        raise ValueError(f"ugs_weight_dict: box_loss must be 'ce', 'l1' or 'smooth_l1', got {box_loss!r}")
    for key in ("loss_bbox", "loss_giou"):
        if key not in weight_dict:
            raise KeyError(f"ugs_weight_dict: DINO weight_dict has no '{key}' (keys: {sorted(weight_dict)})")
    suffixes = [k[len("loss_giou"):] for k in weight_dict if k.startswith("loss_giou")]
    out = dict(weight_dict)
    for s in suffixes:
        mult = _set_multiplier(weight_dict, s)
        on = ugs_loss_on(s, aux_layers, interm, dn)
        if box_loss == "smooth_l1":
            out[f"loss_box_sl1{s}"] = smooth_l1_weight * mult if on else 0.0
        else:
            out[f"loss_box_ce{s}"] = ce_weight * mult if on and box_loss == "ce" else 0.0
            out[f"loss_um{s}"] = um_weight * mult if on else 0.0
        if on and box_loss != "l1":
            out[f"loss_bbox{s}"] = 0.0  # still computed and logged
    if ur_weight > 0:  # no key when UR is off: the criterion does not compute it
        out["loss_ur"] = ur_weight
    return out


class UGSCriterion(SetCriterion):
    """SetCriterion with the UR term (`loss_ur`, unweighted; its weight is weight_dict["loss_ur"]).

    UR (paper Eqs. 14-15): g_l = d(sum of the decoder layers' loss_um)/d(memory level l),
    delta_l = rho g_l / (||g_l|| + eps) per image and level (padding untouched), decoder again on
    memory + delta (matching queries only, no denoising queries), loss_ur = sum over decoder
    layers of the entropy of the step-1-matched queries (mean over coordinates, / num_boxes); the
    second pass runs the box head on those matched queries only (no class heads, no other loss).
    With `ur_per_level`, the paper's literal form: sum over levels l of the same loss after a pass
    with delta_l alone (one pass per perturbed level). Skipped (not even computed)
    when ur_weight is 0; 0 when the outputs carry no `ur_context` (evaluation).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, weight_dict: dict[str, float],
                 focal_alpha: float = 0.25, losses: Sequence[str] = ("labels", "boxes", "cardinality"),
                 box_losses: Sequence[BoxLossTerm] | None = None, focal_gamma: float = 2.0,
                 ur_weight: float = 0.0, ur_rho: float = 0.5, ur_levels: Sequence[int] | None = None,
                 ur_eps: float = 1e-12, ur_per_level: bool = False) -> None:
        super().__init__(num_classes, matcher, weight_dict, focal_alpha, losses, box_losses, focal_gamma)
        if not any(isinstance(t, UGSBoxLoss) for t in self.box_losses):
            raise ValueError("UGSCriterion needs a UGSBoxLoss among box_losses (it provides loss_um)")
        self.ur_weight, self.ur_rho, self.ur_eps = float(ur_weight), float(ur_rho), float(ur_eps)
        self.ur_levels = None if ur_levels is None else sorted(set(int(lv) for lv in ur_levels))
        self.ur_per_level = bool(ur_per_level)
        self.ur_passes = 0  # second decoder passes run so far (tests and benchmarks read it)
        self._matched: dict[str, MatchedPairs] = {}  # this forward's pairs per output set, for UR

    def forward(self, outputs: dict, targets: list[dict], indices: dict | None = None,
                return_indices: bool = False):
        self._matched = {}
        losses, used = super().forward(outputs, targets, indices, return_indices=True)
        if self.ur_weight > 0:
            ctx = outputs.get("ur_context")
            if ctx is None or not self.training:
                losses["loss_ur"] = torch.zeros((), device=outputs["pred_logits"].device)
            else:
                losses["loss_ur"] = self.ur_loss(ctx, outputs, losses)
        self._matched = {}
        return (losses, used) if return_indices else losses

    def matched_pairs(self, outputs: dict, targets: list[dict], indices: list[tuple[Tensor, Tensor]],
                      num_boxes: float, suffix: str = "", on_device: DevicePairs | None = None) -> MatchedPairs:
        matched = super().matched_pairs(outputs, targets, indices, num_boxes, suffix, on_device)
        self._matched[suffix] = matched
        return matched

    def ur_loss(self, ctx, outputs: dict, losses: dict[str, Tensor]) -> Tensor:  # noqa: ANN001
        """Reuses the main pass's device index tensors and num_boxes (MatchedPairs of each decoder
        layer): no host sync between the UM gradient, the second decoder pass and its loss, which
        would leave the second pass's kernel launches exposed on a GPU."""
        layer_suffixes = [f"_{i}" for i in range(len(outputs.get("aux_outputs") or []))] + [""]
        um_total = sum(losses[f"loss_um{s}"] for s in layer_suffixes)
        if not um_total.requires_grad:
            return ctx.memory.sum() * 0.0  # a zero that keeps the graph connected
        # step-1 matching of each decoder layer; the box head runs on those queries only
        matched = [(self._matched[s].batch_idx, self._matched[s].query_idx) for s in layer_suffixes]
        num_boxes = self._matched[""].num_boxes
        # profiler ranges (named for `tools/benchmark_model.py --profile` and users' own traces)
        with record_function("ugs_ur/um_gradient"):
            (grad,) = torch.autograd.grad(um_total, ctx.memory, retain_graph=True, allow_unused=True)
        if grad is None:
            return ctx.memory.sum() * 0.0
        with record_function("ugs_ur/perturbation"):
            feats = ctx.memory.split(ctx.level_sizes, dim=1)
            grads = list(grad.split(ctx.level_sizes, dim=1))
            if self.ur_levels is not None:
                if max(self.ur_levels) >= len(grads):
                    raise ValueError(f"ugs.ur.levels {self.ur_levels}: the model has {len(grads)} feature levels")
                grads = [g if lv in self.ur_levels else None for lv, g in enumerate(grads)]
            masks = ctx.padding_mask.split(ctx.level_sizes, dim=1)
            deltas = ugs.ur_delta(feats, grads, self.ur_rho, masks, self.ur_eps)
        if self.ur_per_level:  # the paper's sum_l L_UR^l: one pass per level, only that level moved
            perturbations = [[d if i == lv else None for i in range(len(deltas))]
                             for lv, d in enumerate(deltas) if d is not None]
        else:  # one joint pass, every selected level perturbed at once
            perturbations = [deltas]
        total = None
        for level_deltas in perturbations:
            delta = torch.cat([torch.zeros_like(f) if d is None else d for f, d in zip(feats, level_deltas)], dim=1)
            with record_function("ugs_ur/second_decoder_pass"):
                layer_logits = ctx.rerun_perturbed(delta, matched)  # L x (N_l, 4, n+1); delta is detached
            self.ur_passes += 1
            # sum over layers of each layer's sum = one sum over all layers' rows
            # (no rows matched: an empty sum, 0, still attached to the box head's parameters)
            term = ugs.um_loss(torch.cat(layer_logits)).mean(-1).sum() / num_boxes
            total = term if total is None else total + term
        return total


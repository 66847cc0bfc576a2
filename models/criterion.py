"""DINO's set criterion: named losses over every output set, weights applied outside.

Output sets and key suffixes (docs/dino.md, "Criterion")::

    final decoder layer          ""            matched by the Hungarian matcher
    auxiliary decoder layer i    "_{i}"        matched per layer
    encoder proposals            "_interm"     matched
    denoising, last layer        "_dn"         fixed pairs: positive slot g*2M + j <-> target j
    denoising, layer i           "_dn_{i}"     same fixed pairs

Every set gets the same named losses (``losses``): ``labels`` -> ``loss_ce`` (sigmoid focal;
``class_error`` for the final set only), ``boxes`` -> the box-loss terms (default ``loss_bbox``,
``loss_giou`` and the logging-only ``loss_xy``, ``loss_hw``), ``cardinality`` ->
``cardinality_error`` (logging only). Denoising keys are always present: zeros when denoising
is off (eval mode, no ``dn_meta``, or a batch with no ground-truth box, i.e. ``pad_size == 0``).
The total is ``sum(losses[k] * weight_dict[k] for k in weight_dict)``.

Box-loss hook (how UGS plugs in)
--------------------------------
``box_losses`` is a sequence of *box-loss terms*. A term is any callable
``term(matched: MatchedPairs) -> dict[str, Tensor]`` with an attribute ``names`` (tuple of the
unsuffixed keys it returns; used to emit zeros for inactive denoising sets). The criterion calls
each term once per output set with that set's matched pairs and adds the set's suffix to the keys.
``MatchedPairs`` carries the whole output dict of the set, the matched ``(batch_idx, query_idx)``,
the matched predicted and target boxes and the normaliser, so a term can gather anything else the
model emits for the same queries, e.g. with UGS::

    class UGSBoxLoss(nn.Module):                     # e.g. in models/, wrapping ugs functions
        names = ("loss_bbox_ce", "loss_um")
        def forward(self, matched):
            logits = matched.gather("pred_box_logits")      # (N, 4, n+1) per-coordinate bin logits
            ref = matched.gather("ref_boxes_logit")         # (N, 4) detached reference, inverse-sigmoid
            y = inverse_sigmoid(matched.target_boxes_cxcywh) - ref  # (N, 4) regression targets
            ce = ugs.ce_loss(logits, y, self.grid).mean(-1)         # (N,)
            um = ugs.um_loss(logits).mean(-1)                       # (N,)
            return {"loss_bbox_ce": ce.sum() / matched.num_boxes, "loss_um": um.sum() / matched.num_boxes}

A term may instead define ``forward_sets(sets: list[MatchedPairs]) -> list[dict]`` (one dict per set,
same order): the criterion then calls it once per forward with every set that has predictions,
after all of them are matched, so that it can compute its loss on all sets' pairs at once (UGS
does: on a GPU each small per-set kernel costs more to launch than to run). The built-in terms do
the same (L1, GIoU, and the focal and cardinality terms, per logits shape), and the matcher costs
all sets in one call: apart from a label check and that one copy of the cost matrices to the host,
the criterion never waits for the device.

The default is ``(L1BoxLoss(), GIoUBoxLoss())``; UGS replaces ``L1BoxLoss`` by its CE term (or keeps
it unweighted for logging) and adds UM, and gives the new keys weights in ``weight_dict`` (see
``expand_weight_dict``). Terms that are ``nn.Module`` are registered as sub-modules, so buffers
such as a bin grid follow ``criterion.to(device)``.

Reusing the matching (UGS's UR second pass): ``criterion(outputs, targets, return_indices=True)``
returns ``(losses, indices)`` with ``indices[suffix]`` the per-image ``(pred_idx, tgt_idx)`` of
every set (denoising pairs included); ``criterion(outputs2, targets, indices=indices)`` reuses
them instead of matching. ``matched_pairs(...)`` and ``num_boxes(...)`` are public for the same
purpose, e.g. the UM loss of a second decoder pass over the final and auxiliary layers::

    losses, indices = criterion(outputs, targets, return_indices=True)
    num_boxes = criterion.num_boxes(targets, device)
    sets = [("", outputs2)] + [(f"_{i}", aux) for i, aux in enumerate(outputs2["aux_outputs"])]
    for suffix, out in sets:
        matched = criterion.matched_pairs(out, targets, indices[suffix], num_boxes, suffix)
        ... ugs.um_loss(matched.gather("pred_box_logits")) ...
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torchvision.ops import box_convert
from torch import Tensor, nn

from models.matched_pairs import (
    BoxLossTerm,
    DevicePairs,
    MatchedPairs,
    host_to_device,
    indices_to_device,
    per_set_normalisers,
    per_set_sums,
)
from models.matcher import HungarianMatcher, MatchIndices
from util.box_ops import paired_generalized_box_iou
from util.precision import at_least_float32

__all__ = [
    "BoxLossTerm",
    "GIoUBoxLoss",
    "L1BoxLoss",
    "MatchedPairs",
    "SetCriterion",
    "cardinality_error",
    "cardinality_errors",
    "class_error",
    "denoising_indices",
    "expand_weight_dict",
    "focal_loss_elements",
    "sigmoid_focal_loss",
]

LOSS_KINDS = ("labels", "boxes", "cardinality")


class L1BoxLoss(nn.Module):
    """L1 on matched cxcywh boxes (weighted) and its xy / hw split (logging only)."""

    names = ("loss_bbox", "loss_xy", "loss_hw")

    def forward(self, matched: MatchedPairs) -> dict[str, Tensor]:
        return self.forward_sets([matched])[0]

    def forward_sets(self, sets: list[MatchedPairs]) -> list[dict[str, Tensor]]:
        """All sets' pairs in one computation (the criterion's batched hook)."""
        src = torch.cat([m.src_boxes_cxcywh for m in sets])
        l1 = F.l1_loss(src, torch.cat([m.target_boxes_cxcywh for m in sets]).to(src.dtype), reduction="none")
        sums = per_set_sums(l1, sets)  # (S, 4)
        num_boxes = per_set_normalisers(sets, sums)
        loss = sums.sum(1) / num_boxes
        with torch.no_grad():
            xy = sums[:, :2].sum(1) / num_boxes
            hw = sums[:, 2:].sum(1) / num_boxes
        return [{"loss_bbox": loss[i], "loss_xy": xy[i], "loss_hw": hw[i]} for i in range(len(sets))]


class GIoUBoxLoss(nn.Module):
    """1 - GIoU of matched boxes (computed on the decoded ``pred_boxes``)."""

    names = ("loss_giou",)

    def forward(self, matched: MatchedPairs) -> dict[str, Tensor]:
        return self.forward_sets([matched])[0]

    def forward_sets(self, sets: list[MatchedPairs]) -> list[dict[str, Tensor]]:
        """All sets' pairs in one computation (the criterion's batched hook)."""
        src = box_convert(torch.cat([m.src_boxes_cxcywh for m in sets]), "cxcywh", "xyxy")
        tgt = box_convert(torch.cat([m.target_boxes_cxcywh for m in sets]).to(src.dtype), "cxcywh", "xyxy")
        giou = paired_generalized_box_iou(src, tgt)  # (N,), = diag of the pairwise GIoU
        loss = per_set_sums(1 - giou, sets) / per_set_normalisers(sets, src)
        return [{"loss_giou": loss[i]} for i in range(len(sets))]


def focal_loss_elements(logits: Tensor, onehot: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """The sigmoid focal loss of every logit, unreduced (same shape as `logits`)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * loss
    return loss


def sigmoid_focal_loss(logits: Tensor, onehot: Tensor, num_boxes: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """Focal loss (B, Q, C) summed over all elements / num_boxes (official: mean over Q, x Q)."""
    loss = focal_loss_elements(logits, onehot, alpha, gamma)
    # Official order of operations (mean over queries, sum, / num_boxes, x Q).
    return loss.mean(1).sum() / num_boxes * logits.shape[1]


@torch.no_grad()
def class_error(matched_logits: Tensor, matched_labels: Tensor) -> Tensor:
    """100 - top-1 accuracy (%) of the matched queries; 100 when nothing is matched (official)."""
    if matched_labels.numel() == 0:
        return matched_logits.new_tensor(100.0)
    correct = (matched_logits.argmax(-1) == matched_labels).sum()
    return 100 - correct.to(matched_logits.dtype) * (100.0 / matched_labels.numel())


@torch.no_grad()
def cardinality_error(logits: Tensor, targets: list[dict]) -> Tensor:
    """Mean |#queries whose argmax is not the last class - #targets| (logging only, official)."""
    num_targets = torch.as_tensor([len(t["labels"]) for t in targets], device=logits.device)
    num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
    return F.l1_loss(num_pred.to(logits.dtype), num_targets.to(logits.dtype))


def _groups_by_logits(sets: Sequence[MatchedPairs]) -> list[list[int]]:
    """Indices of the sets whose pred_logits share shape and dtype (they can be concatenated)."""
    groups: dict[tuple, list[int]] = {}
    for i, m in enumerate(sets):
        logits = m.outputs["pred_logits"]
        groups.setdefault((tuple(logits.shape), logits.dtype), []).append(i)
    return list(groups.values())


@torch.no_grad()
def cardinality_errors(sets: Sequence[MatchedPairs], num_targets: Tensor) -> list[Tensor]:
    """`cardinality_error` of each set (logging only), computed together for sets of one logits
    shape. num_targets: (B,) target counts on the logits' device."""
    out: list[Tensor | None] = [None] * len(sets)
    for members in _groups_by_logits(sets):
        logits = torch.cat([at_least_float32(sets[i].outputs["pred_logits"]) for i in members])  # (G*B, Q, C)
        num_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1).view(len(members), -1)  # (G, B)
        errors = (num_pred.to(logits.dtype) - num_targets.to(logits.dtype)).abs().mean(1)
        for k, i in enumerate(members):
            out[i] = errors[k]
    return out  # type: ignore[return-value]


def denoising_indices(targets: list[dict], pad_size: int, num_groups: int) -> MatchIndices:
    """Fixed pairs of the denoising positives: slot ``g * 2M + j`` <-> target j (g-major order).

    ``2M = pad_size // num_groups``; the negatives at ``g * 2M + M + j`` are background only.
    """
    if num_groups < 1 or pad_size % num_groups != 0:
        raise ValueError(f"dn_meta: pad_size {pad_size} is not a multiple of num_dn_group {num_groups}")
    group_size = pad_size // num_groups  # 2M: positives then negatives
    indices = []
    for b, t in enumerate(targets):
        n = len(t["labels"])
        if 2 * n > group_size:
            raise ValueError(f"dn_meta: image {b} has {n} targets but denoising groups hold "
                             f"{group_size // 2} positives (pad_size {pad_size}, {num_groups} groups)")
        tgt = torch.arange(n, dtype=torch.int64).repeat(num_groups)  # (G*n,)
        pred = (torch.arange(num_groups, dtype=torch.int64) * group_size)[:, None] + torch.arange(n)
        indices.append((pred.flatten(), tgt))
    return indices


def expand_weight_dict(base: dict[str, float], num_decoder_layers: int, aux_loss: bool = True,
                       denoising: bool = True, interm: bool = True, interm_coef: float = 1.0,
                       no_interm_box_loss: bool = False) -> dict[str, float]:
    """Official weight_dict from the final-layer weights, e.g. ``{"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2}``.

    Adds ``_dn``, then ``_{i}`` / ``_dn_{i}`` for the ``num_decoder_layers - 1`` auxiliary layers,
    then ``_interm`` (times ``interm_coef``; box terms, i.e. every key but ``loss_ce``, times 0 when
    ``no_interm_box_loss``). Extra terms (UGS's) get the same treatment when put in ``base``.
    """
    weights = dict(base)
    if denoising:
        weights.update({f"{k}_dn": v for k, v in base.items()})
    per_layer = dict(weights)
    if aux_loss:
        for i in range(num_decoder_layers - 1):
            weights.update({f"{k}_{i}": v for k, v in per_layer.items()})
    if interm:
        for k, v in base.items():
            box_coef = 0.0 if (no_interm_box_loss and k != "loss_ce") else 1.0
            weights[f"{k}_interm"] = v * interm_coef * box_coef
    return weights


def _takes_all_sets(term: BoxLossTerm) -> bool:
    """A term with the batched hook `forward_sets` (module docstring), called once per forward."""
    return hasattr(term, "forward_sets")


def _checked(term: BoxLossTerm, values: dict[str, Tensor]) -> dict[str, Tensor]:
    if set(values) != set(term.names):
        raise ValueError(f"box-loss term {term!r} returned keys {sorted(values)}, "
                         f"declared names {list(term.names)}")
    return values


@dataclass
class _OutputSet:
    suffix: str
    outputs: dict | None  # None: inactive denoising set -> zeros
    indices: MatchIndices | None = None  # None: match with the Hungarian matcher
    num_boxes_scale: float = 1.0
    log: bool = False  # class_error (final set only)


class SetCriterion(nn.Module):
    """DINO's losses for all output sets.

    Args:
        num_classes: number of logits per query (C); labels must lie in [0, C).
        matcher: the Hungarian matcher used for the final, auxiliary and encoder sets.
        weight_dict: loss name -> weight; only stored here (the total is computed by the caller).
        focal_alpha, focal_gamma: sigmoid focal loss parameters (official 0.25, 2).
        losses: which loss kinds to compute, from ``("labels", "boxes", "cardinality")``.
        box_losses: box-loss terms (module docstring); default ``(L1BoxLoss(), GIoUBoxLoss())``.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        weight_dict: dict[str, float],
        focal_alpha: float = 0.25,
        losses: Sequence[str] = LOSS_KINDS,
        box_losses: Sequence[BoxLossTerm] | None = None,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        unknown = [k for k in losses if k not in LOSS_KINDS]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {list(LOSS_KINDS)}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.losses = tuple(losses)
        terms = tuple(box_losses) if box_losses is not None else (L1BoxLoss(), GIoUBoxLoss())
        for term in terms:
            if not isinstance(getattr(term, "names", None), tuple):
                raise TypeError(f"box-loss term {term!r} needs a tuple attribute 'names' listing its keys")
        self.box_losses = terms
        # Registered so that buffers of module terms follow .to(device); called through box_losses.
        self.box_loss_modules = nn.ModuleList([t for t in terms if isinstance(t, nn.Module)])
        names = [n for t in terms for n in t.names]
        if len(set(names)) != len(names):
            raise ValueError(f"SetCriterion: box-loss terms return overlapping keys {names}")

    # ----------------------------------------------------------------------------- loss kinds
    def loss_names(self, log: bool = False) -> list[str]:
        """Unsuffixed keys one output set produces."""
        names: list[str] = []
        for kind in self.losses:
            if kind == "labels":
                names += ["loss_ce", "class_error"] if log else ["loss_ce"]
            elif kind == "boxes":
                names += [n for t in self.box_losses for n in t.names]
            else:
                names.append("cardinality_error")
        return names

    def label_loss(self, matched: MatchedPairs, targets: list[dict], log: bool) -> dict[str, Tensor]:
        """Focal loss (and with `log` the class error) of one set."""
        if matched.target_labels is None:
            labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, matched.indices)])
            matched = replace(matched, target_labels=labels.to(matched.batch_idx.device))
        return self.label_losses([matched], [log])[0]

    def label_losses(self, sets: Sequence[MatchedPairs], logged: Sequence[bool]) -> list[dict[str, Tensor]]:
        """`label_loss` of many sets (each with `target_labels`), computed together for sets whose
        logits have one shape and dtype: one focal-loss computation instead of one per set (on
        a GPU each small kernel costs more to launch than to run). Per set the official order:
        mean over queries, sum, / num_boxes, x Q."""
        out: list[dict[str, Tensor]] = [{} for _ in sets]
        for members in _groups_by_logits(sets):
            group = [sets[i] for i in members]
            logits = torch.cat([at_least_float32(m.outputs["pred_logits"]) for m in group])  # (G*B, Q, C)
            batch, num_queries = group[0].outputs["pred_logits"].shape[:2]
            labels = torch.cat([m.target_labels for m in group])
            rows = torch.cat([m.batch_idx + k * batch for k, m in enumerate(group)])
            onehot = torch.zeros_like(logits)
            onehot[rows, torch.cat([m.query_idx for m in group]), labels] = 1
            loss = focal_loss_elements(logits, onehot, self.focal_alpha, self.focal_gamma)
            per_set = loss.mean(1).view(len(group), -1).sum(1) / per_set_normalisers(group, logits) * num_queries
            for k, (i, m) in enumerate(zip(members, group)):
                out[i]["loss_ce"] = per_set[k]
                if logged[i]:
                    out[i]["class_error"] = class_error(at_least_float32(m.outputs["pred_logits"])[m.batch_idx, m.query_idx],
                                                        m.target_labels)
        return out

    def box_loss(self, matched: MatchedPairs) -> dict[str, Tensor]:
        """The per-set box-loss terms of one set (terms with `forward_sets` run in `forward`)."""
        out: dict[str, Tensor] = {}
        for term in self.box_losses:
            if not _takes_all_sets(term):
                out.update(_checked(term, term(matched)))
        return out

    def matched_pairs(self, outputs: dict, targets: list[dict], indices: MatchIndices, num_boxes: float,
                      suffix: str = "", on_device: DevicePairs | None = None) -> MatchedPairs:
        """Gather the matched predictions and targets of one output set. on_device: the set's
        `indices_to_device` entry when the caller moved all sets' pairs at once."""
        boxes = at_least_float32(outputs["pred_boxes"])
        if on_device is None:
            (on_device,) = indices_to_device([indices], targets, boxes.device)
        return MatchedPairs(outputs=outputs, indices=indices, batch_idx=on_device.batch_idx,
                            query_idx=on_device.query_idx,
                            src_boxes_cxcywh=boxes[on_device.batch_idx, on_device.query_idx],
                            target_boxes_cxcywh=on_device.target_boxes.to(dtype=boxes.dtype),
                            num_boxes=num_boxes, suffix=suffix, target_labels=on_device.target_labels)

    def set_losses(self, matched: MatchedPairs, targets: list[dict], log: bool = False,
                   kinds: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Every named loss of one output set (unsuffixed keys), but those of box-loss terms with
        `forward_sets`, which `forward` computes for all sets at once. kinds: the loss kinds to
        compute (default all of `losses`)."""
        out: dict[str, Tensor] = {}
        for kind in self.losses if kinds is None else kinds:
            if kind == "labels":
                out.update(self.label_loss(matched, targets, log))
            elif kind == "boxes":
                out.update(self.box_loss(matched))
            else:
                out["cardinality_error"] = cardinality_error(at_least_float32(matched.outputs["pred_logits"]), targets)
        return out

    # ----------------------------------------------------------------------------- driver
    def num_boxes(self, targets: list[dict], device: torch.device) -> float:
        """Target boxes per process: summed over processes / world size, at least 1 (official).
        One process: host arithmetic only (the official float32 rounding kept), no device copy."""
        local = float(sum(len(t["labels"]) for t in targets))
        if not (dist.is_available() and dist.is_initialized()):
            return max(local, 1.0)  # integer counts: exact in float32 as in the official tensor
        num = torch.as_tensor([local], dtype=torch.float, device=device)
        dist.all_reduce(num)
        return torch.clamp(num / dist.get_world_size(), min=1).item()

    def output_sets(self, outputs: dict, targets: list[dict]) -> Iterator[_OutputSet]:
        """Final, auxiliary, encoder and denoising sets, each with its key suffix."""
        if "enc_outputs" in outputs:
            raise NotImplementedError("'enc_outputs' (official multi-layer two-stage encoder losses) "
                                      "are not supported; DINO-5scale emits 'interm_outputs' only")
        aux = outputs.get("aux_outputs") or []
        yield _OutputSet("", outputs, log=True)
        for i, aux_out in enumerate(aux):
            yield _OutputSet(f"_{i}", aux_out)
        if "interm_outputs" in outputs:
            yield _OutputSet("_interm", outputs["interm_outputs"])

        dn_meta = outputs.get("dn_meta")
        known = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
        active = self.training and known is not None and dn_meta["pad_size"] > 0
        dn_aux = (known.get("aux_outputs") or []) if active else []
        if active and len(dn_aux) != len(aux):
            raise ValueError(f"dn_meta.output_known_lbs_bboxes has {len(dn_aux)} aux_outputs, "
                             f"the matching part has {len(aux)}")
        dn_indices = (denoising_indices(targets, dn_meta["pad_size"], dn_meta["num_dn_group"])
                      if active else None)
        scale = float(dn_meta["num_dn_group"]) if active else 1.0
        yield _OutputSet("_dn", known if active else None, dn_indices, scale)
        for i in range(len(aux)):
            yield _OutputSet(f"_dn_{i}", dn_aux[i] if active else None, dn_indices, scale)

    def check_targets(self, targets: list[dict], batch_size: int) -> None:
        if len(targets) != batch_size:
            raise ValueError(f"SetCriterion: {len(targets)} targets for a batch of {batch_size}")
        for b, t in enumerate(targets):
            for key in ("labels", "boxes"):
                if key not in t:
                    raise KeyError(f"SetCriterion: target {b} has no '{key}' (keys: {sorted(t)})")
            labels, boxes = t["labels"], t["boxes"]
            if boxes.ndim != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
                raise ValueError(f"SetCriterion: target {b}: expected labels (n,) and boxes (n, 4), got "
                                 f"{tuple(labels.shape)} and {tuple(boxes.shape)}")
            if labels.is_floating_point():
                raise ValueError(f"SetCriterion: target {b}: labels must be int64, got {labels.dtype}")
        # One host sync on the happy path; the per-image search only runs to word the error.
        all_labels = torch.cat([t["labels"] for t in targets]) if targets else torch.zeros(0)
        if all_labels.numel() and not bool(((all_labels >= 0) & (all_labels < self.num_classes)).all()):
            for b, t in enumerate(targets):
                labels = t["labels"]
                if labels.numel() and not bool(((labels >= 0) & (labels < self.num_classes)).all()):
                    raise ValueError(f"SetCriterion: target {b}: labels must be integers in "
                                     f"[0, {self.num_classes}), got {labels.tolist()}")

    def forward(self, outputs: dict, targets: list[dict], indices: dict[str, MatchIndices] | None = None,
                return_indices: bool = False
                ) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, MatchIndices]]:
        """Compute every named loss.

        Args:
            outputs: the model's output dict (conventions.md: pred_logits, pred_boxes,
                aux_outputs, interm_outputs, dn_meta).
            targets: per image ``labels`` (n,) int64 and ``boxes`` (n, 4) cxcywh normalised; other
                keys (``ignore_boxes``, ``image_id``...) are not used.
            indices: optional per-suffix matching to reuse instead of running the matcher.
            return_indices: also return the per-suffix indices used.

        Returns:
            ``{name: scalar tensor}`` (or ``(losses, indices)`` with ``return_indices``).
        """
        logits = outputs["pred_logits"]
        self.check_targets(targets, logits.shape[0])
        num_boxes = self.num_boxes(targets, logits.device)
        losses: dict[str, Tensor] = {}
        used: dict[str, MatchIndices] = {}
        sets = list(self.output_sets(outputs, targets))
        live = [s for s in sets if s.outputs is not None]
        # Matching first, all sets in one matcher call (one device->host copy), then all sets'
        # pairs to the device in one copy: the loss computation below never waits for the device.
        for s in live:
            if s.indices is None and indices is not None:
                if s.suffix not in indices:
                    raise KeyError(f"SetCriterion: indices given for {sorted(indices)} but not for "
                                   f"output set '{s.suffix}'")
                s.indices = indices[s.suffix]
        to_match = [s for s in live if s.indices is None]
        if getattr(self.matcher, "costs_by_set", False):  # e.g. models/ugs_matcher.py: per-set grids
            found = self.matcher.forward_sets([s.outputs for s in to_match], targets,
                                              set_names=[s.suffix for s in to_match])
        elif hasattr(self.matcher, "forward_sets"):
            found = self.matcher.forward_sets([s.outputs for s in to_match], targets)
        else:  # any matcher with HungarianMatcher.forward's signature
            found = [self.matcher(s.outputs, targets) for s in to_match]
        for s, idx in zip(to_match, found, strict=True):
            s.indices = idx
        num_targets = None
        if "cardinality" in self.losses:
            num_targets = torch.tensor([len(t["labels"]) for t in targets])
        on_device = indices_to_device([s.indices for s in live], targets, logits.device)
        if num_targets is not None:
            num_targets = host_to_device(num_targets, logits.device)
        active: list[MatchedPairs] = []
        logged: list[bool] = []
        per_set_kinds = [k for k in self.losses if k == "boxes"]  # the others: all sets at once
        with torch.autocast(device_type=logits.device.type, enabled=False):
            pairs = iter(on_device)
            for s in sets:
                if s.outputs is None:
                    zero = torch.zeros((), dtype=at_least_float32(logits).dtype, device=logits.device)
                    losses.update({f"{k}{s.suffix}": zero.clone() for k in self.loss_names(s.log)})
                    continue
                used[s.suffix] = s.indices
                matched = self.matched_pairs(s.outputs, targets, s.indices, num_boxes * s.num_boxes_scale,
                                             s.suffix, next(pairs))
                per_set = self.set_losses(matched, targets, s.log, per_set_kinds)
                losses.update({f"{k}{s.suffix}": v for k, v in per_set.items()})
                active.append(matched)
                logged.append(s.log)
            if "labels" in self.losses and active:  # all sets' classification losses at once
                for matched, values in zip(active, self.label_losses(active, logged), strict=True):
                    losses.update({f"{k}{matched.suffix}": v for k, v in values.items()})
            if "cardinality" in self.losses and active:
                for matched, error in zip(active, cardinality_errors(active, num_targets), strict=True):
                    losses[f"cardinality_error{matched.suffix}"] = error
            if "boxes" in self.losses and active:
                for term in filter(_takes_all_sets, self.box_losses):
                    for matched, values in zip(active, term.forward_sets(active), strict=True):
                        losses.update({f"{k}{matched.suffix}": v for k, v in _checked(term, values).items()})
        return (losses, used) if return_indices else losses

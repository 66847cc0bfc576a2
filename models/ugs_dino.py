"""UGS-DINO: DINO with distribution box heads (docs/ugs.md, "The method").

Same modules and parameter names as DINO (so official checkpoints load, minus the box heads' last
layers); the differences are all here:
- every box head is a `DistributionBoxHead` (models/ugs_head.py), passed to DINO's constructor as
  its box-head factory, so decoding, matching and GIoU use the expectation of the bin distribution;
- every output set (final, aux, interm, dn) also carries `pred_box_logits (B, T, 4, n+1)` and
  `ref_boxes_logit (B, T, 4)` for the criterion (docs/conventions.md);
- in training with UR on, `outputs["ur_context"]` carries what the UR second pass needs
  (URContext): the decoder's inputs of this forward (`intermediates["decoder_inputs"]` of
  DINO.forward) restricted to the matching queries, with each decoder layer's projected memory,
  a `rerun(memory)` that repeats the decoder on other memory and `rerun_perturbed(delta)`, the
  same on memory + delta computed by linearity from the kept projections.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import ugs
from models.decoder import Decoder, DecoderInputs
from models.dino import DINO
from models.heads import apply_box_delta
from models.outputs import DINOOutput, Prediction
from models.query_selection import SelectedQueries
from models.ugs_head import DistributionBoxHead, distribution_outputs

# |inverse_sigmoid| never exceeds this (eps 1e-3, util/box_ops.py)
MAX_REFERENCE_LOGIT = math.log((1 - 1e-3) / 1e-3)


@dataclass
class URContext:
    """What the UR pass needs from one training forward.

    inputs: the decoder's inputs for the Q matching queries (no denoising queries, no attention
        mask); `inputs.memory` (B, S, d) is the encoder output with its autograd graph.
    level_sizes: [h_l * w_l] per level (sum S), to split memory into levels.
    decoder, box_head: the model's decoder and its (shared) decoder box head.
    """

    inputs: DecoderInputs
    level_sizes: list[int]
    decoder: Decoder
    box_head: DistributionBoxHead
    # the autocast state of the first pass (enabled, dtype), re-entered by the second pass so that
    # it runs at the same precision wherever the criterion is called
    autocast: tuple[bool, torch.dtype] = (False, torch.float32)

    @property
    def memory(self) -> Tensor:
        return self.inputs.memory

    @property
    def padding_mask(self) -> Tensor:
        """(B, S) bool, True on padding."""
        return self.inputs.memory_padding_mask

    def rerun(self, memory: Tensor, matched: list[tuple[Tensor, Tensor]] | None = None) -> list[Tensor]:
        """The decoder again on `memory` (B, S, d), same queries and anchors -> per decoder layer
        the bin logits (B, Q, 4, n+1), or with `matched` (one (batch_idx (N_l,), query_idx (N_l,))
        per layer) only those queries' (N_l, 4, n+1): the box head runs on nothing else."""
        with self._first_pass_precision():
            hs, _ = self.decoder(**{**self.inputs.kwargs(), "memory": memory, "memory_values": None})
            return self._bin_logits(hs, matched)

    def rerun_perturbed(self, delta: Tensor, matched: list[tuple[Tensor, Tensor]] | None = None) -> list[Tensor]:
        """`rerun(memory + delta, matched)`, computed by linearity where the first pass kept its
        projected memory (`inputs.memory_values`): layer l's cross-attention reads
        value_proj_l(memory + delta) = values_l + delta W_l^T (bias and padding already in values_l,
        delta zero on padding), so the second pass multiplies only the constant delta (no input
        gradient) and its gradient into memory flows through the first pass's values_l, whose
        projection backward then runs once for both passes. delta: (B, S, d), detached."""
        values = self.inputs.memory_values
        if values is None:
            return self.rerun(self.memory + delta, matched)
        layers = self.decoder.layers
        with self._first_pass_precision():
            perturbed = [v + F.linear(delta, layer.cross_attn.value_proj.weight).to(v.dtype)
                         for v, layer in zip(values, layers)]
            hs, _ = self.decoder(**{**self.inputs.kwargs(), "memory_values": perturbed})
            return self._bin_logits(hs, matched)

    def _first_pass_precision(self) -> torch.autocast:
        enabled, dtype = self.autocast
        return torch.autocast(self.memory.device.type, dtype=dtype, enabled=enabled)

    def _bin_logits(self, hs: list[Tensor], matched: list[tuple[Tensor, Tensor]] | None) -> list[Tensor]:
        if matched is None:
            return [self.box_head.bin_logits(h) for h in hs]
        if len(matched) != len(hs):
            raise ValueError(f"URContext: {len(matched)} index pairs for {len(hs)} decoder layers")
        # the head is shared by the layers: one call on all layers' rows (fewer small kernels)
        rows = torch.cat([h[b, q] for h, (b, q) in zip(hs, matched)])
        return list(self.box_head.bin_logits(rows).split([b.numel() for b, _q in matched]))


class UGSPrediction(Prediction, total=False):
    """A Prediction (models/outputs.py) with the fields the criterion needs for two-hot targets.

    pred_box_logits: (B, N, 4, n+1) raw per-coordinate bin logits (cx, cy, w, h order) over the
        head's grid; their expectation is the logit-space delta that pred_boxes applied.
    ref_boxes_logit: (B, N, 4) the detached logit-space reference the delta was added to:
        inverse_sigmoid(reference box) for decoder layers (pred_boxes = sigmoid(ref_boxes_logit +
        delta)); for interm_outputs the raw selected proposal clamped to +-log(999) (the
        inverse_sigmoid range), so invalid (+inf) proposals still give finite targets.
    """

    pred_box_logits: Tensor
    ref_boxes_logit: Tensor


class UGSOutput(DINOOutput, total=False):
    """What `UGSDINO.forward` returns: a DINOOutput whose every prediction set (final, aux_outputs,
    interm_outputs, the dn ones; not interm_outputs_for_matching_pre) is a UGSPrediction.

    pred_box_logits (B, Q, 4, n+1), ref_boxes_logit (B, Q, 4): of the last decoder layer.
    ur_context: training forwards with UR on only; not a tensor, so drop it before exporting or
        gathering outputs.
    """

    pred_box_logits: Tensor
    ref_boxes_logit: Tensor
    ur_context: URContext


class UGSDINO(DINO):
    """DINO whose box heads predict per-coordinate bin distributions over `grid`.

    args, kwargs: DINO's constructor arguments (models/dino.py) but `box_head_factory`.
    grid (n+1,): the decoder heads' bins; interm_grid (n+1,): the encoder-proposal head's
    (default `grid`). zero_last_layer: start the bin layers at zero (uniform bins, delta 0).
    collect_ur_context: training forwards attach `ur_context` (False when ur.weight is 0, so a
    run without UR keeps nothing for it), with each decoder layer's projected memory, so that the
    UR pass works by linearity.

    The box heads are built where DINO builds its own, so from the same seed every parameter but
    the heads' last layers equals the DINO baseline's (the baseline-vs-UGS diagnostics rely on it).
    """

    def __init__(self, *args: Any, grid: Tensor, interm_grid: Tensor | None = None,
                 zero_last_layer: bool = True, collect_ur_context: bool = False, **kwargs: Any) -> None:
        if "box_head_factory" in kwargs:
            raise TypeError("UGSDINO builds its own box heads; do not pass box_head_factory")
        super().__init__(*args, box_head_factory=partial(DistributionBoxHead, grid=grid,
                                                         zero_last_layer=zero_last_layer), **kwargs)
        # the encoder head starts as a copy of the decoder head (official init), over its own range
        self.transformer.enc_out_bbox_embed.set_grid(interm_grid if interm_grid is not None else grid)
        self.collect_ur_context = collect_ur_context

    @property
    def box_grid(self) -> Tensor:
        return self.bbox_embed[0].grid

    def decoder_memory_values(self, memory: Tensor, padding_mask: Tensor) -> list[Tensor] | None:
        """Kept for the UR pass (URContext.rerun_perturbed) in training with UR on."""
        if self.training and self.collect_ur_context:
            return self.transformer.decoder.project_memory(memory, padding_mask)
        return None

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None,
                dn_override: dict | None = None, intermediates: dict | None = None) -> UGSOutput:
        stages = intermediates if intermediates is not None else {}
        out = super().forward(images, masks, targets, dn_override, stages)
        if self.training and self.collect_ur_context:
            num_dn = out["dn_meta"]["pad_size"] if out.get("dn_meta") else 0
            inputs = stages["decoder_inputs"].without_denoising(num_dn)
            sizes = [int(h) * int(w) for h, w in inputs.spatial_shapes.tolist()]
            device = images.device.type
            precision = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            out["ur_context"] = URContext(inputs, sizes, self.transformer.decoder, self.bbox_embed[0], precision)
        return out

    def box_outputs(self, layer: int, hidden: Tensor, reference_boxes: Tensor) -> dict[str, Tensor]:
        """DINO's refined boxes decoded from the bin logits, plus the fields the UGS losses need:
        pred_box_logits (B, T, 4, n+1) and ref_boxes_logit (B, T, 4) (detached). The head runs
        once; the arithmetic is `models.heads.apply_box_delta`."""
        head = self.bbox_embed[layer]
        logits = head.bin_logits(hidden)
        delta = ugs.expectation(logits, head.grid)  # (B, T, 4), at least float32
        boxes, ref_logit = apply_box_delta(delta, reference_boxes)
        return {"pred_boxes": boxes, "pred_box_logits": logits, "ref_boxes_logit": ref_logit.detach()}

    def interm_box_outputs(self, selected: SelectedQueries) -> dict[str, Tensor]:
        # The reference is the selected raw proposal (logit space, +inf where invalid; clamped as
        # inverse_sigmoid clamps, so such a query's target stays finite): no sigmoid/logit round trip.
        proposal_logit = selected.proposals_unsig.clamp(-MAX_REFERENCE_LOGIT, MAX_REFERENCE_LOGIT)
        head = self.transformer.enc_out_bbox_embed
        return {"pred_boxes": selected.interm_boxes,
                **distribution_outputs(head, selected.interm_hidden, proposal_logit)}

"""UGS-DINO: DINO with distribution box heads (ugs_method.md sections 5, 8, 10).

Same modules and parameter names as DINO (so official checkpoints load, minus the box heads' last
layers); the differences are all here:
- every box head is a `DistributionBoxHead` (models/ugs_head.py), so decoding, matching and GIoU
  use the expectation of the bin distribution;
- every output set (final, aux, interm, dn) also carries `pred_box_logits (B, T, 4, n+1)` and
  `ref_boxes_logit (B, T, 4)` for the criterion (docs/conventions.md);
- in training, `outputs["ur_context"]` carries what the UR second pass needs (URContext): the
  encoder memory with its graph, the level layout, and a `rerun(memory)` that repeats the decoder
  on the matching queries only (same content queries and anchors, no denoising queries).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import Tensor, nn

from models.decoder import Decoder
from models.dino import DINO
from models.ugs_head import DistributionBoxHead, distribution_outputs, use_distribution_box_heads

_DECODER_ARGS = inspect.signature(Decoder.forward)


@dataclass
class URContext:
    """What the UR pass needs from one training forward.

    memory: (B, S, d) encoder output with its autograd graph (S = sum of h_l * w_l).
    padding_mask: (B, S) bool, True on padding. level_sizes: [h_l * w_l] per level (sum S).
    decoder_inputs: the matching part's decoder arguments except `memory` (tgt (B, Q, d),
        anchors_unsig (B, Q, 4) detached, memory_padding_mask, spatial_shapes, level_start_index,
        valid_ratios, self_attn_mask=None).
    """

    memory: Tensor
    padding_mask: Tensor
    level_sizes: list[int]
    decoder_inputs: dict
    decoder: Decoder
    box_head: DistributionBoxHead

    def rerun(self, memory: Tensor) -> list[Tensor]:
        """Decoder on `memory` (B, S, d) -> bin logits (B, Q, 4, n+1) of every decoder layer."""
        hs, _ = self.decoder(memory=memory, **self.decoder_inputs)
        return [self.box_head.bin_logits(h) for h in hs]


class UGSDINO(DINO):
    """DINO whose box heads predict per-coordinate bin distributions. Build with `from_dino`."""

    # Set by from_dino: whether training forwards attach `ur_context` (False when ur.weight is 0,
    # so a run without UR pays nothing for it).
    collect_ur_context: bool

    @classmethod
    def from_dino(cls, model: DINO, grid: Tensor, interm_grid: Tensor | None = None,
                  zero_last_layer: bool = True, collect_ur_context: bool = False) -> "UGSDINO":
        """Turn a freshly built DINO into UGS-DINO in place and return it.

        Re-typing the built model (rather than building a second one) keeps every parameter but the
        box heads' last layers identical to the baseline built from the same seed, which the
        baseline-vs-UGS diagnostics rely on. The first two layers of each box head are kept.
        """
        if type(model) is not DINO:
            raise TypeError(f"UGSDINO.from_dino expects a DINO, got {type(model).__name__}")
        model.__class__ = cls
        model.replaced_heads = use_distribution_box_heads(model, grid, interm_grid, zero_last_layer)
        model.collect_ur_context = collect_ur_context
        return model

    @property
    def box_grid(self) -> Tensor:
        return self.bbox_embed[0].grid

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None,
                dn_override: dict | None = None, intermediates: dict | None = None) -> dict:
        captured: dict = {}

        def keep_decoder_args(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.update(_DECODER_ARGS.bind(None, *args, **kwargs).arguments)

        hook = (self.transformer.decoder.register_forward_pre_hook(keep_decoder_args, with_kwargs=True)
                if self.training and self.collect_ur_context else None)
        try:
            out = super().forward(images, masks, targets, dn_override, intermediates)
        finally:
            if hook is not None:
                hook.remove()
        if captured:
            out["ur_context"] = self._ur_context(captured, out)
        return out

    def _ur_context(self, args: dict, out: dict) -> URContext:
        pad = out["dn_meta"]["pad_size"] if out.get("dn_meta") else 0
        spatial_shapes = args["spatial_shapes"]
        inputs = {"tgt": args["tgt"][:, pad:], "anchors_unsig": args["anchors_unsig"][:, pad:],
                  "memory_padding_mask": args["memory_padding_mask"], "spatial_shapes": spatial_shapes,
                  "level_start_index": args["level_start_index"], "valid_ratios": args["valid_ratios"],
                  "self_attn_mask": None}
        sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
        return URContext(memory=args["memory"], padding_mask=args["memory_padding_mask"], level_sizes=sizes,
                         decoder_inputs=inputs, decoder=self.transformer.decoder, box_head=self.bbox_embed[0])

    def predict(self, hs: list[Tensor], references: list[Tensor], selected, dn) -> dict:  # noqa: ANN001
        out = super().predict(hs, references, selected, dn)
        pad = 0 if dn is None else dn.pad_size
        extras = [distribution_outputs(self.bbox_embed[i], h, references[i]) for i, h in enumerate(hs)]
        for layer_out, extra in zip(out["aux_outputs"] + [out], extras):
            layer_out.update({k: v[:, pad:] for k, v in extra.items()})
        if out.get("dn_meta"):
            known = out["dn_meta"]["output_known_lbs_bboxes"]
            for layer_out, extra in zip(known["aux_outputs"] + [known], extras):
                layer_out.update({k: v[:, :pad] for k, v in extra.items()})
        # Encoder proposals: the reference is the selected proposal box (logit space, detached).
        out["interm_outputs"].update(distribution_outputs(self.transformer.enc_out_bbox_embed,
                                                          selected.interm_hidden, selected.init_box_proposal))
        return out

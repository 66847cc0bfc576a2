"""DINO: the wiring of backbone -> input projections -> encoder -> query selection ->
denoising -> decoder -> heads (the paper's figure; docs/dino.md).

Module names reproduce the official state dict exactly: encoder, decoder and the
query-selection parameters live under `transformer.*`; the shared decoder heads are stored once
and aliased as `bbox_embed.{i}` / `class_embed.{i}` and `transformer.decoder.bbox_embed.{i}` /
`transformer.decoder.class_embed.{i}`, so official checkpoints load with strict=True.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from models.backbone import Backbone
from models.decoder import Decoder, DecoderInputs
from models.deformable_attention import MSDeformAttn
from models.denoising import DenoisingQueries, prepare_denoising
from models.encoder import Encoder, flatten_levels
from models.heads import build_box_head, build_class_head, refine_boxes
from models.input_projection import InputProjection
from models.outputs import DINOOutput
from models.query_selection import SelectedQueries, select_queries


class DeformableTransformer(nn.Module):
    """Parameter container with the official `transformer.*` names (the data flow is in DINO.forward).

    level_embed (L, d); encoder; decoder; tgt_embed (Q, d) learned content queries; enc_output +
    enc_output_norm (the projection before query selection); enc_out_class_embed and
    enc_out_bbox_embed (the encoder's own heads, attached by DINO).
    """

    def __init__(self, encoder: Encoder, decoder: Decoder, num_levels: int, num_queries: int,
                 hidden_dim: int) -> None:
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.encoder = encoder
        self.decoder = decoder
        self.tgt_embed = nn.Embedding(num_queries, hidden_dim)
        self.enc_output = nn.Linear(hidden_dim, hidden_dim)
        self.enc_output_norm = nn.LayerNorm(hidden_dim)
        self.enc_out_bbox_embed: nn.Module | None = None
        self.enc_out_class_embed: nn.Module | None = None
        # Official init order: xavier on every matrix (tgt_embed included), then the MSDA init,
        # then level_embed ~ N(0, 1).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        nn.init.normal_(self.level_embed)


class DINO(nn.Module):
    """DINO-DETR with two-stage mixed query selection and contrastive denoising.

    forward(images (B, 3, H, W), masks (B, H, W) True on padding, targets=None, dn_override=None)
    -> DINOOutput (models/outputs.py). Denoising queries are built in training mode when targets
    are given; `dn_override` = {input_query_label (B, P, d), input_query_bbox (B, P, 4)
    unsigmoided, attn_mask (P+Q, P+Q) bool, dn_meta {pad_size, num_dn_group}} injects exact
    queries instead (tests against the official fixtures).

    `box_head_factory(hidden_dim)` makes the box head (default: DINO's MLP(d, d, 4, 3) with a
    zero last layer); a variant passes its own (UGS-DINO: per-coordinate bin heads). It is called
    where the official code builds the head, so every other parameter gets the same random
    initialisation from the same seed whichever head is used.
    """

    def __init__(self, backbone: Backbone, input_proj: InputProjection, encoder: Encoder, decoder: Decoder,
                 hidden_dim: int, num_classes: int, num_queries: int, num_feature_levels: int,
                 dn_number: int, dn_label_noise_ratio: float, dn_box_noise_scale: float,
                 dn_labelbook_size: int,
                 box_head_factory: Callable[[int], nn.Module] = build_box_head) -> None:
        super().__init__()
        if dn_labelbook_size < num_classes:
            raise ValueError(f"dn_labelbook_size ({dn_labelbook_size}) must be >= "
                             f"num_classes ({num_classes})")
        self.hidden_dim, self.num_classes, self.num_queries = hidden_dim, num_classes, num_queries
        self.dn_number, self.dn_label_noise_ratio = dn_number, dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        num_dec_layers = len(decoder.layers)

        self.transformer = DeformableTransformer(encoder, decoder, num_feature_levels, num_queries,
                                                 hidden_dim)
        self.label_enc = nn.Embedding(dn_labelbook_size + 1, hidden_dim)
        self.input_proj = input_proj
        self.backbone = backbone
        # One class head and one box head shared by all decoder layers, under 2 x L names.
        class_head = build_class_head(hidden_dim, num_classes)
        box_head = box_head_factory(hidden_dim)
        self.bbox_embed = nn.ModuleList([box_head] * num_dec_layers)
        self.class_embed = nn.ModuleList([class_head] * num_dec_layers)
        decoder.bbox_embed = self.bbox_embed
        decoder.class_embed = self.class_embed
        # The encoder heads start as copies of the freshly initialised decoder heads.
        self.transformer.enc_out_bbox_embed = copy.deepcopy(box_head)
        self.transformer.enc_out_class_embed = copy.deepcopy(class_head)

    def forward(self, images: Tensor, masks: Tensor, targets: list[dict] | None = None,
                dn_override: dict | None = None, intermediates: dict | None = None) -> DINOOutput:
        """`intermediates`, if a dict, receives stage outputs for debugging and conformance checks,
        and `decoder_inputs` (models/decoder.py DecoderInputs), the decoder's exact arguments, for
        a second decoder pass (UGS's UR)."""
        features, level_masks, pos = self.backbone(images, masks)
        srcs, level_masks, pos = self.input_proj(features, level_masks, pos, masks, self.backbone[1])
        tokens = flatten_levels(srcs, level_masks, pos, self.transformer.level_embed)
        memory = self.transformer.encoder(tokens.src, tokens.pos, tokens.spatial_shapes,
                                          tokens.spatial_shapes_list, tokens.level_start_index,
                                          tokens.valid_ratios, tokens.padding_mask)
        selected = select_queries(memory, tokens.padding_mask, tokens.spatial_shapes_list,
                                  self.transformer.enc_output, self.transformer.enc_output_norm,
                                  self.transformer.enc_out_class_embed, self.transformer.enc_out_bbox_embed,
                                  self.num_queries)
        dn = self.denoising_queries(targets, dn_override)
        content, anchors_unsig = self.decoder_queries(selected, dn, images.shape[0])
        decoder_inputs = DecoderInputs(content, anchors_unsig, memory, tokens.padding_mask,
                                       tokens.spatial_shapes, tokens.level_start_index, tokens.valid_ratios,
                                       None if dn is None else dn.attn_mask,
                                       self.decoder_memory_values(memory, tokens.padding_mask))
        hs, references = self.transformer.decoder(**decoder_inputs.kwargs())
        if intermediates is not None:
            # same layout as the official fixture's `intermediates` (hs_enc/ref_enc carry a leading 1)
            intermediates.update({
                "backbone": {"masks": level_masks[:len(features)], "pos0": pos[0]},
                "srcs": srcs, "memory": memory,
                "transformer": {"hs": hs, "references": references, "hs_enc": selected.interm_hidden[None],
                                "ref_enc": selected.interm_boxes[None],
                                "init_box_proposal": selected.init_box_proposal},
                "decoder_inputs": decoder_inputs})
        return self.predict(hs, references, selected, dn)

    def decoder_memory_values(self, memory: Tensor, padding_mask: Tensor) -> list[Tensor] | None:
        """The decoder layers' projected memory, computed before the decoder runs when a subclass
        needs to keep them (UGS's UR reuses them); None lets each layer project its own, so that
        inference never holds all of them at once."""
        return None

    def decoder_queries(self, selected: SelectedQueries, dn: DenoisingQueries | None,
                        batch_size: int) -> tuple[Tensor, Tensor]:
        """(content (B, P+Q, d), anchors_unsig (B, P+Q, 4)): the denoising queries (P of them,
        none without dn) first, then the learned content queries on the selected anchors."""
        content = self.transformer.tgt_embed.weight[None].expand(batch_size, -1, -1)
        anchors_unsig = selected.anchors_unsig
        if dn is None:
            return content, anchors_unsig
        return (torch.cat([dn.label_queries, content], 1),
                torch.cat([dn.box_queries_unsig.to(anchors_unsig.dtype), anchors_unsig], 1))

    def denoising_queries(self, targets: list[dict] | None,
                          dn_override: dict | None) -> DenoisingQueries | None:
        """Noised GT queries in training (None in eval, without targets, or with no GT box in the batch)."""
        dtype = self.label_enc.weight.dtype
        if dn_override is not None:
            meta = dn_override["dn_meta"]
            return DenoisingQueries(label_queries=dn_override["input_query_label"].to(dtype),
                                    box_queries_unsig=dn_override["input_query_bbox"].to(dtype),
                                    attn_mask=dn_override["attn_mask"].to(torch.bool),
                                    pad_size=int(meta["pad_size"]), num_groups=int(meta["num_dn_group"]))
        if not self.training or targets is None or self.dn_number <= 0:
            return None
        return prepare_denoising(targets, self.dn_number, self.dn_label_noise_ratio, self.dn_box_noise_scale,
                                 self.num_classes, self.num_queries, self.label_enc)

    def predict(self, hs: list[Tensor], references: list[Tensor], selected: SelectedQueries,
                dn: DenoisingQueries | None) -> DINOOutput:
        """Heads on every decoder layer, then split the denoising part off (dn queries come first)."""
        # keeps label_enc in the graph when no dn query is used (DDP needs every parameter used)
        hs = [hs[0] + self.label_enc.weight[0, 0] * 0.0] + list(hs[1:])
        layers = [{"pred_logits": self.class_embed[i](h), **self.box_outputs(i, h, references[i])}
                  for i, h in enumerate(hs)]
        pad = 0 if dn is None else dn.pad_size
        matching = [{k: v[:, pad:] for k, v in layer.items()} for layer in layers]
        interm_logits = self.transformer.enc_out_class_embed(selected.interm_hidden)
        out: DINOOutput = {
            **matching[-1],
            "aux_outputs": matching[:-1],
            "interm_outputs": {"pred_logits": interm_logits, **self.interm_box_outputs(selected)},
            "interm_outputs_for_matching_pre": {"pred_logits": interm_logits,
                                                "pred_boxes": selected.init_box_proposal},
            "dn_meta": None,
        }
        if dn is not None:
            dn_layers = [{k: v[:, :pad] for k, v in layer.items()} for layer in layers]
            known = {**dn_layers[-1], "aux_outputs": dn_layers[:-1]}
            out["dn_meta"] = {**dn.meta(), "output_known_lbs_bboxes": known}
        return out

    def box_outputs(self, layer: int, hidden: Tensor, reference_boxes: Tensor) -> dict[str, Tensor]:
        """The per-query box fields of decoder layer `layer`: hidden (B, T, d), reference_boxes
        (B, T, 4) cxcywh (undetached: look forward twice) -> {pred_boxes (B, T, 4) cxcywh}.
        A variant adds its own fields here (UGS: the bin logits)."""
        return {"pred_boxes": refine_boxes(self.bbox_embed[layer], hidden, reference_boxes)}

    def interm_box_outputs(self, selected: SelectedQueries) -> dict[str, Tensor]:
        """The per-query box fields of the encoder proposals: {pred_boxes (B, Q, 4) cxcywh}."""
        return {"pred_boxes": selected.interm_boxes}

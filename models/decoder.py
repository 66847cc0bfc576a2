"""Deformable decoder with look-forward-twice box refinement (docs/dino.md, "Decoder").

Each layer: self-attention -> deformable cross-attention into the encoder memory -> FFN (the
official norm *names* are norm2, norm1, norm3 in that order). After each layer the shared box
head refines the reference boxes from the un-normalised output; the next layer gets the refined
box detached, while the undetached box is returned so the prediction of layer i+1 can
back-propagate into layer i's box head.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.deformable_attention import MSDeformAttn
from models.heads import MLP, refine_boxes
from models.position_encoding import box_sine_embedding, sine_divisors
from models.self_attention import SelfAttention


@dataclass
class DecoderInputs:
    """Everything `Decoder.forward` reads in one model forward (same names as its arguments).

    `DINO.forward` builds it, calls the decoder with it and exposes it as
    `intermediates["decoder_inputs"]`, so a second decoder pass (UGS's uncertainty-guided
    refinement) repeats the first one exactly, e.g. on perturbed memory, without hooks.

    tgt (B, T, d): content queries, the P denoising queries first, then the Q learned ones;
    anchors_unsig (B, T, 4): initial reference boxes, unsigmoided cxcywh, detached;
    memory (B, S, d): encoder output (with its autograd graph), S = sum over levels of h_l * w_l;
    memory_padding_mask (B, S) bool, True on padding; spatial_shapes (L, 2) int64 as (h, w);
    level_start_index (L,) int64; valid_ratios (B, L, 2) as (w, h);
    self_attn_mask (T, T) bool (True = blocked) keeping the denoising groups apart, or None.
    memory_values: per decoder layer its cross-attention's projected memory
    (`Decoder.project_memory`), computed once by the caller so that a second pass can reuse them;
    None: each layer projects `memory` itself.
    """

    tgt: Tensor
    anchors_unsig: Tensor
    memory: Tensor
    memory_padding_mask: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor
    self_attn_mask: Tensor | None
    memory_values: list[Tensor] | None = None

    def kwargs(self) -> dict:
        """Keyword arguments of `Decoder.forward` (a shallow dict: tensors are not copied)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def without_denoising(self, num_denoising: int) -> "DecoderInputs":
        """The matching queries only: drops the first `num_denoising` (P) queries and the mask."""
        return replace(self, tgt=self.tgt[:, num_denoising:],
                       anchors_unsig=self.anchors_unsig[:, num_denoising:], self_attn_mask=None)


class DecoderLayer(nn.Module):
    """Keys: `cross_attn.*`, `norm1`, `self_attn.{in_proj_*, out_proj.*}`, `norm2`, `linear1`,
    `linear2`, `norm3`."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, n_levels: int, n_heads: int,
                 n_points: int) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = SelfAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, memory_padding_mask: Tensor,
                self_attn_mask: Tensor | None, memory_value: Tensor | None = None) -> Tensor:
        """tgt, query_pos (B, T, d); reference_points (B, T, L, 4); memory (B, S, d) (no pos added);
        memory_value: `cross_attn.project_value(memory, memory_padding_mask)`, if already computed."""
        sa = self.self_attn(tgt + query_pos, tgt, self_attn_mask)
        tgt = self.norm2(tgt + self.dropout2(sa))
        ca = self.cross_attn(tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index,
                             memory_padding_mask, memory_value)
        tgt = self.norm1(tgt + self.dropout1(ca))
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class Decoder(nn.Module):
    """Keys: `layers.{i}.*`, `norm` (one LayerNorm shared by every layer's output), `ref_point_head`
    (MLP(2d, d, d, 2)), and the aliases `bbox_embed.{i}` / `class_embed.{i}` of the model's heads
    (set by `DINO`; the class heads are only stored here, for official checkpoint compatibility)."""

    def __init__(self, layers: list[DecoderLayer], d_model: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(d_model)
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.d_model = d_model
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def compile_layers(self) -> None:
        """torch.compile every layer in place (`model.compile_decoder_layers`; parameter names
        unchanged). Dynamic shapes: the query count (denoising groups) and the memory length
        (image size) change from batch to batch."""
        import torch._functorch.config as functorch_config

        # UGS's UR pass differentiates through the decoder (retain_graph=True) before the step's
        # backward runs through it again; donated buffers would forbid that second backward.
        if hasattr(functorch_config, "donated_buffer"):  # torch >= 2.6
            functorch_config.donated_buffer = False
        for layer in self.layers:
            layer.compile(dynamic=True)

    def project_memory(self, memory: Tensor, memory_padding_mask: Tensor) -> list[Tensor]:
        """Each layer's projected memory (B, S, d), as its cross-attention would compute it."""
        return [layer.cross_attn.project_value(memory, memory_padding_mask) for layer in self.layers]

    def forward(self, tgt: Tensor, anchors_unsig: Tensor, memory: Tensor, memory_padding_mask: Tensor,
                spatial_shapes: Tensor, level_start_index: Tensor, valid_ratios: Tensor,
                self_attn_mask: Tensor | None,
                memory_values: list[Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """tgt (B, T, d) content queries; anchors_unsig (B, T, 4) unsigmoided cxcywh;
        valid_ratios (B, L, 2) (w, h); memory_values: `project_memory(memory, memory_padding_mask)`
        if the caller computed it, else None.

        Returns hs: L_dec x (B, T, d) normalised outputs, and references: (L_dec + 1) x (B, T, 4)
        cxcywh boxes (initial anchors, then each layer's undetached refined box).
        """
        if self.bbox_embed is None:
            raise RuntimeError("Decoder.bbox_embed is not set; DINO assigns its box heads to the decoder")
        output = tgt
        reference = anchors_unsig.sigmoid()
        references = [reference]
        hs = []
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        divisors = sine_divisors(self.d_model // 2, 10000.0, reference.dtype, reference.device)
        for layer_id, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * ratios.to(reference.dtype)  # (B, T, L, 4)
            query_sine = box_sine_embedding(reference_input[:, :, 0, :], self.d_model // 2, divisors=divisors)
            query_pos = self.ref_point_head(query_sine.to(output.dtype))
            output = layer(output, query_pos, reference_input, memory, spatial_shapes, level_start_index,
                           memory_padding_mask, self_attn_mask,
                           None if memory_values is None else memory_values[layer_id])
            new_reference = refine_boxes(self.bbox_embed[layer_id], output, reference)
            reference = new_reference.detach()
            references.append(new_reference)
            hs.append(self.norm(output))
        return hs, references

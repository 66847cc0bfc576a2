"""The model's output contract (the official DINO output structure), one documented place.

The model returns plain dicts (so the official criterion layout, `torch.compile` and DDP all
work); these TypedDicts document and type them. B = batch, Q = num_queries, C = num_classes,
P = dn pad_size, L = decoder layers, n+1 = UGS bins per coordinate. Boxes are cxcywh normalised
to the unpadded image; logits are raw (apply sigmoid for per-class scores; there is no background
class). UGS-DINO returns the same structure with two more fields in every Prediction and, in
training with UR on, `ur_context`: its types live with it (models/ugs_dino.py UGSPrediction,
UGSOutput).
"""
from __future__ import annotations

from typing import TypedDict

from torch import Tensor


class Prediction(TypedDict, total=False):
    """One set of predictions.

    pred_logits: (B, N, C) raw class logits.
    pred_boxes: (B, N, 4) cxcywh in [0, 1], float32 or wider even under bf16 autocast.
    """

    pred_logits: Tensor
    pred_boxes: Tensor


class DenoisingMeta(TypedDict, total=False):
    """`dn_meta` of a training forward with denoising queries.

    pad_size: P = 2 * num_dn_group * (max GT boxes per image); the first P decoder queries.
    num_dn_group: G. Group g's positives are slots [2gM, 2gM + M), negatives [2gM + M, 2(g+1)M),
    M = P // (2G); image b's j-th GT box sits at slot j of both halves (slots j >= n_b are padding).
    output_known_lbs_bboxes: Prediction of the P dn queries (last layer) plus `aux_outputs`
    (L - 1 Predictions, one per earlier decoder layer).
    """

    pad_size: int
    num_dn_group: int
    output_known_lbs_bboxes: dict


class DINOOutput(TypedDict, total=False):
    """What `DINO.forward` returns.

    pred_logits (B, Q, C), pred_boxes (B, Q, 4): last decoder layer, matching queries only.
    aux_outputs: list of L - 1 Predictions (decoder layers 0 .. L-2), same shapes.
    interm_outputs: Prediction of the encoder's top-Q selection (logits of the encoder class head,
        boxes = sigmoid(selected proposal + delta), undetached).
    interm_outputs_for_matching_pre: {pred_logits: interm logits, pred_boxes: the raw selected
        proposals (sigmoid)}; kept for compatibility, unused by the loss.
    dn_meta: None (evaluation, or a training batch without any GT box) or a DenoisingMeta.
    """

    pred_logits: Tensor
    pred_boxes: Tensor
    aux_outputs: list[Prediction]
    interm_outputs: Prediction
    interm_outputs_for_matching_pre: Prediction
    dn_meta: DenoisingMeta | None

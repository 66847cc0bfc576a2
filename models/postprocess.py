"""Post-processing of DINO outputs into per-image detections (docs/dino.md, "Post-processing").

Top-K over the flattened (query x class) sigmoid scores, so one query can yield several
detections with different labels. Boxes are scaled to the original image size and, as in the
official code, not clamped to the image; no score threshold; NMS only if asked for.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, nms

__all__ = ["PostProcess"]


class PostProcess(nn.Module):
    """Turn raw outputs into detections.

    Args:
        num_select: detections kept per image (K); at most num_queries * num_classes.
        nms_iou_threshold: class-agnostic NMS IoU threshold applied after top-K when > 0
            (official default -1: off).
        extra_keys: per-query output tensors (B, Q, ...) to gather with the same query index as
            each detection and return under the same key (e.g. UGS uncertainties); they are passed
            through unchanged (no rescaling).
    """

    def __init__(self, num_select: int = 300, nms_iou_threshold: float = -1.0,
                 extra_keys: Sequence[str] = ()) -> None:
        super().__init__()
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = num_select
        self.nms_iou_threshold = nms_iou_threshold
        self.extra_keys = tuple(extra_keys)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections per image.

        Args:
            outputs: ``pred_logits`` (B, Q, C) raw logits, ``pred_boxes`` (B, Q, 4) cxcywh
                normalised, and every key of ``extra_keys``.
            target_sizes: (B, 2) original image sizes as (h, w).

        Returns:
            B dicts: ``scores`` (K,) sorted descending, ``labels`` (K,) int64 class indices,
            ``boxes`` (K, 4) xyxy absolute pixels of the original image, ``query_index`` (K,)
            int64, and each extra key gathered to (K, ...). With NMS, K can be smaller.
        """
        logits, boxes_cxcywh = outputs["pred_logits"], outputs["pred_boxes"]
        bs, num_queries, num_classes = logits.shape
        if target_sizes.shape != (bs, 2):
            raise ValueError(f"PostProcess: target_sizes must be (B, 2) = ({bs}, 2) as (h, w), "
                             f"got {tuple(target_sizes.shape)}")
        if self.num_select > num_queries * num_classes:
            raise ValueError(f"PostProcess: num_select {self.num_select} exceeds num_queries x num_classes "
                             f"= {num_queries} x {num_classes} = {num_queries * num_classes}")
        missing = [k for k in self.extra_keys if k not in outputs]
        if missing:
            raise KeyError(f"PostProcess: extra_keys {missing} are not in the outputs ({sorted(outputs)})")

        prob = logits.sigmoid()
        scores, flat_idx = torch.topk(prob.view(bs, -1), self.num_select, dim=1)  # (B, K), query-major
        query = flat_idx // num_classes
        labels = flat_idx % num_classes
        boxes_xyxy = box_convert(boxes_cxcywh, "cxcywh", "xyxy")
        boxes_xyxy = torch.gather(boxes_xyxy, 1, query.unsqueeze(-1).expand(-1, -1, 4))  # (B, K, 4)
        img_h, img_w = target_sizes.unbind(1)
        scale = torch.stack([img_w, img_h, img_w, img_h], dim=1)  # (B, 4)
        boxes_xyxy = boxes_xyxy * scale[:, None, :]

        results = []
        for b in range(bs):
            det = {"scores": scores[b], "labels": labels[b], "boxes": boxes_xyxy[b], "query_index": query[b]}
            for key in self.extra_keys:
                det[key] = outputs[key][b, query[b]]
            if self.nms_iou_threshold > 0:
                keep = nms(det["boxes"], det["scores"], iou_threshold=self.nms_iou_threshold)
                det = {k: v[keep] for k, v in det.items()}
            results.append(det)
        return results

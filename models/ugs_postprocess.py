"""Post-processing for UGS-DINO: DINO's detections plus per-detection uncertainty (docs/ugs.md, "Uncertainty as an output").

Each detection also gets `std_xyxy_px` (K, 4), the standard deviation of each edge in pixels of the
original image (delta method through the sigmoid, ugs.box_std_pixels), and `entropy` (K,), the mean
over the 4 coordinates of the bin distributions' entropy (nats, in [0, log(n+1)]). Result files
write them as `uncertainty: {std_xyxy_px, entropy}` (docs/conventions.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from models.postprocess import PostProcess
from models.ugs_head import detection_uncertainty

_NEEDED = ("pred_box_logits", "pred_boxes")


class UGSPostProcess(PostProcess):
    """PostProcess that also returns `std_xyxy_px` and `entropy` per detection (grid (n+1,))."""

    def __init__(self, grid: Tensor, num_select: int = 300, nms_iou_threshold: float = -1.0,
                 extra_keys: Sequence[str] = ()) -> None:
        self.user_extra_keys = tuple(extra_keys)
        super().__init__(num_select, nms_iou_threshold, tuple(extra_keys) + tuple(k for k in _NEEDED
                                                                                   if k not in extra_keys))
        self.register_buffer("grid", grid.detach().clone().float(), persistent=False)

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        results = super().forward(outputs, target_sizes)
        for b, det in enumerate(results):
            std_px, entropy = detection_uncertainty(det["pred_box_logits"], det["pred_boxes"], self.grid,
                                                    target_sizes[b].to(det["pred_boxes"].dtype))
            det["std_xyxy_px"], det["entropy"] = std_px, entropy
            for key in _NEEDED:
                if key not in self.user_extra_keys:
                    del det[key]
        return results

"""Batch images of different sizes: zero-pad bottom/right and build DINO's padding mask."""
from __future__ import annotations

import functools

import torch


def collate_detection(batch: list[tuple[torch.Tensor, dict]], size_divisor: int = 1
                      ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """`[(image (3, h_i, w_i), target)] -> (images (B, 3, H, W), masks (B, H, W) bool, targets)`.

    H, W are the largest h_i, w_i, rounded up to a multiple of `size_divisor` (1 = official DINO:
    no rounding). Images are zero-padded at the bottom/right in normalised space, as in the
    official code; masks are True on padding. Targets pass through untouched (boxes stay normalised to
    each unpadded image).
    """
    if not batch:
        raise ValueError("collate_detection got an empty batch")
    images = [item[0] for item in batch]
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"collate_detection: batch item {i} image has shape {tuple(img.shape)}, "
                             "expected (3, H, W)")
    H = max(img.shape[1] for img in images)
    W = max(img.shape[2] for img in images)
    if size_divisor > 1:
        H = -(-H // size_divisor) * size_divisor
        W = -(-W // size_divisor) * size_divisor
    out = images[0].new_zeros((len(images), 3, H, W))
    masks = torch.ones((len(images), H, W), dtype=torch.bool)
    for i, img in enumerate(images):
        h, w = img.shape[1:]
        out[i, :, :h, :w].copy_(img)
        masks[i, :h, :w] = False
    return out, masks, [item[1] for item in batch]


def make_collate(size_divisor: int = 1):  # noqa: ANN201 - returns a picklable partial
    """A picklable collate function (DataLoader workers need to pickle it under spawn)."""
    if size_divisor == 1:
        return collate_detection
    return functools.partial(collate_detection, size_divisor=size_divisor)

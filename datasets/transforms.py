"""Box-aware augmentation policies built on torchvision.transforms.v2.

A sample inside the pipeline is `(image, target)`: `image` a `tv_tensors.Image` (3, H, W) (uint8
until `NormalizeImage`), `target` a dict with
  `boxes`: `tv_tensors.BoundingBoxes` XYXY absolute pixels, (n, 4) — the objects;
  `labels`: int64 (n,);
  `ignore_boxes`: `tv_tensors.BoundingBoxes` XYXY absolute, (k, 4) — crowd / ignored regions;
  `dropped`: dict[str, int] — what the transforms removed from this sample, by reason.
Geometric transforms move both box sets; anything that removes a box counts it in
`target["dropped"]` (the dataset sums these into `dataset.drop_stats`), so nothing disappears
silently. Randomness comes from torch's RNG (seeded per DataLoader worker).

Policies (`build_transforms`): "detr" is the official DINO/DETR policy (flip; then with p=0.5
multi-scale resize with max size, else resize -> random crop -> multi-scale resize); "small_object"
is for VisDrone-like data (flip; object-keeping crop; multi-scale resize that never shrinks a box
side below `min_box_px`); "none" only normalises. Eval: "detr" resizes the shorter side to
`eval_size` (max `eval_max_size`), "none" only normalises.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLICIES = ("detr", "small_object", "none")
EVAL_POLICIES = ("detr", "none")


class DropStats:
    """Counts of boxes / records removed or changed in the data path, by reason."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] += int(n)

    def update(self, counts: dict[str, int]) -> None:
        for reason, n in counts.items():
            self.add(reason, n)

    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())) or "nothing"
        return f"DropStats({body})"


def _count(target: dict, reason: str, n: int) -> None:
    if n:   # a fresh dict: never mutate the caller's counts
        dropped = target.get("dropped", {})
        target["dropped"] = {**dropped, reason: dropped.get(reason, 0) + int(n)}


def official_resize_hw(hw: tuple[int, int], size: int, max_size: int | None) -> tuple[int, int]:
    """Output (h, w) of the official DETR resize: shorter side -> `size`, longer side capped.

    If the longer side would exceed `max_size`, `size` becomes round(max_size * short / long);
    the longer side is then int(size * long / short) (truncation, as in the official code).
    """
    h, w = hw
    if max_size is not None:
        short, long = float(min(h, w)), float(max(h, w))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def resize_sample(image: torch.Tensor, target: dict, hw: tuple[int, int]) -> tuple[torch.Tensor, dict]:
    """Resize the image to `hw` = (h, w); boxes scale by (w_new / w, h_new / h)."""
    image = F.resize(image, list(hw), antialias=True)
    target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        target[key] = F.resize(target[key], list(hw))
    return image, target


def _keep_boxes(target: dict, key: str, keep: torch.Tensor, reason: str) -> dict:
    target[key] = tv_tensors.wrap(target[key][keep], like=target[key])
    if key == "boxes":
        target["labels"] = target["labels"][keep]
    _count(target, reason, int((~keep).sum()))
    return target


def crop_sample(image: torch.Tensor, target: dict, top: int, left: int, height: int,
                width: int) -> tuple[torch.Tensor, dict]:
    """Crop; boxes are shifted and clipped to the window, boxes left with zero width or height
    (outside the window) are removed and counted (`boxes_outside_crop`, `ignore_boxes_outside_crop`)."""
    image = F.crop(image, top, left, height, width)
    target = dict(target)
    for key in ("boxes", "ignore_boxes"):
        boxes = F.crop(target[key], top, left, height, width)
        data = boxes.as_subclass(torch.Tensor).clone()
        data[:, 0::2] = data[:, 0::2].clamp(0, width)       # explicit clip: version-independent
        data[:, 1::2] = data[:, 1::2].clamp(0, height)
        target[key] = tv_tensors.wrap(data, like=boxes)
        keep = (data[:, 2] > data[:, 0]) & (data[:, 3] > data[:, 1])
        reason = "boxes_outside_crop" if key == "boxes" else "ignore_boxes_outside_crop"
        target = _keep_boxes(target, key, keep, reason)
    return image, target


class RandomResize(v2.Transform):
    """Official RandomResize: shorter side drawn from `sizes`, longer side at most `max_size`."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.max_size = max_size

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        hw = official_resize_hw(tuple(image.shape[-2:]), size, self.max_size)
        return resize_sample(image, target, hw)


class RandomSizeCrop(v2.Transform):
    """Official RandomSizeCrop: crop (h, w) each uniform in [min_size, min(side, max_size)]."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = int(min_size), int(max_size)

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        H, W = image.shape[-2:]
        hi_w, hi_h = min(W, self.max_size), min(H, self.max_size)
        # An image smaller than min_size is cropped to its full side (the official code would fail).
        w = int(torch.randint(min(self.min_size, hi_w), hi_w + 1, ()))
        h = int(torch.randint(min(self.min_size, hi_h), hi_h + 1, ()))
        top = int(torch.randint(0, H - h + 1, ()))
        left = int(torch.randint(0, W - w + 1, ()))
        return crop_sample(image, target, top, left, h, w)


class ObjectAwareCrop(v2.Transform):
    """Crop a window (side fraction in `fraction`) placed to contain a random object and cut as
    few boxes as possible (best of `trials` candidates).

    Boxes the window cuts so that less than `min_visible` of their area remains become ignore
    boxes (a sliver of an object is neither a positive nor background); counted as `cut_to_ignore`.
    """

    def __init__(self, fraction: tuple[float, float] = (0.5, 0.9), min_visible: float = 0.5,
                 trials: int = 8) -> None:
        super().__init__()
        self.fraction, self.min_visible, self.trials = fraction, float(min_visible), int(trials)

    def _window(self, boxes: torch.Tensor, H: int, W: int, h: int, w: int) -> tuple[int, int]:
        best, best_cut = (0, 0), None
        for _ in range(self.trials):
            if len(boxes):
                x1, y1, x2, y2 = boxes[int(torch.randint(len(boxes), ()))].tolist()
                # tops/lefts that contain the anchor box fully (or its centre if it is too big)
                lo_t, hi_t = max(0, math.ceil(y2 - h)), min(H - h, math.floor(y1))
                lo_l, hi_l = max(0, math.ceil(x2 - w)), min(W - w, math.floor(x1))
                if lo_t > hi_t:
                    cy = (y1 + y2) / 2
                    lo_t, hi_t = max(0, math.ceil(cy - h)), min(H - h, math.floor(cy))
                if lo_l > hi_l:
                    cx = (x1 + x2) / 2
                    lo_l, hi_l = max(0, math.ceil(cx - w)), min(W - w, math.floor(cx))
                lo_t, hi_t = min(lo_t, H - h), max(min(hi_t, H - h), 0)
                lo_l, hi_l = min(lo_l, W - w), max(min(hi_l, W - w), 0)
                top = int(torch.randint(min(lo_t, hi_t), max(lo_t, hi_t) + 1, ()))
                left = int(torch.randint(min(lo_l, hi_l), max(lo_l, hi_l) + 1, ()))
            else:
                top = int(torch.randint(0, H - h + 1, ()))
                left = int(torch.randint(0, W - w + 1, ()))
            inside = ((boxes[:, 0] >= left) & (boxes[:, 1] >= top)
                      & (boxes[:, 2] <= left + w) & (boxes[:, 3] <= top + h))
            touches = ((boxes[:, 2] > left) & (boxes[:, 0] < left + w)
                       & (boxes[:, 3] > top) & (boxes[:, 1] < top + h))
            cut = int((touches & ~inside).sum())
            if best_cut is None or cut < best_cut:
                best, best_cut = (top, left), cut
        return best

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        H, W = image.shape[-2:]
        lo, hi = self.fraction
        frac = lo + (hi - lo) * float(torch.rand(()))
        h, w = max(1, round(H * frac)), max(1, round(W * frac))
        boxes = target["boxes"].as_subclass(torch.Tensor)
        top, left = self._window(boxes, H, W, h, w)
        area_before = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        # indices of boxes that survive the crop, to compare their areas before/after
        win = torch.tensor([left, top, left, top], dtype=boxes.dtype)
        clipped = boxes - win
        clipped[:, 0::2] = clipped[:, 0::2].clamp(0, w)
        clipped[:, 1::2] = clipped[:, 1::2].clamp(0, h)
        survives = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        visible = ((clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
                   / area_before.clamp(min=1e-12))[survives]
        image, target = crop_sample(image, target, top, left, h, w)
        to_ignore = visible < self.min_visible
        if to_ignore.any():
            moved = target["boxes"].as_subclass(torch.Tensor)[to_ignore]
            ign = target["ignore_boxes"].as_subclass(torch.Tensor)
            target["ignore_boxes"] = tv_tensors.wrap(torch.cat([ign, moved]), like=target["ignore_boxes"])
            target = _keep_boxes(target, "boxes", ~to_ignore, "cut_to_ignore")
        return image, target


class MinPixelResize(v2.Transform):
    """Multi-scale resize (official size rule) that never shrinks a box side below `min_box_px`.

    If the drawn scale would make the smallest box narrower or shorter than `min_box_px`, the
    scale is raised to keep it at `min_box_px`, but never above 1 (no upsampling just to satisfy
    the guard; boxes already below `min_box_px` are simply not shrunk). The guard wins over
    `max_size`. `min_box_px = 0` disables it.
    """

    def __init__(self, sizes: Sequence[int], max_size: int | None, min_box_px: float = 1.0) -> None:
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.max_size, self.min_box_px = max_size, float(min_box_px)

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        H, W = image.shape[-2:]
        size = self.sizes[int(torch.randint(len(self.sizes), ()))]
        h, w = official_resize_hw((H, W), size, self.max_size)
        boxes = target["boxes"].as_subclass(torch.Tensor)
        if self.min_box_px > 0 and len(boxes):
            bw, bh = (boxes[:, 2] - boxes[:, 0]), (boxes[:, 3] - boxes[:, 1])
            need = self.min_box_px / float(torch.minimum(bw, bh).clamp(min=1e-12).min())
            floor = min(1.0, need)
            if h / H < floor or w / W < floor:
                h, w = max(h, math.ceil(H * floor - 1e-9)), max(w, math.ceil(W * floor - 1e-9))
        return resize_sample(image, target, (h, w))


class SanitizeBoxes(v2.Transform):
    """Remove boxes whose width or height is <= `min_size` px (counted as `degenerate_boxes`).

    `min_size = 0` reproduces the official rule (keep boxes with positive width and height).
    """

    def __init__(self, min_size: float = 0.0) -> None:
        super().__init__()
        self.min_size = float(min_size)

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        target = dict(target)
        for key, reason in (("boxes", "degenerate_boxes"), ("ignore_boxes", "degenerate_ignore_boxes")):
            b = target[key].as_subclass(torch.Tensor)
            wh = b[:, 2:] - b[:, :2]
            if self.min_size > 0:
                keep = (wh >= self.min_size).all(dim=1)
            else:
                keep = (wh > 0).all(dim=1)
            target = _keep_boxes(target, key, keep, reason)
        return image, target


class NormalizeImage(v2.Transform):
    """uint8 (or float in [0, 1]) image -> float32 ImageNet-normalised."""

    def __init__(self) -> None:
        super().__init__()
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def forward(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return self.normalize(self.to_float(image)), target


def detr_train_transforms(scales: Sequence[int], max_size: int, crop_resize_scales: Sequence[int],
                          crop_min_size: int, crop_max_size: int) -> list[v2.Transform]:
    """The official DINO/DETR training policy (coco_transformer.py)."""
    return [
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            RandomResize(scales, max_size=max_size),
            v2.Compose([RandomResize(crop_resize_scales),
                        RandomSizeCrop(crop_min_size, crop_max_size),
                        RandomResize(scales, max_size=max_size)]),
        ]),
        SanitizeBoxes(0.0),
    ]


def small_object_train_transforms(scales: Sequence[int], max_size: int, crop_prob: float,
                                  crop_fraction: tuple[float, float], min_visible: float,
                                  min_box_px: float) -> list[v2.Transform]:
    """Small-object policy: flip, object-keeping crop, resize that keeps boxes >= min_box_px."""
    return [
        v2.RandomHorizontalFlip(0.5),
        v2.RandomApply([ObjectAwareCrop(crop_fraction, min_visible)], p=crop_prob),
        SanitizeBoxes(min_box_px),     # crop slivers narrower than min_box_px (counted)
        MinPixelResize(scales, max_size, min_box_px),
        SanitizeBoxes(0.0),
    ]


def build_transforms(policy: str, train: bool, *,
                     scales: Sequence[int] = tuple(range(480, 801, 32)), max_size: int = 1333,
                     crop_resize_scales: Sequence[int] = (400, 500, 600), crop_min_size: int = 384,
                     crop_max_size: int = 600, eval_size: int = 800, eval_max_size: int = 1333,
                     small_object_scales: Sequence[int] = tuple(range(640, 1025, 32)),
                     small_object_max_size: int = 1600, crop_prob: float = 0.5,
                     crop_fraction: tuple[float, float] = (0.5, 0.9), min_visible: float = 0.5,
                     min_box_px: float = 1.0) -> v2.Compose:
    """The transform pipeline for `policy` (train) or eval policy (`train=False`); defaults are the
    official DINO values. Returns a callable `(image uint8 (3, H, W), target) -> (image float
    normalised, target)` with boxes still XYXY absolute in the output image."""
    if train:
        if policy not in POLICIES:
            raise ValueError(f"unknown train augmentation policy {policy!r}; expected one of {POLICIES}")
        if policy == "detr":
            steps = detr_train_transforms(scales, max_size, crop_resize_scales, crop_min_size, crop_max_size)
        elif policy == "small_object":
            steps = small_object_train_transforms(small_object_scales, small_object_max_size, crop_prob,
                                                  crop_fraction, min_visible, min_box_px)
        else:
            steps = [SanitizeBoxes(0.0)]
    else:
        if policy not in EVAL_POLICIES:
            raise ValueError(f"unknown eval policy {policy!r}; expected one of {EVAL_POLICIES}")
        steps = [RandomResize([eval_size], max_size=eval_max_size)] if policy == "detr" else []
        steps.append(SanitizeBoxes(0.0))
    return v2.Compose(steps + [NormalizeImage()])

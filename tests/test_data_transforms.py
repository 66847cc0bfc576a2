"""Box coordinates through every augmentation step, against hand-computed cases."""
from __future__ import annotations

import functools

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from datasets.transforms import (
    MinPixelResize,
    ObjectAwareCrop,
    RandomResize,
    RandomSizeCrop,
    SanitizeBoxes,
    build_transforms,
    crop_sample,
    official_resize_hw,
    resize_sample,
)


@functools.lru_cache(maxsize=8)
def coord_image(h: int, w: int) -> tv_tensors.Image:
    """Channel 0 = x, channel 1 = y (mod 256): a crop's offset can be read back from its pixels.
    (Cached; the transforms never modify their input in place.)"""
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.int32), torch.arange(w, dtype=torch.int32),
                            indexing="ij")
    return tv_tensors.Image(torch.stack([xx % 256, yy % 256, (xx // 256) * 16 + yy // 256]).to(torch.uint8))


def sample(boxes, hw, labels=None, ignore=None):  # noqa: ANN001, ANN201
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    ignore = torch.tensor(ignore if ignore is not None else [], dtype=torch.float32).reshape(-1, 4)
    labels = torch.tensor(labels if labels is not None else list(range(len(boxes))), dtype=torch.int64)
    return {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=hw), "labels": labels,
            "ignore_boxes": tv_tensors.BoundingBoxes(ignore, format="XYXY", canvas_size=hw), "dropped": {}}


def t64(values) -> torch.Tensor:  # noqa: ANN001
    return torch.tensor(values, dtype=torch.float64)


def plain(boxes) -> torch.Tensor:  # noqa: ANN001
    return boxes.as_subclass(torch.Tensor).to(torch.float64)


@pytest.mark.parametrize("hw,size,max_size,expected", [
    ((480, 640), 800, 1333, (800, 1066)),     # 800 * 640 / 480 = 1066.67 -> truncated
    ((100, 200), 800, 1333, (666, 1332)),     # capped: round(1333 * 100 / 200) = round(666.5) = 666
    ((1500, 2000), 512, 1333, (512, 682)),
    ((640, 480), 800, None, (1066, 800)),     # portrait
    ((800, 1000), 800, 1333, (800, 1000)),    # already the right size
])
def test_official_resize_rule(hw, size, max_size, expected):  # noqa: ANN001
    assert official_resize_hw(hw, size, max_size) == expected


def test_horizontal_flip_boxes_and_pixels():
    img = coord_image(100, 200)
    tgt = sample([[10, 20, 50, 60]], (100, 200), ignore=[[0, 0, 30, 10]])
    out_img, out = v2.RandomHorizontalFlip(p=1.0)(img, tgt)
    assert torch.equal(plain(out["boxes"]), t64([[150.0, 20, 190, 60]]))
    assert torch.equal(plain(out["ignore_boxes"]), t64([[170.0, 0, 200, 10]]))
    assert int(out_img[0, 0, 0]) == 199 % 256 and torch.equal(out["labels"], tgt["labels"])


def test_resize_scales_boxes_per_axis():
    img = coord_image(100, 200)
    tgt = sample([[10, 20, 50, 60]], (100, 200), ignore=[[0, 0, 200, 100]])
    out_img, out = resize_sample(img, tgt, (50, 80))
    assert tuple(out_img.shape[-2:]) == (50, 80)
    # x scales by 80/200 = 0.4, y by 50/100 = 0.5
    torch.testing.assert_close(plain(out["boxes"]), t64([[4.0, 10, 20, 30]]))
    torch.testing.assert_close(plain(out["ignore_boxes"]), t64([[0.0, 0, 80, 50]]))


def test_random_resize_single_size_is_official_rule():
    tgt = sample([[10, 20, 50, 60]], (100, 200))
    out_img, out = RandomResize([800], max_size=1333)(coord_image(100, 200), tgt)
    assert tuple(out_img.shape[-2:]) == (666, 1332)
    torch.testing.assert_close(plain(out["boxes"]), t64([[66.6, 133.2, 333.0, 399.6]]),
                               rtol=0, atol=1e-4)


def test_crop_clips_and_counts_boxes_outside():
    img = coord_image(100, 200)
    tgt = sample([[10, 10, 50, 50], [0, 0, 5, 5], [80, 70, 120, 130], [30, 20, 30, 40]], (100, 200),
                 labels=[1, 2, 3, 4], ignore=[[0, 0, 10, 10], [40, 30, 70, 60]])
    out_img, out = crop_sample(img, tgt, top=20, left=30, height=60, width=60)
    assert tuple(out_img.shape[-2:]) == (60, 60)
    assert int(out_img[0, 0, 0]) == 30 and int(out_img[1, 0, 0]) == 20    # x, y of the window
    # [10,10,50,50] -> [0,0,20,30]; [80,70,120,130] -> [50,50,60,60]; [0,0,5,5] outside;
    # [30,20,30,40] has zero width -> removed as well
    assert torch.equal(plain(out["boxes"]), t64([[0.0, 0, 20, 30], [50, 50, 60, 60]]))
    assert out["labels"].tolist() == [1, 3]
    assert torch.equal(plain(out["ignore_boxes"]), t64([[10.0, 10, 40, 40]]))
    assert out["dropped"] == {"boxes_outside_crop": 2, "ignore_boxes_outside_crop": 1}


def test_random_size_crop_matches_its_window():
    torch.manual_seed(0)
    boxes = [[5, 5, 90, 60], [100, 150, 180, 260], [0, 0, 300, 300], [250, 10, 299, 40]]
    for _ in range(20):
        img, out = RandomSizeCrop(80, 150)(coord_image(300, 300), sample(boxes, (300, 300)))
        h, w = img.shape[-2:]
        assert 80 <= h <= 150 and 80 <= w <= 150
        left, top = int(img[0, 0, 0]), int(img[1, 0, 0])
        ref = t64(boxes) - t64([left, top, left, top])
        ref[:, 0::2] = ref[:, 0::2].clamp(0, w)
        ref[:, 1::2] = ref[:, 1::2].clamp(0, h)
        keep = (ref[:, 2] > ref[:, 0]) & (ref[:, 3] > ref[:, 1])
        assert torch.equal(plain(out["boxes"]), ref[keep])
        assert out["labels"].tolist() == torch.arange(4)[keep].tolist()
        assert out["dropped"].get("boxes_outside_crop", 0) == int((~keep).sum())


def test_sanitize_drops_degenerate_and_counts():
    tgt = sample([[1, 1, 1, 5], [0, 0, 3, 3], [2, 2, 2.5, 9]], (10, 10), labels=[7, 8, 9],
                 ignore=[[4, 4, 4, 8]])
    _, out = SanitizeBoxes(0.0)(coord_image(10, 10), tgt)
    assert out["labels"].tolist() == [8, 9] and len(out["ignore_boxes"]) == 0
    assert out["dropped"] == {"degenerate_boxes": 1, "degenerate_ignore_boxes": 1}
    _, out = SanitizeBoxes(1.0)(coord_image(10, 10), tgt)      # 0.5 px wide box is below 1 px
    assert out["labels"].tolist() == [8] and out["dropped"]["degenerate_boxes"] == 2


def test_eval_transform_resizes_and_normalises():
    img = tv_tensors.Image(torch.full((3, 480, 640), 255, dtype=torch.uint8))
    out_img, out = build_transforms("detr", train=False)(img, sample([[64, 48, 128, 96]], (480, 640)))
    assert tuple(out_img.shape) == (3, 800, 1066) and out_img.dtype == torch.float32
    torch.testing.assert_close(out_img[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                               (1 - 0.406) / 0.225]), rtol=0, atol=1e-5)
    sx, sy = 1066 / 640, 800 / 480
    ref = t64([[64 * sx, 48 * sy, 128 * sx, 96 * sy]])
    torch.testing.assert_close(plain(out["boxes"]), ref, rtol=0, atol=1e-4)


def test_detr_policy_outputs_follow_the_official_rules():
    torch.manual_seed(1)
    t = build_transforms("detr", train=True, scales=[64, 96], max_size=150, crop_resize_scales=[80],
                         crop_min_size=40, crop_max_size=60)
    boxes = [[5, 5, 20, 30], [50, 40, 90, 70], [0, 0, 120, 90], [100, 10, 119, 20]]
    for _ in range(30):
        img, out = t(coord_image(90, 120), sample(boxes, (90, 120)))
        h, w = img.shape[-2:]
        assert min(h, w) in (64, 96) or max(h, w) <= 150
        b = plain(out["boxes"])
        assert len(b) == len(out["labels"])
        assert len(b) + sum(out["dropped"].values()) == len(boxes)     # every removal counted
        assert (b[:, 2:] > b[:, :2]).all() and (b >= 0).all()
        assert (b[:, 0::2] <= w + 1e-4).all() and (b[:, 1::2] <= h + 1e-4).all()


def test_min_pixel_resize_hand_case():
    # scale drawn: shorter side 300 -> 100 is 1/3, which would make the 2 px box 0.67 px wide;
    # the guard raises the scale to 1/2: (300, 400) -> (150, 200), the box becomes exactly 1 px.
    resize = MinPixelResize([100], None, min_box_px=1.0)
    img, out = resize(coord_image(300, 400), sample([[10, 10, 12, 40]], (300, 400)))
    assert tuple(img.shape[-2:]) == (150, 200)
    torch.testing.assert_close(plain(out["boxes"]), t64([[5.0, 5, 6, 20]]))
    # a box already below 1 px: the image is not shrunk at all
    img, _ = resize(coord_image(300, 400), sample([[10, 10, 10.5, 40]], (300, 400)))
    assert tuple(img.shape[-2:]) == (300, 400)


def test_small_object_policy_never_makes_boxes_below_one_pixel():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(3)
    t = build_transforms("small_object", train=True, small_object_scales=[60, 90], small_object_max_size=200,
                         crop_prob=0.5, crop_fraction=(0.4, 0.8), min_box_px=1.0)
    for _ in range(25):
        xy = torch.rand(30, 2, generator=g) * torch.tensor([390.0, 290.0])
        wh = 1 + torch.rand(30, 2, generator=g) * 8                       # 1..9 px
        boxes = torch.cat([xy, (xy + wh).clamp(max=torch.tensor([400.0, 300.0]))], 1)
        boxes = boxes[(boxes[:, 2:] - boxes[:, :2] >= 1).all(1)]
        img, out = t(coord_image(300, 400), sample(boxes.tolist(), (300, 400)))
        b = plain(out["boxes"])
        assert (b[:, 2:] - b[:, :2] >= 1 - 1e-4).all(), (b[:, 2:] - b[:, :2]).min()
        assert len(b) + sum(out["dropped"].values()) == len(boxes)


def test_object_aware_crop_keeps_the_only_object_whole():
    torch.manual_seed(4)
    for _ in range(10):
        crop = ObjectAwareCrop(fraction=(0.5, 0.5))
        img, out = crop(coord_image(200, 200), sample([[120, 30, 150, 70]], (200, 200)))
        assert tuple(img.shape[-2:]) == (100, 100)
        left, top = int(img[0, 0, 0]), int(img[1, 0, 0])
        ref = t64([[120.0 - left, 30 - top, 150 - left, 70 - top]])
        assert torch.equal(plain(out["boxes"]), ref)


def test_object_aware_crop_moves_slivers_to_ignore():
    torch.manual_seed(5)
    seen_cut = 0
    boxes = [[10, 10, 30, 30], [60, 60, 100, 100], [0, 80, 40, 120], [150, 150, 199, 199]]
    for _ in range(30):
        _, out = ObjectAwareCrop(fraction=(0.4, 0.4), min_visible=0.5, trials=1)(coord_image(200, 200),
                                                                                sample(boxes, (200, 200)))
        n_ignore = out["dropped"].get("cut_to_ignore", 0)
        seen_cut += n_ignore
        assert len(out["ignore_boxes"]) == n_ignore
        assert len(out["boxes"]) + sum(out["dropped"].values()) == len(boxes)
    assert seen_cut > 0


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="unknown train augmentation policy 'fancy'"):
        build_transforms("fancy", train=True)
    with pytest.raises(ValueError, match="unknown eval policy"):
        build_transforms("small_object", train=False)

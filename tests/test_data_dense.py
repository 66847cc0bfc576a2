"""The dense small-object data config: clutter is unannotated and leaves the objects unchanged;
the scenes hold many 3-16 px objects and a few medium/large ones."""
from __future__ import annotations

import numpy as np
import pytest

from configs import ConfigError, load_config
from datasets.synthetic import generate_synthetic, size_bucket_counts


def _generate(clutter: int, n: int = 12):
    d = load_config("dense_small_synthetic").data
    return generate_synthetic(n, tuple(d.synthetic_image_size), d.synthetic_min_objects, d.synthetic_max_objects,
                              seed=0, max_ignored_regions=d.synthetic_max_ignored_regions,
                              small_side=tuple(d.synthetic_small_side_px), clutter=clutter)


def test_dense_config_scenes_are_dense_and_small():
    cfg = load_config("dense_small_synthetic")
    assert cfg.data.synthetic_clutter > 0 and cfg.ugs.ablation == "full" and cfg.optim.lr_box_head_last_mult == 1.0
    # the sweeps' schedule, whatever the demo it derives from uses: 5 epochs of 80 steps, evaluated after each
    assert (cfg.optim.epochs, cfg.optim.lr_drop, cfg.eval.interval, cfg.data.synthetic_train_images) == (5, 4, 1, 320)
    coco, _, _ = _generate(cfg.data.synthetic_clutter)
    objects = [a for a in coco["annotations"] if not a["iscrowd"]]
    assert len(objects) / 12 >= 25  # many objects per scene
    counts = size_bucket_counts(coco)
    assert counts["small"] >= 0.9 * len(objects) and counts["medium"] + counts["large"] >= 3
    small_sides = [max(a["bbox"][2:]) for a in objects if a["area"] < 32 ** 2]
    assert min(small_sides) >= 3 and np.percentile(small_sides, 90) <= 17


def test_clutter_is_unannotated_and_leaves_the_objects_unchanged():
    plain, plain_images, _ = _generate(0, n=3)
    busy, busy_images, _ = _generate(24, n=3)
    assert plain["annotations"] == busy["annotations"]
    changed = [(plain_images[i] != busy_images[i]).any(0).float().mean().item() for i in plain_images]
    assert all(0.003 < c < 0.3 for c in changed), changed
    with pytest.raises(ConfigError, match="synthetic_clutter"):
        load_config("dense_small_synthetic", ["data.synthetic_clutter=-1"])

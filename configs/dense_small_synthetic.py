"""Dense small objects on the embedded synthetic data, closer to VisDrone than the demo: 30-90
objects per 128 x 128 scene, small ones 3-16 px on a side (median 7), a few medium and large ones
(the generator's 5% / 0.7% shares), up to 3 ignored crowd regions and up to 24 unannotated
distractors (strokes and specks) per scene. The model and optimiser are the demo's
(`demo_synthetic`) with the paper's settings: UGS full (lambda_1 = lambda_2 = rho = 0.5, alpha = 1)
and the box head's last layer at the shared learning rate (multiplier 1). The sweeps in
configs/sweeps/ start from it and switch the variants with one override each.
"""
from __future__ import annotations

from configs.demo_synthetic import config as demo_config
from configs.schema import Config
from configs.ugs import apply_ablation_row


def config() -> Config:
    cfg = demo_config()
    cfg.name = "dense_small_synthetic"
    apply_ablation_row(cfg.ugs, "full")
    d = cfg.data
    d.synthetic_image_size = (128, 128)
    d.synthetic_min_objects = 30
    d.synthetic_max_objects = 90
    d.synthetic_small_side_px = (3.0, 7.0, 16.0)
    d.synthetic_max_ignored_regions = 3
    d.synthetic_clutter = 24
    d.synthetic_train_images = 320  # 80 steps per epoch at batch 4
    d.synthetic_val_images = 64
    m = cfg.model
    # denoising groups = 2 * dn_number // (2 * max objects in the batch), at least 1: 100 keeps one
    # group at 90 objects
    m.dn_number = 100
    cfg.eval.max_dets = 300  # up to 90 objects per scene: a cap of 100 would truncate recall
    cfg.eval.num_select = 300
    cfg.eval.interval = 1  # after every epoch: the sweeps' AP-vs-step curves (the demo evaluates every second)
    o = cfg.optim
    o.lr_box_head_last_mult = 1.0  # the paper's setting; the sweeps add x10 as a separate variant
    o.epochs = 5
    o.lr_drop = 4
    r = cfg.runtime
    r.max_steps = 0  # the epochs set the schedule (the sweeps set runtime.max_steps)
    r.max_train_minutes = 0.0
    r.output_dir = "outputs/dense_small"
    return cfg

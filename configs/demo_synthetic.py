"""The CPU demo (`accelerate launch main.py` with no arguments): a small UGS-DINO trained from
scratch on the embedded synthetic dataset, then evaluated, on a fixed schedule of 1200 steps
taking about 5 minutes on a quiet 2-core CPU (docs/demo.md has the measured figures).

A diff of `dino_tiny`: 112 x 112 scenes with 5-25 objects and no resize augmentation (a step's
cost is set by the image size), timm's ResNet-10-T, d=128, 4 feature levels from stride 8, 2
encoder and 3 decoder layers, 100 queries, UGS on (CE on the IN grid + UM; UR's second decoder pass
is left off to keep the step cheap), everything at lr 8e-4 because it starts from random weights.
"""
from __future__ import annotations

from configs.dino_tiny import config as base_config
from configs.schema import Config
from configs.ugs import apply_ablation_row


def config() -> Config:
    cfg = base_config()
    cfg.name = "demo_synthetic"
    m = cfg.model
    # ResNet-10-T learns faster per step from random weights than ResNet-18 and is cheaper
    # (docs/ugs.md, "Learning speed from scratch"); timm's BN trains, unlike the official frozen
    # BN, which is the identity on random weights.
    m.backbone = "timm:resnet10t"
    m.return_interm_indices = [2, 3, 4]  # timm feature indices: layer2..layer4, strides 8, 16, 32
    m.num_feature_levels = 4  # + the extra stride-64 level; a stride-4 level costs 1.45x per step
    m.hidden_dim = 128  # learns faster per step than d=64 at ~1.1x its step time
    m.nheads = 4
    m.dim_feedforward = 256
    # 2 encoder + 3 decoder layers: 1 + 2 is cheaper and learns as fast up to the lr drop, but
    # gains less after it (AP50 0.446 against 0.482 at the end; docs/demo.md)
    m.enc_layers = 2
    m.dec_layers = 3
    m.num_queries = 100
    # 2 denoising groups at 25 objects (models/denoising.py): 100 costs 1.16x per step for about
    # the same learning per step
    m.dn_number = 50

    apply_ablation_row(cfg.ugs, "ce_in_um")  # UGS enabled: two-hot CE on the IN grid + uncertainty minimisation

    d = cfg.data
    # objects keep their 4-31 px, so smaller scenes are denser and harder (docs/demo.md)
    d.synthetic_image_size = (112, 112)
    d.synthetic_min_objects = 5
    d.synthetic_max_objects = 25
    # 120 steps per epoch at batch 4, so the lr drop can sit at step 1080 (10 epochs = 1200 steps);
    # half as many scenes also halves the rendering at start-up
    d.synthetic_train_images = 480
    d.synthetic_val_images = 64
    d.train_policy = "none"
    d.eval_policy = "none"
    d.num_workers = 0  # in-memory images; worker processes only cost on 2 cores
    d.pin_memory = False

    o = cfg.optim
    o.batch_size = 4
    o.lr = 8e-4  # from scratch at this budget: faster than 4e-4 and 2e-4, 1.2e-3 no better
    o.lr_backbone = 8e-4  # random-init backbone: the official 1e-5 is for ImageNet weights
    # The bin head's last layer at 10x the lr: with Adam, the expectation of a softmax over 17
    # bins moves far more slowly per step than L1's 4 outputs (docs/ugs.md).
    o.lr_box_head_last_mult = 10.0
    o.epochs = 10
    # lr x0.1 for the last 120 steps: AP50 0.523 at the end against 0.482 with the drop at step 960
    # (docs/demo.md)
    o.lr_drop = 9

    e = cfg.eval
    e.max_dets = 100
    e.num_select = 100
    e.interval = 2  # after every second epoch (every 240 steps): the AP history plot

    r = cfg.runtime
    r.output_dir = "outputs/demo"
    r.max_steps = 1200  # = 10 epochs; also the progress bar's total
    # No wall-clock cap: the result must not depend on the machine's speed.
    # `--opt runtime.max_train_minutes=M` stops training early (then evaluates and saves).
    r.max_train_minutes = 0.0
    # torch's default threads (2 on the demo machine, 1.34x faster than 1 when it is quiet); on a
    # machine shared with other jobs `runtime.num_threads=1` can be several times faster.
    r.num_threads = 0
    r.channels_last = True  # NHWC convolution weights: oneDNN's CPU convolutions run faster on them
    r.log_interval = 10
    r.checkpoint_interval = 0
    return cfg

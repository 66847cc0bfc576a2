"""The CPU demo (`accelerate launch main.py` with no arguments): a small UGS-DINO trained from
scratch on the embedded synthetic dataset, then evaluated, in at most 10 minutes on 2 CPU cores.

A diff of `dino_tiny`: 128 x 128 scenes with 5-25 objects and no resize augmentation (the cost
of a step is set by image size), timm's ResNet-10-T, d=128, 4 feature levels from stride 8, 100
queries, UGS on (CE on the IN grid + UM; UR's second decoder pass is left off to keep the step
cheap), the backbone at the full lr because it starts from random weights, and a step budget
(`runtime.max_steps`) instead of a COCO schedule. Measurements behind each choice are in the comments below.
"""
from __future__ import annotations

from configs.dino_tiny import config as base_config
from configs.schema import Config
from configs.ugs import apply_ablation_row


def config() -> Config:
    cfg = base_config()
    cfg.name = "demo_synthetic"
    m = cfg.model
    # Backbone: timm's ResNet-10-T (features_only): one block per stage and a three-conv stem. From
    # random weights it learns faster per step than ResNet-18 and is cheaper (fwd+bwd at 4 x 128 x
    # 128: 72 vs 118 ms). Same recipe otherwise, 1 thread, two runs at a time (2026-11-26, session
    # 4): AP50 0.471 @1020 / 0.572 @1360 / 0.654 @1700 steps (lr drop at 1360) with ResNet-10-T
    # against 0.384 @870 / 0.460 @1160 / 0.545 @1450 (drop at 1160) with ResNet-18, whose steps
    # are also 1.16x slower. timm's BN trains everywhere, unlike the official frozen BN, which is
    # the identity on random weights (earlier: lr 4e-4, AP50 0.015 @200 steps vs 0.004 @256 for
    # torchvision's ResNet-18 with frozen BN at 2e-4).
    m.backbone = "timm:resnet10t"
    m.return_interm_indices = [2, 3, 4]  # timm feature indices: layer2..layer4, strides 8, 16, 32
    m.num_queries = 100
    # d=128 (dino_tiny: 64), 4 heads, FFN 256: ~1.1x the step time of d=64 and faster learning
    # (300 steps, 1 thread: AP50 0.052 @256 / 0.091 @300 vs 0.040 / 0.067); d=128 with 8 heads and
    # FFN 512 learned a little faster still (0.069 / 0.107) at 1.5x the step time (1 thread; 1.1x
    # with 2 threads), but as a whole demo (750 steps at 1.80 steps/s, lr drop at 512, 7 min 10 s)
    # it reached only AP50 0.271.
    m.hidden_dim = 128
    m.nheads = 4
    m.dim_feedforward = 256
    # (+ the extra stride-64 level). A stride-4 level (timm [1, 2, 3, 4]) cost 1.45x per step and
    # was not better at 200 steps (AP50 0.004), so it is left out.
    m.num_feature_levels = 4
    m.dec_layers = 3
    # Denoising groups (official rule, models/denoising.py): G = 2 * dn_number // (2 * max objects in
    # the batch) when 2 * dn_number >= 100, so 50 gives 2 groups at 25 objects (100: 4 groups).
    # dn_number 50 instead of 100: 1.16x faster steps at about the same AP50 per step (1100 steps,
    # ResNet-18: 0.438 vs 0.448), i.e. more steps in the same time.
    m.dn_number = 50

    apply_ablation_row(cfg.ugs, "ce_in_um")  # UGS enabled: two-hot CE on the IN grid + uncertainty minimisation

    d = cfg.data
    d.synthetic_image_size = (128, 128)
    d.synthetic_min_objects = 5
    d.synthetic_max_objects = 25
    d.synthetic_train_images = 1160  # 290 steps per epoch at batch 4: 5 epochs = 1450 steps
    d.synthetic_val_images = 64
    d.train_policy = "none"
    d.eval_policy = "none"
    d.num_workers = 0  # in-memory images; worker processes only cost on 2 cores
    d.pin_memory = False

    o = cfg.optim
    o.batch_size = 4
    # From scratch at this budget a higher lr learns faster: AP50 @256 steps 0.022 at 4e-4 vs 0.040
    # at 8e-4 (0.067 @300 steps at 8e-4, which 4e-4 reached only at 512); 2e-4 was slower still.
    o.lr = 8e-4
    o.lr_backbone = 8e-4  # random-init backbone: the official 1e-5 is for ImageNet weights
    # The bin head's last layer at 10x the lr (docs/ugs.md, "Learning speed from scratch"): with
    # Adam, the expectation of a softmax over 17 bins moves far more slowly per step than L1's 4
    # outputs. 1000-step demo, 1 thread: AP50 0.105 / 0.211 / 0.323 / 0.401 at 256 / 512 / 768 /
    # 1000 steps (x30: 0.128 / 0.226 / 0.332 / 0.385; x1, 2 threads: 0.068 / 0.202 / 0.301 / 0.364).
    # With ResNet-18 at x10 (session 3), neither lr 1.2e-3 (0.406 @1000), EMA of weights (decay
    # 0.995: 0.158 @512, it lags), 200 denoising queries (0.118 @256 at 1.3x the step time), a
    # stride-4 level (2.1x the step time) nor the class heads at x10 too (0.441 @1100 vs 0.448)
    # helped within the time budget.
    o.lr_box_head_last_mult = 10.0
    o.epochs = 5
    # lr x0.1 for the last epoch (from step 1160): the drop is worth ~+0.07 AP50 in its epoch
    # (0.526 @1160 -> 0.598 @1450 in the run below)
    o.lr_drop = 4

    e = cfg.eval
    e.max_dets = 100
    e.num_select = 100
    e.interval = 1

    r = cfg.runtime
    r.output_dir = "outputs/demo"
    # This config, `python main.py` alone on the idle 2-core machine (2026-11-26, session 4): 1450
    # steps in 485 s (2.99 steps/s), 8 min 19 s wall in all, peak RSS 1.3 GB; AP50 0.170 @290,
    # 0.279 @580, 0.426 @870, 0.526 @1160, 0.598 @1450 (AP 0.421, APs 0.415, AR 0.625); the same
    # numbers from `bash tools/run_demo.sh` on a fresh clone (deterministic on this machine).
    # Session 3 (ResNet-18, dn_number 100, 1100 steps, 2.38 steps/s, 7 min 57 s): 0.448. Session 2
    # (no box-head lr multiplier, 1000 steps): 0.364. Earlier from-scratch comparisons are tabled in
    # docs/ugs.md, "Learning speed from scratch".
    r.max_steps = 1450  # = 5 epochs
    # The shared machine's speed varies (2.3-3.0 steps/s measured, nothing else of ours running), so
    # a wall-clock cap keeps the demo under 10 minutes: training (with the per-epoch evaluations)
    # stops after 8.5 minutes at the latest, then evaluates and saves (logged as a warning). At 3
    # steps/s all 1450 steps fit; at 2.4 steps/s the cap stops at ~1220 steps, 60 into the
    # low-lr epoch (measured: fresh clone, `bash tools/run_demo.sh`, 2.42 steps/s, stopped at step
    # 1245, AP50 0.562, 9 min 5 s wall including the pip check). A 1250-step schedule (drop at 1000) reached AP50 0.540: less margin on AP for
    # little gain in time.
    r.max_train_minutes = 8.5
    # torch's default threads (2 here): 2.39 steps/s vs 1.78 with 1 thread on an idle machine
    # (session 3, ResNet-18, fused AdamW). On a machine shared with other jobs,
    # `runtime.num_threads=1` can be faster.
    r.num_threads = 0
    r.log_interval = 10
    r.checkpoint_interval = 0
    return cfg

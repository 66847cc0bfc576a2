"""Optimisation, evaluation and runtime sections of the config.

Defaults reproduce official DINO-5scale training (docs/dino.md, "Configuration"): AdamW at 1e-4,
backbone at 1e-5, weight decay 1e-4, 12 epochs with a step drop after epoch 11, gradient clipping
at max-norm 0.1. Mixed precision, gradient accumulation and the number of processes are not here:
they come from accelerate (`accelerate config` or `configs/accelerate/*.yaml`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from configs.errors import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-4
    lr_backbone: float = 1e-5
    # A parameter belongs to the backbone group when its name contains one of these substrings.
    # Official "default" grouping tests the word "backbone"; "ddetr_in_mmdet" uses "backbone.0".
    lr_backbone_names: list[str] = field(default_factory=lambda: ["backbone.0"])
    lr_linear_proj_names: list[str] = field(
        default_factory=lambda: ["reference_points", "sampling_offsets"])
    lr_linear_proj_mult: float = 0.1
    # "default": official grouping -- lr_linear_proj_mult is NOT applied (official behaviour).
    # "ddetr_in_mmdet": the deformable-attention offset/reference layers get lr * lr_linear_proj_mult.
    param_dict_type: Literal["default", "ddetr_in_mmdet"] = "default"
    # lr multiplier for the last linear layer of every box head (4 box deltas, or UGS's 4(n+1) bin
    # logits), matched by `lr_box_head_last_pattern` (a regular expression on parameter names); 1.0
    # is the official behaviour. Adam moves each weight by about lr per step whatever the gradient's
    # size, and a softmax over n+1 bins needs all its logits to move before its expectation does, so
    # a zero-initialised bin head trained from scratch is slow at the shared lr (docs/ugs.md).
    lr_box_head_last_mult: float = 1.0
    lr_box_head_last_pattern: str = r"bbox_embed(\.\d+)?\.layers\.2\.(weight|bias)$"
    weight_decay: float = 1e-4
    epochs: int = 12
    # Step schedule (stepped once per epoch, gamma 0.1): a single drop at `lr_drop`, or several
    # drops at `lr_drop_list` (MultiStepLR) when that list is non-empty.
    lr_drop: int = 11
    lr_drop_list: list[int] = field(default_factory=list)
    lr_gamma: float = 0.1
    clip_max_norm: float = 0.1  # <= 0 disables clipping
    batch_size: int = 2  # per process
    # Micro-batches per optimizer step. None: accelerate's setting (environment variable
    # ACCELERATE_GRADIENT_ACCUMULATION_STEPS, default 1; `accelerate launch
    # --gradient_accumulation_steps` forwards it only for DeepSpeed), an integer overrides it.
    gradient_accumulation_steps: int | None = None
    use_ema: bool = False
    ema_decay: float = 0.9997
    # Abort training after this many consecutive steps with a non-finite loss (each is skipped).
    max_nonfinite_steps: int = 5

    def check(self) -> None:
        if self.lr <= 0 or self.lr_backbone < 0:
            raise ConfigError(f"optim.lr must be > 0 and optim.lr_backbone >= 0, got "
                              f"{self.lr}, {self.lr_backbone}")
        if self.epochs < 1:
            raise ConfigError(f"optim.epochs must be >= 1, got {self.epochs}")
        if self.gradient_accumulation_steps is not None and self.gradient_accumulation_steps < 1:
            raise ConfigError("optim.gradient_accumulation_steps must be >= 1 (or none), got "
                              f"{self.gradient_accumulation_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"optim.batch_size must be >= 1, got {self.batch_size}")
        if not self.lr_box_head_last_mult > 0:
            raise ConfigError(f"optim.lr_box_head_last_mult must be > 0, got {self.lr_box_head_last_mult}")
        try:
            re.compile(self.lr_box_head_last_pattern)
        except re.error as exc:
            raise ConfigError(f"optim.lr_box_head_last_pattern {self.lr_box_head_last_pattern!r} is not a "
                              f"regular expression: {exc}") from exc
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.max_nonfinite_steps < 1:
            raise ConfigError(f"optim.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if sorted(self.lr_drop_list) != list(self.lr_drop_list):
            raise ConfigError(f"optim.lr_drop_list must be increasing, got {self.lr_drop_list}")


@dataclass
class EvalConfig:
    # COCO summaries (AP, AP50, ..., AR) are all computed at this many detections per image.
    max_dets: int = 100
    num_select: int = 300  # top-k of the post-processor (query x class)
    # Class-agnostic NMS (IoU threshold) after the top-k when > 0; official default -1: off.
    nms_iou_threshold: float = -1.0
    interval: int = 1  # evaluate every N epochs (and always after the last one)
    # COCO evaluation backend, same numbers: "faster" (faster-coco-eval, several times faster on
    # dense scenes), "pycocotools" (the reference), or "auto": faster when installed, else pycocotools.
    backend: Literal["auto", "pycocotools", "faster"] = "auto"
    draw_score_threshold: float = 0.3  # detections drawn on the validation pictures
    num_draw_images: int = 4

    def check(self) -> None:
        if self.max_dets < 1 or self.num_select < 1:
            raise ConfigError(f"eval.max_dets and eval.num_select must be >= 1, got "
                              f"{self.max_dets}, {self.num_select}")
        if self.interval < 1:
            raise ConfigError(f"eval.interval must be >= 1, got {self.interval}")
        if self.nms_iou_threshold > 1:
            raise ConfigError(f"eval.nms_iou_threshold must be <= 1 (<= 0: no NMS), got {self.nms_iou_threshold}")


@dataclass
class RuntimeConfig:
    output_dir: str = "outputs/run"
    seed: int = 42  # each process uses seed + rank (official)
    log_interval: int = 10  # steps between console/tqdm postfix updates (the JSONL log has every step)
    checkpoint_interval: int = 1  # epochs between extra `checkpoint_epochNNNN.pth` copies (0: none)
    # How many `checkpoint_epochNNNN.pth` copies to keep (each holds the optimizer state: about
    # 3x the weights); older ones are deleted after each save, oldest first. checkpoint_last.pth
    # and checkpoint_best.pth are always kept. -1 keeps every copy.
    keep_checkpoints: int = 2
    # Also refresh checkpoint_last.pth every N optimizer steps inside an epoch (0: epoch ends only),
    # so a crash loses at most N steps; `--resume auto` skips the batches already consumed and
    # continues bit-identically (per-sample augmentation seeds, datasets/seeded.py).
    checkpoint_every_steps: int = 0
    # Stop after this many optimizer steps in total (0: no limit). For smoke tests and the demo.
    max_steps: int = 0
    # Stop training after this many minutes of it in this invocation (0: no limit), at an optimizer
    # step boundary, then evaluate and save as at the end; `--resume` continues from that step. A
    # wall-clock cap for time-boxed runs (the CPU demo on a shared machine whose speed varies).
    max_train_minutes: float = 0.0
    # Mirror the logs to TensorBoard (run_dir/tensorboard): null (default) when the tensorboard
    # package is installed, silently off otherwise; true asks for it (a warning when missing).
    tensorboard: bool | None = None
    # torch intra-op CPU threads per process (0: torch's default). On a busy shared CPU, 1 thread
    # can be several times faster than 2 (OpenMP threads spin while waiting for a core).
    num_threads: int = 0
    # Use deterministic algorithms (exact resume checks; slower on GPU).
    deterministic: bool = False
    # TF32 tensor-core arithmetic for float32 matrix products and convolutions on Ampere and newer
    # GPUs: None keeps PyTorch's defaults (since 1.12: products full fp32, convolutions TF32);
    # true turns both on (PyTorch 1.7-1.11, e.g. the official DINO's 1.9, had both on), false off.
    # fp32 matrix products are about half of a DINO-5scale training step's GPU time without it.
    tf32: bool | None = None
    # Keep convolution weights, and so the backbone's activations, in channels-last memory format
    # (NHWC): oneDNN's CPU convolutions and GPU tensor cores run faster on it; same arithmetic up
    # to float rounding. Off by default, as in the official code; the CPU demo turns it on.
    channels_last: bool = False
    # DistributedDataParallel(find_unused_parameters=...): needed when some parameters get no
    # gradient in a step (official default False).
    find_unused_parameters: bool = False
    # Evaluate/save with the EMA weights when optim.use_ema (the raw weights are saved too).
    eval_ema: bool = True
    # Profile this many optimizer steps (0: off) after `profile_skip` warm ones, on the main process,
    # once per invocation: run_dir/profile/summary.md (ms per step, device-busy share, host waits,
    # data-loader wait, device time by kind of work) and trace.json (util/profiling.py).
    profile_steps: int = 0
    profile_skip: int = 5

    def check(self) -> None:
        if not self.max_train_minutes >= 0:
            raise ConfigError(f"runtime.max_train_minutes must be >= 0 (0: no limit), got {self.max_train_minutes}")
        if (self.max_steps < 0 or self.log_interval < 1 or self.checkpoint_interval < 0 or self.num_threads < 0
                or self.checkpoint_every_steps < 0):
            raise ConfigError("runtime.max_steps, runtime.checkpoint_interval, runtime.checkpoint_every_steps "
                              "and runtime.num_threads "
                              "must be >= 0, runtime.log_interval >= 1")
        if self.profile_steps < 0 or self.profile_skip < 0:
            raise ConfigError(f"runtime.profile_steps and runtime.profile_skip must be >= 0, got "
                              f"{self.profile_steps}, {self.profile_skip}")
        if self.keep_checkpoints < -1:
            raise ConfigError("runtime.keep_checkpoints must be >= 0, or -1 to keep every epoch "
                              f"checkpoint, got {self.keep_checkpoints}")

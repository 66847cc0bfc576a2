"""Train and evaluate DINO / UGS-DINO on accelerate.

    accelerate launch main.py                       # the CPU demo -> outputs/demo/
    accelerate launch --config_file configs/accelerate/4gpu.yaml main.py \\
        --config dino_5scale_r50_coco --opt data.train_images=... data.train_annotations=...
    python main.py --eval --resume outputs/run/checkpoint_best.pth   # its stored config
    python main.py --config dino_5scale_r50_coco --pretrained official.pth --skip-mismatched
    torchrun --nproc_per_node 2 main.py ...         # 2 CPU processes (gloo); accelerate picks it up

The config: --config NAME (plus --opt overrides); without --config, `--resume`/`--eval` use the
config stored in the checkpoint (or config.json beside a safetensors file) with the --opt
overrides on top, and a new run uses demo_synthetic. The log says which one was used.
The number of processes and mixed precision come from accelerate (`accelerate config`, the files
in configs/accelerate/, or launcher flags); gradient accumulation from accelerate's
ACCELERATE_GRADIENT_ACCUMULATION_STEPS or `--opt optim.gradient_accumulation_steps=K`.
Resume continues from the last checkpoint: written at each epoch's end and, with
`runtime.checkpoint_every_steps=N`, every N optimizer steps inside an epoch (a `runtime.max_steps`
stop counts its partial epoch as done).
Offline: a run that loads a checkpoint (--resume, --eval, --pretrained) never downloads the
backbone's ImageNet weights (the checkpoint replaces them); a run that needs them and cannot
download them stops with the file to fetch and where to put it.
Errors in the config, data or checkpoints end in one message and exit status 2; --debug (or
DINO_UGS_DEBUG=1) shows the traceback.
Run directory: config.json (resolved config), log.jsonl (every step), metrics.json and
metrics_history.jsonl (every evaluation), results_val.json, plots/*.png, checkpoint_last.pth and
checkpoint_best.pth (official layout: {"model": state_dict, ...}); with `runtime.profile_steps=N`,
profile/ (summary.md of N profiled training steps and their Chrome trace).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedDataParallelKwargs, set_seed

from configs import Config, dump_config
from datasets import build_dataset
from datasets.coco_eval import format_summary
from datasets.collate import make_collate
from datasets.report import write_data_report
from datasets.seeded import SeededSamples
from models import build_model
from models.build import build_optimizer, build_scheduler
from util.checkpoint import export_safetensors, import_weights, prune_epoch_checkpoints
from util.cli import add_debug_option, entry_point
from util.ema import ModelEMA
from util.engine import NonFiniteLossError, TrainSettings, TrainState, evaluate, train_one_epoch
from util.logging import RunLogger, setup_console_logging, write_json_atomic
from util.precision import set_tf32
from util.profiling import StepProfiler
from util.preflight import check_data_paths, finished_run_message, launcher_process_warning
from util.run_start import (
    DEFAULT_CONFIG,
    Start,
    check_checkpoint_fits,
    config_for_building,
    config_overrides,
    eval_weights,
    resolve_start,
)
from util.run_summary import run_summary
from util.training_checkpoint import restore_training, save_training, training_checkpoint
from util.weight_downloads import explain_download_failure

log = logging.getLogger("main")

CHECKPOINT_LAST = "checkpoint_last.pth"  # written by util.checkpoint.save_training_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="named config (configs/<name>.py) or a .py/.json path (default: the config stored "
                        f"in the --resume checkpoint, else {DEFAULT_CONFIG})")
    p.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=2e-4 model.num_queries=300")
    p.add_argument("--eval", action="store_true", help="evaluate only (weights from --resume/--pretrained)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue a run: a training checkpoint, or 'auto' (output_dir/checkpoint_last.pth, "
                        "starting fresh if it does not exist); with --eval also a .safetensors export")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="initial weights (official DINO or ours, .pth or .safetensors); prints the import report")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="with --pretrained: a tensor whose shape differs from the model's (other than the "
                        "class heads and UGS box heads, which are re-initialised anyway) keeps the model's "
                        "initialisation and is reported, instead of stopping with an error")
    p.add_argument("--output-dir", default=None, help="run directory (overrides runtime.output_dir)")
    p.add_argument("--max-dets", type=int, default=None,
                   help="detections per image for evaluation (default eval.max_dets: 1500 VisDrone, 100 COCO)")
    p.add_argument("--export-safetensors", action="store_true",
                   help="also write model.safetensors (weights only) at the end")
    add_debug_option(p)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------
@dataclass
class Data:
    train: Any
    val: Any
    collate: Callable
    label_to_category_id: Any
    coco_gt: Any
    class_names: dict[int, str] | None = None


def build_data(cfg: Config, with_train: bool = True) -> Data:
    """Datasets from the data section (datasets.build_dataset), with the evaluation GT.
    `with_train=False` (evaluation only) leaves the training split unread (train=None)."""
    train = build_dataset(cfg.data, "train") if with_train else None
    val = build_dataset(cfg.data, "val")
    names = None
    cats = getattr(val, "categories", None)
    l2c = getattr(val, "label_to_category_id", None)
    if cats is not None and l2c is not None:
        by_id = {c["id"]: c.get("name", str(c["id"])) for c in cats}
        items = l2c.items() if isinstance(l2c, dict) else enumerate(l2c)
        names = {int(label): by_id.get(int(cat), str(cat)) for label, cat in items}
    return Data(train=train, val=val, collate=make_collate(cfg.data.pad_size_divisor),
                label_to_category_id=l2c, coco_gt=val.coco_gt(), class_names=names)


def build_loaders(cfg: Config, data: Data, num_workers: int, pin_memory: bool
                  ) -> tuple[torch.utils.data.DataLoader | None, torch.utils.data.DataLoader, torch.Generator]:
    """Training order is a function of (seed, epoch) only -- the sampler's generator is re-seeded
    at each epoch -- and each sample's augmentation of (seed, epoch, index), so a resumed run sees
    the same batches as an uninterrupted one. The train loader's dataset is a SeededSamples
    (None when `data.train` is None)."""
    generator = torch.Generator()
    generator.manual_seed(cfg.runtime.seed)
    train = None
    if data.train is not None:
        # augmentation draws are a function of (seed, epoch, sample) too: see datasets/seeded.py
        train_set = SeededSamples(data.train, cfg.runtime.seed)
        train = torch.utils.data.DataLoader(
            train_set, batch_size=cfg.optim.batch_size,
            sampler=torch.utils.data.RandomSampler(train_set, generator=generator),
            drop_last=len(data.train) >= cfg.optim.batch_size, collate_fn=data.collate,
            num_workers=num_workers, pin_memory=pin_memory,
            # workers' base seeds come from here, not from the global stream that the model's own
            # draws (denoising noise) use: an extra loader (a resumed epoch's) must not shift them
            generator=torch.Generator().manual_seed(cfg.runtime.seed + 1))
    val = torch.utils.data.DataLoader(
        data.val, batch_size=cfg.optim.batch_size, shuffle=False, drop_last=False,
        collate_fn=data.collate, num_workers=num_workers, pin_memory=pin_memory)
    return train, val, generator


# ------------------------------------------------------------------------------------------
# The run: build, resume, train, evaluate
# ------------------------------------------------------------------------------------------
@dataclass
class Parts:
    """Everything a run trains and evaluates with."""

    model: torch.nn.Module
    criterion: torch.nn.Module
    postprocessor: torch.nn.Module
    data: Data
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    generator: torch.Generator
    ema: Any = None


def _log_truncation(args: argparse.Namespace, resume: Any, step: int) -> int | None:
    """Which logged records a run keeps: a fresh training run starts new logs (-1: none), a
    resumed one keeps those up to its checkpoint's step, `--eval` appends to the history."""
    if args.eval:
        return None
    return step if resume is not None else -1


def _drop_stale_detection_pictures(plots_dir: Path, keep_until_step: int | None) -> int:
    """Deletes `detections_step*.png` drawn after `keep_until_step` (all for a fresh run, -1): they
    belong to an earlier run in the same directory and would be mistaken for this one's."""
    if keep_until_step is None or not plots_dir.is_dir():
        return 0
    dropped = 0
    for png in plots_dir.glob("detections_step*.png"):
        step = png.stem.removeprefix("detections_step")
        if step.isdigit() and int(step) > keep_until_step:
            png.unlink()
            dropped += 1
    if dropped:
        log.info("%s: removed %d detection picture(s) of an earlier run from %s",
                 "fresh run" if keep_until_step < 0 else f"resume at step {keep_until_step}", dropped, plots_dir)
    return dropped


def loader_transfers_non_blocking(pin_memory: bool, cuda: bool) -> bool:
    """Whether accelerate moves batches to the GPU without blocking: only from pinned memory
    (then a batch's copies never make the host wait, and it launches the step at once)."""
    return pin_memory and cuda


def make_accelerator(cfg: Config) -> Any:
    # accelerate only starts a multi-process CPU group (gloo) when asked for the CPU; under
    # torchrun on a machine without CUDA, ask for it, or each process would run alone.
    cpu = not torch.cuda.is_available() and os.environ.get("LOCAL_RANK") is not None
    extra = {}
    if cfg.optim.gradient_accumulation_steps is not None:
        extra["gradient_accumulation_steps"] = cfg.optim.gradient_accumulation_steps
    non_blocking = loader_transfers_non_blocking(cfg.data.pin_memory, torch.cuda.is_available() and not cpu)
    return Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(
        find_unused_parameters=cfg.runtime.find_unused_parameters)],
        dataloader_config=DataLoaderConfiguration(non_blocking=non_blocking), **extra)


def configure_torch(cfg: Config, accelerator: Any) -> None:
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    log.info("torch CPU threads: %d", torch.get_num_threads())
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_tf32(cfg.runtime.tf32)
    # seed + process index in python, numpy and torch (official DINO: processes draw different
    # augmentations and denoising noise)
    set_seed(cfg.runtime.seed, device_specific=True)


def build(args: argparse.Namespace, start: Start, accelerator: Any, build_model_fn: Callable | None,
          build_data_fn: Callable | None) -> Parts:
    """Model (with --pretrained imported, the --resume checkpoint checked against it), data,
    optimizer, schedule, loaders, EMA, prepared by accelerate."""
    cfg = start.cfg
    build_model_fn = build_model_fn or build_model
    build_cfg = config_for_building(args, start)
    with explain_download_failure(build_cfg.model.backbone, build_cfg.model.backbone_weights):
        model, criterion, postprocessor = build_model_fn(build_cfg)
    if start.pretrained is not None:
        report = import_weights(model, start.pretrained, skip_mismatched=args.skip_mismatched)
        if accelerator.is_main_process:
            print(f"--pretrained {args.pretrained}:\n{report}", flush=True)
    check_checkpoint_fits(args, start, model)
    if cfg.runtime.channels_last:
        model.to(memory_format=torch.channels_last)  # 4-d parameters only; inputs follow the weights
    data = (build_data_fn or partial(build_data, with_train=not args.eval))(cfg)
    if cfg.eval.num_select < cfg.eval.max_dets:
        log.warning("eval.num_select=%d < eval.max_dets=%d: at most %d detections per image exist, "
                    "so the cap is not reached", cfg.eval.num_select, cfg.eval.max_dets, cfg.eval.num_select)

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)  # per epoch: not prepared by accelerate
    train_loader, val_loader, generator = build_loaders(
        cfg, data, cfg.data.num_workers, pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda")
    if train_loader is None:
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    else:
        model, optimizer, train_loader, val_loader = accelerator.prepare(
            model, optimizer, train_loader, val_loader)
    criterion.to(accelerator.device)
    postprocessor.to(accelerator.device)
    ema = ModelEMA(accelerator.unwrap_model(model), cfg.optim.ema_decay) if cfg.optim.use_ema else None
    return Parts(model, criterion, postprocessor, data, optimizer, scheduler, train_loader, val_loader,
                 generator, ema)


def resume(args: argparse.Namespace, start: Start, accelerator: Any, parts: Parts) -> TrainState:
    """The counters (and for training every state) of the --resume checkpoint, if any."""
    state = TrainState()
    if start.checkpoint is None:
        if args.resume == "auto":
            log.info("--resume auto: no checkpoint in %s; starting a new run", start.cfg.runtime.output_dir)
        return state
    ckpt, path = start.checkpoint, start.resume_path
    if args.eval:
        # Evaluation needs weights only (the EMA weights when the run kept them).
        weights, which = eval_weights(ckpt, start.cfg)
        accelerator.unwrap_model(parts.model).load_state_dict(weights)
        state.epoch, state.step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
        parts.ema = None
        log.info("evaluating %s weights of %s", which, path)
    else:
        restore_training(ckpt, path, accelerator, parts.model, parts.optimizer, parts.scheduler,
                         parts.ema, state)
        log.info("resumed %s at epoch %d, step %d", path, state.epoch, state.step)
    start.checkpoint = None  # frees the loaded tensors
    return state


def planned_total_steps(cfg: Config, accelerator: Any, parts: Parts) -> int:
    """The run's optimizer steps (what the progress bar and its ETA count to): every epoch's, or
    runtime.max_steps when that stops the run earlier."""
    per_epoch = math.ceil(len(parts.train_loader) / max(accelerator.gradient_accumulation_steps, 1))
    total = per_epoch * cfg.optim.epochs
    return min(total, cfg.runtime.max_steps) if cfg.runtime.max_steps else total


def evaluate_and_log(tag: str, cfg: Config, accelerator: Any, parts: Parts, state: TrainState,
                     run_logger: RunLogger, out_dir: Path) -> dict:
    """Evaluate (the EMA weights when kept), then log, write results and draw the plots."""
    t0 = time.time()
    model = parts.ema.module if (parts.ema is not None and cfg.runtime.eval_ema) else parts.model
    metrics, results, samples = evaluate(
        model, parts.postprocessor, parts.val_loader, accelerator, parts.data.coco_gt,
        parts.data.label_to_category_id, cfg.eval.max_dets, backend=cfg.eval.backend,
        num_samples=cfg.eval.num_draw_images if accelerator.is_main_process else 0)
    if accelerator.is_main_process:
        from util.plots import plot_ap_history, plot_detections  # matplotlib: ~1 s, only here

        metrics["eval_seconds"] = round(time.time() - t0, 2)
        write_data_report(out_dir, {"train": parts.data.train, "val": parts.data.val}, only_changes=True)
        log.info("evaluation (%s, maxDets=%d):\n%s", tag, cfg.eval.max_dets, format_summary(metrics))
        run_logger.log_metrics(metrics, epoch=state.epoch, step=state.step)
        write_json_atomic(out_dir / "results_val.json", results)
        plot_ap_history(out_dir / "metrics_history.jsonl", out_dir / "plots" / "ap_history.png")
        drawn = plot_detections(samples, out_dir / "plots" / f"detections_step{state.step:07d}.png",
                                cfg.eval.draw_score_threshold, parts.data.class_names,
                                title=f"{cfg.name}: step {state.step}, AP50 {metrics['AP50']:.3f} "
                                      f"(white dashed: ground truth)")
        if drawn is not None:
            shutil.copyfile(drawn, out_dir / "plots" / "detections_last.png")
    accelerator.wait_for_everyone()
    return metrics


def save_run_checkpoint(accelerator: Any, parts: Parts, state: TrainState, cfg: Config, out_dir: Path,
                        is_best: bool = False, extra_names: list[str] | None = None) -> None:
    save_training(accelerator, lambda rng: training_checkpoint(
        accelerator, parts.model, parts.optimizer, parts.scheduler, parts.ema, state, cfg, rng), out_dir,
        is_best, extra_names or [])


def train(cfg: Config, accelerator: Any, parts: Parts, state: TrainState, run_logger: RunLogger,
          out_dir: Path) -> tuple[dict | None, float]:
    """Epochs from state.epoch on: train, evaluate every eval.interval epochs and at the end, save.
    Returns the last evaluation's metrics and the training speed (steps/s)."""
    save = partial(save_run_checkpoint, accelerator, parts, state, cfg, out_dir)
    settings = TrainSettings(clip_max_norm=cfg.optim.clip_max_norm,
                             max_nonfinite_steps=cfg.optim.max_nonfinite_steps,
                             max_steps=cfg.runtime.max_steps, log_interval=cfg.runtime.log_interval,
                             checkpoint_every_steps=cfg.runtime.checkpoint_every_steps,
                             on_checkpoint=save, total_steps=planned_total_steps(cfg, accelerator, parts))
    if cfg.runtime.profile_steps and accelerator.is_main_process:
        settings.profiler = StepProfiler(out_dir / "profile", cfg.runtime.profile_skip, cfg.runtime.profile_steps,
                                         accelerator.device)
    metrics = None
    t_start, step_start = time.time(), state.step
    if cfg.runtime.max_train_minutes:
        settings.deadline = time.monotonic() + 60.0 * cfg.runtime.max_train_minutes
    for epoch in range(state.epoch, cfg.optim.epochs):
        if cfg.runtime.max_steps and state.step >= cfg.runtime.max_steps:
            break
        parts.generator.manual_seed(cfg.runtime.seed * 100_003 + epoch)  # order = f(seed, epoch)
        parts.train_loader.dataset.use_epoch(epoch)
        loader = parts.train_loader
        if state.batches_in_epoch:  # resumed from a mid-epoch checkpoint: same order, minus those
            log.info("resuming epoch %d after its first %d batches", epoch, state.batches_in_epoch)
            loader = accelerator.skip_first_batches(parts.train_loader, state.batches_in_epoch)
        try:
            means = train_one_epoch(parts.model, parts.criterion, loader, parts.optimizer, accelerator, epoch,
                                    state, settings, ema=parts.ema, logger=run_logger)
        except NonFiniteLossError:
            log.error("training aborted; the last checkpoint (%s) is from before these steps",
                      out_dir / CHECKPOINT_LAST)
            raise
        elapsed = time.time() - t_start
        if state.deadline_reached and state.batches_in_epoch < len(parts.train_loader):
            # mid-epoch: keep the epoch and its consumed batches, so --resume continues right here
            log.warning("runtime.max_train_minutes=%g reached in epoch %d after step %d (%d of %d "
                        "batches): training stops here; evaluation and checkpoint follow, --resume "
                        "continues", cfg.runtime.max_train_minutes, epoch, state.step,
                        state.batches_in_epoch, len(parts.train_loader))
        else:
            parts.scheduler.step()
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            log.info("epoch %d done: step %d, %.2f steps/s, mean loss %.4f", epoch, state.step,
                     (state.step - step_start) / max(elapsed, 1e-9), means.get("loss", math.nan))
        last = state.deadline_reached or state.epoch >= cfg.optim.epochs or bool(
            cfg.runtime.max_steps and state.step >= cfg.runtime.max_steps)
        if last or state.epoch % cfg.eval.interval == 0:
            metrics = evaluate_and_log(f"epoch {epoch}", cfg, accelerator, parts, state, run_logger, out_dir)
        extra = []
        if cfg.runtime.checkpoint_interval and state.epoch % cfg.runtime.checkpoint_interval == 0:
            extra.append(f"checkpoint_epoch{state.epoch:04d}.pth")
        is_best = False  # decided on the main process, the only one that writes
        if metrics is not None and accelerator.is_main_process and metrics["AP"] > state.best_metric:
            state.best_metric, is_best = float(metrics["AP"]), True
        save(is_best, extra)
        if accelerator.is_main_process:
            from util.plots import plot_loss_curves  # matplotlib: ~1 s, not needed before the first plot

            plot_loss_curves(out_dir / "log.jsonl", out_dir / "plots" / "loss_curves.png")
            prune_epoch_checkpoints(out_dir, cfg.runtime.keep_checkpoints)
        metrics = metrics if last else None
        if last:
            break
    elapsed = time.time() - t_start
    steps_per_s = (state.step - step_start) / max(elapsed, 1e-9)
    log.info("training done: %d steps in %.1f s (%.3f steps/s)", state.step - step_start, elapsed, steps_per_s)
    if accelerator.is_main_process:  # final metrics and where the plots are
        print(run_summary(metrics, out_dir, state.step - step_start, elapsed), flush=True)
    return metrics, steps_per_s


def run(args: argparse.Namespace, cfg: Config | None = None,
        build_model_fn: Callable | None = None, build_data_fn: Callable | None = None) -> dict:
    """Everything `main` does; the builders can be replaced (tests use tiny fakes).
    Returns {"metrics": last metrics or None, "state": TrainState, "output_dir": Path}
    (and "finished": True when --resume found nothing left to train)."""
    start = resolve_start(args, cfg)
    cfg = start.cfg
    cfg.check_detections_per_image()
    check_data_paths(cfg, ("val",) if args.eval else ("train", "val"))
    accelerator = make_accelerator(cfg)
    setup_console_logging(accelerator.is_main_process)
    out_dir = Path(cfg.runtime.output_dir)
    overrides = config_overrides(args)
    log.info("config: %s%s", start.config_source, f", with --opt {' '.join(overrides)}" if overrides else "")
    warning = launcher_process_warning(os.environ, accelerator.num_processes)
    if warning:
        log.warning(warning)
    if start.checkpoint is not None and not args.eval:
        done = finished_run_message(start.checkpoint, cfg, start.resume_path)
        if done:
            if accelerator.is_main_process:
                print(done, flush=True)
            accelerator.end_training()
            return {"metrics": None, "output_dir": out_dir, "finished": True,
                    "state": TrainState(epoch=int(start.checkpoint.get("epoch", 0)),
                                        step=int(start.checkpoint.get("step", 0)))}
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.json")
    log.info("config %s -> %s; %d process(es) on %s, mixed precision %s, gradient accumulation %d",
             cfg.name, out_dir, accelerator.num_processes, accelerator.device,
             accelerator.mixed_precision, accelerator.gradient_accumulation_steps)
    configure_torch(cfg, accelerator)

    parts = build(args, start, accelerator, build_model_fn, build_data_fn)
    if accelerator.is_main_process:  # skipped records by reason, with examples: data_report.json
        write_data_report(out_dir, {"train": parts.data.train, "val": parts.data.val})
    resume_path = start.resume_path
    state = resume(args, start, accelerator, parts)
    keep_until_step = _log_truncation(args, resume_path, state.step)
    run_logger = RunLogger(out_dir, enabled=accelerator.is_main_process,
                           tensorboard=cfg.runtime.tensorboard, truncate_after_step=keep_until_step)
    if accelerator.is_main_process:
        _drop_stale_detection_pictures(out_dir / "plots", keep_until_step)
    if args.eval:
        metrics = evaluate_and_log("evaluation only", cfg, accelerator, parts, state, run_logger, out_dir)
        _finish(args, accelerator, parts.model, out_dir, run_logger)
        return {"metrics": metrics, "state": state, "output_dir": out_dir}
    metrics, steps_per_s = train(cfg, accelerator, parts, state, run_logger, out_dir)
    _finish(args, accelerator, parts.model, out_dir, run_logger)
    return {"metrics": metrics, "state": state, "output_dir": out_dir, "steps_per_s": steps_per_s}


def _finish(args: argparse.Namespace, accelerator: Any, model: torch.nn.Module, out_dir: Path,
            run_logger: RunLogger) -> None:
    if args.export_safetensors and accelerator.is_main_process:
        path = export_safetensors(accelerator.unwrap_model(model).state_dict(),
                                  out_dir / "model.safetensors",
                                  metadata={"layout": "official DINO state_dict"})
        log.info("wrote %s (weights only)", path)
    run_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


@entry_point
def main(argv: list[str] | None = None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train and evaluate DINO / UGS-DINO on accelerate.

    accelerate launch main.py                       # the CPU demo -> outputs/demo/
    accelerate launch --config_file configs/accelerate/4gpu.yaml main.py \\
        --config dino_5scale_r50_coco --opt data.train_images=... data.train_annotations=...
    python main.py --config dino_tiny --eval --resume outputs/run/checkpoint_best.pth
    torchrun --nproc_per_node 2 main.py ...         # 2 CPU processes (gloo); accelerate picks it up

The number of processes and mixed precision come from accelerate (`accelerate config`, the files
in configs/accelerate/, or launcher flags); gradient accumulation from accelerate's
ACCELERATE_GRADIENT_ACCUMULATION_STEPS or `--opt optim.gradient_accumulation_steps=K`.
Resume continues from the last checkpoint: written at each epoch's end and, with
`runtime.checkpoint_every_steps=N`, every N optimizer steps inside an epoch (a `runtime.max_steps`
stop counts its partial epoch as done).
Run directory: config.json (resolved config), log.jsonl (every step), metrics.json and
metrics_history.jsonl (every evaluation), results_val.json, plots/*.png, checkpoint_last.pth and
checkpoint_best.pth (official layout: {"model": state_dict, ...}).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from configs import Config, ConfigError, dump_config, load_config, to_dict
from util.checkpoint import capture_rng_state, restore_rng_state
from util.distributed import seed_everything
from util.engine import NonFiniteLossError, TrainSettings, TrainState, evaluate, train_one_epoch
from util.logging import RunLogger, setup_console_logging, write_json_atomic
from util.precision import set_tf32
from util.run_summary import run_summary

log = logging.getLogger("main")

DEFAULT_CONFIG = "demo_synthetic"
CHECKPOINT_LAST = "checkpoint_last.pth"  # written by util.checkpoint.save_training_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help=f"named config (configs/<name>.py) or a .py/.json path (default: {DEFAULT_CONFIG})")
    p.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted overrides, e.g. optim.lr=2e-4 model.num_queries=300")
    p.add_argument("--eval", action="store_true", help="evaluate only (weights from --resume/--pretrained)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH|auto",
                   help="continue a run: a training checkpoint, or 'auto' (output_dir/checkpoint_last.pth, "
                        "starting fresh if it does not exist)")
    p.add_argument("--pretrained", default=None, metavar="PATH",
                   help="initial weights (official DINO or ours); prints the import report")
    p.add_argument("--output-dir", default=None, help="run directory (overrides runtime.output_dir)")
    p.add_argument("--max-dets", type=int, default=None,
                   help="detections per image for evaluation (default eval.max_dets: 1500 VisDrone, 100 COCO)")
    p.add_argument("--export-safetensors", action="store_true",
                   help="also write model.safetensors (weights only) at the end")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> Config:
    overrides = list(args.opt or [])
    if args.output_dir is not None:
        overrides.append(f"runtime.output_dir={args.output_dir}")
    if args.max_dets is not None:
        overrides.append(f"eval.max_dets={args.max_dets}")
    return load_config(args.config, overrides)


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


def build_data(cfg: Config) -> Data:
    """Datasets from the data section (datasets.build_dataset), with the evaluation GT."""
    from datasets import build_dataset
    from datasets.collate import make_collate

    train = build_dataset(cfg.data, "train")
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
                  ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader, torch.Generator]:
    """Training order is a function of (seed, epoch) only -- the sampler's generator is re-seeded
    at each epoch -- and each sample's augmentation of (seed, epoch, index), so a resumed run sees
    the same batches as an uninterrupted one. The train loader's dataset is a SeededSamples."""
    from datasets.seeded import SeededSamples

    generator = torch.Generator()
    generator.manual_seed(cfg.runtime.seed)
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
# Checkpoints
# ------------------------------------------------------------------------------------------
def training_checkpoint(accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                        ema: Any, state: TrainState, cfg: Config, rng_all: list) -> dict:
    """The official layout ({"model": state_dict}) plus what exact resume needs."""
    ckpt = {"model": accelerator.unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
            "epoch": state.epoch, "step": state.step, "train_state": state.state_dict(),
            "rng": rng_all, "config": to_dict(cfg)}
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        ckpt["scaler"] = scaler.state_dict()
    if ema is not None:
        ckpt["ema"] = ema.state_dict()
    return ckpt


def restore_training(ckpt: dict, path: Path, accelerator: Any, model: torch.nn.Module,
                     optimizer: Any, scheduler: Any, ema: Any, state: TrainState) -> None:
    missing = [k for k in ("model", "optimizer", "lr_scheduler", "train_state") if k not in ckpt]
    if missing:
        raise ValueError(f"--resume {path}: not a training checkpoint of this code (missing "
                         f"{missing}); to start from its weights use --pretrained {path}")
    accelerator.unwrap_model(model).load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["lr_scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        if "ema" in ckpt:
            ema.load_state_dict(ckpt["ema"])
        else:
            log.warning("--resume %s has no EMA state; the EMA restarts from the current weights", path)
    state.load_state_dict(ckpt["train_state"])
    rng = ckpt.get("rng") or []
    if len(rng) == accelerator.num_processes:
        restore_rng_state(rng[accelerator.process_index])
    else:
        log.warning("--resume %s: saved by %d process(es), running %d; RNG streams are re-seeded, "
                    "so the run continues but not bit-exactly", path, len(rng), accelerator.num_processes)
        seed_everything(1000 * state.epoch + int(ckpt["config"]["runtime"]["seed"]), accelerator.process_index)


def save_training(accelerator: Any, ckpt_fn: Callable[[list], dict], out_dir: Path, is_best: bool,
                  extra_names: list[str]) -> None:
    """Every process contributes its RNG state; the main process writes atomically."""
    from accelerate.utils import gather_object

    from util.checkpoint import save_checkpoint, save_training_checkpoint

    rng_all = gather_object([capture_rng_state()])
    if accelerator.is_main_process:
        ckpt = ckpt_fn(rng_all)
        save_training_checkpoint(out_dir, ckpt, is_best=is_best)
        for name in extra_names:
            save_checkpoint(ckpt, out_dir / name)
    accelerator.wait_for_everyone()


# ------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------
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


def run(args: argparse.Namespace, cfg: Config | None = None,
        build_model_fn: Callable | None = None, build_data_fn: Callable | None = None) -> dict:
    """Everything `main` does; the builders can be replaced (tests use tiny fakes).
    Returns {"metrics": last metrics or None, "state": TrainState, "output_dir": Path}."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedDataParallelKwargs

    cfg = cfg if cfg is not None else resolve_config(args)
    # accelerate only starts a multi-process CPU group (gloo) when asked for the CPU; under
    # torchrun on a machine without CUDA, ask for it, or each process would run alone.
    cpu = not torch.cuda.is_available() and os.environ.get("LOCAL_RANK") is not None
    extra = {}
    if cfg.optim.gradient_accumulation_steps is not None:
        extra["gradient_accumulation_steps"] = cfg.optim.gradient_accumulation_steps
    non_blocking = loader_transfers_non_blocking(cfg.data.pin_memory, torch.cuda.is_available() and not cpu)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(
        find_unused_parameters=cfg.runtime.find_unused_parameters)],
        dataloader_config=DataLoaderConfiguration(non_blocking=non_blocking), **extra)
    setup_console_logging(accelerator.is_main_process)
    out_dir = Path(cfg.runtime.output_dir)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out_dir / "config.json")
    log.info("config %s -> %s; %d process(es) on %s, mixed precision %s, gradient accumulation %d",
             cfg.name, out_dir, accelerator.num_processes, accelerator.device,
             accelerator.mixed_precision, accelerator.gradient_accumulation_steps)
    if cfg.runtime.num_threads:
        torch.set_num_threads(cfg.runtime.num_threads)
    log.info("torch CPU threads: %d", torch.get_num_threads())
    if cfg.runtime.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    set_tf32(cfg.runtime.tf32)
    seed_everything(cfg.runtime.seed, accelerator.process_index)

    if build_model_fn is None:
        from models import build_model as build_model_fn
    model, criterion, postprocessor = build_model_fn(cfg)
    data = (build_data_fn or build_data)(cfg)
    if cfg.eval.num_select < cfg.eval.max_dets:
        log.warning("eval.num_select=%d < eval.max_dets=%d: at most %d detections per image exist, "
                    "so the cap is not reached", cfg.eval.num_select, cfg.eval.max_dets, cfg.eval.num_select)

    if args.pretrained:
        from util.checkpoint import import_weights, load_weights_file

        report = import_weights(model, load_weights_file(args.pretrained))
        if accelerator.is_main_process:
            print(f"--pretrained {args.pretrained}:\n{report}", flush=True)

    from util.ema import ModelEMA
    from util.optim import build_optimizer, build_scheduler

    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim)  # per epoch: not prepared by accelerate
    train_loader, val_loader, generator = build_loaders(
        cfg, data, cfg.data.num_workers, pin_memory=cfg.data.pin_memory and accelerator.device.type == "cuda")
    model, optimizer, train_loader, val_loader = accelerator.prepare(
        model, optimizer, train_loader, val_loader)
    criterion.to(accelerator.device)
    postprocessor.to(accelerator.device)
    ema = ModelEMA(accelerator.unwrap_model(model), cfg.optim.ema_decay) if cfg.optim.use_ema else None
    state = TrainState()

    resume = args.resume
    if resume == "auto":
        from util.checkpoint import find_resume_checkpoint

        resume = find_resume_checkpoint(out_dir)
        if resume is None:
            log.info("--resume auto: no checkpoint in %s; starting a new run", out_dir)
    if resume is not None:
        from util.checkpoint import load_checkpoint

        resume = Path(resume)
        ckpt = load_checkpoint(resume)
        if args.eval:
            # Evaluation needs weights only (the EMA weights when the run kept them).
            use_ema = cfg.runtime.eval_ema and "ema" in ckpt
            weights = ckpt["ema"]["model"] if use_ema else ckpt.get("model")
            if weights is None:
                raise ValueError(f"--resume {resume}: no 'model' entry (keys {sorted(ckpt)})")
            accelerator.unwrap_model(model).load_state_dict(weights)
            state.epoch, state.step = int(ckpt.get("epoch", 0)), int(ckpt.get("step", 0))
            ema = None
            log.info("evaluating %s weights of %s", "EMA" if use_ema else "model", resume)
        else:
            restore_training(ckpt, resume, accelerator, model, optimizer, scheduler, ema, state)
            log.info("resumed %s at epoch %d, step %d", resume, state.epoch, state.step)
        del ckpt

    keep_until_step = _log_truncation(args, resume, state.step)
    run_logger = RunLogger(out_dir, enabled=accelerator.is_main_process,
                           tensorboard=cfg.runtime.tensorboard, truncate_after_step=keep_until_step)
    if accelerator.is_main_process:
        _drop_stale_detection_pictures(out_dir / "plots", keep_until_step)
    eval_model = (lambda: ema.module if (ema is not None and cfg.runtime.eval_ema) else model)

    def run_eval(tag: str) -> dict | None:
        t0 = time.time()
        metrics, results, samples = evaluate(
            eval_model(), postprocessor, val_loader, accelerator, data.coco_gt,
            data.label_to_category_id, cfg.eval.max_dets, backend=cfg.eval.backend,
            num_samples=cfg.eval.num_draw_images if accelerator.is_main_process else 0)
        if accelerator.is_main_process:
            from datasets.coco_eval import format_summary
            from util.plots import plot_ap_history, plot_detections

            metrics["eval_seconds"] = round(time.time() - t0, 2)
            log.info("evaluation (%s, maxDets=%d):\n%s", tag, cfg.eval.max_dets, format_summary(metrics))
            run_logger.log_metrics(metrics, epoch=state.epoch, step=state.step)
            write_json_atomic(out_dir / "results_val.json", results)
            plot_ap_history(out_dir / "metrics_history.jsonl", out_dir / "plots" / "ap_history.png")
            drawn = plot_detections(samples, out_dir / "plots" / f"detections_step{state.step:07d}.png",
                                    cfg.eval.draw_score_threshold, data.class_names,
                                    title=f"{cfg.name}: step {state.step}, AP50 {metrics['AP50']:.3f} "
                                          f"(white dashed: ground truth)")
            if drawn is not None:
                shutil.copyfile(drawn, out_dir / "plots" / "detections_last.png")
        accelerator.wait_for_everyone()
        return metrics

    if args.eval:
        metrics = run_eval("evaluation only")
        _finish(args, accelerator, model, out_dir, run_logger)
        return {"metrics": metrics, "state": state, "output_dir": out_dir}

    def save(is_best: bool = False, extra_names: list[str] | None = None) -> None:
        save_training(accelerator, lambda rng: training_checkpoint(
            accelerator, model, optimizer, scheduler, ema, state, cfg, rng), out_dir, is_best,
            extra_names or [])

    settings = TrainSettings(clip_max_norm=cfg.optim.clip_max_norm,
                             max_nonfinite_steps=cfg.optim.max_nonfinite_steps,
                             max_steps=cfg.runtime.max_steps, log_interval=cfg.runtime.log_interval,
                             checkpoint_every_steps=cfg.runtime.checkpoint_every_steps,
                             on_checkpoint=save)
    metrics = None
    t_start, step_start = time.time(), state.step
    if cfg.runtime.max_train_minutes:
        settings.deadline = time.monotonic() + 60.0 * cfg.runtime.max_train_minutes
    for epoch in range(state.epoch, cfg.optim.epochs):
        if cfg.runtime.max_steps and state.step >= cfg.runtime.max_steps:
            break
        generator.manual_seed(cfg.runtime.seed * 100_003 + epoch)  # order = f(seed, epoch)
        train_loader.dataset.use_epoch(epoch)
        loader = train_loader
        if state.batches_in_epoch:  # resumed from a mid-epoch checkpoint: same order, minus those
            log.info("resuming epoch %d after its first %d batches", epoch, state.batches_in_epoch)
            loader = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
        try:
            means = train_one_epoch(model, criterion, loader, optimizer, accelerator, epoch,
                                    state, settings, ema=ema, logger=run_logger)
        except NonFiniteLossError:
            log.error("training aborted; the last checkpoint (%s) is from before these steps",
                      out_dir / CHECKPOINT_LAST)
            raise
        elapsed = time.time() - t_start
        if state.deadline_reached and state.batches_in_epoch < len(train_loader):
            # mid-epoch: keep the epoch and its consumed batches, so --resume continues right here
            log.warning("runtime.max_train_minutes=%g reached in epoch %d after step %d (%d of %d "
                        "batches): training stops here; evaluation and checkpoint follow, --resume "
                        "continues", cfg.runtime.max_train_minutes, epoch, state.step,
                        state.batches_in_epoch, len(train_loader))
        else:
            scheduler.step()
            state.epoch, state.batches_in_epoch = epoch + 1, 0
            log.info("epoch %d done: step %d, %.2f steps/s, mean loss %.4f", epoch, state.step,
                     (state.step - step_start) / max(elapsed, 1e-9), means.get("loss", math.nan))
        last = state.deadline_reached or state.epoch >= cfg.optim.epochs or bool(
            cfg.runtime.max_steps and state.step >= cfg.runtime.max_steps)
        if last or state.epoch % cfg.eval.interval == 0:
            metrics = run_eval(f"epoch {epoch}")
        extra = []
        if cfg.runtime.checkpoint_interval and state.epoch % cfg.runtime.checkpoint_interval == 0:
            extra.append(f"checkpoint_epoch{state.epoch:04d}.pth")
        is_best = False  # decided on the main process, the only one that writes
        if metrics is not None and accelerator.is_main_process and metrics["AP"] > state.best_metric:
            state.best_metric, is_best = float(metrics["AP"]), True
        save(is_best, extra)
        if accelerator.is_main_process:
            from util.plots import plot_loss_curves

            plot_loss_curves(out_dir / "log.jsonl", out_dir / "plots" / "loss_curves.png")
        metrics = metrics if last else None
        if last:
            break
    elapsed = time.time() - t_start
    steps_per_s = (state.step - step_start) / max(elapsed, 1e-9)
    log.info("training done: %d steps in %.1f s (%.3f steps/s)", state.step - step_start, elapsed, steps_per_s)
    if accelerator.is_main_process:
        print(run_summary(metrics, out_dir, state.step - step_start, elapsed), flush=True)
    _finish(args, accelerator, model, out_dir, run_logger)
    return {"metrics": metrics, "state": state, "output_dir": out_dir, "steps_per_s": steps_per_s}


def _finish(args: argparse.Namespace, accelerator: Any, model: torch.nn.Module, out_dir: Path,
            run_logger: RunLogger) -> None:
    if args.export_safetensors and accelerator.is_main_process:
        from util.checkpoint import export_safetensors

        path = export_safetensors(accelerator.unwrap_model(model).state_dict(),
                                  out_dir / "model.safetensors",
                                  metadata={"layout": "official DINO state_dict"})
        log.info("wrote %s (weights only)", path)
    run_logger.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = resolve_config(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    run(args, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())

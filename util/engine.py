"""The training and evaluation loops: two plain functions on accelerate.

`train_one_epoch` runs forward -> weighted loss -> backward -> clip -> step under
`accelerator.accumulate`, so gradient accumulation and mixed precision come from accelerate.
Guards: a non-finite loss (on any process: all processes agree through one all_reduce) or a
non-finite gradient norm skips the step with the image ids logged, and `max_nonfinite_steps`
consecutive skips abort training; an out-of-memory error names the batch's image sizes and the
settings that reduce memory before re-raising.

`evaluate` runs the post-processor on every batch, turns detections into COCO results, gathers
them from all processes and removes the duplicates a distributed sampler pads with, so every
image is scored exactly once, then computes the COCO summary at `max_dets` on the main process.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from util.run_summary import format_duration

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Raised after too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class TrainState:
    """Counters saved in checkpoints: `epoch` is the next epoch to run, `step` the number of
    optimizer steps done (skipped steps count, so the log's step axis never repeats)."""

    epoch: int = 0
    step: int = 0
    nonfinite_streak: int = 0
    best_metric: float = -math.inf
    skipped_steps: int = 0
    # loader batches of `epoch` already consumed (a mid-epoch checkpoint); 0 at epoch boundaries
    batches_in_epoch: int = 0
    # set when `TrainSettings.deadline` stopped training (this invocation only; not saved)
    deadline_reached: bool = False

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "nonfinite_streak": self.nonfinite_streak,
                "best_metric": self.best_metric, "skipped_steps": self.skipped_steps,
                "batches_in_epoch": self.batches_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("epoch", "step", "nonfinite_streak", "skipped_steps", "batches_in_epoch"):
            setattr(self, k, int(state.get(k, 0)))
        self.best_metric = float(state.get("best_metric", -math.inf))


@dataclass
class TrainSettings:
    clip_max_norm: float = 0.1
    max_nonfinite_steps: int = 5
    max_steps: int = 0  # total optimizer steps at which to stop (0: no limit)
    deadline: float | None = None  # time.monotonic() after which to stop at the next step boundary
    log_interval: int = 10
    extra_log: dict[str, Any] = field(default_factory=dict)
    # every this many optimizer steps (0: never), `on_checkpoint()` saves a mid-epoch checkpoint
    checkpoint_every_steps: int = 0
    on_checkpoint: Callable[[], None] | None = None
    # optimizer steps the whole run plans, for the progress bar's ETA (0: `max_steps` when set,
    # else the end of the current epoch)
    total_steps: int = 0
    # told of each batch and optimizer step (util/profiling.StepProfiler); finished at the epoch's end
    profiler: Any | None = None


def weighted_loss(loss_dict: dict[str, torch.Tensor],
                  weight_dict: dict[str, float]) -> torch.Tensor:
    """Total loss = sum(loss[k] * weight[k]) over the keys that have a weight (official), leaving
    out the zero weights: the same value and gradients, without a backward pass through terms that
    are only logged (UGS keeps L1 at weight 0 on 13 output sets) and without a NaN in such a term
    turning the total into NaN (0 * NaN; the non-finite guard of `train_one_epoch` still checks
    every logged term)."""
    weighted = [k for k in loss_dict if k in weight_dict]
    if not weighted:
        raise KeyError(f"no loss in {sorted(loss_dict)} has a weight in criterion.weight_dict "
                       f"({sorted(weight_dict)})")
    terms = [loss_dict[k] * weight_dict[k] for k in weighted if weight_dict[k] != 0]
    if not terms:  # every weight is zero: a zero total, still attached to the graph
        return torch.stack([loss_dict[k].reshape(()) for k in weighted]).sum() * 0.0
    return torch.stack([t.reshape(()) for t in terms]).sum()


def _image_ids(targets: list[dict]) -> list[int]:
    return [int(t["image_id"]) for t in targets if "image_id" in t]


def _oom_message(images: torch.Tensor, targets: list[dict]) -> str:
    sizes = [tuple(int(v) for v in t["size"]) for t in targets if "size" in t]
    return (f"out of memory on a batch of {images.shape[0]} image(s), padded to "
            f"(h, w)=({images.shape[-2]}, {images.shape[-1]}), unpadded sizes {sizes}, "
            f"image ids {_image_ids(targets)}, objects per image {[len(t['boxes']) for t in targets]}. "
            "Settings that reduce memory: a smaller per-process optim.batch_size (keep the effective "
            "batch with accelerate's --gradient_accumulation_steps), activation checkpointing in the "
            "model section, a smaller maximum image size in the data section, fewer queries / "
            "denoising queries, or bf16 mixed precision (accelerate --mixed_precision bf16).")


def _is_oom(err: BaseException) -> bool:
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError")
    return isinstance(err, oom_type) or "out of memory" in str(err).lower()


def train_one_epoch(model: nn.Module, criterion: nn.Module, data_loader: Iterable,
                    optimizer: torch.optim.Optimizer, accelerator: Any, epoch: int,
                    state: TrainState, settings: TrainSettings, ema: Any | None = None,
                    logger: Any | None = None) -> dict[str, float]:
    """One pass over `data_loader` (already prepared by accelerate). Returns the mean of each
    logged quantity over the optimizer steps taken. Stops early when `settings.max_steps` total
    steps are reached (check `state.step` afterwards) or, after the step in progress, when
    `settings.deadline` has passed (`state.deadline_reached`)."""
    model.train()
    criterion.train()
    weight_dict = criterion.weight_dict
    sums: dict[str, float] = {}
    n_logged = 0
    # the reduced ["loss"] + keys vector of each micro-batch of one step (read once per step)
    window: list[torch.Tensor] = []
    stop_after_step = False
    total = planned_steps(settings, state, data_loader,
                          getattr(accelerator, "gradient_accumulation_steps", 1))
    # counts optimizer steps of the whole run, so its rate and ETA are the run's (evaluations aside)
    bar = tqdm(total=total, initial=state.step, desc=f"train (epoch {epoch})", unit="step",
               disable=not accelerator.is_main_process, dynamic_ncols=True, leave=False)
    epoch_start, epoch_start_step = time.monotonic(), state.step
    for images, masks, targets in data_loader:
        if settings.max_steps and state.step >= settings.max_steps:
            break
        state.batches_in_epoch += 1
        if settings.profiler is not None:
            settings.profiler.batch_ready()
        with accelerator.accumulate(model):
            try:
                with accelerator.autocast():
                    outputs = model(images, masks, targets)
                    loss_dict = criterion(outputs, targets)
                    loss = weighted_loss(loss_dict, weight_dict)
                keys = sorted(loss_dict)
                deadline = [] if settings.deadline is None else [torch.full(
                    (), float(time.monotonic() >= settings.deadline), device=loss.device)]  # no host copy
                local = torch.stack([loss.detach().float()]
                                    + [loss_dict[k].detach().float().reshape(()) for k in keys] + deadline)
                # One all_reduce serves logging, the guard and the deadline: a non-finite value on
                # any process makes the sum non-finite everywhere, and the deadline flag (last
                # entry) is > 0 everywhere once one process is past it, so every process takes
                # the same branch.
                reduced = accelerator.reduce(local, reduction="mean")
                # Backward is launched before the host reads the flags: reading them waits for the
                # device, and the decoder's backward kernels (UGS's UR pass doubles them) are small
                # enough that launching them after that wait would leave the GPU idle. A
                # non-finite step's gradients are discarded below (accumulated ones included).
                accelerator.backward(loss)
                stop_after_step = stop_after_step or bool(deadline and reduced[-1] > 0)
                finite = bool(torch.isfinite(reduced).all())
            except RuntimeError as err:
                if _is_oom(err):
                    log.error(_oom_message(images, targets))
                raise
            if not finite:
                _skip_step(accelerator, optimizer, state, settings, epoch, targets,
                           local, keys, logger, reason="non-finite loss")
                bar.update(1)
                window.clear()
                continue
            window.append(reduced[:len(keys) + 1])
            if not accelerator.sync_gradients:
                continue  # accumulating; the optimizer steps on the last micro-batch
            grad_norm = None
            if settings.clip_max_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), settings.clip_max_norm)
                # (fp16 is left to its gradient scaler, which skips inf steps by design.)
                if (grad_norm is not None and accelerator.mixed_precision != "fp16"
                        and not torch.isfinite(torch.as_tensor(grad_norm)).all()):
                    # Gradients are already all-reduced, so every process sees the same norm.
                    _skip_step(accelerator, optimizer, state, settings, epoch, targets, local,
                               keys, logger, reason="non-finite gradient norm")
                    bar.update(1)
                    window.clear()
                    continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            state.step += 1
            bar.update(1)
            state.nonfinite_streak = 0
            if settings.profiler is not None:
                settings.profiler.step_done()
            record: dict[str, Any] = {"step": state.step, "epoch": epoch}
            for i, g in enumerate(optimizer.param_groups):
                record[f"lr_{g.get('name', i)}"] = g["lr"]
            # one device->host copy for every logged term (not one per term)
            record.update(zip(["loss"] + keys, torch.stack(window).mean(0).tolist()))
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            record.update(settings.extra_log)
            window.clear()
            if logger is not None:
                logger.log_step(record)
            for k, v in record.items():
                if k.startswith("loss") or k == "grad_norm":
                    sums[k] = sums.get(k, 0.0) + v
            n_logged += 1
            if accelerator.is_main_process and state.step % settings.log_interval == 0:
                bar.set_postfix(loss=f"{record['loss']:.3f}")
            if (settings.checkpoint_every_steps and settings.on_checkpoint is not None
                    and state.step % settings.checkpoint_every_steps == 0):
                settings.on_checkpoint()
            if stop_after_step:
                state.deadline_reached = True
                break
    bar.close()
    if settings.profiler is not None:
        settings.profiler.finish()  # a profile cut short by the epoch's end covers the steps it saw
    if accelerator.is_main_process and state.step > epoch_start_step:
        # one line per epoch: the bar above is erased, and logs written to a file keep this
        rate = (state.step - epoch_start_step) / max(time.monotonic() - epoch_start, 1e-9)
        left = format_duration(max(total - state.step, 0) / rate)
        log.info("epoch %d: step %d of %d, %.2f steps/s, training time left about %s (evaluations not "
                 "counted)", epoch, state.step, total, rate, left)
    return {k: v / max(n_logged, 1) for k, v in sums.items()}


def planned_steps(settings: TrainSettings, state: TrainState, data_loader: Iterable,
                  accumulation_steps: int = 1) -> int:
    """The step count the progress bar runs to: the run's plan when known (`total_steps`, else
    `max_steps`), otherwise the end of this epoch."""
    if settings.total_steps:
        return settings.total_steps
    if settings.max_steps:
        return settings.max_steps
    try:
        batches = len(data_loader)  # type: ignore[arg-type]
    except TypeError:
        return 0
    # (a resumed epoch's loader already leaves out the batches consumed before the checkpoint)
    return state.step + batches // max(accumulation_steps, 1)


def _skip_step(accelerator: Any, optimizer: torch.optim.Optimizer, state: TrainState,
               settings: TrainSettings, epoch: int, targets: list[dict], local: torch.Tensor,
               keys: list[str], logger: Any | None, reason: str) -> None:
    """Drop this step's gradients (including accumulated micro-batches), log it, count it."""
    # accelerate's wrapper ignores zero_grad() between accumulation boundaries: go underneath.
    getattr(optimizer, "optimizer", optimizer).zero_grad(set_to_none=True)
    from accelerate.utils import gather_object

    local_bad = not bool(torch.isfinite(local).all())
    # Every process reaches here together, so this collective is safe.
    per_process = gather_object([{"rank": accelerator.process_index, "image_ids": _image_ids(targets),
                                  "nonfinite_here": local_bad,
                                  "bad_terms": [k for k, v in zip(["loss"] + keys, local)
                                                if not math.isfinite(float(v))]}])
    state.step += 1
    state.nonfinite_streak += 1
    state.skipped_steps += 1
    bad = [p for p in per_process if p["nonfinite_here"]] or per_process
    ids = sorted({i for p in bad for i in p["image_ids"]})
    terms = sorted({t for p in bad for t in p["bad_terms"]})
    log.warning("step %d (epoch %d) skipped: %s in %s on image ids %s (%d consecutive, limit %d)",
                state.step, epoch, reason, terms or "the total", ids, state.nonfinite_streak,
                settings.max_nonfinite_steps)
    if logger is not None:
        logger.log_step({"step": state.step, "epoch": epoch, "skipped": True, "reason": reason,
                         "image_ids": ids, "nonfinite_terms": terms})
    if state.nonfinite_streak >= settings.max_nonfinite_steps:
        raise NonFiniteLossError(
            f"{state.nonfinite_streak} consecutive steps had a {reason} (last on image ids {ids}, "
            f"terms {terms}); stopping. Lower optim.lr, check these images' annotations, or raise "
            "optim.max_nonfinite_steps.")


@dataclass
class EvalSample:
    """One validation image with its detections, for the detection pictures.
    `image` is (3, h, w) in [0, 1] (unpadded); boxes are xyxy pixels of that image."""

    image_id: int
    image: torch.Tensor
    boxes_xyxy: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor
    gt_boxes_xyxy: torch.Tensor


@torch.no_grad()
def predict(model: nn.Module, postprocessor: nn.Module, data_loader: Iterable, accelerator: Any,
            label_to_category_id: Any, max_dets: int, num_samples: int = 0,
            mean_std: tuple[tuple[float, ...], tuple[float, ...]] = ((0.485, 0.456, 0.406),
                                                                      (0.229, 0.224, 0.225)),
            ) -> tuple[dict[int, list[dict]], list[EvalSample]]:
    """Detections of this process only: ({image_id: COCO results capped at max_dets}, samples
    to draw). Images without detections are present with an empty list."""
    from datasets.coco_eval import cap_per_image, predictions_to_coco_results

    model.eval()
    per_image: dict[int, list[dict]] = {}
    samples: list[EvalSample] = []
    bar = tqdm(data_loader, desc="eval", disable=not accelerator.is_main_process,
               dynamic_ncols=True, leave=False)
    for images, masks, targets in bar:
        with accelerator.autocast():
            outputs = model(images, masks)
        orig_sizes = torch.stack([t["orig_size"] for t in targets]).to(images.device)
        dets = postprocessor(_to_float(outputs), orig_sizes)
        ids = _image_ids(targets)
        records, _ = cap_per_image(predictions_to_coco_results(dets, ids, label_to_category_id),
                                   max_dets)
        for image_id in ids:
            per_image[image_id] = []
        for rec in records:
            per_image[rec["image_id"]].append(rec)
        if len(samples) < num_samples:
            samples.extend(_samples(images, targets, dets, mean_std)[: num_samples - len(samples)])
    bar.close()
    return per_image, samples


def _to_float(outputs: Any) -> Any:
    """Post-process in float32 even under bf16/fp16 autocast (score ranking and box scaling)."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float(v) for v in outputs)
    return outputs


def _samples(images: torch.Tensor, targets: list[dict], dets: list[dict],
             mean_std: tuple) -> list[EvalSample]:
    mean = torch.tensor(mean_std[0]).view(3, 1, 1)
    std = torch.tensor(mean_std[1]).view(3, 1, 1)
    out = []
    for img, t, d in zip(images, targets, dets):
        h, w = (int(v) for v in t["size"])
        oh, ow = (int(v) for v in t["orig_size"])
        pixels = (img[:, :h, :w].float().cpu() * std + mean).clamp(0, 1)
        scale = torch.tensor([w / ow, h / oh, w / ow, h / oh], dtype=torch.float32)
        cx, cy, bw, bh = t["boxes"].float().cpu().unbind(-1)
        gt = torch.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w,
                          (cy + bh / 2) * h], -1) if len(t["boxes"]) else torch.zeros(0, 4)
        out.append(EvalSample(int(t["image_id"]), pixels, d["boxes"].float().cpu() * scale,
                              d["scores"].float().cpu(), d["labels"].cpu(), gt))
    return out


def evaluate(model: nn.Module, postprocessor: nn.Module, data_loader: Iterable, accelerator: Any,
             coco_gt: Any, label_to_category_id: Any, max_dets: int, backend: str = "pycocotools",
             num_samples: int = 0) -> tuple[dict[str, float] | None, list[dict], list[EvalSample]]:
    """COCO metrics at `max_dets` detections per image, every image scored exactly once.

    Returns (metrics on the main process / None elsewhere, merged results, samples to draw).
    `coco_gt` is the ground truth `datasets.coco_eval` evaluates against.
    """
    from accelerate.utils import gather_object

    from datasets.coco_eval import evaluate_detections, merge_predictions

    local, samples = predict(model, postprocessor, data_loader, accelerator, label_to_category_id,
                             max_dets, num_samples)
    # gather_object concatenates the per-process lists, so `parts` has one dict per process.
    parts = gather_object([local])
    # A sampler's padded repeat is predicted in a different batch (other padding), so tiny
    # numeric differences are expected: keep the first copy, every image counted once.
    merged = merge_predictions(parts, on_conflict="first")
    results = [rec for recs in merged.values() for rec in recs]
    metrics = None
    if accelerator.is_main_process:
        metrics = evaluate_detections(coco_gt, results, max_dets=max_dets, backend=backend)
        metrics["num_images_predicted"] = len(merged)
        if len(merged) != metrics["num_images"]:
            log.warning("evaluation predicted %d images but the ground truth has %d; images without "
                        "predictions count as misses", len(merged), metrics["num_images"])
    return metrics, results, samples

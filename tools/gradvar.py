"""Gradient-stability diagnostic of ugs_method.md section 11 (the paper's Sec. 4.6, Figs. 1-2).

Two training runs from the same initialisation and the same batches: the L1 baseline
(`ugs.ablation=l1`) and UGS (`--variant`, default `full`). UGS-DINO is the baseline DINO re-typed
in place (models/ugs_dino.py), so with the same seed every parameter except the box heads' last
layers is identical (checked and printed). At every iteration, in each run:

1. training forward, Hungarian matching (the criterion's own, `return_indices=True`);
2. the localisation loss of each matched object of the *final decoder layer*, weighted as the
   run trains it but without the batch normaliser num_boxes (the same for both runs, and it would
   only add batch-size noise): baseline `bbox_loss_coef * L1(box)` (sum over the 4 coordinates),
   UGS `ce_weight * CE` (mean over the 4 coordinates); `--include-giou` adds the GIoU term to both,
   `--include-um` adds UGS's entropy term;
3. its gradient with respect to the box head's input, the decoder's normalised hidden state of
   the matched query (captured with a forward hook on the decoder), L2 norm per object, averaged
   per size bucket (small < 32^2, medium < 96^2, large; input-image pixels) -> one number per
   bucket and iteration;
4. an optimisation step with the run's own total loss (the config's AdamW and clipping).

Across iterations it prints per bucket the mean, variance and coefficient of variation (std/mean,
scale-free: raw variances depend on the loss weights) of both runs and the baseline/UGS ratios,
and writes `gradvar.png` (per-iteration magnitude by bucket, baseline vs UGS: the view of the
paper's Fig. 2) and `gradvar.json` under `--out`.

    python tools/gradvar.py --config demo_synthetic --iters 100 --json --out outputs/gradvar

With `--json` the last line is a JSON object with `small_variance_ratio` and `small_cv_ratio`
(and the medium/large ones). `--warmup K` trains both runs K steps before recording (the box
heads' last layers start at zero in both runs, so the first iterations' gradients at the hidden
state are ~0 and grow; warm-up keeps that transient out of the statistics).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import ugs  # noqa: E402
from tools.target_stats import (BUCKETS, batch_to, image_sizes_hw, optimizer_step, size_bucket,  # noqa: E402
                                take, weighted_total)
from util.box_ops import box_cxcywh_to_xyxy, inverse_sigmoid, paired_generalized_box_iou  # noqa: E402


class HiddenStateCatcher:
    """Forward hook on the decoder: keeps the last layer's normalised hidden state (B, T, d)."""

    def __init__(self, decoder: torch.nn.Module) -> None:
        self.hidden: Tensor | None = None
        self.handle = decoder.register_forward_hook(self._hook)

    def _hook(self, _module: torch.nn.Module, _args: tuple, output: tuple) -> None:
        hs = output[0]
        self.hidden = hs[-1]

    def remove(self) -> None:
        self.handle.remove()


def per_object_loc_loss(matched, weight_dict: dict[str, float], grid: Tensor | None,  # noqa: ANN001
                        include_giou: bool = False, include_um: bool = False) -> Tensor:
    """(N,) localisation loss of each matched object of one output set (final layer's keys),
    weighted like training, not divided by num_boxes."""
    src, tgt = matched.src_boxes_cxcywh, matched.target_boxes_cxcywh
    loss = src.new_zeros(src.shape[0])
    w_l1 = weight_dict.get("loss_bbox", 0.0)
    if w_l1:
        loss = loss + w_l1 * (src - tgt).abs().sum(-1)
    w_ce, w_um = weight_dict.get("loss_box_ce", 0.0), weight_dict.get("loss_um", 0.0)
    if (w_ce or (include_um and w_um)) and grid is not None:
        logits = matched.gather("pred_box_logits")  # (N, 4, n+1)
        if w_ce:
            ref = matched.gather("ref_boxes_logit")  # (N, 4) detached reference, logit space
            y = inverse_sigmoid(tgt.to(ref.dtype)) - ref
            loss = loss + w_ce * ugs.ce_loss(logits, y, grid.to(logits.device)).mean(-1)
        if include_um and w_um:
            loss = loss + w_um * ugs.um_loss(logits).mean(-1)
    if include_giou:
        giou = paired_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
        loss = loss + weight_dict.get("loss_giou", 0.0) * (1 - giou)
    return loss


def bucket_grad_norms(model, criterion, images: Tensor, masks: Tensor, targets: list[dict],  # noqa: ANN001
                      include_giou: bool = False, include_um: bool = False
                      ) -> tuple[dict[str, Tensor], list[float]]:
    """One training forward: (losses, per-bucket mean gradient norm [small, medium, large], NaN
    where the batch has no matched object of that size). The losses keep their graph."""
    catcher = HiddenStateCatcher(model.transformer.decoder)
    try:
        outputs = model(images, masks, targets)
    finally:
        catcher.remove()
    hidden = catcher.hidden
    if hidden is None:
        raise RuntimeError("gradvar: the decoder hook saw no hidden state")
    losses, indices = criterion(outputs, targets, return_indices=True)
    nb = criterion.num_boxes(targets, images.device)
    matched = criterion.matched_pairs(outputs, targets, indices[""], nb, "")
    grid = getattr(model, "box_grid", None) if "pred_box_logits" in outputs else None
    loc = per_object_loc_loss(matched, criterion.weight_dict, grid, include_giou, include_um)
    result = [float("nan")] * len(BUCKETS)
    if loc.numel() and loc.requires_grad:
        (grad,) = torch.autograd.grad(loc.sum(), hidden, retain_graph=True, allow_unused=True)
        pad = outputs["dn_meta"]["pad_size"] if outputs.get("dn_meta") else 0
        if grad is None:
            grad = torch.zeros_like(hidden)
        norms = grad[matched.batch_idx, matched.query_idx + pad].double().norm(dim=-1).cpu()  # (N,)
        sizes = image_sizes_hw(targets, images)
        hw = torch.stack([sizes[int(b)] for b in matched.batch_idx.cpu()])
        buckets = size_bucket(matched.target_boxes_cxcywh.detach().double().cpu(), hw)
        for k in range(len(BUCKETS)):
            sel = norms[buckets == k]
            if sel.numel():
                result[k] = float(sel.mean())
    return losses, result


DETREND_WINDOW = 9  # iterations in the centred moving average of the detrended oscillation


def detrended_oscillation(v: Tensor, window: int = DETREND_WINDOW) -> float:
    """Std of log(g_t) minus its centred moving average (symmetric, shrunk at the ends): the
    iteration-to-iteration relative fluctuation with the slow trend removed. Scale-free, like the
    CV, but not inflated by the steady growth of the gradient while the zero-initialised last
    layers of the box heads grow. NaN with fewer than 3 positive values."""
    v = v[v > 0]
    if v.numel() < 3:
        return float("nan")
    logs = v.log()
    half = window // 2
    n = len(logs)
    # symmetric windows, shrunk near the ends, so a linear trend in log g is removed exactly
    trend = torch.stack([logs[i - h:i + h + 1].mean() for i in range(n) for h in [min(half, i, n - 1 - i)]])
    return float((logs - trend).std(unbiased=True))


def series_stats(values: list[float]) -> dict:
    """mean, variance (ddof 1), std, coefficient of variation and detrended oscillation over the
    finite values (in iteration order)."""
    v = torch.tensor([x for x in values if math.isfinite(x)], dtype=torch.float64)
    if v.numel() < 2:
        return {"n": int(v.numel()), "mean": float("nan"), "variance": float("nan"), "std": float("nan"),
                "cv": float("nan"), "detrended_osc": float("nan")}
    mean, var = float(v.mean()), float(v.var(unbiased=True))
    return {"n": int(v.numel()), "mean": mean, "variance": var, "std": math.sqrt(var),
            "cv": math.sqrt(var) / mean if mean > 0 else float("nan"), "detrended_osc": detrended_oscillation(v)}


def _ratio(a: float, b: float) -> float:
    return a / b if (math.isfinite(a) and math.isfinite(b) and b > 0) else float("nan")


def make_configs(config: str, overrides: list[str], variant: str):  # noqa: ANN201 - (Config, Config)
    """(baseline config, UGS config) from the same named config and overrides."""
    from configs import load_config

    base = load_config(config, list(overrides) + ["ugs.ablation=l1"])
    cfg = load_config(config, list(overrides) + [f"ugs.ablation={variant}"])  # sets every field of the row
    cfg.ugs.check()
    if not cfg.ugs.enabled:
        raise ValueError(f"--variant {variant}: UGS is not enabled by this row")
    return base, cfg


def build_pair(base_cfg, ugs_cfg, seed: int):  # noqa: ANN001, ANN201
    """Both (model, criterion) from the same seed; returns them and the names of differing tensors."""
    from models import build_model

    torch.manual_seed(seed)
    base_model, base_crit, _ = build_model(base_cfg)
    torch.manual_seed(seed)
    ugs_model, ugs_crit, _ = build_model(ugs_cfg)
    sd_b, sd_u = base_model.state_dict(), ugs_model.state_dict()
    differ = sorted(k for k in sd_u if k not in sd_b or sd_b[k].shape != sd_u[k].shape
                    or not torch.equal(sd_b[k], sd_u[k]))
    return (base_model, base_crit), (ugs_model, ugs_crit), differ


def run(config: str, overrides: list[str], iters: int, variant: str = "full", warmup: int = 0, seed: int = 0,
        include_giou: bool = False, include_um: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """Both runs; returns per-iteration series, per-bucket stats and ratios."""
    from tqdm import tqdm

    from datasets import build_dataloader, build_dataset
    from util.optim import build_optimizer

    base_cfg, ugs_cfg = make_configs(config, overrides, variant)
    (bm, bc), (um, uc), differ = build_pair(base_cfg, ugs_cfg, seed)
    dev = torch.device(device)
    torch.manual_seed(seed)
    dataset = build_dataset(base_cfg.data, "train")
    loader = build_dataloader(base_cfg.data, dataset, base_cfg.optim.batch_size, train=True, seed=seed)
    batches = []
    while len(batches) < warmup + iters:  # the same batches, in the same order, for both runs
        batches += take(loader, warmup + iters - len(batches))
    series: dict[str, dict[str, list[float]]] = {}
    timing = {}
    for name, model, crit, cfg in (("baseline", bm, bc, base_cfg), ("ugs", um, uc, ugs_cfg)):
        model.to(dev).train()
        crit.to(dev).train()
        optimizer = build_optimizer(model, cfg.optim)
        rec = {b: [] for b in BUCKETS}
        start = time.perf_counter()
        for i, (images, masks, targets) in enumerate(tqdm(batches, desc=name, disable=not progress,
                                                          mininterval=5)):
            torch.manual_seed(seed * 100_003 + i)  # the same denoising noise in both runs
            images, masks, targets = batch_to(images, masks, targets, dev)
            losses, norms = bucket_grad_norms(model, crit, images, masks, targets, include_giou, include_um)
            total = weighted_total(losses, crit.weight_dict)
            if not torch.isfinite(total):
                raise RuntimeError(f"gradvar: non-finite {name} loss at iteration {i}")
            optimizer_step(model, optimizer, total, cfg.optim.clip_max_norm)
            if i >= warmup:
                for b, v in zip(BUCKETS, norms):
                    rec[b].append(v)
        timing[name] = time.perf_counter() - start
        series[name] = rec
    stats = {run_: {b: series_stats(series[run_][b]) for b in BUCKETS} for run_ in series}
    ratios = {}
    for b in BUCKETS:
        ratios[f"{b}_variance_ratio"] = _ratio(stats["baseline"][b]["variance"], stats["ugs"][b]["variance"])
        ratios[f"{b}_cv_ratio"] = _ratio(stats["baseline"][b]["cv"], stats["ugs"][b]["cv"])
        ratios[f"{b}_mean_ratio"] = _ratio(stats["baseline"][b]["mean"], stats["ugs"][b]["mean"])
        ratios[f"{b}_detrended_osc_ratio"] = _ratio(stats["baseline"][b]["detrended_osc"],
                                                    stats["ugs"][b]["detrended_osc"])
    return {"config": config, "overrides": list(overrides), "variant": variant, "iters": iters, "warmup": warmup,
            "seed": seed, "include_giou": include_giou, "include_um": include_um,
            "differing_init_tensors": differ, "seconds": timing, **ratios, "stats": stats, "series": series}


def plot(result: dict, path: Path) -> Path:
    """Fig. 2's view: per-iteration gradient magnitude by bucket (top) and relative to its mean
    (bottom, the scale-free oscillation the CV measures), baseline vs UGS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(BUCKETS), figsize=(4.2 * len(BUCKETS), 6.4), squeeze=False)
    colors = {"baseline": "tab:red", "ugs": "tab:blue"}
    labels = {"baseline": "L1 baseline", "ugs": f"UGS ({result['variant']})"}
    for j, b in enumerate(BUCKETS):
        for run_ in ("baseline", "ugs"):
            vals = result["series"][run_][b]
            # log axis: iterations without an object of this size (NaN) or with a zero gradient
            # (the zero-initialised last layer at step 0) are left out of the line
            x = [result["warmup"] + i for i, v in enumerate(vals) if math.isfinite(v) and v > 0]
            y = [v for v in vals if math.isfinite(v) and v > 0]
            st = result["stats"][run_][b]
            if not y:
                continue
            axes[0][j].plot(x, y, color=colors[run_], lw=1.2, label=f"{labels[run_]} (CV {st['cv']:.2f})")
            if st["mean"] and math.isfinite(st["mean"]):
                axes[1][j].plot(x, [v / st["mean"] for v in y], color=colors[run_], lw=1.2, label=labels[run_])
        if not axes[0][j].lines:
            for ax in (axes[0][j], axes[1][j]):
                ax.text(0.5, 0.5, f"no matched {b} objects", ha="center", va="center", transform=ax.transAxes)
        ratio = result[f"{b}_variance_ratio"], result[f"{b}_cv_ratio"], result[f"{b}_detrended_osc_ratio"]
        axes[0][j].set_title(f"{b}: baseline/UGS var {ratio[0]:.2f}, CV {ratio[1]:.2f}, detr. osc. {ratio[2]:.2f}",
                             fontsize=9)
        if axes[0][j].lines:
            axes[0][j].set_yscale("log")
        axes[0][j].set_ylabel("mean ||dL_loc / dh|| per object")
        axes[1][j].set_ylabel("relative to the run's mean")
        axes[1][j].set_xlabel("iteration")
        axes[1][j].axhline(1.0, color="gray", lw=0.6)
        for ax in (axes[0][j], axes[1][j]):
            ax.grid(alpha=0.3)
            if any(not line.get_label().startswith("_") for line in ax.lines):
                ax.legend(fontsize=8)
    fig.suptitle(f"Localisation-loss gradient at the box head's input, {result['config']} "
                 f"({result['iters']} iterations after {result['warmup']} warm-up)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def report_text(result: dict) -> str:
    lines = [f"gradvar: {result['config']} {' '.join(result['overrides'])}, variant {result['variant']}, "
             f"{result['iters']} iterations after {result['warmup']} warm-up, seed {result['seed']}",
             f"tensors that differ at init: {result['differing_init_tensors']}",
             "", "| bucket | run | n | mean | variance | CV | detrended osc. |", "|---|---|---|---|---|---|---|"]
    for b in BUCKETS:
        for run_ in ("baseline", "ugs"):
            s = result["stats"][run_][b]
            lines.append(f"| {b} | {run_} | {s['n']} | {s['mean']:.4g} | {s['variance']:.4g} | {s['cv']:.3f} | "
                         f"{s['detrended_osc']:.3f} |")
    lines += ["", "| bucket | variance ratio (baseline/UGS) | CV ratio | detrended osc. ratio | mean ratio |",
              "|---|---|---|---|---|"]
    for b in BUCKETS:
        lines.append(f"| {b} | {result[f'{b}_variance_ratio']:.3f} | {result[f'{b}_cv_ratio']:.3f} | "
                     f"{result[f'{b}_detrended_osc_ratio']:.3f} | {result[f'{b}_mean_ratio']:.3f} |")
    lines.append(f"(paper: small-object variance 2.5-2.9x lower with UGS); time {result['seconds']}")
    return "\n".join(lines)


def _json_safe(obj):  # noqa: ANN001, ANN202
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--opt", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for both runs")
    ap.add_argument("--iters", type=int, default=100, help="recorded iterations (each also an optimiser step)")
    ap.add_argument("--warmup", type=int, default=0, help="training steps before recording")
    ap.add_argument("--variant", default="full", choices=["ce_uniform", "ce_in", "ce_in_um", "full"],
                    help="UGS ablation row of the UGS run")
    ap.add_argument("--include-giou", action="store_true", help="add the GIoU term to both localisation losses")
    ap.add_argument("--include-um", action="store_true", help="add UGS's UM term to its localisation loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("outputs/gradvar"), help="folder for gradvar.png/.json")
    ap.add_argument("--json", action="store_true", help="last line: a JSON object with the ratios and stats")
    args = ap.parse_args(argv)
    if args.iters < 2 or args.warmup < 0:
        ap.error("--iters must be >= 2 and --warmup >= 0")
    result = run(args.config, args.opt, args.iters, args.variant, args.warmup, args.seed, args.include_giou,
                 args.include_um, args.device)
    png = plot(result, args.out / "gradvar.png")
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "gradvar.json.tmp"
    tmp.write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    os.replace(tmp, args.out / "gradvar.json")
    print(report_text(result))
    print(f"wrote {png} and {args.out / 'gradvar.json'}", flush=True)
    if args.json:
        summary = {k: v for k, v in result.items() if k != "series"}
        summary["png"] = str(png)
        print(json.dumps(_json_safe(summary)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

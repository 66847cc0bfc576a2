"""Distribution of DINO's logit-space box-regression targets, to choose the UGS grid range R.

For every query matched to a ground-truth box t, the box head that refined reference r must
predict y_c = inverse_sigmoid(t_c) - inverse_sigmoid(r_c) per coordinate (docs/ugs.md,
the same clamped logit, eps 1e-3); UGS clamps y into [-R, R], so R should cover
nearly all of these. This tool runs a model (random init, `--checkpoint`, or `--train-steps` of
training first) on the config's training pipeline, matches like the criterion does, and prints
percentiles of y per output set (each decoder layer, the encoder proposals, the denoising
positives), per coordinate group (xy = centre, wh = size) and per object size (small < 32^2,
medium < 96^2, large, in input-image pixels), with the fraction outside [-R, R] for the
configured R (`ugs.grid.range`; `ugs.grid.interm_range` for the proposals).

    python tools/target_stats.py --config demo_synthetic --batches 8
    python tools/target_stats.py --config demo_synthetic --batches 8 --train-steps 300   # trained
    python tools/target_stats.py --config dino_5scale_r50_visdrone_ugs --checkpoint ckpt.pth \\
        --opt data.train_images=... data.train_annotations=... --batches 50 --json

The last line with `--json` is a JSON object with every record. Works for DINO (L1) and
UGS-DINO models alike (the references are the same; UGS outputs carry them, for DINO they are
read from the decoder's returned references).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from util.box_ops import inverse_sigmoid  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402

SMALL_AREA, MEDIUM_AREA = 32 ** 2, 96 ** 2  # COCO size buckets, input-image pixels
BUCKETS = ("small", "medium", "large")
PERCENTILES = (1, 5, 25, 50, 75, 95, 99, 99.9)
COORD_GROUPS = {"xy": [0, 1], "wh": [2, 3], "all": [0, 1, 2, 3]}


def size_bucket(boxes_cxcywh: Tensor, sizes_hw: Tensor) -> Tensor:
    """(N, 4) normalised boxes and (N, 2) image (h, w) -> (N,) int64: 0 small, 1 medium, 2 large.

    Area in pixels of the (augmented, unpadded) input image, COCO's thresholds 32^2 and 96^2.
    """
    area = boxes_cxcywh[:, 2] * boxes_cxcywh[:, 3] * sizes_hw[:, 0] * sizes_hw[:, 1]
    return (area >= SMALL_AREA).long() + (area >= MEDIUM_AREA).long()


def image_sizes_hw(targets: list[dict], images: Tensor) -> list[Tensor]:
    """Per image (h, w) float of the unpadded input image (target `size`, else the batch size)."""
    out = []
    for t in targets:
        if "size" in t:
            out.append(t["size"].to(torch.float64).cpu())
        else:
            out.append(torch.tensor(images.shape[-2:], dtype=torch.float64))
    return out


def _layer_references(model: torch.nn.Module, images: Tensor, masks: Tensor, targets: list[dict]
                      ) -> tuple[dict, dict[str, Tensor]]:
    """Forward (training mode, no grad) -> (outputs, {suffix: reference logits (B, T, 4)}).

    UGS-DINO emits `ref_boxes_logit` in every set; for DINO the decoder's references are read
    through the model's `intermediates` hook (references[i] is what layer i's head refines).
    """
    inter: dict = {}
    outputs = model(images, masks, targets, intermediates=inter)
    refs: dict[str, Tensor] = {}
    aux = outputs.get("aux_outputs") or []
    num_layers = len(aux) + 1
    layer_sets = [(f"_{i}", a) for i, a in enumerate(aux)] + [("", outputs)]
    dn_meta = outputs.get("dn_meta")
    known = dn_meta.get("output_known_lbs_bboxes") if dn_meta else None
    dn_sets = ([(f"_dn_{i}", a) for i, a in enumerate(known.get("aux_outputs") or [])] + [("_dn", known)]
               if known is not None and dn_meta["pad_size"] > 0 else [])
    if "ref_boxes_logit" in outputs:
        for s, o in layer_sets + dn_sets + [("_interm", outputs["interm_outputs"])]:
            refs[s] = o["ref_boxes_logit"]
        return outputs, refs
    tr = inter.get("transformer")
    if tr is None:
        raise RuntimeError("target_stats: the model returned no `ref_boxes_logit` and filled no "
                           "`intermediates['transformer']`; cannot recover the reference boxes")
    pad = dn_meta["pad_size"] if dn_sets else 0
    references = tr["references"]  # (L + 1) x (B, pad + Q, 4)
    for i, (s, _) in enumerate(layer_sets):
        refs[s] = inverse_sigmoid(references[i][:, pad:].float())
    for i, (s, _) in enumerate(dn_sets):
        refs[s] = inverse_sigmoid(references[i][:, :pad].float())
    refs["_interm"] = inverse_sigmoid(tr["init_box_proposal"].float())
    assert len(layer_sets) == num_layers
    return outputs, refs


def set_name(suffix: str, num_layers: int) -> str:
    """Criterion suffix -> readable set name ("dec0".."dec{L-1}", "interm", "dn")."""
    if suffix == "":
        return f"dec{num_layers - 1}"
    if suffix == "_interm":
        return "interm"
    if suffix.startswith("_dn"):
        return "dn"  # denoising positives pooled over decoder layers
    return f"dec{int(suffix[1:])}"


@torch.no_grad()
def collect_targets(model: torch.nn.Module, criterion: torch.nn.Module, batches: Iterable,
                    device: torch.device) -> dict[str, dict[str, Tensor]]:
    """Run the model on `batches` of (images, masks, targets) and gather y per output set.

    Returns {set name: {"y": (N, 4) float64 logit-space targets, "bucket": (N,) int64}}.
    Training mode (denoising queries and matching as in training); no gradients.
    """
    model.train()
    criterion.train()
    acc: dict[str, dict[str, list[Tensor]]] = {}
    for images, masks, targets in batches:
        images, masks, targets = batch_to(images, masks, targets, device)
        outputs, refs = _layer_references(model, images, masks, targets)
        _, indices = criterion(outputs, targets, return_indices=True)
        num_layers = len(outputs.get("aux_outputs") or []) + 1
        sizes = image_sizes_hw(targets, images)
        for suffix, idx in indices.items():
            if suffix not in refs:
                continue
            b = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(idx)])
            q = torch.cat([src for src, _ in idx])
            if b.numel() == 0:
                continue
            tgt = torch.cat([t["boxes"][j.to(t["boxes"].device)].cpu() for t, (_, j) in zip(targets, idx)])
            ref = refs[suffix].cpu()[b, q].double()
            y = inverse_sigmoid(tgt.double()) - ref
            hw = torch.stack([sizes[int(i)] for i in b])
            entry = acc.setdefault(set_name(suffix, num_layers), {"y": [], "bucket": []})
            entry["y"].append(y)
            entry["bucket"].append(size_bucket(tgt.double(), hw))
    return {k: {"y": torch.cat(v["y"]), "bucket": torch.cat(v["bucket"])} for k, v in acc.items()}


def summarize(values: Tensor, r: float) -> dict:
    """Percentiles of signed y, max |y| and the fraction outside [-R, R] of a 1-D float64 tensor."""
    if values.numel() == 0:
        return {"n": 0}
    q = torch.quantile(values, torch.tensor([p / 100 for p in PERCENTILES], dtype=values.dtype))
    absv = values.abs()
    return {"n": int(values.numel()), **{f"p{p:g}": float(v) for p, v in zip(PERCENTILES, q)},
            "abs_p99": float(torch.quantile(absv, 0.99)), "abs_p99.9": float(torch.quantile(absv, 0.999)),
            "max_abs": float(absv.max()), "R": r, "frac_outside_R": float((absv > r).double().mean())}


def _set_order(name: str) -> tuple:
    return (0, int(name[3:])) if name.startswith("dec") else ((1, 0) if name == "interm" else (2, 0))


def build_records(collected: dict[str, dict[str, Tensor]], r_decoder: float, r_interm: float) -> list[dict]:
    """One record per (set, coordinate group, size bucket or "all"); decoder layers also pooled."""
    sets = dict(sorted(collected.items(), key=lambda kv: _set_order(kv[0])))
    dec = [v for k, v in sets.items() if k.startswith("dec")]
    if dec:
        sets["dec_all"] = {"y": torch.cat([v["y"] for v in dec]), "bucket": torch.cat([v["bucket"] for v in dec])}
    records = []
    for name, data in sets.items():
        r = r_interm if name == "interm" else r_decoder
        for group, cols in COORD_GROUPS.items():
            for b, bucket in [(None, "all")] + list(enumerate(BUCKETS)):
                sel = data["y"] if b is None else data["y"][data["bucket"] == b]
                records.append({"set": name, "coords": group, "size": bucket,
                                **summarize(sel[:, cols].flatten(), r)})
    return records


def suggest_range(records: list[dict], set_name_: str, max_outside: float = 0.01,
                  candidates: tuple[float, ...] = (2, 2.5, 3, 3.5, 4, 5, 6, 7, 8)) -> float | None:
    """Smallest candidate R with at most `max_outside` of the set's targets (all coordinates)
    outside [-R, R] (from the record's percentiles of |y|: p99 for 1%, p99.9 for 0.1%)."""
    rec = next((r for r in records if r["set"] == set_name_ and r["coords"] == "all" and r["size"] == "all"
                and r["n"] > 0), None)
    if rec is None:
        return None
    key = "abs_p99.9" if max_outside <= 0.001 else "abs_p99"
    return next((c for c in candidates if c >= rec[key]), None)


def format_table(records: list[dict], sizes: tuple[str, ...] = ("all",), sets: tuple[str, ...] | None = None
                 ) -> str:
    """Markdown table of the records with `size` in `sizes` (and `set` in `sets` when given)."""
    head = ["set", "coords", "size", "n"] + [f"p{p:g}" for p in PERCENTILES] + ["max abs", "R", "out of [-R,R]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        if r["size"] not in sizes or (sets is not None and r["set"] not in sets) or r["n"] == 0:
            continue
        cells = [r["set"], r["coords"], r["size"], str(r["n"])] + [f"{r[f'p{p:g}']:+.2f}" for p in PERCENTILES]
        cells += [f"{r['max_abs']:.2f}", f"{r['R']:g}", f"{100 * r['frac_outside_R']:.2f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_to(images: Tensor, masks: Tensor, targets: list[dict], device: torch.device
             ) -> tuple[Tensor, Tensor, list[dict]]:
    """A collated batch on `device` (the targets' tensors moved, their other values kept)."""
    targets = [{k: v.to(device) if isinstance(v, Tensor) else v for k, v in t.items()} for t in targets]
    return images.to(device), masks.to(device), targets


def weighted_total(loss_dict: dict[str, Tensor], weight_dict: dict[str, float]) -> Tensor:
    """sum(loss[k] * w[k]) over the losses with a non-zero weight (a zero-weighted diagnostic term
    cannot make the total non-finite)."""
    return sum(loss_dict[k] * w for k, w in weight_dict.items() if k in loss_dict and w)


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, total: Tensor,
                   clip_max_norm: float) -> None:
    """zero_grad -> backward -> clip the gradient norm when clip_max_norm > 0 -> step."""
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if clip_max_norm > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
    optimizer.step()


def train_steps(model, criterion, cfg, loader, steps: int, device: torch.device) -> list[float]:  # noqa: ANN001
    """A short training run (AdamW of the config, clipping, the model's own weighted loss) so the
    targets can be measured on a model that has started to fit. Returns the loss per step."""
    from tqdm import tqdm

    from models.build import build_optimizer

    optimizer = build_optimizer(model, cfg.optim)
    model.train()
    criterion.train()
    losses: list[float] = []
    it = iter(loader)
    for _ in tqdm(range(steps), desc="train", disable=steps == 0, mininterval=5):
        try:
            images, masks, targets = next(it)
        except StopIteration:
            it = iter(loader)
            images, masks, targets = next(it)
        images, masks, targets = batch_to(images, masks, targets, device)
        out = model(images, masks, targets)
        loss_dict = criterion(out, targets)
        total = weighted_total(loss_dict, criterion.weight_dict)
        if not torch.isfinite(total):
            raise RuntimeError(f"target_stats: non-finite training loss at step {len(losses)}")
        optimizer_step(model, optimizer, total, cfg.optim.clip_max_norm)
        losses.append(float(total))
    return losses


def take(loader, n: int) -> list:  # noqa: ANN001
    """The first n batches of a loader (fewer if it is shorter)."""
    out = []
    for batch in loader:
        if len(out) >= n:
            break
        out.append(batch)
    return out


def run(config: str, overrides: list[str], batches: int, checkpoint: Path | None = None, train_steps_: int = 0,
        seed: int = 0, device: str = "cpu") -> dict:
    """Build model + data from the config, optionally load or train, and measure. Returns the
    result dict (records, suggestions, settings)."""
    from configs import load_config
    from datasets import build_dataloader, build_dataset
    from models import build_model

    cfg = load_config(config, overrides)
    _seed_all(seed)
    dev = torch.device(device)
    model, criterion, _ = build_model(cfg)
    if checkpoint is not None:
        from util.checkpoint import extract_state_dict, import_weights, load_checkpoint

        report = import_weights(model, extract_state_dict(load_checkpoint(checkpoint)))
        print(report, flush=True)
    model.to(dev)
    criterion.to(dev)
    dataset = build_dataset(cfg.data, "train")
    loader = build_dataloader(cfg.data, dataset, cfg.optim.batch_size, train=True, seed=seed)
    train_losses = train_steps(model, criterion, cfg, loader, train_steps_, dev) if train_steps_ else []
    _seed_all(seed + 1)
    measured = take(loader, batches)
    collected = collect_targets(model, criterion, measured, dev)
    r_dec = cfg.ugs.grid_range(interm=False)
    r_int = cfg.ugs.grid_range(interm=True)
    records = build_records(collected, r_dec, r_int)
    return {"config": config, "overrides": overrides, "batches": len(measured), "train_steps": train_steps_,
            "checkpoint": None if checkpoint is None else str(checkpoint), "seed": seed,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "ugs_enabled": cfg.ugs.enabled, "R": r_dec, "interm_R": r_int,
            "train_loss_first_last": [train_losses[0], train_losses[-1]] if train_losses else None,
            "suggested_R": {"decoder_1pct": suggest_range(records, "dec_all", 0.01),
                            "decoder_0.1pct": suggest_range(records, "dec_all", 0.001),
                            "interm_1pct": suggest_range(records, "interm", 0.01),
                            "interm_0.1pct": suggest_range(records, "interm", 0.001),
                            "dn_1pct": suggest_range(records, "dn", 0.01)},
            "records": records}


def report_text(result: dict) -> str:
    recs = result["records"]
    parts = [f"targets y = logit(t) - logit(r): config {result['config']} {' '.join(result['overrides'])}, "
             f"{result['batches']} batches, train steps {result['train_steps']}, "
             f"checkpoint {result['checkpoint']}, {result['date']}",
             "", "By output set (all sizes):", format_table(recs, ("all",)),
             "", "By object size (decoder layers pooled, encoder proposals, denoising):",
             format_table(recs, BUCKETS, ("dec_all", "interm", "dn")),
             "", "suggested R (smallest of 2..8 covering 99% / 99.9% of |y|): " + json.dumps(result["suggested_R"])]
    return "\n".join(parts)


@entry_point
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="named config or .py/.json path")
    ap.add_argument("--opt", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                    help="config overrides")
    ap.add_argument("--batches", type=int, default=8, help="training batches to measure")
    ap.add_argument("--checkpoint", type=Path, help="model weights (official layout or ours)")
    ap.add_argument("--train-steps", type=int, default=0,
                    help="train this many steps (the config's optimiser and loss) before measuring")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="print every record as a JSON object on the last line")
    add_debug_option(ap)
    args = ap.parse_args(argv)
    if args.batches < 1 or args.train_steps < 0:
        ap.error("--batches must be >= 1 and --train-steps >= 0")
    result = run(args.config, args.opt, args.batches, args.checkpoint, args.train_steps, args.seed, args.device)
    print(report_text(result), flush=True)
    if not any(r["n"] for r in result["records"]):
        print("warning: no matched targets (empty images?)", file=sys.stderr)
    if args.json:
        from util.logging import json_safe  # NaN -> null (json.dumps' default= never sees floats)

        print(json.dumps(json_safe(result), allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The official DINO-5scale R50 training step against ours, same GPU, same weights, same batch.

    python tools/benchmark_official.py --official DINO_DIR --msda-original OP_DIR --out OUT
    python tools/benchmark_official.py --official DINO_DIR --dry-run --out OUT   # CPU, tiny, no timing value

DINO_DIR is a copy of the official model code (IDEA-Research/DINO: its `models/`, `util/` and
`args_dino_5scale_r50.json`, the argument namespace of config/DINO/DINO_5scale.py as a JSON dict);
OP_DIR holds its compiled op, the module `MultiScaleDeformableAttention`. Neither is part of this
repository. The official packages are named `models` and `util` like ours, so each side runs in its
own process (this script with --side), and they exchange tensors through files in OUT/work:

1. the official process builds its model (seeded), saves the state dict, and runs an eval forward
   in float32 (TF32 off) and in float64 on the batch;
2. our process builds ours from the same arguments (configs.from_official_args), imports that state
   dict through util.checkpoint.import_weights (as tools/import_official.py does), runs the same
   eval forwards and compares (`agreement`: the float32 encoder proposals as a set, the final
   outputs by query in float64); the table says whether they agree;
3. each side then times its own training step: forward with denoising queries, criterion, backward,
   gradient clipping at 0.1, AdamW step, and one read of the loss (both training loops read it
   every step). Precisions: float32 (PyTorch's default TF32 settings on both sides) and each side's
   fastest: the official `--amp` (float16 autocast with GradScaler, its op in float32), ours bfloat16
   autocast. Warm-up steps first, then --repeats rounds of --steps steps; peak memory of one step.

Batch: 2 images of --size (default 800x1333), 20-100 boxes each (seeded), small objects.
Results: OUT/official_vs_ours.md (table: ms per step, images/s, peak memory, ratios with the spread
over the rounds, the targets) and OUT/official_vs_ours.json.

--dry-run runs everything on the CPU at a tiny size (100 queries) with the official op replaced by
the official code's own pure-PyTorch function (ms_deform_attn_core_pytorch) and its moves to the
GPU made no-ops:
it checks that the script works end to end, and its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_profiling():  # noqa: ANN202
    """util/profiling.py (torch only) loaded by path under its own name: the official side's
    process imports the official `util` package, which ours would shadow."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("dino_ugs_profiling", ROOT / "util" / "profiling.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


profiling = _load_profiling()
ARGS_FILE = "args_dino_5scale_r50.json"
TARGET_IMAGES_PER_S = {"fp32": 1.3, "best": 1.5}  # ours / official
AGREE_ATOL = 1e-3  # float32 eval outputs (logits and normalised boxes) after 6 + 6 layers
# float64 eval outputs: the official code computes its sine position embeddings in float32 even in a
# float64 model (cumsum with dtype=float32), so the sides agree to that rounding (~1e-7), not to 1e-12
AGREE_ATOL_FLOAT64 = 1e-5
PRECISION_LABEL = {"official": {"fp32": "float32", "best": "float16 autocast + GradScaler (--amp), op in float32"},
                   "ours": {"fp32": "float32", "best": "bfloat16 autocast"}}


# ---- the batch --------------------------------------------------------------------------------------
def make_batch(height: int, width: int, min_boxes: int, max_boxes: int, seed: int = 0) -> dict:
    """Two normalised random images and their targets: small boxes (sides 1-10% of the image)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, height, width, generator=gen)
    targets = []
    for _ in range(2):
        n = int(torch.randint(min_boxes, max_boxes + 1, (1,), generator=gen))
        centers = torch.rand(n, 2, generator=gen) * 0.8 + 0.1
        sizes = torch.rand(n, 2, generator=gen) * 0.09 + 0.01
        targets.append({"labels": torch.randint(1, 91, (n,), generator=gen),
                        "boxes": torch.cat([centers, sizes], 1)})
    return {"images": images, "targets": targets}


def load_batch(work: Path, device: torch.device) -> tuple[torch.Tensor, list[dict]]:
    batch = torch.load(work / "batch.pt", weights_only=True)
    targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
    return batch["images"].to(device), targets


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, warmup: int, steps: int, repeats: int) -> dict:
    """ms per step of each round (median-free: a round's total over its steps) and peak memory."""
    for _ in range(warmup):
        step()
    sync(device)
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    rounds = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rounds.append((time.perf_counter() - start) / steps * 1000)
    return {"step_ms": rounds, "peak_mib": peak}


def official_args(opts: argparse.Namespace) -> dict:
    """The official argument namespace both sides build from; a dry run selects 100 queries, so
    that its tiny images have enough proposals for the two-stage top-k."""
    args = json.loads((Path(opts.official) / ARGS_FILE).read_text())
    if opts.dry_run:
        args["num_queries"] = 100
    return args


# ---- the official side ------------------------------------------------------------------------------
def _official_imports(official: Path, msda_original: Path | None, dry_run: bool):  # noqa: ANN202
    """Import the official builder with its op, or, in a dry run, with its pure-PyTorch function."""
    if str(ROOT) in sys.path:  # our packages `models` / `util` would shadow the official ones
        sys.path.remove(str(ROOT))
    sys.path.insert(0, str(official))
    if dry_run:
        import types

        stub = types.ModuleType("MultiScaleDeformableAttention")  # DRY RUN: the CUDA op is not loaded
        sys.modules["MultiScaleDeformableAttention"] = stub
        # DRY RUN: the official code moves tensors with .cuda() / .to('cuda') directly
        tensor_to = torch.Tensor.to

        def to_cpu(self, *args, **kwargs):  # noqa: ANN001, ANN202
            args = tuple("cpu" if str(a).startswith("cuda") else a for a in args)
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return tensor_to(self, *args, **kwargs)

        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.Tensor.to = to_cpu
        from models.dino.ops.functions import ms_deform_attn_func as func

        def pytorch_op(value, shapes, starts, locations, weights, im2col_step):  # noqa: ANN001, ANN202
            return func.ms_deform_attn_core_pytorch(value, shapes, locations, weights)

        func.MSDeformAttnFunction.apply = staticmethod(pytorch_op)
    elif msda_original is not None:
        sys.path.insert(1, str(msda_original))
    from models.dino.dino import build_dino
    from util.get_param_dicts import get_param_dict
    from util.misc import nested_tensor_from_tensor_list
    return build_dino, get_param_dict, nested_tensor_from_tensor_list


def run_official(opts: argparse.Namespace, device: torch.device) -> dict:
    build_dino, get_param_dict, nested = _official_imports(Path(opts.official), opts.msda_original and
                                                           Path(opts.msda_original), opts.dry_run)
    work = Path(opts.work)
    args = argparse.Namespace(**official_args(opts))
    args.device = device.type
    torch.manual_seed(args.seed)
    model, criterion, _post = build_dino(args)
    model.to(device)
    criterion.to(device)
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, work / "official_state.pt")
    images, targets = load_batch(work, device)
    samples = nested([img for img in images])

    torch.save(eval_outputs(lambda dtype: model(nested([img.to(dtype) for img in images])), model),
               work / "official_eval.pt")

    optimizer = torch.optim.AdamW(get_param_dict(args, model), lr=args.lr, weight_decay=args.weight_decay)
    weight_dict = criterion.weight_dict
    results = {}
    for precision in opts.precisions:
        amp = precision == "best"
        scaler = torch.amp.GradScaler(device.type, enabled=amp)

        def step() -> None:  # the official engine.train_one_epoch, one iteration
            model.train()
            criterion.train()
            with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
                outputs = model(samples, targets)
                loss_dict = criterion(outputs, targets)
                losses = sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)
            optimizer.zero_grad()
            scaler.scale(losses).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_max_norm)
            scaler.step(optimizer)
            scaler.update()
            losses.item()

        results[precision] = _timed(step, device, opts)
        if opts.profile and "error" not in results[precision]:
            results[precision]["profile"] = _profiled(step, device)
    return results


def _default_tf32() -> tuple[bool, bool]:
    return False, True  # PyTorch's defaults: TF32 off for matrix products, on for cuDNN convolutions


def _timed(step, device: torch.device, opts: argparse.Namespace) -> dict:
    return _recorded(lambda: time_steps(step, device, opts.warmup, opts.steps, opts.repeats), device)


def _profiled(step, device: torch.device) -> dict:  # noqa: ANN001
    """One step under torch.profiler (after the timed rounds: warm)."""
    return _recorded(lambda: profiling.profile_step(step, device), device)


def _recorded(run, device: torch.device) -> dict:  # noqa: ANN001
    """run()'s result, or its exception printed and recorded as {"error": ...}: the other precision,
    or the timings a failed profile belongs to, still stand."""
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - recorded
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def profile_markdown(official: dict, ours: dict, meta: dict) -> str:
    """The profiled step of each side per precision, side by side (util/profiling.py)."""
    lines = [f"# Profiled training step, official DINO vs ours ({meta['device']}, commit {meta['commit']}, "
             f"{meta['date']})", "",
             "One step per side and precision under torch.profiler, after the timed rounds. Kinds of work "
             "are grouped by kernel name (util/profiling.py, KERNEL_CATEGORIES); the profiler's own overhead "
             "lengthens the wall time, so compare the sides, not these walls with the timed table.", ""]
    for precision in official:
        profiles = {side: result.get(precision, {}).get("profile") for side, result in
                    (("official", official), ("ours", ours))}
        if not all(p and "error" not in p for p in profiles.values()):
            lines += [f"### {precision}: not profiled ({profiles})", ""]
            continue
        lines.append(profiling.side_by_side(profiles, f"{precision}: official {PRECISION_LABEL['official'][precision]}, "
                                            f"ours {PRECISION_LABEL['ours'][precision]}"))
    return "\n".join(lines)


# ---- our side ---------------------------------------------------------------------------------------
def agreement(ours: dict, official: dict, atol32: float = AGREE_ATOL, atol64: float = AGREE_ATOL_FLOAT64) -> dict:
    """Max abs differences of the eval outputs (`eval_outputs` of each side).

    In float32 the two-stage top-k picks the same proposals but may order near-equal ones
    differently (their scores differ in the last bits; at 89k proposals some lie closer than
    that), and the decoder's query embeddings follow that order. So float32 is checked where the
    order cannot matter: the selected proposals (encoder outputs) as a set, each side's rows in
    lexicographic order; and the final outputs by query index in float64 (and in float32 too when
    the orders happen to agree). `agree`: the float32 set and the float64 outputs within tolerance."""
    def diffs(a: dict, b: dict) -> dict:
        return {k: float((a[k].double() - b[k].double()).abs().max()) for k in ("pred_logits", "pred_boxes")}

    result = {"atol_float32": atol32, "atol_float64": atol64,
              "float32_proposals_as_set": diffs(lexsorted(ours["float32_proposals"]),
                                                lexsorted(official["float32_proposals"])),
              "float32_by_index": diffs(ours["float32"], official["float32"]),
              "float64_by_index": diffs(ours["float64"], official["float64"])}
    result["agree"] = (max(result["float32_proposals_as_set"].values()) <= atol32
                       and max(result["float64_by_index"].values()) <= atol64)
    return result


def lexsorted(out: dict) -> dict:
    """Each image's rows (best logit, box, logits) in descending lexicographic order."""
    rows = torch.cat([out["pred_logits"].max(-1, keepdim=True).values, out["pred_boxes"], out["pred_logits"]], -1)
    order = torch.arange(rows.shape[1]).expand(rows.shape[0], -1)
    for col in reversed(range(rows.shape[-1])):  # stable sorts, least significant column first
        key = rows.gather(1, order[..., None].expand_as(rows))[..., col]
        order = order.gather(1, torch.argsort(key, dim=1, stable=True, descending=True))
    return {k: out[k].gather(1, order[..., None].expand_as(out[k])) for k in ("pred_logits", "pred_boxes")}


def eval_outputs(forward, model) -> dict:  # noqa: ANN001
    """Eval-mode outputs in float32 (TF32 off) and float64: final logits and boxes, and the
    encoder's selected proposals (interm_outputs) in float32; the model is left in float32."""
    result = {}
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
    model.eval()
    try:
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)
            with torch.no_grad():
                out = forward(dtype)
            name = str(dtype).replace("torch.", "")
            result[name] = {k: out[k].detach().cpu() for k in ("pred_logits", "pred_boxes")}
            if dtype == torch.float32:
                result["float32_proposals"] = {k: out["interm_outputs"][k].detach().cpu()
                                               for k in ("pred_logits", "pred_boxes")}
    finally:
        model.float()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    return result


def run_ours(opts: argparse.Namespace, device: torch.device) -> tuple[dict, dict]:
    sys.path.insert(0, str(ROOT))
    from configs import from_official_args
    from models import build_model
    from util.checkpoint import import_weights
    from util.engine import weighted_loss
    from models.build import build_optimizer

    work = Path(opts.work)
    cfg = from_official_args(official_args(opts))
    model, criterion, _post = build_model(cfg)
    report = import_weights(model, torch.load(work / "official_state.pt", weights_only=True))
    if not report.clean:
        raise RuntimeError(f"the official state dict does not fit our model:\n{report}")
    model.to(device)
    criterion.to(device)
    images, targets = load_batch(work, device)
    masks = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool, device=device)

    mine = eval_outputs(lambda dtype: model(images.to(dtype), masks), model)
    agree = agreement(mine, torch.load(work / "official_eval.pt", weights_only=True))
    print(f"eval outputs vs official: {agree}", flush=True)

    optimizer = build_optimizer(model, cfg.optim)
    results = {}
    for precision in opts.precisions:
        bf16 = precision == "best"

        def step() -> None:  # util/engine.py train_one_epoch, one iteration
            model.train()
            criterion.train()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                outputs = model(images, masks, targets)
                losses = criterion(outputs, targets)
            total = weighted_loss(losses, criterion.weight_dict)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_max_norm)
            optimizer.step()
            total.item()

        results[precision] = _timed(step, device, opts)
        if opts.profile and "error" not in results[precision]:
            results[precision]["profile"] = _profiled(step, device)
    return results, agree


# ---- the report -------------------------------------------------------------------------------------
def spread(values: list[float], digits: int = 2) -> str:
    return (f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"
            if values else "-")


def compare(official: dict, ours: dict, images_per_step: int = 2) -> list[dict]:
    """One row per precision: times, images/s, memory and ours/official ratios per round."""
    rows = []
    for precision in official:
        o, u = official[precision], ours.get(precision, {"error": "not run"})
        row = {"precision": precision, "official": o, "ours": u}
        if "error" not in o and "error" not in u:
            row["official_images_per_s"] = [images_per_step * 1000 / t for t in o["step_ms"]]
            row["ours_images_per_s"] = [images_per_step * 1000 / t for t in u["step_ms"]]
            # per round: official time / our time = our images/s over the official's
            row["speedup"] = [a / b for a, b in zip(o["step_ms"], u["step_ms"])]
            if o.get("peak_mib") and u.get("peak_mib"):
                row["memory_ratio"] = u["peak_mib"] / o["peak_mib"]
        rows.append(row)
    return rows


def verdict(row: dict) -> str:
    if "speedup" not in row:
        return "not measured"
    target = TARGET_IMAGES_PER_S[row["precision"]]
    speed = statistics.median(row["speedup"])
    parts = [f"speed x{speed:.2f} {'meets' if min(row['speedup']) >= target else 'misses'} >= x{target}"]
    if "memory_ratio" in row:
        parts.append(f"memory x{row['memory_ratio']:.3f} {'meets' if row['memory_ratio'] <= 1 else 'misses'} <= x1")
    return "; ".join(parts)


def markdown(rows: list[dict], agree: dict, meta: dict) -> str:
    lines = []
    if meta["dry_run"]:
        lines += ["**DRY RUN** (CPU, tiny images, the official op replaced by its pure-PyTorch function): "
                  "a check that the script runs, not a measurement.", ""]
    lines += [f"Device: {meta['device']}; torch {meta['torch']}; commit {meta['commit']}; {meta['date']}.",
              f"Command: `{meta['command']}`",
              f"Batch: 2 images of {meta['size'][0]}x{meta['size'][1]}, {meta['boxes']} boxes, denoising "
              f"queries on; {meta['warmup']} warm-up steps, then {meta['repeats']} rounds of {meta['steps']} steps; "
              "median (min-max) over the rounds.",
              f"Same weights, same outputs (float32 proposals within {agree.get('atol_float32')}, float64 "
              f"outputs within {agree.get('atol_float64')}): {'yes' if agree.get('agree') else 'NO'} "
              f"({_agree_text(agree)}).", "",
              "| precision | official ms/step | ours ms/step | official images/s | ours images/s | "
              "ours/official images/s | official peak MiB | ours peak MiB | memory ours/official | targets |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, u = r["official"], r["ours"]
        label = (f"{r['precision']}: official {PRECISION_LABEL['official'][r['precision']]}, "
                 f"ours {PRECISION_LABEL['ours'][r['precision']]}")
        lines.append(" | ".join([
            f"| {label}", o.get("error") or spread(o["step_ms"], 1), u.get("error") or spread(u["step_ms"], 1),
            spread(r.get("official_images_per_s", [])), spread(r.get("ours_images_per_s", [])),
            spread(r.get("speedup", []), 3), _mib(o), _mib(u),
            f"{r['memory_ratio']:.3f}" if "memory_ratio" in r else "-", verdict(r)]) + " |")
    return "\n".join(lines) + "\n"


def _mib(side: dict) -> str:
    return f"{side['peak_mib']:.0f}" if side.get("peak_mib") else "-"


def _agree_text(agree: dict) -> str:
    names = {"float32_proposals_as_set": "float32 encoder proposals as a set",
             "float64_by_index": "float64 outputs by query", "float32_by_index": "float32 outputs by query"}
    return "; ".join(f"{label}: {_fmt_diffs(agree[k])}" for k, label in names.items() if k in agree)


def _fmt_diffs(d: dict) -> str:
    return ", ".join(f"{k} max |diff| {v:.2e}" for k, v in d.items())


def _run_side(side: str, opts: argparse.Namespace, work: Path, log: Path) -> int:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--work", str(work),
           "--official", str(opts.official), "--steps", str(opts.steps), "--warmup", str(opts.warmup),
           "--repeats", str(opts.repeats), "--precisions", ",".join(opts.precisions)]
    if opts.msda_original:
        cmd += ["--msda-original", str(opts.msda_original)]
    if opts.dry_run:
        cmd.append("--dry-run")
    if opts.profile:
        cmd.append("--profile")
    print(f"== {side}: {' '.join(cmd)}", flush=True)
    with log.open("w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    print(log.read_text()[-3000:], flush=True)
    return done.returncode


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--official", required=True, help=f"the official DINO code (models/, util/, {ARGS_FILE})")
    p.add_argument("--msda-original", default=None, help="folder with its compiled op MultiScaleDeformableAttention")
    p.add_argument("--out", default="official_vs_ours", help="folder for the table, JSON and logs")
    p.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="image size (default 800 1333; 96 128 with --dry-run)")
    p.add_argument("--boxes", type=int, nargs=2, default=(20, 100), metavar=("MIN", "MAX"))
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 10; 1 with --dry-run)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; 1 with --dry-run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default="fp32,best", type=lambda s: s.split(","))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny, the official op's PyTorch function")
    p.add_argument("--profile", action="store_true",
                   help="also profile one step of each side and precision: OUT/profile.md (kernel time by kind, "
                        "device-busy share, launches, host waits)")
    p.add_argument("--side", choices=["official", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    bad = [x for x in opts.precisions if x not in TARGET_IMAGES_PER_S]
    if bad:
        p.error(f"--precisions: unknown {bad}; choose from {sorted(TARGET_IMAGES_PER_S)}")
    opts.size = opts.size or ([96, 128] if opts.dry_run else [800, 1333])
    opts.steps = opts.steps or (1 if opts.dry_run else 10)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.dry_run else 5)
    if not (Path(opts.official) / ARGS_FILE).is_file():
        p.error(f"--official {opts.official}: no {ARGS_FILE} there (a copy of the official DINO code is needed)")
    device = torch.device("cpu" if opts.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --dry-run to check the script on the CPU")

    if opts.side == "official":
        Path(opts.work, "official.json").write_text(json.dumps(run_official(opts, device), indent=1))
        return 0
    if opts.side == "ours":
        results, agree = run_ours(opts, device)
        Path(opts.work, "ours.json").write_text(json.dumps({"results": results, "agreement": agree}, indent=1))
        return 0

    out = Path(opts.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    batch = make_batch(*opts.size, *opts.boxes)
    torch.save(batch, work / "batch.pt")
    rc = _run_side("official", opts, work, out / "official.log")
    official = json.loads((work / "official.json").read_text()) if rc == 0 else {}
    rc_ours = _run_side("ours", opts, work, out / "ours.log") if rc == 0 else -1
    mine = json.loads((work / "ours.json").read_text()) if rc_ours == 0 else {"results": {}, "agreement": {}}
    rows = compare(official, mine["results"])
    meta = {"dry_run": opts.dry_run, "torch": torch.__version__, "commit": _commit(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python tools/benchmark_official.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "size": opts.size, "boxes": "+".join(str(len(t["labels"])) for t in batch["targets"]),
            "steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats}
    text = markdown(rows, mine["agreement"], meta)
    (out / "official_vs_ours.md").write_text(text)
    (out / "official_vs_ours.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                           "agreement": mine["agreement"]}, indent=1))
    print(text)
    if opts.profile:
        profile_text = profile_markdown(official, mine["results"], meta)
        (out / "profile.md").write_text(profile_text)
        print(profile_text)
    if rc != 0 or rc_ours != 0:
        print(f"a side failed (official rc={rc}, ours rc={rc_ours}): see {out}/official.log, {out}/ours.log",
              file=sys.stderr)
        return 1
    return 0 if mine["agreement"].get("agree") else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Operators dispatched by one training step, per DINO / UGS variant (benchmark, not a test).

On a GPU, DINO's decoder is launch-bound: its kernels are small (900 queries), so a decoder pass
costs about as much host time per operator as device time. The number of operators a step
dispatches is therefore the host's share of the step, and unlike a timing it is exact and can be
measured on any CPU: this tool counts them (a `TorchDispatchMode`, so every ATen call that reaches
the kernels, in autograd's backward too) for one training step of each variant of
`tools/benchmark_model.py` (DINO, UGS with UR off, UR on, UR on with recomputed projections).

Counts per phase (model forward, criterion incl. matching and the UR pass, backward) and per
kind: `kernels` launch device work; `views` only change metadata (view, transpose, slice, ...;
cheaper on the host, no launch); `syncs` make the host wait for the device (`.item()`, `bool()`
of a tensor, `nonzero`). On a GPU the matcher's one device-to-host copy per step (every output set's
cost matrix) waits too; host-to-device copies of CPU tensors are not visible on a CPU run (the
criterion makes them non-blocking, `models.matched_pairs.host_to_device`).

    python tools/count_ops.py [--config dino_5scale_r50_coco] [--size 96 128] [--json]

The counts hardly depend on the image size (a few per-level loops), so small images keep it
fast on a CPU (about a minute for the R50 config on 2 cores).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tools.benchmark_model import UGS_VARIANTS, _build_variant, make_batch  # noqa: E402
from util.cli import add_debug_option, entry_point  # noqa: E402
from util.engine import weighted_loss  # noqa: E402

VIEW_OPS = frozenset({
    "alias", "as_strided", "detach", "expand", "flatten", "narrow", "permute", "select", "slice",
    "split", "split_with_sizes", "squeeze", "t", "transpose", "unbind", "unflatten", "unsqueeze",
    "view", "_unsafe_view", "_reshape_alias", "unfold", "view_as_real", "view_as_complex",
    "promote_types", "result_type", "is_same_size", "sym_size", "sym_stride", "sym_numel",
})
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
                      "unique_consecutive", "repeat_interleave"})


class OpCounter(TorchDispatchMode):
    """Counts every ATen call dispatched while active, by operator name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.calls[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict[str, int]:
        views = sum(n for op, n in self.calls.items() if op in VIEW_OPS)
        syncs = sum(n for op, n in self.calls.items() if op in SYNC_OPS)
        total = sum(self.calls.values())
        return {"total": total, "kernels": total - views, "views": views, "syncs": syncs}


def count_step(config: str, overrides: list[str], override: str, size: tuple[int, int], boxes: int,
               steps: int = 2) -> dict:
    """Counts of the last of `steps` training steps (the first ones warm caches), by phase."""
    device = torch.device("cpu")
    model, criterion, _optimizer, num_classes = _build_variant(config, overrides, override, device)
    images, masks, targets = make_batch(2, size[0], size[1], boxes, device, num_classes, max_box=0.03)
    model.train()
    criterion.train()
    for _ in range(steps):
        phases = {name: OpCounter() for name in ("forward", "criterion", "backward")}
        with phases["forward"]:
            outputs = model(images, masks, targets)
        with phases["criterion"]:
            losses = criterion(outputs, targets)
        total = weighted_loss(losses, criterion.weight_dict)  # as util/engine.py
        with phases["backward"]:
            total.backward()
        model.zero_grad(set_to_none=True)
    result = {name: counter.summary() for name, counter in phases.items()}
    step = collections.Counter()
    for counter in phases.values():
        step.update(counter.calls)
    result["step"] = {key: sum(result[p][key] for p in phases) for key in ("total", "kernels", "views", "syncs")}
    result["top_ops"] = dict(step.most_common(15))
    return result


def table(results: dict, labels: dict[str, str]) -> str:
    base = next(iter(results.values()))["step"]
    rows = ["| variant | forward | criterion | backward | step kernels | vs DINO | step total | vs DINO | syncs |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, r in results.items():
        s = r["step"]
        rows.append(f"| {labels[key]} | {r['forward']['kernels']} | {r['criterion']['kernels']} | "
                    f"{r['backward']['kernels']} | {s['kernels']} | x{s['kernels'] / base['kernels']:.3f} | "
                    f"{s['total']} | x{s['total'] / base['total']:.3f} | {s['syncs']} |")
    return "\n".join(rows)


@entry_point
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="dino_5scale_r50_coco")
    parser.add_argument("--opt", nargs="*", action="extend", default=["model.backbone_weights=none"],
                        help="config overrides applied to every variant")
    parser.add_argument("--size", type=int, nargs=2, default=(96, 128), metavar=("H", "W"))
    parser.add_argument("--boxes", type=int, default=20, help="target boxes per image")
    parser.add_argument("--variants", nargs="*", default=[k for k, _l, _o in UGS_VARIANTS],
                        choices=[k for k, _l, _o in UGS_VARIANTS])
    parser.add_argument("--json", action="store_true", help="print the results as JSON on the last line")
    add_debug_option(parser)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    labels = {k: label for k, label, _o in UGS_VARIANTS}
    results = {}
    for key, _label, override in UGS_VARIANTS:
        if key in args.variants:
            results[key] = count_step(args.config, args.opt, override, tuple(args.size), args.boxes)
            print(f"{labels[key]}: {results[key]['step']}", flush=True)
    print(f"\nOperators per training step ({args.config}, 2 x {args.size[0]}x{args.size[1]}, "
          f"torch {torch.__version__}); kernels = all but views:\n")
    print(table(results, labels))
    if args.json:
        print(json.dumps({"config": args.config, "size": list(args.size), "torch": torch.__version__,
                          "variants": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

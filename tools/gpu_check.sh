#!/usr/bin/env bash
# One-shot GPU check for the MSDA CUDA kernels, run from the repository root on the lent GPU machine:
#   build the extension for sm_90 (timed), a numerical self-check (no pytest needed), the CUDA and op
#   tests, tools/benchmark_model.py (DINO vs UGS-DINO steps), then the op benchmark (ours / plain
#   PyTorch / original op, then deformops Triton + CUDA). Every step is guarded (a failure never stops the rest) and
#   time-boxed; the whole run stays within GPU_CHECK_BUDGET seconds (default 400).
# Results go to $OUT (default ./gpu_check_out): logs, benchmarks.md (sections to merge into
# docs/benchmarks.md), JSON rows, and the compiler log if the build fails. GPU_CHECK_SKIP="bench_ops pytest"
# (step names, space-separated) skips those steps.
# Anchors are taken from .gpu_carry/ (a git-ignored copy of ../shared/anchors carried to the machine);
# pytest, if the machine lacks it, from .gpu_carry/pysite (pip install --target .gpu_carry/pysite pytest).
set +e
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-400}"
START=$(date +%s)
export TORCH_CUDA_ARCH_LIST="9.0"  # sm_90 (H100/H200) only: the build is on the clock
export MAX_JOBS="${MAX_JOBS:-16}"
export MSDA_BUILD_DIR="${MSDA_BUILD_DIR:-$PWD/build/msda}"
export PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
if ! "$PY" -c "import pytest" 2>/dev/null && [ -d .gpu_carry/pysite ]; then
  export PYTHONPATH="$PWD/.gpu_carry/pysite${PYTHONPATH:+:$PYTHONPATH}"
fi

# step NAME MAX_SECONDS CMD...: runs CMD with a timeout capped by what is left of the budget,
# output tee'd to $OUT/NAME.log; records the exit status in $OUT/steps.txt.
step() {
  local name="$1" max="$2"; shift 2
  local now left limit rc
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
    echo "== $name: SKIPPED (GPU_CHECK_SKIP)" | tee -a "$OUT/steps.txt"; return 0;; esac
  now=$(date +%s); left=$((BUDGET - (now - START)))
  limit=$max; [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 15 ]; then
    echo "== $name: SKIPPED (budget used: $((now - START)) s of $BUDGET s)" | tee -a "$OUT/steps.txt"
    return 0
  fi
  echo "== $name (timeout ${limit}s, t=$((now - START))s)"
  local t0; t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 )) s" | tee -a "$OUT/steps.txt"
  return 0
}

{
  date -u
  nvidia-smi
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1
  command -v nvcc && nvcc --version | tail -2
  "$PY" -c "import pytest; print('pytest', pytest.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.log"

# 1. build (sm_90 only here)
step build 240 "$PY" -m ops.build
cp "$MSDA_BUILD_DIR"/*/build.log "$OUT/" 2>/dev/null

# 2. numerical self-check: max errors per dtype vs the float64 reference (works without pytest)
step selfcheck 90 "$PY" - <<'EOF'
import os, sys, torch
sys.path.insert(0, ".")
from ops.build import load_extension
from ops.reference import ms_deform_attn_reference as ref
ext = load_extension()
torch.manual_seed(0)
dev = "cuda"
shapes = [(50, 84), (25, 42), (13, 21), (7, 11), (1, 1)]
sp = torch.tensor(shapes, device=dev)
areas = sp[:, 0] * sp[:, 1]
st = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
S = int(areas.sum())
worst = 0.0
for d, cap in ((32, None), (32, "8"), (8, None), (5, None)):
    for switch in ("MSDA_CUDA_FWD_VECTOR", "MSDA_CUDA_BWD_VECTOR"):  # cap "8": the wide non-default kernels
        if cap:
            os.environ[switch] = cap
        else:
            os.environ.pop(switch, None)
    n, lq, m, p = 2, 2000, 8, 4
    v64 = torch.randn(n, S, m, d, device=dev, dtype=torch.float64)
    l64 = torch.rand(n, lq, m, len(shapes), p, 2, device=dev, dtype=torch.float64) * 1.2 - 0.1
    a64 = torch.rand(n, lq, m, len(shapes), p, device=dev, dtype=torch.float64)
    g64 = torch.randn(n, lq, m * d, device=dev, dtype=torch.float64)
    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        v, l, a, g = (t.to(dt) for t in (v64, l64, a64, g64))
        out = ext.forward(v, sp, st, l, a)
        gv, gl, ga = ext.backward(v, sp, st, l, a, g)
        vr, lr, ar = (t.double().requires_grad_() for t in (v, l, a))
        o = ref(vr, sp, st, lr, ar)
        rg = torch.autograd.grad(o, (vr, lr, ar), g.double())
        errs = []
        for name, x, r in (("out", out, o), ("gv", gv, rg[0]), ("gloc", gl, rg[1]), ("gw", ga, rg[2])):
            e = float((x.double() - r).abs().max() / r.abs().max().clamp_min(1e-30))
            errs.append(f"{name} {e:.2e}")
            if dt == torch.float64:
                worst = max(worst, e)
        print(f"D={d:3d} cap={cap or '-'} {str(dt):15s} max|err|/max|ref|: " + "  ".join(errs), flush=True)
print("float64 worst relative error:", f"{worst:.2e}", "PASS" if worst < 1e-10 else "CHECK")
EOF

# 3. tests (CUDA kernels, the criterion's host syncs on a GPU; the op's CPU/device tests if present)
TESTS="tests/test_ops_cuda.py tests/test_criterion_cuda.py"
[ -f tests/test_ops.py ] && TESTS="$TESTS tests/test_ops.py"
if "$PY" -c "import pytest" 2>/dev/null; then
  # shellcheck disable=SC2086
  step pytest 180 "$PY" -m pytest -q -ra --maxfail=30 -p no:cacheprovider $TESTS
else
  echo "== pytest: not installed on this machine (carry .gpu_carry/pysite); self-check above stands in" \
    | tee -a "$OUT/steps.txt"
fi

# 4. DINO vs UGS-DINO training steps (UR cost; eager, decoder layers compiled, bf16, TF32) and one profiled
#    step of each: first among the benchmarks, it is what issue 5 still needs measured
if [ -f tools/benchmark_model.py ]; then
  step bench_model 320 "$PY" tools/benchmark_model.py --skip-dino --gpu-only --compile-decoder --ugs-bf16 --tf32 \
    --profile
fi

# 5. op benchmark: ours (+ kernel variants), plain PyTorch, the original op (float32) -> $OUT/benchmarks.md
step bench_ops 150 "$PY" tools/benchmark_ops.py --device cuda \
  --impls ours,ours-fwd-query-b1,ours-fwd-head-b2,pytorch,original \
  --msda-original .gpu_carry/msda_original --write-docs --docs-path "$OUT/benchmarks.md" \
  --partial "$OUT/bench_ops_partial.md" --json "$OUT/bench_ops.json"

# 6. deformops (Triton, CUDA), with ours again in the same process for a same-run comparison
step bench_deformops 170 "$PY" tools/benchmark_ops.py --device cuda --impls ours,deformops-triton,deformops-cuda \
  --deformops-wheel .gpu_carry/deformops/deformops-3.0.1-py3-none-any.whl --write-docs \
  --docs-path "$OUT/benchmarks.md" --partial "$OUT/bench_deformops_partial.md" --json "$OUT/bench_deformops.json"

echo "== total $(( $(date +%s) - START )) s"; cat "$OUT/steps.txt"

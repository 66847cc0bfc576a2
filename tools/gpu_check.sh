#!/usr/bin/env bash
# The GPU check: build the MSDA CUDA op, run every CUDA test, then the benchmarks and a short training
# run, writing logs and markdown tables into one folder. Run from anywhere in a checkout:
#
#   bash tools/gpu_check.sh OUT_DIR
#
# Each step is time-limited (the whole stays within GPU_CHECK_BUDGET seconds, default 480: about 8
# minutes on an H100/H200); a failing or timed-out step is recorded in OUT_DIR/steps.md and the rest
# still run. Optional inputs, all through the environment:
#   OFFICIAL_DINO=DIR     the official DINO code (models/, util/, args_dino_5scale_r50.json):
#                         enables the official-vs-ours training-step benchmark
#   MSDA_ORIGINAL=DIR     the official op, compiled (MultiScaleDeformableAttention module): the
#                         official model's op, and the "original" row of the op benchmark
#   DEFORMOPS_WHEEL=FILE  a deformops wheel: its Triton kernel as a row of the op benchmark
#   WHEELS=DIR            wheels (pip download) for Python packages this machine lacks (pytest,
#                         pycocotools, ...): each missing one is installed into OUT_DIR/site
#   GPU_CHECK_SKIP="a b"  step names to skip (build pytest bench_ops bench_official bench_matcher bench_model train)
#   GPU_CHECK_DRY_RUN=1   check this script on a CPU machine: tiny sizes, few steps, no CUDA numbers
#   PYTHON                the interpreter (default python3)
# Outputs: env.md, steps.md (status and time of every step), <step>.log, and the tables
# bench_ops.md, official_vs_ours/official_vs_ours.md (and profile.md: each side's step by kind of
# work), bench_model.md, train.md.
set +e
if [ $# -lt 1 ]; then
  echo "usage: bash tools/gpu_check.sh OUT_DIR   (see the comment at the top for the options)" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-480}"  # seconds
DRY="${GPU_CHECK_DRY_RUN:-0}"
START=$(date +%s)
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MSDA_BUILD_DIR="${MSDA_BUILD_DIR:-$PWD/build/msda}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
echo "| step | status | seconds | limit |" > "$OUT/steps.md"
echo "|---|---|---|---|" >> "$OUT/steps.md"

# step NAME MAX_SECONDS CMD...: CMD with a timeout of MAX_SECONDS, capped by what is left of the
# budget; output to OUT/NAME.log (and the console); status into OUT/steps.md.
step() {
  local name="$1" max="$2"; shift 2
  local now left limit rc t0 status
  case " ${GPU_CHECK_SKIP:-} " in *" $name "*)
    echo "| $name | skipped (GPU_CHECK_SKIP) | - | - |" >> "$OUT/steps.md"; return 0;; esac
  now=$(date +%s); left=$((BUDGET - (now - START)))
  limit=$max; [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "| $name | skipped (budget of $BUDGET s used) | - | - |" >> "$OUT/steps.md"; return 0
  fi
  echo "== $name (limit ${limit} s, $((now - START)) s into the check)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  tail -n 40 "$OUT/$name.log"
  case $rc in 0) status="ok";; 124|137) status="TIMED OUT";; *) status="FAILED (exit $rc)";; esac
  echo "| $name | $status | $(( $(date +%s) - t0 )) | $limit |" >> "$OUT/steps.md"
  return 0
}

# Python packages: install the ones this machine lacks from WHEELS (no index, no dependencies).
SITE="$OUT/site"
if [ -n "${WHEELS:-}" ]; then
  for pair in pytest:pytest iniconfig:iniconfig pluggy:pluggy pycocotools:pycocotools \
      faster_coco_eval:faster-coco-eval accelerate:accelerate huggingface_hub:huggingface_hub \
      safetensors:safetensors tqdm:tqdm psutil:psutil yaml:pyyaml matplotlib:matplotlib \
      contourpy:contourpy cycler:cycler fontTools:fonttools kiwisolver:kiwisolver pyparsing:pyparsing \
      dateutil:python-dateutil six:six packaging:packaging; do
    module="${pair%%:*}"; package="${pair##*:}"
    if ! "$PY" -c "import $module" 2>/dev/null; then
      "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" --target "$SITE" "$package" \
        >> "$OUT/wheels.log" 2>&1 && echo "installed $package from $WHEELS" >> "$OUT/wheels.log"
    fi
  done
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  echo "# GPU check environment"; echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- $("$PY" -c "import sys, torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', d)" 2>&1)"
  echo "- nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -1 || echo "${CUDA_HOME:-none}")"
  for m in pytest pycocotools faster_coco_eval accelerate triton; do
    echo "- $m: $("$PY" -c "import $m; print(getattr($m, '__version__', 'present'))" 2>&1 | tail -1)"
  done
  command -v nvidia-smi >/dev/null && { echo; echo '```'; nvidia-smi; echo '```'; }
} > "$OUT/env.md" 2>&1
cat "$OUT/env.md"

if [ "$DRY" = "1" ]; then
  OPS_ARGS=(--device cpu --iters 2 --warmup 1)
  OFFICIAL_ARGS=(--dry-run)
  MODEL_ARGS=(--cpu-only --iters 1 --warmup 0 --skip-ugs)
  TRAIN_LAUNCH=(--config_file configs/accelerate/cpu.yaml)
  TRAIN_OPTS=(data.synthetic_image_size=[192,320] data.synthetic_train_images=4 data.synthetic_val_images=2
              runtime.max_steps=2 optim.epochs=1 data.num_workers=0 runtime.profile_skip=0 runtime.profile_steps=1)
else
  OPS_ARGS=(--device cuda --iters 10 --warmup 3 --impls ours,original,deformops-triton)
  OFFICIAL_ARGS=()
  MODEL_ARGS=(--gpu-only --skip-dino --ugs-bf16 --ugs-iters 6 --profile)
  TRAIN_LAUNCH=(--config_file configs/accelerate/1gpu.yaml)
  TRAIN_OPTS=(data.synthetic_image_size=[800,1333] data.synthetic_train_images=100 data.synthetic_val_images=16
              runtime.max_steps=200 runtime.max_train_minutes=1.5 optim.epochs=4 data.num_workers=4
              runtime.profile_skip=20 runtime.profile_steps=5)
fi

# 1. build the op for this GPU (TORCH_CUDA_ARCH_LIST, else the visible GPU's arch)
if [ "$DRY" = "1" ]; then
  echo "| build | skipped (dry run: tests/test_ops_cuda_build.py compiles on CPU) | - | - |" >> "$OUT/steps.md"
else
  step build 200 "$PY" -m ops.build
  for log in "$MSDA_BUILD_DIR"/*/build.log; do [ -f "$log" ] && cp "$log" "$OUT/build_compiler.log"; done
fi

# 2. every CUDA test: the kernels (all dtypes, both forward variants in float64), the op through
#    torch.compile, the criterion's host waits; they skip themselves without a GPU
step pytest 150 "$PY" -m pytest -q -ra \
  tests/test_ops_cuda.py tests/test_ops.py tests/test_criterion_cuda.py

# 3. the official DINO-5scale R50 training step against ours (same weights, same batch), and one
#    profiled step of each side: where a shortfall comes from
if [ -n "${OFFICIAL_DINO:-}" ]; then
  OFFICIAL_EXTRA=()
  [ -n "${MSDA_ORIGINAL:-}" ] && OFFICIAL_EXTRA+=(--msda-original "$MSDA_ORIGINAL")
  step bench_official 150 "$PY" tools/benchmark_official.py --official "$OFFICIAL_DINO" "${OFFICIAL_EXTRA[@]}" \
    "${OFFICIAL_ARGS[@]}" --profile --out "$OUT/official_vs_ours"
else
  echo "| bench_official | skipped (no OFFICIAL_DINO) | - | - |" >> "$OUT/steps.md"
fi

# 4. the op: ours against the original op and deformops (Triton), encoder and decoder shapes,
#    float32 and bfloat16, 3 rounds each
OPS_EXTRA=()
[ -n "${MSDA_ORIGINAL:-}" ] && OPS_EXTRA+=(--msda-original "$MSDA_ORIGINAL")
[ -n "${DEFORMOPS_WHEEL:-}" ] && OPS_EXTRA+=(--deformops-wheel "$DEFORMOPS_WHEEL")
step bench_ops 100 "$PY" tools/benchmark_ops.py "${OPS_ARGS[@]}" "${OPS_EXTRA[@]}" \
  --markdown "$OUT/bench_ops.md" --json "$OUT/bench_ops.json"

# 4b. one matching call of a step (cost matrices of 7 output sets, the copy, the assignments) at
#     dense-image sizes, DINO's L1 cost and UGS's bins cost
if [ "$DRY" = "1" ]; then MATCH_ARGS=(--device cpu --images 2 --targets 20 --queries 50 --repeats 1)
else MATCH_ARGS=(--device cuda --images 2 4 --targets 300 --threads 4 --repeats 5); fi
step bench_matcher 60 bash -c '"$0" tools/benchmark_matcher.py "$@" && "$0" tools/benchmark_matcher.py --bins "$@"' \
  "$PY" "${MATCH_ARGS[@]}"

# 5. the cost of UGS over DINO (UR on / off; float32 and bfloat16) with a profile of each step
step bench_model 150 "$PY" tools/benchmark_model.py "${MODEL_ARGS[@]}" --markdown "$OUT/bench_model.md" \
  --out "$OUT/bench_model.json"

# 6. a short training run through accelerate: UGS-DINO R50 from random weights on synthetic
#    small-object scenes, evaluated at 1500 detections per image; steps/s from its log, GPU
#    utilisation sampled every second while it runs, and 5 of its steps profiled (train/profile/)
UTIL_PID=""
if command -v nvidia-smi >/dev/null && [ "$DRY" != "1" ]; then
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -l 1 > "$OUT/train_gpu_util.csv" 2>/dev/null &
  UTIL_PID=$!
fi
step train 200 "$PY" -m accelerate.commands.launch "${TRAIN_LAUNCH[@]}" main.py --config dino_5scale_r50_coco_ugs \
  --output-dir "$OUT/train" --max-dets 1500 --opt data.dataset=synthetic "${TRAIN_OPTS[@]}" \
  data.train_policy=none data.eval_policy=none model.backbone_weights=none eval.num_select=1500
[ -n "$UTIL_PID" ] && kill "$UTIL_PID" 2>/dev/null
[ -f "$OUT/train.log" ] && {
  echo "# Training run (UGS-DINO R50, synthetic small objects, accelerate launch)"; echo
  echo "Command: see train.log (the step's command line is in tools/gpu_check.sh)."
  echo '```'
  grep -E "training done|epoch [0-9]+ done|AP|AR|maxDets" "$OUT/train.log" | tail -n 30
  echo '```'
  if [ -s "$OUT/train_gpu_util.csv" ]; then
    awk '{ s += $1; n += 1 } END { if (n) printf "GPU utilisation while the step ran: mean %.0f%% over %d samples (1 s apart, incl. start-up and evaluation)\n", s / n, n }' "$OUT/train_gpu_util.csv"
  fi
  [ -f "$OUT/train/metrics.json" ] && { echo; echo "metrics.json:"; cat "$OUT/train/metrics.json"; }
  [ -f "$OUT/train/profile/summary.md" ] && { echo; cat "$OUT/train/profile/summary.md"; }
} > "$OUT/train.md" 2>&1

echo "== done in $(( $(date +%s) - START )) s"
cat "$OUT/steps.md"

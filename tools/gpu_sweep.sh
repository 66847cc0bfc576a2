#!/usr/bin/env bash
# The GPU version of the UGS-vs-DINO measurement (docs/results.md, "On a GPU"): both protocols
# (configs/sweeps/gpu_scratch.toml and gpu_finetune.toml: 12 variants x 5 seeds, 1.6x the CPU steps,
# 256 x 256 px dense small-object scenes) side by side on one GPU, several runs at a time, and the
# gradient-variance diagnostic (tools/gradvar.py, comparator Smooth-L1) at 5 seeds next to them.
# Run from anywhere in a checkout:
#
#   bash tools/gpu_sweep.sh OUT_DIR
#
# Sized for about 8 minutes on one H100/H200 (the estimate is in configs/sweeps/gpu_scratch.toml);
# everything stops at GPU_SWEEP_BUDGET seconds (default 480) and is then aggregated. Runs are
# started seed by seed, so a stop leaves whole seeds finished; rerunning the same command with the
# same OUT_DIR skips finished runs and resumes interrupted ones. Optional inputs (environment):
#   GPU_SWEEP_BUDGET=S      seconds for the whole (default 480)
#   GPU_SWEEP_GPUS=0        comma-separated GPU ids the runs are spread over (default 0)
#   GPU_SWEEP_PROCESSES="6 5"  runs at a time of the scratch and the fine-tuning sweep (in all, on
#                           all GPUs; default 6 and 5: with 5 gradient-variance runs, 16 host cores)
#   GPU_SWEEP_MPS=1         start an NVIDIA MPS control daemon of this user for the runs, so that
#                           their small kernels overlap on the GPU (default 1 where
#                           nvidia-cuda-mps-control exists; 0: the runs take turns on the GPU)
#   GPU_SWEEP_SKIP="a b"    step names to skip (data scratch finetune gradvar)
#   GPU_SWEEP_GRADVAR_SEEDS=0,1,2,3,4  one gradient-variance process per seed
#   GPU_SWEEP_KEEP_CHECKPOINTS=1  keep the checkpoints of finished runs (default: deleted at the
#                           end; a finished run is marked by its sweep_run.json, not its checkpoint;
#                           the fine-tuning stage's checkpoint is always kept)
#   GPU_SWEEP_DRY_RUN=1     check this script on a CPU machine: print every command (the sweeps'
#                           through `tools/sweep.py --dry-run`), train nothing
#   PYTHON                  the interpreter (default python3)
# Outputs: env.md, steps.md (status and time of every step), <step>.log, data/ (the scenes, written
# once: PNG is lossless, so the runs read exactly the scenes they would generate in memory),
# gpu_scratch/ and gpu_finetune/ (results.md, results.json, plots/, runs/), gradvar/seed*/ (one
# seed each) and gradvar/gradvar.json (the seeds pooled by tools/gradvar_merge.py; the table is in
# gradvar_merge.log).
set +e
if [ $# -lt 1 ]; then
  echo "usage: bash tools/gpu_sweep.sh OUT_DIR   (see the comment at the top for the options)" >&2
  exit 2
fi
mkdir -p "$1" || exit 2
OUT="$(cd "$1" && pwd)"
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-python3}"
BUDGET="${GPU_SWEEP_BUDGET:-480}"
DRY="${GPU_SWEEP_DRY_RUN:-0}"
GPUS="${GPU_SWEEP_GPUS:-0}"
read -r P_SCRATCH P_FINETUNE <<< "${GPU_SWEEP_PROCESSES:-6 5}"
GRADVAR_SEEDS="${GPU_SWEEP_GRADVAR_SEEDS:-0,1,2,3,4}"
START=$(date +%s)
CORES=$(nproc)
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

skipped() { case " ${GPU_SWEEP_SKIP:-} " in *" $1 "*) return 0;; esac; return 1; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
row() { echo "| $1 | $2 | $3 | $4 |" >> "$OUT/steps.md"; }
status_of() { case $1 in 0) echo "ok";; 124|137) echo "TIMED OUT (rerun to continue)";; *) echo "FAILED (exit $1)";; esac; }
echo "| step | status | seconds | limit |" > "$OUT/steps.md"
echo "|---|---|---|---|" >> "$OUT/steps.md"

{
  echo "# GPU sweep environment"; echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "- $("$PY" -c "import sys, torch; d = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'; print('python', sys.version.split()[0], '| torch', torch.__version__, '| CUDA', torch.version.cuda, '|', d)" 2>&1 | tail -1)"
  echo "- host cores: $CORES; budget: $BUDGET s; GPUs: $GPUS; runs at a time: scratch $P_SCRATCH, fine-tuning $P_FINETUNE"
  command -v nvidia-smi >/dev/null && [ "$DRY" != "1" ] && { echo; echo '```'; nvidia-smi; echo '```'; }
} > "$OUT/env.md" 2>&1
cat "$OUT/env.md"

# The specs' shared data and model overrides (without the schedule), for tools/gradvar.py.
SHARED=$("$PY" -c "import tomllib; print(' '.join(o for o in tomllib.load(open('configs/sweeps/gpu_scratch.toml', 'rb'))['overrides'] if not o.startswith('optim.')))")
val_of() { for o in $SHARED; do case $o in "data.$1="*) echo "${o#*=}";; esac; done; }
SIZE=$(val_of synthetic_image_size | tr -d '[]' | tr ',' ' ')
VAL_SEED=$("$PY" -c "from configs import load_config; from datasets import _SYNTHETIC_VAL_SEED_OFFSET as o; print(load_config('dense_small_synthetic').data.synthetic_seed + o)")
TRAIN_SEED=$("$PY" -c "from configs import load_config; print(load_config('dense_small_synthetic').data.synthetic_seed)")
SMALL=$("$PY" -c "from configs import load_config; print(*load_config('dense_small_synthetic').data.synthetic_small_side_px)")

# 1. the scenes, written once (about 0.1 s per 256 px scene on one core, instead of every run
#    generating its own 384), train and validation split in parallel
DATA_OPTS=()
make_split() {  # make_split RUNNER SPLIT SEED IMAGES (RUNNER: echo, or a timeout)
  local runner="$1"; shift
  # shellcheck disable=SC2086
  $runner "$PY" tools/make_synthetic.py "$OUT/data/$1" --images "$3" --seed "$2" --size $SIZE \
    --min-objects "$(val_of synthetic_min_objects)" --max-objects "$(val_of synthetic_max_objects)" \
    --max-ignored-regions "$(val_of synthetic_max_ignored_regions)" --clutter "$(val_of synthetic_clutter)" \
    --small-side $SMALL
}
if skipped data; then
  row data "skipped (GPU_SWEEP_SKIP): every run generates its scenes" - -
elif [ "$DRY" = "1" ]; then
  echo "== data (dry run, not written)"
  make_split echo train "$TRAIN_SEED" "$(val_of synthetic_train_images)"
  make_split echo val "$VAL_SEED" "$(val_of synthetic_val_images)"
  row data "dry run" - -
else
  t0=$(date +%s)
  rc=0
  if [ ! -f "$OUT/data/train/annotations.json" ] || [ ! -f "$OUT/data/val/annotations.json" ]; then
    echo "== data"
    make_split "timeout 300" train "$TRAIN_SEED" "$(val_of synthetic_train_images)" > "$OUT/data_train.log" 2>&1 &
    pid_train=$!
    make_split "timeout 300" val "$VAL_SEED" "$(val_of synthetic_val_images)" > "$OUT/data_val.log" 2>&1
    rc=$?
    wait "$pid_train" || rc=$?
  fi
  if [ "$rc" -eq 0 ]; then
    row data ok $(( $(date +%s) - t0 )) 300
  else
    row data "$(status_of "$rc"): every run generates its scenes" $(( $(date +%s) - t0 )) 300
  fi
fi
if [ "$DRY" = "1" ] || { [ -f "$OUT/data/train/annotations.json" ] && [ -f "$OUT/data/val/annotations.json" ]; }; then
  DATA_OPTS=(data.dataset=coco "data.train_images=$OUT/data/train/images"
             "data.train_annotations=$OUT/data/train/annotations.json"
             "data.val_images=$OUT/data/val/images" "data.val_annotations=$OUT/data/val/annotations.json")
fi

# 2. MPS: the runs' kernels overlap on the GPU instead of taking turns (checked with one CUDA call;
#    on any failure the runs share the GPU without it)
MPS_PIPE=""
stop_mps() { [ -n "$MPS_PIPE" ] && { echo quit | CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE" nvidia-cuda-mps-control >/dev/null 2>&1; rm -rf "$MPS_PIPE"; MPS_PIPE=""; }; }
trap stop_mps EXIT
if [ "$DRY" != "1" ] && [ "${GPU_SWEEP_MPS:-1}" = "1" ] && command -v nvidia-cuda-mps-control >/dev/null; then
  MPS_PIPE="$(mktemp -d)"
  mkdir -p "$OUT/mps"
  export CUDA_MPS_PIPE_DIRECTORY="$MPS_PIPE" CUDA_MPS_LOG_DIRECTORY="$OUT/mps"
  if nvidia-cuda-mps-control -d && timeout 120 "$PY" -c "import torch; assert torch.ones(1, device='cuda').sum().item() == 1" \
      > "$OUT/mps/probe.log" 2>&1; then
    row mps "ok (runs overlap on the GPU)" - -
  else
    stop_mps
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    row mps "not available (runs take turns on the GPU; see mps/)" - -
  fi
else
  row mps "off" - -
fi

# 3. both sweeps and the gradient-variance runs side by side, until the budget
RESERVE=60  # seconds kept for the aggregation and the clean-up
LIMIT=$(( $(left) - RESERVE ))
declare -A PIDS T0S
launch() {  # launch NAME CMD...: in the background, time-limited, output to OUT/NAME.log
  local name="$1"; shift
  if skipped "${name%%_*}"; then row "$name" "skipped (GPU_SWEEP_SKIP)" - -; return; fi
  if [ "$DRY" = "1" ]; then echo "== $name (dry run)"; echo "$*"; row "$name" "dry run" - -; return; fi
  if [ "$LIMIT" -lt 30 ]; then row "$name" "skipped (budget of $BUDGET s used)" - -; return; fi
  echo "== $name (limit $LIMIT s, $(( $(date +%s) - START )) s in)"
  rm -f "$OUT/$name.rc"
  ( timeout --kill-after=60 "$LIMIT" "$@" > "$OUT/$name.log" 2>&1; echo $? > "$OUT/$name.rc" ) &
  PIDS[$name]=$!
  T0S[$name]=$(date +%s)
}
for spec in gpu_scratch gpu_finetune; do
  processes=$P_SCRATCH; [ "$spec" = gpu_finetune ] && processes=$P_FINETUNE
  SWEEP=("$PY" tools/sweep.py "configs/sweeps/$spec.toml" --gpus "$GPUS" --processes "$processes" --out "$OUT/$spec")
  [ ${#DATA_OPTS[@]} -gt 0 ] && SWEEP+=(--opt "${DATA_OPTS[@]}")
  if [ "$DRY" = "1" ]; then
    if skipped "${spec#gpu_}"; then row "${spec#gpu_}" "skipped (GPU_SWEEP_SKIP)" - -; continue; fi
    echo "== ${spec#gpu_} (dry run: tools/sweep.py --dry-run)"
    "${SWEEP[@]}" --dry-run > "$OUT/${spec#gpu_}.log" 2>&1
    rc=$?; cat "$OUT/${spec#gpu_}.log"
    row "${spec#gpu_}" "dry run: $(status_of $rc)" - -
    [ "$rc" -eq 0 ] || exit "$rc"
  else
    launch "${spec#gpu_}" "${SWEEP[@]}"
  fi
done

FIRST_GPU="${GPUS%%,*}"
GV_LAUNCHED=0
for seed in ${GRADVAR_SEEDS//,/ }; do
  if [ "$DRY" != "1" ] && [ -f "$OUT/gradvar/seed$seed/gradvar.json" ]; then
    row "gradvar_seed$seed" "done before: kept" - -; GV_LAUNCHED=1; continue
  fi
  # shellcheck disable=SC2086
  launch "gradvar_seed$seed" env CUDA_VISIBLE_DEVICES="$FIRST_GPU" "$PY" tools/gradvar.py --config dense_small_synthetic \
    --opt $SHARED "${DATA_OPTS[@]}" --device cuda --seeds "$seed" --windows 50,300,600 --iters 100 \
    --noise-batches 100 --json --out "$OUT/gradvar/seed$seed"
  [ -n "${PIDS[gradvar_seed$seed]:-}" ] && GV_LAUNCHED=1
done
# the gradient-variance seeds pooled (tools/gradvar_merge.py: ratios and 95% intervals over every
# seed that finished) as soon as they have all ended, on the host cores they free; CPU only and
# slow (the block bootstrap: minutes at 5 seeds x 3 windows): if the time limit stops it, run
# OUT_DIR/gradvar/merge_command.sh on any machine
POOL='out=$1 py=$2 seeds=$3
for s in ${seeds//,/ }; do
  while [ ! -f "$out/gradvar_seed$s.rc" ] && [ ! -f "$out/gradvar/seed$s/gradvar.json" ]; do sleep 5; done
done
dirs=(); for s in ${seeds//,/ }; do [ -f "$out/gradvar/seed$s/gradvar.json" ] && dirs+=("$out/gradvar/seed$s"); done
[ ${#dirs[@]} -ge 2 ] || { echo "${#dirs[@]} gradient-variance seeds finished; 2 are needed to pool"; exit 3; }
printf "%q " "$py" tools/gradvar_merge.py "$out/gradvar" "${dirs[@]}" --json > "$out/gradvar/merge_command.sh"
exec "$py" tools/gradvar_merge.py "$out/gradvar" "${dirs[@]}" --json'
GV_DIRS=(); for seed in ${GRADVAR_SEEDS//,/ }; do GV_DIRS+=("$OUT/gradvar/seed$seed"); done
if [ "$DRY" = "1" ]; then
  launch gradvar_merge "$PY" tools/gradvar_merge.py "$OUT/gradvar" "${GV_DIRS[@]}" --json
elif [ "$GV_LAUNCHED" = 1 ]; then
  launch gradvar_merge bash -c "$POOL" pool "$OUT" "$PY" "$GRADVAR_SEEDS"
fi
for name in "${!PIDS[@]}"; do
  wait "${PIDS[$name]}"
  rc=$(cat "$OUT/$name.rc" 2>/dev/null || echo 1)
  row "$name" "$(status_of "$rc")" $(( $(date +%s) - ${T0S[$name]} )) "$LIMIT"
  tail -n 5 "$OUT/$name.log" | cut -c1-300
done
stop_mps

[ "$DRY" = "1" ] && { echo "== dry run done"; cat "$OUT/steps.md"; exit 0; }

# 4. results of whatever finished (whole seeds first), then the checkpoints of finished runs go
#    (a stage's stays: the runs still to come start from it)
for spec in gpu_scratch gpu_finetune; do
  skipped "${spec#gpu_}" && continue
  t0=$(date +%s)
  SWEEP=("$PY" tools/sweep.py "configs/sweeps/$spec.toml" --gpus "$GPUS" --out "$OUT/$spec" --aggregate-only)
  [ ${#DATA_OPTS[@]} -gt 0 ] && SWEEP+=(--opt "${DATA_OPTS[@]}")
  timeout 120 "${SWEEP[@]}" > "$OUT/aggregate_${spec#gpu_}.log" 2>&1
  row "aggregate_${spec#gpu_}" "$(status_of $?)" $(( $(date +%s) - t0 )) 120
done
if [ "${GPU_SWEEP_KEEP_CHECKPOINTS:-0}" != "1" ]; then
  for run in "$OUT"/gpu_*/runs/*/seed*; do
    [ -f "$run/sweep_run.json" ] && rm -f "$run"/*.pth
  done
fi
echo "== done in $(( $(date +%s) - START )) s"
cat "$OUT/steps.md"
for spec in gpu_scratch gpu_finetune; do [ -f "$OUT/$spec/results.md" ] && echo "results: $OUT/$spec/results.md"; done
exit 0

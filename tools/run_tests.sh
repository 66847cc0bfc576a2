#!/usr/bin/env bash
# One command: install what the tests need on a fresh machine, then run the whole suite.
# Also compiles the CUDA extension for sm_80 and sm_90 (nvcc is enough; no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision at the versions pinned in constraints-torch.txt (the one place); pip only
# runs when something is missing
if ! python tools/requirements_met.py requirements-dev.txt -c constraints-torch.txt; then
  python -m pip install -q -r requirements-dev.txt -c constraints-torch.txt
fi
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
set +e
python -m pytest -q -ra tests "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "pytest collected no tests (exit 5)" >&2; exit 1; fi
exit "$rc"

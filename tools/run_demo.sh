#!/usr/bin/env bash
# One command: install the project's dependencies on a fresh machine and run the CPU demo
# (a small UGS-DINO trained and evaluated on the embedded synthetic dataset -> outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision at the versions pinned in constraints-torch.txt (the one place); pip only
# runs when something is missing (its resolver alone takes seconds)
if ! python tools/requirements_met.py requirements.txt -c constraints-torch.txt; then
  python -m pip install -q -r requirements.txt -c constraints-torch.txt
fi
# One process on the CPU: main.py builds its own accelerate state, so accelerate's launcher
# (configs/accelerate/cpu.yaml gives the same settings) would only add its start-up time.
# ACCELERATE_USE_CPU keeps the demo on the CPU on a machine with a GPU, as that file does.
export ACCELERATE_USE_CPU="${ACCELERATE_USE_CPU:-true}"
exec python main.py "$@"

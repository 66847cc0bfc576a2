#!/usr/bin/env bash
# One command: install the project's dependencies on a fresh machine and run the CPU demo
# (a small UGS-DINO trained and evaluated on the embedded synthetic dataset -> outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and torchvision at the versions pinned in constraints-torch.txt (the one place)
python -m pip install -q -r requirements.txt -c constraints-torch.txt
accelerate launch --config_file configs/accelerate/cpu.yaml main.py "$@"

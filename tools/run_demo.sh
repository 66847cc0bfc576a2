#!/usr/bin/env bash
# One command: install the project's dependencies on a fresh machine and run the CPU demo
# (a small UGS-DINO trained and evaluated on the embedded synthetic dataset -> outputs/demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -r requirements.txt
accelerate launch --config_file configs/accelerate/cpu.yaml main.py "$@"

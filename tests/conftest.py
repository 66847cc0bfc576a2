"""Shared test fixtures: the repository root on sys.path and the location of ../shared."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared_dir() -> Path:
    """../shared beside the checkout (CI lays a copy there); SHARED_DIR overrides."""
    return Path(os.environ.get("SHARED_DIR", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared() -> Path:
    path = shared_dir()
    if not path.is_dir():
        pytest.fail(f"shared fixtures folder {path} is missing (set SHARED_DIR)")
    return path

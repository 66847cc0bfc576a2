"""Multi-scale deformable attention (MSDA), one function for every device and dtype.

`ms_deform_attn` validates its inputs (ops/validate.py, which also states the dtype policy), picks an
implementation and records it for `backend()`:
  - "auto" (default): CUDA tensors -> the compiled CUDA kernels, CPU tensors -> the fused CPU path
    (ops/cpu.py), both through the registered operator torch.ops.msda.ms_deform_attn
    (ops/library.py), so torch.compile(fullgraph=True) and torch.export see one node;
    other devices -> the plain PyTorch path;
  - "cuda" / "cpu": that kernel only; inputs on another device raise;
  - "pytorch": ops/reference.py, plain PyTorch with autograd (the test oracle; it reads
    spatial_shapes on the host, so torch.compile graph-breaks there).
The choice comes from `set_backend(name)`, else from the environment variable MSDA_BACKEND read at
import (call `set_backend(None)` to re-read it). A CUDA build failure raises; nothing falls back
silently. Importing this package never needs a compiler or a GPU.
"""
from __future__ import annotations

import os

import torch

from ops import library
from ops.reference import ms_deform_attn_reference
from ops.validate import check_inputs

BACKENDS = ("auto", "cuda", "cpu", "pytorch")
_OP_DEVICES = ("cpu", "cuda", "meta")

_setting: str = "auto"
_setting_source: str = "default"


def set_backend(name: str | None) -> None:
    """Choose the implementation: one of BACKENDS; None re-reads MSDA_BACKEND (default "auto")."""
    global _setting, _setting_source
    if name is None:
        env = os.environ.get("MSDA_BACKEND", "").strip().lower()
        _setting, _setting_source = (env, "MSDA_BACKEND") if env else ("auto", "default")
        return
    if name not in BACKENDS:
        raise ValueError(f"ops.set_backend: unknown backend {name!r}; expected one of {BACKENDS}")
    _setting, _setting_source = name, "ops.set_backend"


def get_backend() -> str:
    """The configured choice (not necessarily what ran; see backend())."""
    return _setting


def backend() -> str:
    """Which implementation ran in the last call: "cuda", "cpu-embedding_bag", "pytorch" or "none"."""
    return library.last_kernel


def _resolve(device: torch.device) -> str:
    choice = _setting
    if choice not in BACKENDS:
        raise ValueError(f"ms_deform_attn: backend {choice!r} from {_setting_source} is not one of "
                         f"{BACKENDS}")
    kind = device.type
    if choice == "auto":
        return "op" if kind in _OP_DEVICES else "pytorch"
    if choice == "pytorch":
        return "pytorch"
    if kind != choice and kind != "meta":
        raise ValueError(f"ms_deform_attn: backend {choice!r} (from {_setting_source}) needs {choice} "
                         f"tensors, but the inputs are on {device}; use backend 'auto' or move the inputs")
    return "op"


def ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                   sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention.

    value (N, S, M, D): S tokens of all levels concatenated, M heads, D channels per head;
    spatial_shapes (L, 2) int64 rows (H_l, W_l); level_start_index (L,) int64, first token of each level;
    sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), pixel centres at (i + 0.5) / W
    (bilinear, zeros outside the map: grid_sample with align_corners=False, zero padding);
    attention_weights (N, Lq, M, L, P). Returns (N, Lq, M*D) in value's dtype.
    """
    check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    if _resolve(value.device) == "pytorch":
        library.last_kernel = "pytorch"
        return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights)
    if not torch.is_grad_enabled():  # no backward follows: tell the kernels (ops/cpu.py keeps nothing)
        value, sampling_locations, attention_weights = (
            value.detach(), sampling_locations.detach(), attention_weights.detach())
    return library.ms_deform_attn_op(value, spatial_shapes, level_start_index, sampling_locations,
                                     attention_weights)


set_backend(None)

__all__ = ["BACKENDS", "backend", "get_backend", "ms_deform_attn", "ms_deform_attn_reference", "set_backend"]

"""Multi-scale deformable attention. Importing this package never needs a compiler or a GPU.

Placeholder until the ops issue lands its compiled backends: every device runs the reference.
"""
from __future__ import annotations

from ops.reference import ms_deform_attn_reference

_last_backend = "none"


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    global _last_backend
    _last_backend = "pytorch"
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index,
                                    sampling_locations, attention_weights)


def backend() -> str:
    return _last_backend


__all__ = ["ms_deform_attn", "ms_deform_attn_reference", "backend"]

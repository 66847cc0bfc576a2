"""The PyTorch operators msda::ms_deform_attn and msda::ms_deform_attn_backward.

Registered with torch.library.custom_op, so torch.compile(fullgraph=True) and torch.export see one
opaque node per call (fake kernels give output shapes; autograd calls the backward op, which is
itself a traceable node). Kernels: CPU runs ops/cpu.py, CUDA runs the compiled extension
(ops/build.py, built on first use; a build failure raises, it never falls back).

Autocast: no autocast rule is registered, so under torch.autocast the op receives its inputs
unchanged (value may stay bfloat16 while locations/weights stay float32, as the dtype policy in
ops/validate.py allows) and the kernels run with autocast disabled; the output has value's dtype.
"""
from __future__ import annotations

import torch

from ops.cpu import ms_deform_attn_cpu, ms_deform_attn_cpu_backward

# Which kernel ran last; read by ops.backend(). Set inside the kernels, so it is truthful under
# torch.compile too (compiled graphs call the kernels at run time).
last_kernel = "none"


def _contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.contiguous() for t in tensors]


_ARGS = ("Tensor value, Tensor spatial_shapes, Tensor level_start_index, Tensor sampling_locations, "
         "Tensor attention_weights")


# Schemas are spelled out (not inferred from annotations) so they read the same on every torch >= 2.4.
@torch.library.custom_op("msda::ms_deform_attn", mutates_args=(), schema=f"({_ARGS}) -> Tensor")
def ms_deform_attn_op(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                      sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """value (N, S, M, D), spatial_shapes (L, 2), level_start_index (L,), sampling_locations
    (N, Lq, M, L, P, 2), attention_weights (N, Lq, M, L, P) -> (N, Lq, M*D) in value's dtype."""
    raise NotImplementedError(f"msda::ms_deform_attn has no kernel for device {value.device.type}")


@torch.library.custom_op("msda::ms_deform_attn_backward", mutates_args=(),
                         schema=f"({_ARGS}, Tensor grad_output) -> (Tensor, Tensor, Tensor)")
def ms_deform_attn_backward_op(value: torch.Tensor, spatial_shapes: torch.Tensor,
                               level_start_index: torch.Tensor, sampling_locations: torch.Tensor,
                               attention_weights: torch.Tensor, grad_output: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients w.r.t. (value, sampling_locations, attention_weights), each in its input's dtype."""
    raise NotImplementedError(f"msda::ms_deform_attn_backward has no kernel for device {value.device.type}")


# ---- CPU -------------------------------------------------------------------------------------------
@ms_deform_attn_op.register_kernel("cpu")
def _forward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    global last_kernel
    last_kernel = "cpu-embedding_bag"
    # Inputs computed with grad enabled require grad (under no_grad they do not): then the backward
    # will follow and the forward keeps what it can share with it (ops/cpu.py).
    keep = value.requires_grad or sampling_locations.requires_grad or attention_weights.requires_grad
    with torch.autocast("cpu", enabled=False):
        return ms_deform_attn_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, keep_for_backward=keep)


@ms_deform_attn_backward_op.register_kernel("cpu")
def _backward_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                  grad_output):
    with torch.autocast("cpu", enabled=False):
        return ms_deform_attn_cpu_backward(value, spatial_shapes, level_start_index, sampling_locations,
                                           attention_weights, grad_output)


# ---- CUDA ------------------------------------------------------------------------------------------
def _extension():
    from ops.build import load_extension  # imported lazily: importing ops never needs a compiler

    return load_extension()


@ms_deform_attn_op.register_kernel("cuda")
def _forward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    global last_kernel
    ext = _extension()
    last_kernel = "cuda"
    with torch.autocast("cuda", enabled=False):
        return ext.forward(*_contiguous(value, spatial_shapes, level_start_index, sampling_locations,
                                        attention_weights))


@ms_deform_attn_backward_op.register_kernel("cuda")
def _backward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   grad_output):
    ext = _extension()
    with torch.autocast("cuda", enabled=False):
        grads = ext.backward(*_contiguous(value, spatial_shapes, level_start_index, sampling_locations,
                                          attention_weights, grad_output))
    return tuple(grads)


# ---- shapes (fake tensors) and autograd ------------------------------------------------------------
@ms_deform_attn_op.register_fake
def _forward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@ms_deform_attn_backward_op.register_fake
def _backward_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                   grad_output):
    return (torch.empty_like(value, memory_format=torch.contiguous_format),
            torch.empty_like(sampling_locations, memory_format=torch.contiguous_format),
            torch.empty_like(attention_weights, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_locations, grad_weights = ms_deform_attn_backward_op(
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights, grad_output)
    return grad_value, None, None, grad_locations, grad_weights


ms_deform_attn_op.register_autograd(_backward, setup_context=_setup_context)

"""Input checks and the dtype policy of ops.ms_deform_attn, in one place.

Dtype policy: value is float64, float32, float16 or bfloat16; sampling_locations and
attention_weights are each either value's dtype or float32 (autocast-aware callers keep them in
float32 for precision); spatial_shapes and level_start_index are int64. Computation accumulates in
float64 for float64 value and in float32 otherwise; the output has value's dtype and every gradient
has its input's dtype.

Cost: shape, dtype and device checks read only metadata. The value checks (positive (H, W),
sum of H*W == S, level_start_index == exclusive cumsum of H*W) need the integer tensors on the host:
for CPU tensors that is free and done on every call; for GPU tensors it is a device->host sync,
so it is done once per tensor object (cached by identity and in-place version counter; the
encoder and decoder layers of one forward share one spatial_shapes tensor) and later calls compare
only S against the cached total. Under torch.compile / torch.export tracing the value checks are
skipped (the values are data, not trace-time constants); the shape checks still run.
"""
from __future__ import annotations

import weakref

import torch

VALUE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_NAMES = ("value", "spatial_shapes", "level_start_index", "sampling_locations", "attention_weights")


def compute_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if value_dtype == torch.float64 else torch.float32


def _fail(message: str) -> None:
    raise ValueError(f"ms_deform_attn: {message}")


def _check_rank(name: str, tensor: object, rank: int, layout: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"ms_deform_attn: {name} must be a torch.Tensor {layout}, "
                        f"got {type(tensor).__name__}")
    if tensor.dim() != rank:
        _fail(f"{name} must have {rank} dims {layout}, got shape {tuple(tensor.shape)}")


def check_inputs(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
                 sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> None:
    """Raise a ValueError/TypeError naming the offending tensor and what was expected."""
    _check_rank("value", value, 4, "(N, S, M, D)")
    _check_rank("spatial_shapes", spatial_shapes, 2, "(L, 2) rows (H, W)")
    _check_rank("level_start_index", level_start_index, 1, "(L,)")
    _check_rank("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)")
    _check_rank("attention_weights", attention_weights, 5, "(N, Lq, M, L, P)")

    n, s, m, d = value.shape
    num_levels = spatial_shapes.shape[0]
    if spatial_shapes.shape[1] != 2:
        _fail(f"spatial_shapes must be (L, 2) rows (H, W), got shape {tuple(spatial_shapes.shape)}")
    if level_start_index.shape[0] != num_levels:
        _fail(f"level_start_index must be (L,) = ({num_levels},) like spatial_shapes, "
              f"got shape {tuple(level_start_index.shape)}")
    ln, lq, lm, ll, lp, two = sampling_locations.shape
    if two != 2:
        _fail(f"sampling_locations last dim must be 2 (x, y), got shape {tuple(sampling_locations.shape)}")
    if ln != n:
        _fail(f"sampling_locations batch N={ln} != value batch N={n}")
    if lm != m:
        _fail(f"sampling_locations heads M={lm} != value heads M={m}")
    if ll != num_levels:
        _fail(f"sampling_locations levels L={ll} != spatial_shapes levels L={num_levels}")
    expected = (n, lq, m, num_levels, lp)
    if tuple(attention_weights.shape) != expected:
        _fail(f"attention_weights must be (N, Lq, M, L, P) = {expected} to match sampling_locations "
              f"{tuple(sampling_locations.shape)} and value {tuple(value.shape)}, "
              f"got {tuple(attention_weights.shape)}")

    if value.dtype not in VALUE_DTYPES:
        _fail(f"value dtype must be one of float64, float32, float16, bfloat16, got {value.dtype}")
    for name, tensor in (("sampling_locations", sampling_locations),
                         ("attention_weights", attention_weights)):
        if tensor.dtype not in (value.dtype, torch.float32):
            _fail(f"{name} dtype must be value's dtype ({value.dtype}) or torch.float32, got {tensor.dtype}")
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype != torch.int64:
            _fail(f"{name} must be int64 (torch.long), got {tensor.dtype}")

    for name, tensor in zip(_NAMES[1:], (spatial_shapes, level_start_index, sampling_locations,
                                         attention_weights)):
        if tensor.device != value.device:
            _fail(f"{name} is on {tensor.device} but value is on {value.device}; "
                  "all inputs must share a device")

    if _is_tracing() or value.device.type == "meta":
        return
    total = checked_total(spatial_shapes, level_start_index, cache=spatial_shapes.device.type != "cpu")
    if total != s:
        _fail(f"sum of H*W over spatial_shapes is {total} but value has S={s} tokens (value shape "
              f"{tuple(value.shape)})")


def _is_tracing() -> bool:
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling():
        return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # inference tensors track no version counter
        return None


# id(spatial_shapes) -> (weakref(spatial_shapes), version, weakref(level_start_index), version, total)
_value_cache: dict[int, tuple] = {}
_CACHE_SIZE = 16


def checked_total(spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, cache: bool) -> int:
    """Validate the integer tensors' values and return sum(H*W).

    cache=True (used for GPU tensors) remembers the result per tensor object and in-place version, so
    a repeated call costs no host sync; a new tensor or an in-place change is checked again.
    """
    key = id(spatial_shapes)
    if cache:
        hit = _value_cache.get(key)
        if (hit is not None and hit[0]() is spatial_shapes and hit[1] == _version(spatial_shapes)
                and hit[2]() is level_start_index and hit[3] == _version(level_start_index)):
            return hit[4]
    shapes = spatial_shapes.tolist()
    starts = level_start_index.tolist()
    total = 0
    for level, (h, w) in enumerate(shapes):
        if h < 1 or w < 1:
            _fail(f"spatial_shapes row {level} is (H, W) = ({h}, {w}); both must be >= 1")
        if starts[level] != total:
            expected = [0]
            for hh, ww in shapes[:-1]:
                expected.append(expected[-1] + hh * ww)
            _fail(f"level_start_index {starts} is inconsistent with spatial_shapes {shapes}: "
                  f"expected the exclusive cumulative sum of H*W, {expected}")
        total += h * w
    if cache:
        if len(_value_cache) >= _CACHE_SIZE:
            _value_cache.pop(next(iter(_value_cache)))
        _value_cache[key] = (weakref.ref(spatial_shapes), _version(spatial_shapes),
                             weakref.ref(level_start_index), _version(level_start_index), total)
    return total

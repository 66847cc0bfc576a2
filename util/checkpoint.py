"""Checkpoint files: atomic saving, safe loading, importing official DINO weights, safetensors export.

- Saving writes a temporary file in the target directory, fsyncs it and renames it over the target,
  so a crash mid-write leaves the previous checkpoint intact (`save_checkpoint`).
- Loading never runs pickled code: `torch.load(weights_only=True)` with an explicit allow-list
  (`SAFE_GLOBALS`; official DINO checkpoints carry an `argparse.Namespace` under "args").
- `import_weights` loads an official (or our) state dict into a model and reports every tensor:
  loaded, missing, unexpected, ignored, re-initialised (class-count change, UGS bin head) and
  skipped. Any other shape mismatch is an error naming the tensor and both shapes.
- `export_safetensors` writes weights only, keeping the official key layout (aliases cloned).
- `prune_epoch_checkpoints` keeps the newest `runtime.keep_checkpoints` per-epoch copies.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

# Globals a checkpoint may contain beyond what weights_only allows by default (tensors, dicts,
# lists, tuples, OrderedDict, numbers, strings). Official DINO training checkpoints pickle their
# argparse.Namespace under "args"; nothing else in them needs an exception.
SAFE_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)

# ---- Tensors whose shape depends on the number of classes (re-initialised when it changes).
# Keys follow the official state-dict names (docs/dino.md, "Checkpoints").
CLASS_DEPENDENT_PATTERNS: tuple[str, ...] = (
    r"class_embed\.\d+\.(weight|bias)",                       # decoder class heads (shared, aliased)
    r"transformer\.decoder\.class_embed\.\d+\.(weight|bias)",  # the same heads under their alias
    r"transformer\.enc_out_class_embed\.(weight|bias)",        # encoder (two-stage) proposal head
    r"label_enc\.weight",                                      # CDN label embedding: labelbook + 1 rows
)
# ---- The box heads' last linear layer: 4 outputs in DINO, 4 (n + 1) bin logits with UGS.
# With UGS they start at zero weight and zero bias (docs/ugs.md, "The method").
UGS_BOX_HEAD_PATTERNS: tuple[str, ...] = (
    r"bbox_embed\.\d+\.layers\.\d+\.(weight|bias)",                       # decoder box heads
    r"transformer\.decoder\.bbox_embed\.\d+\.layers\.\d+\.(weight|bias)",  # their alias
    r"transformer\.enc_out_bbox_embed\.layers\.\d+\.(weight|bias)",        # encoder proposal head
)
# ---- Buffers the official code drops when loading (FrozenBatchNorm has none; torchvision's
# BatchNorm state carries them). Reported as "ignored".
IGNORED_PATTERNS: tuple[str, ...] = (r".*num_batches_tracked",)


class CheckpointError(RuntimeError):
    """A checkpoint file or state dict that cannot be used; the message names file / tensor."""


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(re.fullmatch(p, key) for p in patterns)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------
def _fsync_dir(directory: Path) -> None:
    try:  # makes the rename itself durable; not possible on every platform
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001 - write(file_object) -> None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def save_checkpoint(state: Mapping[str, Any], path: str | Path) -> Path:
    """torch.save `state` to `path` atomically (temporary file in the same directory + rename)."""
    path = Path(path)
    _atomic_write(path, lambda fh: torch.save(dict(state), fh))
    return path


def save_training_checkpoint(output_dir: str | Path, state: Mapping[str, Any], is_best: bool = False) -> Path:
    """Write `checkpoint_last.pth` (and `checkpoint_best.pth` when `is_best`), both atomically.

    The best copy is a file copy of the just-written last one, not a second serialisation.
    """
    output_dir = Path(output_dir)
    last = save_checkpoint(state, output_dir / "checkpoint_last.pth")
    if is_best:
        def copy(fh) -> None:  # noqa: ANN001
            with open(last, "rb") as src:
                shutil.copyfileobj(src, fh, length=16 << 20)
        _atomic_write(output_dir / "checkpoint_best.pth", copy)
    return last


EPOCH_CHECKPOINT_RE = re.compile(r"checkpoint_epoch(\d+)\.pth")


def prune_epoch_checkpoints(output_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` `checkpoint_epochNNNN.pth` files (oldest epoch first).

    `runtime.keep_checkpoints`: each copy holds the optimizer state, so a long run would fill the
    disk. checkpoint_last.pth and checkpoint_best.pth are never touched; keep < 0 keeps every copy.
    Returns the deleted paths.
    """
    if keep < 0:
        return []
    found = []
    for path in Path(output_dir).glob("checkpoint_epoch*.pth"):
        match = EPOCH_CHECKPOINT_RE.fullmatch(path.name)
        if match and path.is_file():
            found.append((int(match.group(1)), path))
    found.sort()
    doomed = [path for _, path in found[:max(len(found) - keep, 0)]]
    for path in doomed:
        path.unlink()
    if doomed:
        logging.getLogger(__name__).info("runtime.keep_checkpoints=%d: removed %s", keep,
                                         ", ".join(p.name for p in doomed))
    return doomed


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """`--resume auto`: the last checkpoint in `output_dir`, or None if there is none."""
    path = Path(output_dir) / "checkpoint_last.pth"
    return path if path.is_file() else None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")


def _relevant_line(message: str) -> str:
    """The line of torch's weights-only error that says what was refused."""
    for line in message.splitlines():
        if "WeightsUnpickler error" in line or "Unsupported" in line:
            return line.strip()[:300]
    return _first_line(message)


def _first_line(message: str, limit: int = 200) -> str:
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    return lines[0][:limit] if lines else "no details"


def load_checkpoint(path: str | Path, extra_safe_globals: Iterable[Any] = ()) -> dict[str, Any]:
    """Load a checkpoint on CPU without executing pickled code.

    Allowed beyond torch's defaults: `SAFE_GLOBALS` plus `extra_safe_globals` (only for files you
    trust). Raises CheckpointError naming the file for a missing, corrupt/truncated file or a
    disallowed global.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    allowed = list(SAFE_GLOBALS) + list(extra_safe_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        message = str(exc)
        found = _GLOBAL_RE.search(message)
        if found:
            name = found.group(1)
            raise CheckpointError(
                f"checkpoint {path} contains the global {name}, which is not on the safe-loading allow-list. "
                f"If you trust this file, allow it: load_checkpoint(path, extra_safe_globals=[{name}]) "
                "(import it first).") from None
        raise CheckpointError(f"checkpoint {path} could not be read safely: it is corrupt, truncated, or "
                              f"not a torch.save file (torch: {_relevant_line(message)})") from exc
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        detail = "the file is empty" if path.stat().st_size == 0 else _first_line(str(exc))
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}: {detail}); "
                              "re-download or re-save it") from exc
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict "
                              '(official layout {"model": state_dict, ...} or a bare state dict)')
    return obj


def extract_state_dict(checkpoint: Mapping[str, Any], key: str = "model") -> dict[str, Tensor]:
    """The model state dict of a checkpoint: `checkpoint[key]` when present, else the checkpoint
    itself if it is a bare state dict; a leading `module.` (DDP) is stripped."""
    sd = checkpoint.get(key, checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(sd, Mapping) or not sd or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"no state dict found under '{key}' (keys: {sorted(checkpoint)[:10]})")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


# --------------------------------------------------------------------------------------------
# Importing weights into a model
# --------------------------------------------------------------------------------------------
@dataclass
class ImportReport:
    """What happened to every tensor when a state dict was imported into a model."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)       # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)    # in the checkpoint, not in the model
    ignored: list[str] = field(default_factory=list)       # e.g. num_batches_tracked
    reinitialised: dict[str, str] = field(default_factory=dict)   # key -> reason
    skipped_mismatch: dict[str, str] = field(default_factory=dict)  # key -> "ckpt (..) vs model (..)"

    @property
    def clean(self) -> bool:
        """True when every model tensor came from the checkpoint and nothing was left over."""
        return not (self.missing or self.unexpected or self.reinitialised or self.skipped_mismatch)

    def __str__(self) -> str:
        lines = [f"checkpoint import: {len(self.loaded)} loaded, {len(self.reinitialised)} re-initialised, "
                 f"{len(self.skipped_mismatch)} skipped (shape mismatch), {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"]
        for title, items in (("re-initialised", self.reinitialised), ("skipped (shape mismatch)",
                                                                       self.skipped_mismatch)):
            if items:
                lines.append(f"  {title}:")
                lines.extend(f"    {k}: {why}" for k, why in items.items())
        for title, keys in (("missing (model keeps its initialisation)", self.missing),
                            ("unexpected (not used)", self.unexpected), ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {title}:")
                lines.extend(f"    {k}" for k in keys)
        return "\n".join(lines)


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def import_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, num_classes_changed_ok: bool = True,
                   skip_mismatched: bool = False) -> ImportReport:
    """Load `state_dict` (official key names) into `model`; return the report.

    Shape rules, checked per tensor:
    - same shape: loaded (cast to the model's dtype);
    - class-dependent tensor (CLASS_DEPENDENT_PATTERNS) whose class dimension (dim 0) differs:
      the model keeps its fresh initialisation (prior-bias class heads, new label embedding) when
      `num_classes_changed_ok`;
    - box-head last layer (UGS_BOX_HEAD_PATTERNS) with 4 outputs in the checkpoint and 4 (n + 1)
      in the model: zero weight and zero bias (uniform bins, expectation = reference box);
    - anything else: CheckpointError naming the tensor and both shapes, or skipped and reported
      when `skip_mismatched`.
    """
    report = ImportReport()
    model_sd = model.state_dict()
    to_load: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if _matches(key, IGNORED_PATTERNS) and key not in model_sd:
            report.ignored.append(key)
            continue
        if key not in model_sd:
            report.unexpected.append(key)
            continue
        target = model_sd[key]
        ckpt_shape, model_shape = _shape(value), _shape(target)
        if ckpt_shape == model_shape:
            to_load[key] = value
            report.loaded.append(key)
            continue
        same_rest = ckpt_shape[1:] == model_shape[1:] and len(ckpt_shape) == len(model_shape)
        shapes = f"checkpoint {list(ckpt_shape)} vs model {list(model_shape)}"
        if _matches(key, CLASS_DEPENDENT_PATTERNS) and same_rest and num_classes_changed_ok:
            report.reinitialised[key] = f"class count changed ({shapes}); fresh initialisation kept"
        elif (_matches(key, UGS_BOX_HEAD_PATTERNS) and same_rest and ckpt_shape[0] == 4
              and model_shape[0] > 4 and model_shape[0] % 4 == 0):
            to_load[key] = torch.zeros(model_shape, dtype=target.dtype)
            report.reinitialised[key] = (f"UGS bin head: {model_shape[0] // 4 - 1} + 1 bins per coordinate "
                                         f"({shapes}); zero weight and bias")
        elif skip_mismatched:
            report.skipped_mismatch[key] = shapes
        else:
            hint = (" (class-dependent tensor: pass num_classes_changed_ok=True to re-initialise it)"
                    if _matches(key, CLASS_DEPENDENT_PATTERNS) and same_rest else "")
            raise CheckpointError(f"shape mismatch for '{key}': {shapes}{hint}; to keep the model's "
                                  "initialisation for such tensors add --skip-mismatched (main.py, "
                                  "tools/import_official.py; skip_mismatched=True in Python)")
    report.missing = [k for k in model_sd if k not in state_dict]
    incompatible = model.load_state_dict(to_load, strict=False)
    if incompatible.unexpected_keys:  # cannot happen: every key in to_load is a model key
        raise CheckpointError(f"internal error: unexpected keys {incompatible.unexpected_keys}")
    return report


# --------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------
def export_safetensors(state_dict: Mapping[str, Tensor], path: str | Path,
                       metadata: Mapping[str, str] | None = None) -> Path:
    """Write weights only, atomically, keeping every key of the official layout.

    safetensors refuses tensors that share storage; the official layout stores each shared head
    under 12 names (section 14), so the second and later names of a storage get contiguous
    clones (a few MB more for R50, in exchange for a file that loads strictly under every name).
    """
    from safetensors.torch import save as st_save

    seen: set[tuple[str, int]] = set()
    tensors: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise CheckpointError(f"export_safetensors: '{key}' is a {type(value).__name__}, not a tensor")
        t = value.detach().to("cpu")
        storage = (t.device.type, t.untyped_storage().data_ptr()) if t.numel() else None
        if storage is not None and storage in seen:
            t = t.clone()
        elif storage is not None:
            seen.add(storage)
        tensors[key] = t.contiguous()
    meta = {"format": "pt", **dict(metadata or {})}
    data = st_save(tensors, metadata=meta)
    path = Path(path)
    _atomic_write(path, lambda fh: fh.write(data))
    return path


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file on CPU (weights only by construction)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"safetensors file {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"safetensors file {path} is corrupt or truncated: {exc}") from exc


def load_weights_file(path: str | Path) -> dict[str, Tensor]:
    """A model state dict from a .safetensors file or a (official or our) .pth checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    return extract_state_dict(load_checkpoint(path))


# --------------------------------------------------------------------------------------------
# RNG state in a weights_only-loadable form (resume reproduces the random stream)
# --------------------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA RNG states as tensors / tuples of ints (no numpy pickles)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of capture_rng_state (CUDA states restored only when CUDA is available)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

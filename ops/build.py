"""Build and load the MSDA CUDA extension (ops/csrc), just in time and cached.

The first call compiles with ninja (torch.utils.cpp_extension) into a folder whose name carries a
hash of the sources, the build flags, the torch / CUDA / Python versions and the target archs, so
a stale build is never loaded; later calls import the finished module directly (no compiler
needed). Archs come from TORCH_CUDA_ARCH_LIST, else the visible GPU, else "8.0;9.0" (building
needs nvcc, not a GPU). A failed build raises MSDABuildError naming the compiler log; nothing
falls back to the PyTorch path silently.

Cache folder: $MSDA_BUILD_DIR, else $TORCH_EXTENSIONS_DIR/msda, else <repo>/build/msda.

    python -m ops.build          # build ahead of time for TORCH_CUDA_ARCH_LIST, print where
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from types import ModuleType

import torch

LOG = logging.getLogger("ops")

CSRC = Path(__file__).resolve().parent / "csrc"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_ARCHS = "8.0;9.0"
_CXX_FLAGS = ["-O3"]  # the -std flag is chosen by torch.utils.cpp_extension (C++17 or 20)
_CUDA_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
_OK_MARKER = "build.ok"

_loaded: dict[str, ModuleType] = {}


class MSDABuildError(RuntimeError):
    """The CUDA extension could not be built; the message names the log and the ways out."""


def _ways_out(log: Path | None) -> str:
    where = f"The compiler output is in {log}.\n" if log is not None else ""
    return (f"{where}Two ways out:\n"
            "  1. fix the CUDA toolchain: CUDA_HOME pointing at a CUDA toolkit with nvcc whose major "
            f"version matches torch's CUDA ({torch.version.cuda}), a host C++ compiler this torch supports, and ninja; "
            "then rebuild with `python -m ops.build`;\n"
            "  2. or select the plain PyTorch path explicitly: set the environment variable "
            "MSDA_BACKEND=pytorch, or call ops.set_backend(\"pytorch\") before the first call.")


def cache_root() -> Path:
    if os.environ.get("MSDA_BUILD_DIR"):
        return Path(os.environ["MSDA_BUILD_DIR"])
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "msda"
    return REPO / "build" / "msda"


def arch_list() -> str:
    """Target archs as TORCH_CUDA_ARCH_LIST spells them, e.g. "8.0;9.0"."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCHS


def _nvidia_include_dirs() -> list[str]:
    """include folders of the pip `nvidia` packages (cusparse.h etc. that ATen's headers want)."""
    dirs: list[str] = []
    for entry in sys.path:
        if not entry:
            continue
        dirs += sorted(glob.glob(os.path.join(entry, "nvidia", "*", "include")))
    seen: set[str] = set()
    return [d for d in dirs if not (d in seen or seen.add(d))]


def _cuda_home() -> str:
    """CUDA_HOME for the build; /usr/local/cuda when unset and present."""
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        found = cpp_extension.CUDA_HOME
        # `which nvcc` may resolve to a wrapper in /usr/local/bin, which is not a toolkit root
        if found and Path(found, "include", "cuda_runtime.h").is_file():
            home = found
        elif Path("/usr/local/cuda/bin/nvcc").is_file():
            home = "/usr/local/cuda"
        else:
            home = found
    if not home or not Path(home, "bin", "nvcc").is_file():
        raise MSDABuildError(f"ops: no CUDA toolkit found (CUDA_HOME={home!r}, need bin/nvcc under it).\n"
                             + _ways_out(None))
    return home


def _sources(src_dir: Path) -> list[Path]:
    files = sorted(p for p in src_dir.iterdir() if p.suffix in (".cpp", ".cu", ".cuh", ".h"))
    if not any(p.suffix in (".cpp", ".cu") for p in files):
        raise MSDABuildError(f"ops: no C++/CUDA sources in {src_dir}.\n" + _ways_out(None))
    return files


def _build_name(files: list[Path], archs: str, cflags: list[str], cuda_flags: list[str]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    for part in (torch.__version__, str(torch.version.cuda), sys.version.split()[0], archs,
                 " ".join(cflags), " ".join(cuda_flags)):
        h.update(part.encode())
        h.update(b"\0")
    tag = archs.replace(";", "_").replace(".", "").replace(" ", "").replace("+", "p")
    return f"msda_{tag}_{h.hexdigest()[:12]}"


def _import_built(name: str, so_path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, so_path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build(archs: str | None = None, *, verbose: bool = False, src_dir: Path | None = None,
          root: Path | None = None, extra_cuda_cflags: list[str] | None = None) -> ModuleType:
    """Compile (or load from the cache) the extension for `archs`; the keywords exist for tests."""
    archs = archs or arch_list()
    src_dir = Path(src_dir) if src_dir is not None else CSRC
    cuda_flags = _CUDA_FLAGS + list(extra_cuda_cflags or [])
    files = _sources(src_dir)
    name = _build_name(files, archs, _CXX_FLAGS, cuda_flags)
    if name in _loaded:
        return _loaded[name]
    build_dir = Path(root) if root is not None else cache_root()
    build_dir = build_dir / name
    so_path = build_dir / f"{name}.so"
    if (build_dir / _OK_MARKER).is_file() and so_path.is_file():
        _loaded[name] = _import_built(name, so_path)
        return _loaded[name]

    if torch.version.cuda is None:
        raise MSDABuildError(f"ops: this torch ({torch.__version__}) has no CUDA support, so the MSDA "
                             "CUDA extension cannot be built.\n" + _ways_out(None))
    from torch.utils import cpp_extension

    home = _cuda_home()
    build_dir.mkdir(parents=True, exist_ok=True)
    log_path = build_dir / "build.log"
    major_minor = ", ".join(f"sm_{a.replace('.', '').replace('+PTX', '')}" for a in archs.split(";") if a)
    LOG.warning("ops: compiling MSDA CUDA extension for %s (first use, ~2-5 min) into %s", major_minor,
                build_dir)
    start = time.time()
    old_home = cpp_extension.CUDA_HOME
    cpp_extension.CUDA_HOME = home  # read at import time; make sure the toolkit root is used
    try:
        with _env(TORCH_CUDA_ARCH_LIST=archs, CUDA_HOME=home):
            module = cpp_extension.load(
                name=name,
                sources=[str(f) for f in files if f.suffix in (".cpp", ".cu")],
                extra_cflags=_CXX_FLAGS,
                extra_cuda_cflags=cuda_flags,
                extra_include_paths=_nvidia_include_dirs(),
                build_directory=str(build_dir),
                verbose=verbose,
                with_cuda=True,
            )
    except Exception as exc:  # ninja/compiler failures arrive as RuntimeError with the output
        shown = "\n(verbose build: the compiler output above went to the console)\n" if verbose else ""
        log_path.write_text(f"archs: {archs}\nCUDA_HOME: {home}\ntorch: {torch.__version__} "
                            f"(CUDA {torch.version.cuda})\n\n{exc}\n{shown}")
        raise MSDABuildError(f"ops: building the MSDA CUDA extension failed ({type(exc).__name__}).\n"
                             + _ways_out(log_path)) from exc
    finally:
        cpp_extension.CUDA_HOME = old_home
    log_path.write_text(f"archs: {archs}\nCUDA_HOME: {home}\nbuilt in {time.time() - start:.0f} s\n")
    (build_dir / _OK_MARKER).write_text(f"{so_path.name}\n")
    _prune_stale(build_dir)
    _loaded[name] = module
    return module


_default: ModuleType | None = None


def _prune_stale(keep: Path) -> None:
    """Remove finished builds for the same archs from older sources (they can never load again)."""
    prefix = keep.name.rsplit("_", 1)[0] + "_"
    for other in keep.parent.glob(prefix + "*"):
        if other != keep and other.name.rsplit("_", 1)[0] + "_" == prefix and (other / _OK_MARKER).is_file():
            shutil.rmtree(other, ignore_errors=True)


def load_extension(verbose: bool = False) -> ModuleType:
    """The compiled module with forward(...) and backward(...); builds it on first use.

    After the first call this is a global read (the op calls it on every forward)."""
    global _default
    if _default is None:
        _default = build(verbose=verbose)
    return _default


def main() -> int:
    archs = arch_list()
    start = time.time()
    try:
        module = build(archs, verbose="-v" in sys.argv[1:])
    except MSDABuildError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"ops: MSDA CUDA extension for TORCH_CUDA_ARCH_LIST={archs!r} ready in {time.time() - start:.1f} s: "
          f"{module.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The MSDA CUDA extension compiles for sm_80 and sm_90 with nvcc alone (no GPU needed), holds
exactly the kernel variants the dispatcher can call (one forward and one backward per dtype, in the
vector widths D and alignment may require; float64 has both forward variants for the tests), reads
no environment switches, and a broken build raises MSDABuildError naming its log and the two ways out.

The full build takes ~2 min on 2 cores the first time; it is cached (ops/build.py: the folder name
hashes sources, flags, torch/CUDA/Python versions and archs), so later runs only import the module.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops import build as msda_build

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "ops" / "csrc"

# (value type, locations type) -> vector widths and points per step of the compiled forward, and
# the vector widths of the compiled backward: the kernel choices of ops/csrc/msda_launch.h (Tuning).
HALF_TYPES = [(t, tl) for t in ("c10::BFloat16", "c10::Half") for tl in (t, "float")]
FORWARD = ({(t, tl, v, 2) for t, tl in HALF_TYPES for v in (8, 4, 2, 1)}
           | {("float", "float", v, 1) for v in (4, 2, 1)}
           | {("double", "double", v, k) for v in (4, 2, 1) for k in (1, 2)})
BACKWARD = {(t, tl, v) for t, tl in HALF_TYPES + [("float", "float"), ("double", "double")] for v in (4, 2, 1)}


def _have_nvcc() -> bool:
    try:
        msda_build._cuda_home()
    except msda_build.MSDABuildError:
        return False
    return True


needs_nvcc = pytest.mark.skipif(not _have_nvcc(), reason="no CUDA toolkit (nvcc) on this machine")


@pytest.mark.slow
@needs_nvcc
def test_extension_compiles_for_sm80_and_sm90():
    module = msda_build.build("8.0;9.0")
    assert callable(module.forward) and callable(module.backward)
    folder = Path(module.__file__).parent
    assert folder.name.startswith("msda_80_90_") and (folder / "build.ok").is_file()
    # a second build request is served from the cache: same module, no compiler run
    assert msda_build.build("8.0;9.0") is module


@pytest.mark.slow
@needs_nvcc
def test_cached_build_imports_in_a_fresh_process_without_compiling():
    msda_build.build("8.0;9.0")
    code = ("import time, sys; from ops import build; t = time.time(); m = build.build('8.0;9.0'); "
            "print(m.__file__, round(time.time() - t, 2))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert "compiling" not in result.stderr, result.stderr
    path, seconds = result.stdout.split()
    assert Path(path).is_file() and float(seconds) < 30


def test_build_name_changes_with_sources_and_archs(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.cpp").write_text("int x = 1;\n")
    files = msda_build._sources(src)
    first = msda_build._build_name(files, "8.0;9.0", [], [])
    assert first.startswith("msda_80_90_")
    assert msda_build._build_name(files, "9.0", [], []) != first
    (src / "a.cpp").write_text("int x = 2;\n")
    assert msda_build._build_name(msda_build._sources(src), "8.0;9.0", [], []) != first


@needs_nvcc
def test_broken_build_raises_with_log_and_ways_out(tmp_path):
    src = tmp_path / "broken_src"
    src.mkdir()
    (src / "broken.cpp").write_text('#error "deliberately broken MSDA source"\n')
    with pytest.raises(msda_build.MSDABuildError) as info:
        msda_build.build("9.0", src_dir=src, root=tmp_path / "cache")
    message = str(info.value)
    logs = list((tmp_path / "cache").glob("*/build.log"))
    assert len(logs) == 1 and str(logs[0]) in message
    assert "deliberately broken" in logs[0].read_text()
    assert "MSDA_BACKEND=pytorch" in message and 'ops.set_backend("pytorch")' in message
    assert "CUDA_HOME" in message
    # nothing was marked as built, so the next call tries again instead of loading a stale module
    assert not list((tmp_path / "cache").glob("*/build.ok"))


def test_missing_sources_raise(tmp_path):
    with pytest.raises(msda_build.MSDABuildError, match="no C\\+\\+/CUDA sources"):
        msda_build.build("9.0", src_dir=tmp_path, root=tmp_path / "cache")


def test_nvidia_include_dirs_found_once_in_path_order(tmp_path, monkeypatch):
    """include folders of pip `nvidia` packages on sys.path, each once, in sys.path order."""
    first, second = tmp_path / "site_a", tmp_path / "site_b"
    for root, package in ((first, "cusparse"), (first, "cublas"), (second, "cusparse")):
        (root / "nvidia" / package / "include").mkdir(parents=True)
    (first / "nvidia" / "no_headers").mkdir()
    monkeypatch.setattr(sys, "path", ["", str(first), str(second), str(first)])
    assert msda_build._nvidia_include_dirs() == [
        str(first / "nvidia" / "cublas" / "include"), str(first / "nvidia" / "cusparse" / "include"),
        str(second / "nvidia" / "cusparse" / "include")]


def _instantiated_in_sources() -> tuple[set, set]:
    forward, backward = set(), set()
    for path in sorted(CSRC.glob("msda_inst_*.cu")):
        text = path.read_text()
        for args in re.findall(r"^MSDA_INSTANTIATE_FORWARD\(([^)]*)\)", text, flags=re.M):
            t, tl, v, k = (a.strip() for a in args.split(","))
            forward.add((t, tl, int(v), int(k)))
        for args in re.findall(r"^MSDA_INSTANTIATE_BACKWARD\(([^)]*)\)", text, flags=re.M):
            t, tl, v = (a.strip() for a in args.split(","))
            backward.add((t, tl, int(v)))
    return forward, backward


def test_sources_instantiate_exactly_the_kernel_choices():
    forward, backward = _instantiated_in_sources()
    assert forward == FORWARD
    assert backward == BACKWARD
    assert len(forward) + len(backward) == 43


def test_sources_read_no_environment_switches():
    """Kernel choices are compile-time constants: nothing in ops/csrc reads the environment."""
    for path in sorted(CSRC.iterdir()):
        assert "getenv" not in path.read_text(), path.name


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm (binutils) to list the module's symbols")
def test_built_module_holds_exactly_the_kernel_choices():
    """The compiled module's launchers and kernels (demangled symbols) are the expected set."""
    module = msda_build.build("8.0;9.0")
    symbols = subprocess.run(["nm", "-C", "--defined-only", module.__file__], capture_output=True, text=True,
                             check=True).stdout

    def templates(name: str) -> set[tuple[str, ...]]:
        found = set()
        for args in re.findall(rf"msda::detail::{name}<([^<>]*)>\(", symbols):
            found.add(tuple(int(a) if a.strip().isdigit() else a.strip() for a in args.split(",")))
        return found

    assert templates("launch_forward") == FORWARD
    assert {key[:3] for key in templates("launch_backward")} == BACKWARD
    assert templates("forward_kernel") == FORWARD
    assert templates("backward_kernel") == BACKWARD


@pytest.mark.skipif(shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="a CUDA toolkit is present")
def test_no_toolkit_names_ways_out(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(msda_build.MSDABuildError, match="MSDA_BACKEND=pytorch"):
        msda_build._cuda_home()

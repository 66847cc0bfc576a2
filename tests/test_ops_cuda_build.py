"""The MSDA CUDA extension compiles for sm_80 and sm_90 with nvcc alone (no GPU needed), and a
broken build raises MSDABuildError naming its log and the two ways out.

The full build takes ~2 min on 2 cores the first time; it is cached (ops/build.py: the folder name
hashes sources, flags, torch/CUDA/Python versions and archs), so later runs only import the module.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ops import build as msda_build

ROOT = Path(__file__).resolve().parents[1]


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


def test_nvidia_include_dirs_exist():
    for folder in msda_build._nvidia_include_dirs():
        assert Path(folder).is_dir()


@pytest.mark.skipif(shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists(),
                    reason="a CUDA toolkit is present")
def test_no_toolkit_names_ways_out(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    with pytest.raises(msda_build.MSDABuildError, match="MSDA_BACKEND=pytorch"):
        msda_build._cuda_home()

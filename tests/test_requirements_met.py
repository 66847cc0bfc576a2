"""tools/requirements_met.py decides whether the run scripts skip pip: it must say "met" only when
every requirement (with the pins of the constraint files) is installed at an allowed version."""
from __future__ import annotations

from importlib import metadata
from pathlib import Path

from tools import requirements_met

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_includes_and_comments_are_followed(tmp_path):
    _write(tmp_path, "base.txt", "# a comment\nscipy>=1.0  # inline\n\n")
    top = _write(tmp_path, "top.txt", "-r base.txt\npytest>=8\n")
    assert requirements_met.read_requirements(top) == ["scipy>=1.0", "pytest>=8"]


def test_met_unmet_and_pinned(tmp_path):
    torch_version = metadata.version("torch")
    reqs = _write(tmp_path, "r.txt", "torch>=1.0\nnumpy>=1.0\n")
    assert requirements_met.main([str(reqs)]) == 0
    pinned_ok = _write(tmp_path, "ok.txt", f"torch=={torch_version}\n")
    assert requirements_met.main([str(reqs), "-c", str(pinned_ok)]) == 0
    pinned_other = _write(tmp_path, "other.txt", "torch==0.0.1\n")
    assert requirements_met.main([str(reqs), "-c", str(pinned_other)]) == 1
    too_new = _write(tmp_path, "new.txt", "numpy>=999\n")
    assert requirements_met.main([str(too_new)]) == 1
    absent = _write(tmp_path, "absent.txt", "no-such-package-xyz>=1\n")
    assert requirements_met.unmet(["no-such-package-xyz>=1"], []) == ["no-such-package-xyz>=1 (not installed)"]
    assert requirements_met.main([str(absent)]) == 1
    skipped_by_marker = _write(tmp_path, "marker.txt", "no-such-package-xyz>=1; python_version < '3'\n")
    assert requirements_met.main([str(skipped_by_marker)]) == 0


def test_unreadable_line_leaves_the_decision_to_pip(tmp_path, capsys):
    odd = _write(tmp_path, "odd.txt", "--index-url https://example.invalid\n")
    assert requirements_met.main([str(odd)]) == 1
    assert "pip will check" in capsys.readouterr().err


def test_the_shipped_files_are_read():
    lines = requirements_met.read_requirements(ROOT / "requirements-dev.txt")
    assert any(line.startswith("torch") for line in lines) and any(line.startswith("pytest") for line in lines)

"""tools/check_official.py's per-term tolerance: float64 terms within 1e-10, the official code's
float32 terms (cardinality_error*, class_error*) within float32 rounding of their size. A correct
model passes; a perturbation far below the old 1e-6 tolerance fails."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tools.check_official import TOLERANCE, main, tolerance_for


@pytest.fixture
def dino_fixture(fixtures: Path) -> Path:
    return fixtures / "dino_official_tiny"


def copy_with(fixture: Path, dest: Path, replace: dict[str, object]) -> Path:
    """The fixture with some files replaced (others linked, the checkpoint is 24 MB)."""
    dest.mkdir()
    for path in fixture.iterdir():
        if path.name in replace:
            torch.save(replace[path.name], dest / path.name)
        else:
            (dest / path.name).symlink_to(path.resolve())
    return dest


def run(fixture: Path, capsys) -> tuple[int, dict]:  # noqa: ANN001
    rc = main([str(fixture), "--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tolerance_follows_the_official_dtype_of_each_term():
    eps32 = torch.finfo(torch.float32).eps
    assert tolerance_for("losses.loss_giou_dn_0") == TOLERANCE == 1e-10
    assert tolerance_for("eval.pred_logits") == TOLERANCE
    assert tolerance_for("losses.cardinality_error", {"losses.cardinality_error": 22.0}) == \
        pytest.approx(1e-10 + 4 * eps32 * 22.0)
    assert tolerance_for("losses.class_error_interm", {"losses.class_error_interm": 0.25}) == \
        pytest.approx(1e-10 + 4 * eps32)  # at least one unit of size
    assert tolerance_for("losses.cardinality_error_dn_3") > 1e-7


@pytest.mark.slow
def test_float32_rounding_passes_and_a_tiny_input_perturbation_fails(dino_fixture, tmp_path, capsys):
    fixture = dino_fixture
    criterion = torch.load(fixture / "criterion.pt", map_location="cpu", weights_only=False)
    # the official float32 terms rounded as float32 arithmetic rounds them: still a pass
    for key in ("class_error", "cardinality_error_interm"):
        value = criterion["losses"][key].double()
        criterion["losses"][key] = value + 2 * torch.finfo(torch.float32).eps * max(abs(float(value)), 1.0)
    rc, summary = run(copy_with(fixture, tmp_path / "rounded", {"criterion.pt": criterion}), capsys)
    failing = {k: v for k, v in summary["tensors"].items() if v == "inf" or v > 1e-10}
    assert rc == 0 and summary["pass"], failing
    assert summary["tensors"]["losses.class_error"] > 1e-7  # really compared with the float32 tolerance

    # one input pixel moved by 1e-7: every output moves by far less than 1e-6, yet the check fails
    inputs = torch.load(fixture / "inputs.pt", map_location="cpu", weights_only=False)
    inputs["tensors"] = inputs["tensors"].clone()
    inputs["tensors"][0, :, 40, 60] += 1e-7
    rc, summary = run(copy_with(fixture, tmp_path / "perturbed", {"inputs.pt": inputs}), capsys)
    assert rc == 1 and not summary["pass"]
    moved = summary["tensors"]["eval.pred_logits"]
    assert 1e-10 < moved < 1e-6, moved

"""Matcher, criterion and post-processor against the official DINO code's saved results.

Fixture: tests/fixtures/dino_official_tiny (see tests/fixtures/README.md). The criterion is fed the official
train-mode outputs and targets from ``criterion.pt``; the post-processor the official eval outputs.
Everything is float64; tolerance 1e-6 absolute (differences are expected around 1e-12).
"""
from __future__ import annotations

import json

import pytest
import torch

from models.criterion import SetCriterion, expand_weight_dict
from models.matcher import HungarianMatcher
from models.postprocess import PostProcess

ATOL = 1e-6


def _load(path):
    # Trusted fixture written by the project (README): full unpickling is needed for its dicts.
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def tiny(fixtures):
    root = fixtures / "dino_official_tiny"
    return {
        "config": json.loads((root / "config.json").read_text()),
        "criterion": _load(root / "criterion.pt"),
        "eval": _load(root / "outputs_eval.pt"),
        "inputs": _load(root / "inputs.pt"),
    }


def _build_criterion(cfg: dict) -> SetCriterion:
    matcher = HungarianMatcher(cost_class=cfg["set_cost_class"], cost_bbox=cfg["set_cost_bbox"],
                               cost_giou=cfg["set_cost_giou"], focal_alpha=cfg["focal_alpha"])
    base = {"loss_ce": cfg["cls_loss_coef"], "loss_bbox": cfg["bbox_loss_coef"],
            "loss_giou": cfg["giou_loss_coef"]}
    weight_dict = expand_weight_dict(base, cfg["dec_layers"], aux_loss=cfg["aux_loss"], denoising=cfg["use_dn"],
                                     interm=cfg["two_stage_type"] != "no", interm_coef=cfg["interm_loss_coef"],
                                     no_interm_box_loss=cfg["no_interm_box_loss"])
    return SetCriterion(cfg["num_classes"], matcher, weight_dict, focal_alpha=cfg["focal_alpha"]).train()


def _same_indices(ours, theirs) -> bool:
    return len(ours) == len(theirs) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].dtype == torch.int64
        for a, b in zip(ours, theirs)
    )


def test_weight_dict_matches_official(tiny):
    criterion = _build_criterion(tiny["config"])
    assert criterion.weight_dict == tiny["criterion"]["weight_dict"]


def test_matcher_indices_exact(tiny):
    ref = tiny["criterion"]
    criterion = _build_criterion(tiny["config"])
    _, indices = criterion(ref["outputs"], ref["targets"], return_indices=True)
    assert _same_indices(indices[""], ref["indices_main"])
    assert len(ref["indices_aux"]) == len(ref["outputs"]["aux_outputs"])
    for i, aux in enumerate(ref["indices_aux"]):
        assert _same_indices(indices[f"_{i}"], aux)
    assert _same_indices(indices["_interm"], ref["indices_interm"])
    # The matcher alone gives the same result as inside the criterion.
    assert _same_indices(criterion.matcher(ref["outputs"], ref["targets"]), ref["indices_main"])


def test_all_losses_and_total(tiny):
    ref = tiny["criterion"]
    criterion = _build_criterion(tiny["config"])
    losses = criterion(ref["outputs"], ref["targets"])
    assert set(losses) == set(ref["losses"]) and len(losses) == 31
    diffs = {k: (losses[k].double() - v.double()).abs().item() for k, v in ref["losses"].items()}
    worst = max(diffs, key=diffs.get)
    print(f"max loss diff {diffs[worst]:.3e} ({worst})")
    assert diffs[worst] <= ATOL, diffs
    for k in ("class_error", "cardinality_error", "cardinality_error_dn", "cardinality_error_dn_0"):
        assert losses[k].item() == ref["losses"][k].item()  # integer-valued logging terms: exact
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total_diff = (total.double() - ref["weighted_total_loss"]).abs().item()
    print(f"weighted total diff {total_diff:.3e}")
    assert total_diff <= ATOL


def test_reused_indices_give_same_losses(tiny):
    ref = tiny["criterion"]
    criterion = _build_criterion(tiny["config"])
    losses, indices = criterion(ref["outputs"], ref["targets"], return_indices=True)
    again = criterion(ref["outputs"], ref["targets"], indices=indices)
    assert all(torch.equal(losses[k], again[k]) for k in losses)


def test_eval_mode_fills_dn_losses_with_zeros(tiny):
    ref = tiny["criterion"]
    criterion = _build_criterion(tiny["config"]).eval()
    losses = criterion(ref["outputs"], ref["targets"])
    assert set(losses) == set(ref["losses"])
    dn_keys = [k for k in losses if "_dn" in k]
    assert len(dn_keys) == 12 and all(losses[k].item() == 0.0 for k in dn_keys)
    assert abs(losses["loss_ce"].item() - ref["losses"]["loss_ce"].item()) <= ATOL


def test_postprocess_matches_official(tiny):
    ref = tiny["eval"]
    assert ref["postprocess_num_select"] == 50
    results = PostProcess(num_select=50)(ref["outputs"], tiny["inputs"]["orig_target_sizes"])
    assert len(results) == len(ref["postprocess"])
    worst = 0.0
    for ours, theirs in zip(results, ref["postprocess"]):
        assert torch.equal(ours["labels"], theirs["labels"])
        for key in ("scores", "boxes"):
            assert ours[key].shape == theirs[key].shape
            worst = max(worst, (ours[key] - theirs[key]).abs().max().item())
    print(f"postprocess max diff {worst:.3e}")
    assert worst <= ATOL

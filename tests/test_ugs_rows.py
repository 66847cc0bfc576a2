"""Ablation rows and the baseline/integration options as single overrides: every row from every
named config, Smooth-L1 on the offsets, GIoU off, per-level UR (float64 hand computations)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import ugs
from configs import ConfigError, available_configs, from_dict, load_config, to_dict
from configs.schema import Config
from configs.ugs import ABLATION_ROWS, UGSConfig, apply_ablation_row
from models.build import build_model
from models.matched_pairs import MatchedPairs
from models.offset_baseline import OffsetDINO, OffsetSmoothL1Loss
from models.ugs_dino import UGSDINO
from util.box_ops import inverse_sigmoid

TINY = ["model.num_queries=40", "model.dn_number=4", "eval.num_select=100"]


def _field(u: UGSConfig, dotted: str):
    for part in dotted.split("."):
        u = getattr(u, part)
    return u


@pytest.mark.parametrize("name", available_configs())
def test_every_row_loads_from_every_named_config_and_sets_its_fields(name):
    assert {"demo_synthetic", "dino_tiny", "dino_5scale_r50_coco", "dino_5scale_r50_coco_ugs",
            "dino_5scale_r50_visdrone", "dino_5scale_r50_visdrone_ugs"} <= set(available_configs())
    for row, fields in ABLATION_ROWS.items():
        cfg = load_config(name, [f"ugs.ablation={row}"])
        assert cfg.ugs.ablation == row
        for key, value in fields.items():
            assert _field(cfg.ugs, key) == value, (name, row, key)
        assert from_dict(Config, to_dict(cfg)) == cfg  # the dumped config reloads unchanged
        # GIoU off is one more override on any row
        assert load_config(name, [f"ugs.ablation={row}", "model.giou_loss_coef=0"]).model.giou_loss_coef == 0


def test_a_row_sets_every_field_it_controls_whatever_was_there():
    """From a config whose every controlled field holds another value (e.g. the demo's ur.weight=0,
    which made `full` fail), each row writes the table's values, not only switches off."""
    for row, fields in ABLATION_ROWS.items():
        u = UGSConfig(enabled=not fields.get("enabled", False))
        u.loss.box_loss, u.grid.kind, u.grid.alpha = "l1", "uniform", 2.5
        u.loss.um_weight, u.ur.weight, u.ur.rho, u.loss.smooth_l1_beta = 0.0, 0.0, 0.1, 0.3
        assert apply_ablation_row(u, row) is u and u.ablation == row
        for key, value in fields.items():
            assert _field(u, key) == value, (row, key)
        u.check()
    full = load_config("demo_synthetic", ["ugs.ablation=full"]).ugs
    assert (full.loss.um_weight, full.ur.weight, full.ur.rho, full.grid.alpha) == (0.5, 0.5, 0.5, 1.0)


def test_rows_are_applied_by_a_function_not_by_attribute_assignment():
    assert "__setattr__" not in vars(UGSConfig) and "__post_init__" not in vars(UGSConfig)
    u = UGSConfig()
    u.ablation = "full"  # a plain assignment changes one field; check() then names the contradiction
    assert not u.enabled and u.row_violations()
    with pytest.raises(ConfigError, match="enabled must be true"):
        u.check()


def test_overrides_after_a_row_tune_weights_but_cannot_switch_components():
    cfg = load_config("dino_tiny", ["ugs.ablation=full", "ugs.loss.um_weight=0.3", "ugs.grid.alpha=1.5"])
    assert (cfg.ugs.loss.um_weight, cfg.ugs.grid.alpha, cfg.ugs.ur.weight) == (0.3, 1.5, 0.5)
    # order matters: a row after a weight resets it to the paper's value
    assert load_config("dino_tiny", ["ugs.loss.um_weight=0.3", "ugs.ablation=full"]).ugs.loss.um_weight == 0.5
    with pytest.raises(ConfigError, match="ur.weight must be 0"):
        load_config("dino_tiny", ["ugs.ablation=ce_in", "ugs.ur.weight=0.5"])
    with pytest.raises(ConfigError, match="loss.box_loss must be smooth_l1"):
        load_config("dino_tiny", ["ugs.ablation=smooth_l1", "ugs.loss.box_loss=ce"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config("dino_tiny", ["ugs.ablation=ce_in_um_ur"])
    with pytest.raises(ConfigError, match="no bins"):
        load_config("dino_tiny", ["ugs.enabled=true", "ugs.loss.box_loss=smooth_l1"])  # um_weight 0.5


# ----------------------------------------------------------------------------- Smooth-L1 baseline

def _smooth_l1_by_hand(x: float, beta: float) -> float:
    return 0.5 * x * x / beta if abs(x) < beta else abs(x) - 0.5 * beta


@pytest.mark.parametrize("beta", [1.0, 1.0 / 9.0])
def test_offset_smooth_l1_against_hand_computation_float64(beta):
    gen = torch.Generator().manual_seed(0)
    ref = torch.tensor([[[0.4, 0.5, 0.1, 0.2], [0.2, 0.7, 0.05, 0.04]]], dtype=torch.float64)
    target = torch.tensor([[0.45, 0.52, 0.12, 0.2], [0.25, 0.66, 0.03, 0.06]], dtype=torch.float64)
    ref_logit = torch.log(ref / (1 - ref))
    delta = (torch.randn(1, 2, 4, generator=gen, dtype=torch.float64) * 0.6).requires_grad_()
    outputs = {"pred_box_delta": delta, "ref_boxes_logit": ref_logit}
    b, q = torch.tensor([0, 0]), torch.tensor([1, 0])  # pair 0 = query 1, pair 1 = query 0
    matched = MatchedPairs(outputs, [(q, torch.tensor([0, 1]))], b, q, target, target, num_boxes=3.0)
    loss = OffsetSmoothL1Loss(beta)(matched)["loss_box_sl1"]
    expected, grad = 0.0, torch.zeros_like(delta)
    for k, query in enumerate(q.tolist()):
        for c in range(4):
            t, r = target[k, c].item(), ref[0, query, c].item()
            y = torch.log(torch.tensor(t / (1 - t), dtype=torch.float64)).item() - torch.log(
                torch.tensor(r / (1 - r), dtype=torch.float64)).item()
            x = delta[0, query, c].item() - y
            expected += _smooth_l1_by_hand(x, beta) / 3.0
            grad[0, query, c] += max(-1.0, min(1.0, x / beta)) / 3.0
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    loss.backward()
    torch.testing.assert_close(delta.grad, grad, rtol=1e-12, atol=1e-15)
    # both regimes appear for beta 1/9 (otherwise the test would not tell the branches apart)
    if beta < 1:
        offs = [abs(_x) for _x in (delta.detach()[0, q] - (inverse_sigmoid(target) - ref_logit[0, q])).flatten().tolist()]
        assert min(offs) < beta < max(offs)


@pytest.mark.slow
def test_smooth_l1_row_trains_dinos_4_output_head_on_the_offsets():
    torch.manual_seed(0)
    cfg = load_config("dino_tiny", TINY + ["ugs.ablation=smooth_l1_ninth"])
    model, criterion, _ = build_model(cfg)
    assert type(model) is OffsetDINO and model.bbox_embed[0].layers[-1].out_features == 4
    w = criterion.weight_dict
    for s in ("", "_0", "_dn", "_interm"):
        assert (w[f"loss_box_sl1{s}"], w[f"loss_bbox{s}"], w[f"loss_giou{s}"]) == (1.0, 0.0, 2.0), s
    assert not any(k.startswith(("loss_um", "loss_box_ce", "loss_ur")) for k in w)
    model.double().train()
    criterion.train()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.3]], dtype=torch.float64)},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]], dtype=torch.float64)}]
    out = model(images, masks, targets)
    losses, used = criterion(out, targets, return_indices=True)
    # final layer by hand: the head's delta and the detached reference, F.smooth_l1 with beta 1/9
    expected = 0.0
    for bi, (src, tgt) in enumerate(used[""]):
        y = inverse_sigmoid(targets[bi]["boxes"][tgt]) - out["ref_boxes_logit"][bi, src]
        expected += F.smooth_l1_loss(out["pred_box_delta"][bi, src], y, reduction="sum", beta=1 / 9).item()
    assert losses["loss_box_sl1"].item() == pytest.approx(expected / 3.0, rel=1e-12)
    # the decoded boxes are sigmoid(delta + reference logit)
    torch.testing.assert_close(out["pred_boxes"], (out["pred_box_delta"] + out["ref_boxes_logit"]).sigmoid())
    total = sum(losses[k] * v for k, v in w.items())
    total.backward()
    assert model.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0


def test_giou_off_keeps_each_sets_multiplier():
    """With model.giou_loss_coef=0 the per-set multipliers are read off the L1 weights, so the
    encoder proposals keep interm_loss_coef (and 0 with no_interm_box_loss)."""
    from models.ugs_losses import ugs_weight_dict

    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 0.0, "loss_ce_interm": 1.0,
            "loss_bbox_interm": 2.5, "loss_giou_interm": 0.0, "loss_bbox_dn": 5.0, "loss_giou_dn": 0.0}
    w = ugs_weight_dict(base, "ce", 1.0, 0.5, 0.5)
    assert (w["loss_box_ce_interm"], w["loss_um_interm"], w["loss_box_ce_dn"]) == (0.5, 0.25, 1.0)
    assert w["loss_giou"] == w["loss_giou_interm"] == 0.0
    torch.manual_seed(0)
    _, criterion, _ = build_model(load_config("dino_tiny", TINY + ["ugs.ablation=full", "model.giou_loss_coef=0"]))
    assert all(v == 0 for k, v in criterion.weight_dict.items() if k.startswith("loss_giou"))
    assert criterion.weight_dict["loss_box_ce_interm"] == 1.0 and criterion.weight_dict["loss_ur"] == 0.5


# ----------------------------------------------------------------------------- per-level UR

@pytest.mark.slow
def test_per_level_ur_equals_the_sum_of_one_pass_per_level_float64():
    """ugs.ur.per_level=true: loss_ur = sum over levels l of the UR loss after a decoder pass on
    memory with only level l perturbed (delta_l = rho g_l / ||g_l|| per image), recomputed here
    from the public pieces; its gradient reaches every level's memory."""
    torch.manual_seed(0)
    cfg = load_config("dino_tiny", TINY + ["ugs.ablation=full", "ugs.ur.per_level=true"])
    model, criterion, _ = build_model(cfg)
    assert isinstance(model, UGSDINO) and criterion.ur_per_level
    model.double()
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[1, :, -9:] = True
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.3]], dtype=torch.float64)},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]], dtype=torch.float64)}]
    model.train()
    criterion.train()
    out = model(images, masks, targets)
    passes = criterion.ur_passes
    losses, used = criterion(out, targets, return_indices=True)
    ctx = out["ur_context"]
    num_levels = len(ctx.level_sizes)
    assert criterion.ur_passes - passes == num_levels == cfg.model.num_feature_levels
    suffixes = [f"_{i}" for i in range(len(out["aux_outputs"]))] + [""]
    (grad,) = torch.autograd.grad(sum(losses[f"loss_um{s}"] for s in suffixes), ctx.memory, retain_graph=True)
    feats, grads = ctx.memory.split(ctx.level_sizes, 1), grad.split(ctx.level_sizes, 1)
    masks_l = ctx.padding_mask.split(ctx.level_sizes, 1)
    num_boxes = 3.0
    expected = 0.0
    for lv in range(num_levels):
        only = [g if i == lv else None for i, g in enumerate(grads)]
        perturbed = torch.cat(ugs.ur_perturbation(feats, only, criterion.ur_rho, masks_l), 1)
        moved = (perturbed - ctx.memory).split(ctx.level_sizes, 1)
        assert all((m.abs().max() > 0) == (i == lv) for i, m in enumerate(moved))
        per_layer = ctx.rerun(perturbed)
        for s, logits in zip(suffixes, per_layer):
            for b, (src, _) in enumerate(used[s]):
                expected = expected + ugs.um_loss(logits[b, src]).mean(-1).sum() / num_boxes
    torch.testing.assert_close(losses["loss_ur"], expected, rtol=1e-10, atol=0)
    # the gradient of loss_ur reaches every level of the encoder memory
    (g_ur,) = torch.autograd.grad(losses["loss_ur"], ctx.memory, retain_graph=True)
    for lv, g in enumerate(g_ur.split(ctx.level_sizes, 1)):
        assert g.abs().max() > 0, lv
    # and it differs from the joint pass (same first pass, all levels at once)
    criterion.ur_per_level = False
    joint = criterion(out, targets)["loss_ur"]
    assert abs(joint.item() - losses["loss_ur"].item()) > 1e-6


"""`ugs.match.box_cost=bins`: the matcher costs a pair with the two-hot CE of the query's bins
(float64 against hand computations and a brute force), each set on its own grid; the default
(`expectation`) is DINO's HungarianMatcher unchanged."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

import models.matcher as matcher_module
import ugs
from configs import ConfigError, available_configs, load_config
from models.build import build_model
from models.matcher import HungarianMatcher, focal_class_cost, giou_cost
from models.ugs_matcher import UGSBinsMatcher
from util.box_ops import inverse_sigmoid

F64 = torch.float64
TINY = ["model.num_queries=40", "model.dn_number=4", "eval.num_select=100"]


def _outputs(logits_bins: torch.Tensor, ref_logit: torch.Tensor, grid: torch.Tensor, num_classes: int = 3,
             seed: int = 0) -> dict:
    """One image's UGS output set (B = 1) from per-query bin logits (Q, 4, n+1) and references (Q, 4)."""
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.sigmoid(ref_logit + ugs.expectation(logits_bins, grid))
    return {"pred_logits": torch.randn(1, len(ref_logit), num_classes, generator=gen, dtype=F64),
            "pred_boxes": boxes[None], "pred_box_logits": logits_bins[None],
            "ref_boxes_logit": ref_logit[None]}


def _random_case(q: int, m: int, n: int, seed: int, grid: torch.Tensor) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(q, 4, n + 1, generator=gen, dtype=F64)
    ref = torch.randn(q, 4, generator=gen, dtype=F64) - torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=F64)
    tgt = torch.cat([torch.rand(m, 2, generator=gen, dtype=F64) * 0.8 + 0.1,
                     torch.rand(m, 2, generator=gen, dtype=F64) * 0.3 + 0.02], 1)
    labels = torch.randint(0, 3, (m,), generator=gen)
    return _outputs(logits, ref, grid, seed=seed), [{"labels": labels, "boxes": tgt}]


def _lists(found: list) -> list:
    """Per set, per image (pred_idx, tgt_idx) as lists (index tensors do not compare with ==)."""
    return [[(p.tolist(), t.tolist()) for p, t in per_image] for per_image in found]


def _record_costs(monkeypatch) -> list[list[torch.Tensor]]:
    """Every cost-matrix list HungarianMatcher hands to the solver, in call order."""
    seen: list[list[torch.Tensor]] = []
    real = matcher_module.assign_all

    def recording(costs, *args):
        seen.append(list(costs))
        return real(costs, *args)

    monkeypatch.setattr(matcher_module, "assign_all", recording)
    return seen


def _hand_cost(out: dict, target: dict, grid: torch.Tensor, ce_cost: float, cost_class: float,
               cost_giou: float) -> torch.Tensor:
    """(Q, M) matching cost, pair by pair with ugs.ce_loss (the loss's own function)."""
    logits, ref = out["pred_box_logits"][0], out["ref_boxes_logit"][0]
    prob = out["pred_logits"][0].sigmoid()
    cost = torch.zeros(len(ref), len(target["boxes"]), dtype=F64)
    for i, j in itertools.product(range(len(ref)), range(len(target["boxes"]))):
        y = inverse_sigmoid(target["boxes"][j]) - ref[i]
        ce = ugs.ce_loss(logits[i], y, grid).mean()
        focal = focal_class_cost(prob[i:i + 1], target["labels"][j:j + 1], 0.25, 2.0)[0, 0]
        giou = giou_cost(out["pred_boxes"][0, i:i + 1], target["boxes"][j:j + 1])[0, 0]
        cost[i, j] = ce_cost * ce + cost_class * focal + cost_giou * giou
    return cost


def test_pairwise_ce_equals_ce_loss_pair_by_pair():
    gen = torch.Generator().manual_seed(0)
    grid = ugs.make_grid(3.0, 1.0, 8, dtype=F64)
    logits = 3.0 * torch.randn(5, 4, 9, generator=gen, dtype=F64)
    y = 2.5 * torch.randn(5, 7, 4, generator=gen, dtype=F64)
    y[0, 0] = torch.tensor([5.0, -5.0, 3.0, -3.0], dtype=F64)  # outside the range and at its ends
    y[1, 1] = grid[[0, 4, 5, 8]]  # on grid points
    got = ugs.pairwise_ce_loss(logits, y, grid)
    assert got.shape == (5, 7) and got.dtype == F64
    for i, j in itertools.product(range(5), range(7)):
        want = ugs.ce_loss(logits[i], y[i, j], grid).mean()
        assert abs(got[i, j].item() - want.item()) <= 1e-12, (i, j)
    # float32 logits: the loss's own float32 arithmetic
    got32 = ugs.pairwise_ce_loss(logits.float(), y.float(), grid.float())
    want32 = ugs.ce_loss(logits.float()[:, None].expand(5, 7, 4, 9), y.float(), grid.float()).mean(-1)
    torch.testing.assert_close(got32, want32, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"logits \(N, D, n\+1\) and y \(N, M, D\)"):
        ugs.pairwise_ce_loss(logits, y[:, :, :3], grid)


def test_bins_matcher_picks_the_brute_force_assignment_of_its_cost():
    grid = ugs.make_grid(3.0, 1.0, 6, dtype=F64)
    matcher = UGSBinsMatcher(grid, grid, ce_cost=1.3, cost_class=2.0, cost_giou=2.0, threads=1)
    for seed in range(4):
        out, targets = _random_case(5, 3, 6, seed, grid)
        cost = _hand_cost(out, targets[0], grid, 1.3, 2.0, 2.0)
        got = matcher.group_cost("bins", [out], out["pred_logits"][0], out["pred_boxes"][0],
                                 targets[0]["labels"], targets[0]["boxes"])
        torch.testing.assert_close(got, cost, rtol=0, atol=1e-12)
        best = min(itertools.permutations(range(5), 3),
                   key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
        (pred_idx, tgt_idx), = matcher(out, targets)
        assert sorted(zip(tgt_idx.tolist(), pred_idx.tolist())) == list(enumerate(best)), seed


def test_bins_and_expectation_costs_pick_different_queries():
    """A two-peaked distribution that decodes onto the target exactly wins under L1 and loses under
    CE to a sharp one slightly off: the two costs differ in kind, not only in scale."""
    grid = ugs.make_grid(2.0, 0.0, 4, "uniform", dtype=F64)  # -2, -1, 0, 1, 2
    two_peaks = torch.tensor([6.0, -9.0, -9.0, -9.0, 6.0], dtype=F64)  # mass at -2 and 2: mean 0
    sharp = torch.tensor([-9.0, -9.0, -9.0, 8.0, -9.0], dtype=F64)  # mass at 1
    logits = torch.stack([two_peaks.expand(4, 5), sharp.expand(4, 5)])
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]], dtype=F64)}
    tgt_logit = inverse_sigmoid(target["boxes"][0])
    ref = torch.stack([tgt_logit, tgt_logit - 0.8])  # y = 0 for query 0, 0.8 for query 1
    out = _outputs(logits, ref, grid)
    out["pred_logits"] = torch.zeros(1, 2, 3, dtype=F64)
    l1 = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=0.0, threads=1)
    bins = UGSBinsMatcher(grid, grid, ce_cost=1.0, cost_class=2.0, cost_giou=0.0, threads=1)
    assert l1(out, [target])[0][0].tolist() == [0]
    assert bins(out, [target])[0][0].tolist() == [1]


def test_interm_set_is_costed_on_the_interm_grid():
    """Query 0 is sharp at the top bin, its target 2 beyond: inside the interm grid (R = 4) its CE
    is high, on the main grid (R = 1) the target clamps onto that bin and its CE is ~0; query 1
    sits on the middle bin for a target at 0 (the same CE on both grids)."""
    grid, interm_grid = (ugs.make_grid(r, 0.0, 2, "uniform", dtype=F64) for r in (1.0, 4.0))
    top = torch.tensor([-5.0, -5.0, 5.0], dtype=F64)
    middle = torch.tensor([0.1, 0.8, 0.1], dtype=F64).log()
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.4, 0.6, 0.1, 0.2]], dtype=F64)}
    tgt_logit = inverse_sigmoid(target["boxes"][0])
    bins = torch.stack([top.expand(4, 3), middle.expand(4, 3)])
    out = _outputs(bins, torch.stack([tgt_logit - 2.0, tgt_logit]), grid)
    matcher = UGSBinsMatcher(grid, interm_grid, ce_cost=1.0, cost_class=0.0, cost_giou=0.0, threads=1)
    main, interm = matcher.forward_sets([out, out], [target], set_names=["", "_interm"])
    assert main[0][0].tolist() == [0] and interm[0][0].tolist() == [1]
    for name, g in (("", grid), ("_interm", interm_grid)):
        cost = matcher.group_cost(matcher.cost_kind(name), [out], out["pred_logits"][0], out["pred_boxes"][0],
                                  target["labels"], target["boxes"])
        torch.testing.assert_close(cost, _hand_cost(out, target, g, 1.0, 0.0, 0.0), rtol=0, atol=1e-12)


def test_sets_with_the_ce_loss_off_keep_dinos_l1_cost(monkeypatch):
    """aux_layers / interm false: those sets' cost matrices are HungarianMatcher's, bit for bit."""
    grid = ugs.make_grid(3.0, 1.0, 6, dtype=F64)
    out, targets = _random_case(6, 3, 6, 7, grid)
    seen = _record_costs(monkeypatch)
    names = ["_0", "_interm", ""]
    plain = HungarianMatcher(threads=1).forward_sets([out] * 3, targets, set_names=names)
    ugs_off = UGSBinsMatcher(grid, grid, 1.0, aux_layers=False, interm=False, threads=1)
    mixed = ugs_off.forward_sets([out] * 3, targets, set_names=names)
    assert all(torch.equal(a, b) for a, b in zip(seen[0][:2], seen[1][:2]))
    assert not torch.equal(seen[0][2], seen[1][2])  # the final layer: bins
    assert [ugs_off.cost_kind(n) for n in names] == ["expectation", "expectation", "bins"]
    ugs_on = UGSBinsMatcher(grid, grid, 1.0)
    assert [ugs_on.cost_kind(n) for n in names] == ["bins", "bins_interm", "bins"]
    assert _lists(plain[:2]) == _lists(mixed[:2])
    with pytest.raises(ValueError, match="unknown output set '_dn'"):
        ugs_off.cost_kind("_dn")


def test_expectation_default_is_the_plain_hungarian_matcher(monkeypatch):
    """The default builds DINO's matcher itself; set names do not change its costs by a bit."""
    _, criterion = _build(["ugs.ablation=full"])
    assert type(criterion.matcher) is HungarianMatcher and not criterion.matcher.costs_by_set
    grid = ugs.make_grid(3.0, 1.0, 6, dtype=F64)
    out, targets = _random_case(6, 3, 6, 1, grid)
    seen = _record_costs(monkeypatch)
    matcher = HungarianMatcher(threads=1)
    named = matcher.forward_sets([out, out], targets, set_names=["", "_interm"])
    assert _lists(named) == _lists(matcher.forward_sets([out, out], targets))
    want = matcher.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], targets[0]["labels"],
                               targets[0]["boxes"])
    assert all(torch.equal(c, want) for run in seen for c in run)


def _build(overrides: list[str]):
    torch.manual_seed(0)
    cfg = load_config("dino_tiny", TINY + overrides)
    model, criterion, _ = build_model(cfg)
    return model, criterion


def test_build_wires_the_bins_matcher_with_the_losss_weight_and_grids():
    model, criterion = _build(["ugs.ablation=full", "ugs.match.box_cost=bins"])
    m = criterion.matcher
    assert isinstance(m, UGSBinsMatcher) and m.ce_cost == 1.0 * 5.0 / 5.0
    assert (m.aux_layers, m.interm) == (True, True)
    assert torch.equal(m.grid, model.box_grid)
    assert torch.equal(m.interm_grid, model.transformer.enc_out_bbox_embed.grid)
    assert not torch.equal(m.grid, m.interm_grid)  # R = 4 and 5
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (2.0, 5.0, 2.0)
    _, c = _build(["ugs.ablation=full", "ugs.match.box_cost=bins", "model.bbox_loss_coef=2.5",
                   "ugs.loss.ce_weight=0.5", "ugs.loss.aux_layers=false"])
    assert c.matcher.ce_cost == 0.5 * 5.0 / 2.5 and not c.matcher.aux_layers
    _, c = _build(["ugs.ablation=full", "ugs.match.box_cost=bins", "ugs.match.ce_cost=0.7"])
    assert c.matcher.ce_cost == 0.7
    with pytest.raises(ValueError, match="set ugs.match.ce_cost"):
        _build(["ugs.ablation=full", "ugs.match.box_cost=bins", "model.bbox_loss_coef=0"])
    _, c = _build(["ugs.ablation=l1", "ugs.match.box_cost=bins"])  # DINO: the option is unused
    assert type(c.matcher) is HungarianMatcher


@pytest.mark.parametrize("name", available_configs())
def test_the_override_loads_from_every_named_config(name):
    assert {"demo_synthetic", "dino_tiny", "dino_5scale_r50_coco_ugs"} <= set(available_configs())
    assert load_config(name, ["ugs.match.box_cost=bins"]).ugs.match.box_cost == "bins"
    cfg = load_config(name, ["ugs.ablation=full", "ugs.match.box_cost=bins", "ugs.match.ce_cost=2"])
    assert (cfg.ugs.match.box_cost, cfg.ugs.match.ce_cost) == ("bins", 2.0)
    assert load_config(name).ugs.match.box_cost == "expectation"


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match=r"ugs\.match\.box_cost: 'l1' is not one of"):
        load_config("dino_tiny", ["ugs.match.box_cost=l1"])
    with pytest.raises(ConfigError, match=r"ugs\.match\.ce_cost"):
        load_config("dino_tiny", ["ugs.ablation=full", "ugs.match.ce_cost=-1"])
    with pytest.raises(ConfigError, match=r"ugs\.match\.box_cost=bins .* ugs\.loss\.box_loss=smooth_l1"):
        load_config("dino_tiny", ["ugs.ablation=smooth_l1", "ugs.match.box_cost=bins"])


def test_training_step_with_the_bins_matcher_is_finite_and_names_its_sets(monkeypatch):
    model, criterion = _build(["ugs.ablation=full", "ugs.match.box_cost=bins"])
    names: list[list[str]] = []
    real = UGSBinsMatcher.forward_sets
    monkeypatch.setattr(UGSBinsMatcher, "forward_sets",
                        lambda self, sets, targets, set_names=None: names.append(list(set_names))
                        or real(self, sets, targets, set_names))
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]])}]
    model.train()
    criterion.train()
    with torch.no_grad():  # bins away from uniform, so the CE cost differs between pairs
        for head in (model.bbox_embed[0], model.transformer.enc_out_bbox_embed):
            head.layers[-1].bias.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(2))
    losses = criterion(model(images, masks, targets), targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    assert names == [["", *(f"_{i}" for i in range(len(model.transformer.decoder.layers) - 1)), "_interm"]]
    assert all(math.isfinite(v.item()) for v in losses.values()) and math.isfinite(total.item())
    assert losses["loss_box_ce"] > 0 and losses["loss_ur"] > 0
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())

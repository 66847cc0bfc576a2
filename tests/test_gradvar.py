"""tools/gradvar.py against the paper's protocol: Smooth-L1 comparator on the offsets, head
multiplier 1, windows, the variance-ratio decomposition, the scale-free noise measure and the
block-bootstrap intervals over seeds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools import gradvar
from util.box_ops import inverse_sigmoid

TINY = ["model.num_queries=20", "model.dn_number=4", "eval.num_select=100", "model.enc_layers=1"]
TINY_DATA = ["data.synthetic_train_images=4", "data.synthetic_image_size=[64,64]", "data.synthetic_min_objects=2",
             "data.synthetic_max_objects=6", "data.train_policy=none", "data.num_workers=0", "optim.batch_size=2"]


def test_per_object_smooth_l1_is_the_criterions_term():
    from models.matched_pairs import MatchedPairs
    from models.offset_baseline import OffsetSmoothL1Loss

    gen = torch.Generator().manual_seed(1)
    ref = torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.5, 0.5, 0.2, 0.2]], dtype=torch.float64)
    tgt = torch.tensor([[0.32, 0.29, 0.12, 0.08], [0.45, 0.55, 0.25, 0.15]], dtype=torch.float64)
    delta = torch.randn(1, 2, 4, dtype=torch.float64, generator=gen) * 0.3
    outputs = {"pred_box_delta": delta, "ref_boxes_logit": inverse_sigmoid(ref)[None],
               "pred_boxes": (delta + inverse_sigmoid(ref)[None]).sigmoid()}
    idx = torch.arange(2)
    matched = MatchedPairs(outputs, [(idx, idx)], torch.zeros(2, dtype=torch.long), idx,
                           outputs["pred_boxes"][0], tgt, num_boxes=2.0)
    for beta in (1.0, 1 / 9):
        per_object = gradvar.per_object_loc_loss(matched, {"loss_bbox": 0.0, "loss_box_sl1": 1.0}, None,
                                                 smooth_l1_beta=beta)
        expected = F.smooth_l1_loss(delta[0], inverse_sigmoid(tgt) - inverse_sigmoid(ref), reduction="none",
                                    beta=beta).sum(-1)
        torch.testing.assert_close(per_object, expected, rtol=1e-12, atol=0)
        term = OffsetSmoothL1Loss(beta)(matched)["loss_box_sl1"]
        assert per_object.sum().item() / 2.0 == pytest.approx(term.item(), rel=1e-12)


def test_comparator_configs_share_everything_but_the_loss_and_use_head_multiplier_1():
    base, ugs_cfg = gradvar.make_configs("demo_synthetic", [], "full", "smooth_l1_ninth")
    assert base.ugs.ablation == "smooth_l1_ninth" and base.ugs.loss.smooth_l1_beta == pytest.approx(1 / 9)
    assert base.optim.lr_box_head_last_mult == ugs_cfg.optim.lr_box_head_last_mult == 1.0  # demo has 10
    assert ugs_cfg.ugs.ablation == "full" and ugs_cfg.ugs.ur.weight == 0.5
    with pytest.raises(ValueError, match="comparator"):
        gradvar.make_configs("demo_synthetic", [], "full", "giou")


def test_variance_ratio_is_mean_ratio_squared_times_cv_ratio_squared():
    rng = np.random.default_rng(0)
    a, b = list(rng.gamma(4.0, 0.5, 50)), list(rng.gamma(9.0, 3.0, 50))
    stats = {"baseline": {k: gradvar.series_stats(a) for k in gradvar.BUCKETS},
             "ugs": {k: gradvar.series_stats(b) for k in gradvar.BUCKETS}}
    r = gradvar.window_ratios(stats)
    assert r["small_variance_ratio"] == pytest.approx(r["small_mean_ratio"] ** 2 * r["small_cv_ratio"] ** 2, rel=1e-12)
    assert r["small_variance_ratio"] == pytest.approx(np.var(a, ddof=1) / np.var(b, ddof=1), rel=1e-12)


def test_block_bootstrap_interval():
    rng = np.random.default_rng(1)
    # three seeds where the comparator's series varies 4x as much (2x the std, same mean)
    per_seed = [(list(10 + 2 * rng.standard_normal(200)), list(10 + rng.standard_normal(200))) for _ in range(3)]
    point, low, high = gradvar.block_bootstrap_ratio(per_seed, "variance", block=10, reps=500)
    per_seed_ratios = [np.var(a, ddof=1) / np.var(b, ddof=1) for a, b in per_seed]
    assert point == pytest.approx(float(np.exp(np.mean(np.log(per_seed_ratios)))), rel=1e-12)
    assert low < point < high and 2.5 < low and high < 6.5
    point, low, high = gradvar.block_bootstrap_ratio(per_seed[:1], "cv", block=10, reps=50)
    assert math.isfinite(point) and math.isnan(low)  # one seed: no interval
    p, lo, hi = gradvar.seed_bootstrap([2.0, 2.0, 2.0], reps=50)
    assert p == pytest.approx(2.0) and lo == pytest.approx(2.0) and hi == pytest.approx(2.0)


def test_block_bootstrap_matches_a_plain_loop():
    """The vectorised bootstrap draws the same blocks as a plain loop over series_stats would."""
    rng = np.random.default_rng(3)
    per_seed = [(list(rng.gamma(4.0, 1.0, 60)), list(rng.gamma(9.0, 1.0, 60))) for _ in range(3)]
    per_seed[0][0][5] = float("nan")  # one non-finite iteration: dropped from both runs
    for kind in ("variance", "cv"):
        point, low, high = gradvar.block_bootstrap_ratio(per_seed, kind, block=7, reps=40, seed=5)
        draw_rng, draws = np.random.default_rng(5), []
        for _ in range(40):
            ratios = []
            for s in draw_rng.integers(0, 3, 3):
                a, b = per_seed[s]
                starts = draw_rng.integers(0, len(a) - 7 + 1, -(-len(a) // 7))
                idx = [i for st in starts for i in range(st, st + 7)][:len(a)]
                keep = [i for i in idx if math.isfinite(a[i]) and math.isfinite(b[i])]
                ratios.append(gradvar.series_stats([a[i] for i in keep])[kind]
                              / gradvar.series_stats([b[i] for i in keep])[kind])
            draws.append(float(np.exp(np.mean(np.log(ratios)))))
        assert [low, high] == pytest.approx(list(np.percentile(draws, [2.5, 97.5])), rel=1e-12)


@pytest.mark.slow
def test_gradient_noise_against_a_hand_computation():
    """trace(Cov)/||mean||^2 of per-batch gradients, computed here from torch.autograd directly."""
    torch.manual_seed(0)
    from configs import load_config
    from models.build import build_model
    from tools.target_stats import batch_to

    cfg = load_config("dino_tiny", TINY + ["ugs.ablation=smooth_l1"])
    model, crit, _ = build_model(cfg)
    model.double().train()
    crit.train()
    with torch.no_grad():  # a zero last layer (the init) passes no gradient to the hidden layers
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    images = torch.randn(3, 2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    sizes = torch.tensor([64, 64])
    batches = [(images[i], masks, [{"labels": torch.tensor([1, 2]), "size": sizes,
                                    "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.15]],
                                                          dtype=torch.float64) + 0.02 * i},
                                   {"labels": torch.tensor([0]), "size": sizes,
                                    "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]], dtype=torch.float64)}])
               for i in range(3)]
    noise = gradvar.gradient_noise(model, crit, batches, torch.device("cpu"), seed=0)
    params = gradvar.noise_parameters(model)
    grads = []
    for i, (im, mk, tg) in enumerate(batches):
        torch.manual_seed(i)  # gradient_noise's own seeding: seed * 7919 + i with seed 0
        im, mk, tg = batch_to(im, mk, tg, torch.device("cpu"))
        _l, _h, loc, buckets, _b, _q = gradvar.loc_terms(model, crit, im, mk, tg)
        assert (buckets == 0).all()  # all small at 64 px
        g = torch.autograd.grad(loc.sum(), params)
        grads.append(torch.cat([x.flatten() for x in g]))
    g = torch.stack(grads)
    mean = g.mean(0)
    expected = float(((g - mean) ** 2).sum() / 2 / mean.square().sum())
    assert noise[0] == pytest.approx(expected, rel=1e-9) and expected > 0
    assert math.isnan(noise[1]) and math.isnan(noise[2])  # no medium or large objects


@pytest.mark.slow
def test_gradvar_seeds_windows_noise_and_json(tmp_path, capsys):
    small_model = ["model.backbone=timm:resnet10t", "model.return_interm_indices=[2,3,4]",
                   "model.num_feature_levels=4", "model.hidden_dim=32", "model.dim_feedforward=64"]
    argv = ["--config", "dino_tiny", "--opt", *TINY, *TINY_DATA, *small_model, "--iters", "3", "--windows", "0,3",
            "--seeds", "0,1", "--noise-batches", "2", "--bootstrap", "200", "--block", "1", "--json",
            "--out", str(tmp_path)]
    assert gradvar.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["comparator"] == "smooth_l1" and summary["head_mult"] == 1.0 and summary["windows"] == [0, 3]
    for key in ("small_variance_ratio", "small_cv_ratio", "small_noise_ratio"):
        assert math.isfinite(summary[key]) and summary[key] > 0, key
        low, high = summary[f"{key}_ci95"]
        assert low <= summary[key] <= high, key
    assert set(summary["per_window"]) == {"0", "3"}
    # init identical but the box heads' last layers (4-output comparator vs bins)
    assert summary["differing_init_tensors"] and all(".layers.2." in k for k in summary["differing_init_tensors"])
    full = json.loads((tmp_path / "gradvar.json").read_text())
    seed0 = full["per_seed"][0]["per_window"]["3"]
    assert len(seed0["series"]["ugs"]["small"]) == 3
    assert seed0["small_variance_ratio"] == pytest.approx(seed0["small_mean_ratio"] ** 2 * seed0["small_cv_ratio"] ** 2)
    assert (tmp_path / "gradvar.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""UGS-DINO on the tiny config (CPU): heads, zero-init equivalence, criterion weights, UR pass."""
from __future__ import annotations

import math

import pytest
import torch

import ugs
from configs import load_config
from models.build import build_model
from models.ugs_dino import UGSDINO
from models.ugs_head import DistributionBoxHead
from models.ugs_losses import UGSBoxLoss, ugs_weight_dict
from util.box_ops import inverse_sigmoid

TINY = ["model.num_queries=40", "model.dn_number=4", "eval.num_select=100"]


def _batch():
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 32, 48, dtype=torch.bool)
    masks[1, :, 40:] = True
    targets = [{"labels": torch.tensor([1, 2]),
                "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.3]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]])}]
    return images, masks, targets


def _build(overrides: list[str]):
    torch.manual_seed(0)
    cfg = load_config("dino_tiny", TINY + overrides)
    model, criterion, post = build_model(cfg)  # UGSDINO and the UGS criterion when ugs.enabled
    assert isinstance(model, UGSDINO) == cfg.ugs.enabled
    return cfg, model, criterion, post


def _count_decoder_calls(model) -> list[int]:
    calls = [0]
    model.transformer.decoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def _step(model, criterion):
    images, masks, targets = _batch()
    model.train()
    criterion.train()
    out = model(images, masks, targets)
    losses = criterion(out, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
    total.backward()
    return out, losses, total


@pytest.mark.slow
def test_official_checkpoint_into_ugs_dino_gives_dinos_boxes_at_step_0():
    """An official-layout DINO state dict loads into UGS-DINO, the bin heads start
    at zero (named in the import report), and the boxes equal DINO's with its regression layers at
    zero (DINO's own starting point for them)."""
    from util.checkpoint import import_weights

    _, dino, _, _ = _build([])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a "trained" DINO: every tensor perturbed, last box layers non-zero
        for p in dino.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    _, model, _, _ = _build(["ugs.ablation=full"])  # a fresh UGS-DINO (other random init)
    report = import_weights(model, dino.state_dict())
    zeroed = sorted(k for k, why in report.reinitialised.items() if "UGS bin head" in why)
    assert zeroed and all(".layers.2." in k for k in zeroed), report
    assert any(k.startswith("transformer.enc_out_bbox_embed.") for k in zeroed)
    assert not report.missing and not report.unexpected and not report.skipped_mismatch
    assert model.bbox_embed[0].layers[-1].weight.abs().sum() == 0
    assert isinstance(model.bbox_embed[0], DistributionBoxHead)
    assert model.bbox_embed[0].layers[-1].out_features == 4 * 17
    assert all(h is model.bbox_embed[0] for h in model.transformer.decoder.bbox_embed)
    with torch.no_grad():
        for head in (dino.bbox_embed[0], dino.transformer.enc_out_bbox_embed):
            head.layers[-1].weight.zero_()
            head.layers[-1].bias.zero_()
    images, masks, _ = _batch()
    dino.eval()
    model.eval()
    with torch.no_grad():
        a, b = dino(images, masks), model(images, masks)
    for key in ("pred_boxes", "pred_logits"):
        assert torch.allclose(a[key], b[key], atol=1e-6, rtol=0), key
    assert torch.allclose(a["interm_outputs"]["pred_boxes"], b["interm_outputs"]["pred_boxes"],
                          atol=1e-6, rtol=0)
    for x, y in zip(a["aux_outputs"], b["aux_outputs"]):
        assert torch.allclose(x["pred_boxes"], y["pred_boxes"], atol=1e-6, rtol=0)
    # and the interm reference is the raw proposal itself (no sigmoid -> logit round trip)
    interm = b["interm_outputs"]
    enc_grid = model.transformer.enc_out_bbox_embed.grid
    decoded = torch.sigmoid(ugs.expectation(interm["pred_box_logits"], enc_grid) + interm["ref_boxes_logit"])
    assert torch.allclose(decoded, interm["pred_boxes"], atol=1e-6, rtol=0)


def test_same_seed_gives_dinos_parameters_except_the_bin_layers():
    """UGS-DINO is built by build_dino with the UGSDINO class: from one seed, every parameter but the
    box heads' last layers equals the DINO baseline's (the gradvar comparison relies on it)."""
    _, dino, _, _ = _build([])
    _, model, _, _ = _build(["ugs.ablation=full"])
    a, b = dino.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    differ = sorted(k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k]))
    assert differ and all("bbox_embed." in k for k in differ), differ
    assert all(".layers.2." in k for k in differ), differ
    assert model.transformer.enc_out_bbox_embed is not model.bbox_embed[0]
    assert all(h is model.bbox_embed[0] for h in model.transformer.decoder.bbox_embed)
    with pytest.raises(TypeError, match="box_head_factory"):
        UGSDINO(grid=ugs.make_grid(4.0, 1.0, 8), box_head_factory=None)


@pytest.mark.slow
def test_outputs_carry_bin_logits_and_reference():
    cfg, model, _, _ = _build(["ugs.ablation=ce_in_um"])
    images, masks, targets = _batch()
    model.train()
    out = model(images, masks, targets)
    n1 = cfg.ugs.grid.intervals + 1
    sets = [out, *out["aux_outputs"], out["interm_outputs"], out["dn_meta"]["output_known_lbs_bboxes"],
            *out["dn_meta"]["output_known_lbs_bboxes"]["aux_outputs"]]
    for s in sets:
        q = s["pred_boxes"].shape[1]
        assert s["pred_box_logits"].shape == (2, q, 4, n1) and s["ref_boxes_logit"].shape == (2, q, 4)
        assert not s["ref_boxes_logit"].requires_grad
    # the final boxes are sigmoid(expectation + reference logit)
    grid = model.box_grid
    decoded = torch.sigmoid(ugs.expectation(out["pred_box_logits"], grid) + out["ref_boxes_logit"])
    assert torch.allclose(decoded, out["pred_boxes"], atol=2e-5)
    assert "ur_context" not in out  # UR off: nothing collected


@pytest.mark.slow
def test_training_step_finite_and_ur_off_means_one_decoder_pass():
    _, model, criterion, _ = _build(["ugs.ablation=ce_in_um"])
    calls = _count_decoder_calls(model)
    _, losses, total = _step(model, criterion)
    assert calls[0] == 1 and criterion.ur_passes == 0 and "loss_ur" not in losses
    assert math.isfinite(total.item())
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert model.bbox_embed[0].layers[-1].weight.grad.abs().sum() > 0  # CE reaches the new layer
    for s in ("", "_0", "_interm", "_dn", "_dn_0"):
        assert f"loss_box_ce{s}" in losses and f"loss_um{s}" in losses


@pytest.mark.slow
def test_ur_runs_second_pass_with_reused_matching():
    _, model, criterion, _ = _build(["ugs.ablation=full"])
    calls = _count_decoder_calls(model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # non-uniform bins, so the entropy has a gradient to follow
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.5, generator=gen)
    out, losses, total = _step(model, criterion)
    assert calls[0] == 2 and criterion.ur_passes == 1
    assert losses["loss_ur"].item() > 0 and math.isfinite(total.item())
    assert criterion.weight_dict["loss_ur"] == 0.5
    # the context holds the decoder's inputs of the matching queries: rerunning on the same memory
    # reproduces the first pass's bin logits, all queries or only the given ones
    ctx = out["ur_context"]
    assert ctx.inputs.tgt.shape[1] == out["pred_logits"].shape[1] and ctx.inputs.self_attn_mask is None
    with torch.no_grad():
        again = ctx.rerun(ctx.memory)
        assert torch.allclose(again[-1], out["pred_box_logits"], atol=1e-5)
        assert torch.allclose(again[0], out["aux_outputs"][0]["pred_box_logits"], atol=1e-5)
        b, q = torch.tensor([1, 0, 1]), torch.tensor([3, 5, 0])
        some = ctx.rerun(ctx.memory, [(b, q), (b[:1], q[:1])])
        assert torch.allclose(some[0], again[0][b, q], atol=1e-5)
        assert torch.allclose(some[1], again[1][b[:1], q[:1]], atol=1e-5)


@pytest.mark.slow
def test_ur_loss_equals_its_definition():
    """loss_ur = sum over decoder layers of the mean-over-coordinates entropy of that layer's
    step-1-matched queries, after a decoder pass on memory + rho g / ||g|| per image and level
    (g = d sum_l loss_um_l / d memory), / num_boxes: recomputed here from the public pieces, so a
    mix-up of layers, queries or the normalisation in the criterion shows."""
    _, model, criterion, _ = _build(["ugs.ablation=full"])
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    images, masks, targets = _batch()
    model.train()
    criterion.train()
    out = model(images, masks, targets)
    losses, used = criterion(out, targets, return_indices=True)
    suffixes = [f"_{i}" for i in range(len(out["aux_outputs"]))] + [""]
    assert len({str([src.tolist() for src, _ in used[s]]) for s in suffixes}) > 1  # layers differ
    ctx = out["ur_context"]
    (grad,) = torch.autograd.grad(sum(losses[f"loss_um{s}"] for s in suffixes), ctx.memory, retain_graph=True)
    feats, grads = ctx.memory.split(ctx.level_sizes, 1), grad.split(ctx.level_sizes, 1)
    masks_l = ctx.padding_mask.split(ctx.level_sizes, 1)
    with torch.no_grad():
        perturbed = torch.cat(ugs.ur_perturbation(feats, grads, criterion.ur_rho, masks_l), 1)
        per_layer = ctx.rerun(perturbed)  # all queries, (B, Q, 4, n+1) per layer
    num_boxes = sum(len(t["labels"]) for t in targets)
    expected = 0.0
    for s, logits in zip(suffixes, per_layer):
        for b, (src, _) in enumerate(used[s]):
            expected += ugs.um_loss(logits[b, src].double()).mean(-1).sum().item() / num_boxes
    assert losses["loss_ur"].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("levels", [[], ["ugs.ur.levels=[0,2]"]])
def test_ur_by_linearity_equals_the_second_pass_on_perturbed_memory(levels):
    """The criterion's UR pass reuses the first pass's projected memory (values_l + delta W_l^T,
    URContext.rerun_perturbed); in float64 its loss and the gradients of every parameter must equal
    those of the definition: the decoder rerun on memory + delta (URContext.rerun), projections
    recomputed; also with only some levels perturbed. A wrong bias, a missed padding mask or a lost
    gradient path shows here."""
    _, model, criterion, _ = _build(["ugs.ablation=full"] + levels)
    model.double()
    with torch.no_grad():
        model.bbox_embed[0].layers[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    images, masks, targets = _batch()
    images = images.double()
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    masks = masks.clone()
    masks[1, :, -9:] = True  # padding on the right of image 1: masked memory positions
    model.train()
    criterion.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def ur_loss_and_grads(by_linearity: bool):
        torch.manual_seed(5)  # same denoising queries in both runs
        out = model(images, masks, targets)
        if not by_linearity:
            ctx = out["ur_context"]
            ctx.rerun_perturbed = lambda delta, matched=None: ctx.rerun(ctx.memory + delta, matched)
        losses = criterion(out, targets)
        return losses["loss_ur"], torch.autograd.grad(losses["loss_ur"], params, allow_unused=True)

    loss_fast, grads_fast = ur_loss_and_grads(True)
    loss_ref, grads_ref = ur_loss_and_grads(False)
    assert loss_ref.item() > 0
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-10, atol=0)
    checked = 0
    for p, g_fast, g_ref in zip(params, grads_fast, grads_ref):
        if g_ref is None:
            assert g_fast is None or g_fast.abs().max() == 0
            continue
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-8, atol=1e-12)
        checked += int(g_ref.abs().max() > 0)
    value_proj = model.transformer.decoder.layers[0].cross_attn.value_proj.weight
    assert checked > 10 and any(p is value_proj for p in params)


@pytest.mark.slow
def test_ur_second_pass_runs_at_the_first_pass_precision():
    """A bfloat16-autocast forward with the criterion called outside autocast (as a user script or
    a benchmark may do): the UR pass re-enters the first pass's autocast state, so it neither fails
    on mixed dtypes nor runs at another precision: loss_ur equals that of the criterion called
    inside autocast (the training engine's way), and the gradients are finite."""
    _, model, criterion, _ = _build(["ugs.ablation=full"])
    images, masks, targets = _batch()
    model.train()
    criterion.train()
    results = []
    for criterion_inside in (False, True):
        torch.manual_seed(9)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(images, masks, targets)
            losses = criterion(out, targets) if criterion_inside else None
        if not criterion_inside:
            assert out["ur_context"].autocast == (True, torch.bfloat16)
            losses = criterion(out, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        model.zero_grad()
        total.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        results.append(losses["loss_ur"].item())
    assert results[0] > 0 and results[0] == results[1]


def test_weight_dicts_of_the_ablation_rows():
    _, _, crit_l1, _ = _build(["ugs.ablation=l1"])
    assert "loss_box_ce" not in crit_l1.weight_dict and crit_l1.weight_dict["loss_bbox"] == 5.0
    _, _, crit, _ = _build(["ugs.ablation=full"])
    w = crit.weight_dict
    for s in ("", "_0", "_dn", "_dn_0", "_interm"):
        assert (w[f"loss_bbox{s}"], w[f"loss_box_ce{s}"], w[f"loss_um{s}"]) == (0.0, 1.0, 0.5), s
    assert w["loss_giou"] == 2.0 and w["loss_ur"] == 0.5
    _, _, crit, _ = _build(["ugs.ablation=ce_in"])
    assert crit.weight_dict["loss_um"] == 0.0 and "loss_ur" not in crit.weight_dict
    # switches: interm keeps DINO's L1, the l1 variant keeps L1 everywhere and adds UM
    base = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0,
            "loss_ce_interm": 1.0, "loss_bbox_interm": 5.0, "loss_giou_interm": 2.0}
    w = ugs_weight_dict(base, "ce", 1.0, 0.5, 0.0, interm=False)
    assert (w["loss_bbox_interm"], w["loss_box_ce_interm"], w["loss_um_interm"]) == (5.0, 0.0, 0.0)
    w = ugs_weight_dict(base, "l1", 1.0, 0.5, 0.0)
    assert (w["loss_bbox"], w["loss_box_ce"], w["loss_um"]) == (5.0, 0.0, 0.5)


def test_box_loss_term_against_hand_computation():
    from models.criterion import MatchedPairs

    grid = ugs.make_grid(4.0, 1.0, 8)
    ref = torch.tensor([[0.4, 0.5, 0.1, 0.2]])
    target = torch.tensor([[0.45, 0.5, 0.12, 0.2]])
    y = inverse_sigmoid(target) - inverse_sigmoid(ref)
    logits = torch.randn(1, 1, 4, 9, generator=torch.Generator().manual_seed(3))
    outputs = {"pred_box_logits": logits, "ref_boxes_logit": inverse_sigmoid(ref)[None]}
    idx = [(torch.tensor([0]), torch.tensor([0]))]
    matched = MatchedPairs(outputs, idx, torch.tensor([0]), torch.tensor([0]), target, target, num_boxes=2.0)
    out = UGSBoxLoss(grid)(matched)
    assert torch.allclose(out["loss_box_ce"], ugs.ce_loss(logits[0, 0], y[0], grid).mean() / 2, atol=1e-6)
    assert torch.allclose(out["loss_um"], ugs.um_loss(logits[0, 0]).mean() / 2, atol=1e-6)


@pytest.mark.slow
def test_compiled_decoder_layers_give_the_eager_step():
    """model.compile_decoder_layers=true (torch.compile per decoder layer, dynamic shapes): a full
    UGS training step -- denoising queries with their attention mask, the UR gradient pass and
    second pass, both decoder passes' backward -- gives the eager loss and every parameter
    gradient (float64); parameter names are unchanged."""
    _, eager, criterion, _ = _build(["ugs.ablation=full"])
    _, compiled, _, _ = _build(["ugs.ablation=full", "model.compile_decoder_layers=true"])
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(layer._compiled_call_impl is not None for layer in compiled.transformer.decoder.layers)
    assert all(layer._compiled_call_impl is None for layer in eager.transformer.decoder.layers)
    with torch.no_grad():
        eager.bbox_embed[0].layers[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    eager.double()
    compiled.double().load_state_dict(eager.state_dict())
    images, masks, targets = _batch()
    images = images.double()
    targets = [{k: v.double() if v.is_floating_point() else v for k, v in t.items()} for t in targets]
    criterion.train()
    results = []
    for model in (eager, compiled):
        model.train()
        torch.manual_seed(5)  # same denoising queries
        losses = criterion(model(images, masks, targets), targets)
        assert criterion.ur_passes > 0 and losses["loss_ur"].item() > 0
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items())
        total.backward()
        results.append((total.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-10, atol=0)
    assert grads_c.keys() == grads_e.keys()
    decoder_grads = [n for n in grads_e if n.startswith("transformer.decoder.layers.") and grads_e[n].abs().max() > 0]
    assert len(decoder_grads) > 20
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-7, atol=1e-10, msg=name)


def test_box_loss_on_many_sets_at_once_equals_one_set_at_a_time():
    """The criterion's batched hook (UGSBoxLoss.forward_sets): every set's loss_box_ce and loss_um
    as computed alone (float64), each with its own normaliser and the encoder set on its own grid;
    an empty set gives zeros."""
    from models.criterion import MatchedPairs

    gen = torch.Generator().manual_seed(6)
    term = UGSBoxLoss(ugs.make_grid(4.0, 1.0, 8, dtype=torch.float64),
                      ugs.make_grid(8.0, 1.0, 8, dtype=torch.float64))
    sets = []
    for suffix, n, num_boxes in (("", 3, 3.0), ("_0", 2, 3.0), ("_interm", 3, 3.0), ("_dn", 0, 6.0),
                                 ("_dn_0", 4, 6.0)):
        logits = torch.randn(2, 5, 4, 9, dtype=torch.float64, generator=gen, requires_grad=True)
        ref = torch.randn(2, 5, 4, dtype=torch.float64, generator=gen)
        b = torch.randint(0, 2, (n,), generator=gen)
        q = torch.randperm(5, generator=gen)[:n]
        target = torch.rand(n, 4, dtype=torch.float64, generator=gen) * 0.8 + 0.1
        sets.append(MatchedPairs({"pred_box_logits": logits, "ref_boxes_logit": ref}, [], b, q, target, target,
                                 num_boxes, suffix))
    together = term.forward_sets(sets)
    assert len(together) == len(sets)
    for matched, batched in zip(sets, together):
        alone = term(matched) if matched.suffix else term.forward_sets([matched])[0]
        for key in ("loss_box_ce", "loss_um"):
            torch.testing.assert_close(batched[key], alone[key], rtol=1e-12, atol=1e-15)
        if matched.batch_idx.numel() == 0:
            assert batched["loss_box_ce"].item() == 0 and batched["loss_um"].item() == 0
    # and by hand for one set, so the two paths cannot share a mistake
    m = sets[2]
    grid = term.interm_grid
    y = inverse_sigmoid(m.target_boxes_cxcywh) - m.outputs["ref_boxes_logit"][m.batch_idx, m.query_idx]
    logits = m.outputs["pred_box_logits"][m.batch_idx, m.query_idx]
    expected = ugs.ce_loss(logits, y, grid).mean(-1).sum() / m.num_boxes
    torch.testing.assert_close(together[2]["loss_box_ce"], expected, rtol=1e-12, atol=0)
    # gradients reach every set's logits
    total = sum(v for out in together for v in out.values())
    grads = torch.autograd.grad(total, [m.outputs["pred_box_logits"] for m in sets], allow_unused=True)
    assert all(g is not None and (g.abs().sum() > 0) == (m.batch_idx.numel() > 0) for g, m in zip(grads, sets))


@pytest.mark.slow
def test_postprocess_returns_uncertainty():
    _, model, _, post = _build(["ugs.ablation=ce_in"])
    images, masks, _ = _batch()
    model.eval()
    with torch.no_grad():
        out = model(images, masks)
        dets = post(out, torch.tensor([[480, 600], [480, 420]]))
    d = dets[1]
    k = d["scores"].shape[0]
    assert d["std_xyxy_px"].shape == (k, 4) and d["entropy"].shape == (k,)
    assert "pred_box_logits" not in d and "pred_boxes" not in d
    q = d["query_index"]
    std, ent = ugs.uncertainty(out["pred_box_logits"][1, q], model.box_grid)
    assert torch.allclose(d["entropy"], ent.mean(-1), atol=1e-6)
    want = ugs.box_std_pixels(out["pred_boxes"][1, q], std, torch.tensor([480.0, 420.0]))
    assert torch.allclose(d["std_xyxy_px"], want, atol=1e-4)
    assert (d["entropy"] <= math.log(17) + 1e-5).all()


def test_ur_levels_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="num_feature_levels"):
        _build(["ugs.ablation=full", "ugs.ur.levels=[7]"])

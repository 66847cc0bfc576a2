"""DINO model behaviour beyond the golden fixture: empty targets, denoising statistics, the R50
smoke run, activation checkpointing, bf16 autocast and the config machinery."""
from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from torchvision.ops import box_convert

from configs import ConfigError, from_official_args, load_config
from models import build_model
from models.denoising import dn_attention_mask, noise_boxes, noise_labels, num_dn_groups, prepare_denoising


def _tiny(overrides: list[str] | None = None):
    cfg = load_config("dino_tiny", ["model.num_queries=30"] + (overrides or []))
    return build_model(cfg)


def _batch(h: int = 64, w: int = 96):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, h, w, generator=g)
    masks = torch.zeros(2, h, w, dtype=torch.bool)
    masks[1, h - 16:, :] = True
    masks[1, :, w - 24:] = True
    return images, masks


def _total(criterion, losses):
    return sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)


def _empty_target():
    return {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}


def test_batch_without_any_box_trains():
    """The official code crashes in denoising when no image has a box; we skip dn (dn_meta None)."""
    torch.manual_seed(0)
    model, criterion, _ = _tiny()
    model.train()
    images, masks = _batch()
    targets = [_empty_target(), _empty_target()]
    out = model(images, masks, targets)
    assert out["dn_meta"] is None
    assert out["pred_logits"].shape == (2, 30, 7) and out["pred_boxes"].shape == (2, 30, 4)
    losses = criterion(out, targets)
    total = _total(criterion, losses)
    assert torch.isfinite(total)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_ce_dn"].item() == 0.0
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.label_enc.weight.grad is not None  # kept in the graph (DDP)


def test_mixed_batch_one_image_without_boxes_trains():
    torch.manual_seed(0)
    model, criterion, _ = _tiny()
    model.train()
    images, masks = _batch()
    targets = [{"labels": torch.tensor([1, 4, 6]),
                "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1], [0.7, 0.6, 0.05, 0.08]])},
               _empty_target()]
    out = model(images, masks, targets)
    meta = out["dn_meta"]
    assert meta["num_dn_group"] == 20 and meta["pad_size"] == 2 * 20 * 3
    known = meta["output_known_lbs_bboxes"]
    assert known["pred_logits"].shape == (2, 120, 7) and len(known["aux_outputs"]) == 1
    losses = criterion(out, targets)
    assert losses["loss_bbox_dn"].item() > 0
    _total(criterion, losses).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.slow
def test_decoder_inputs_are_exposed_and_replay_the_decoder():
    """intermediates["decoder_inputs"] holds the decoder's exact arguments (dn queries first): a second
    decoder call with them reproduces the first, and without the dn part gives the matching queries."""
    torch.manual_seed(0)
    model, _, _ = _tiny()
    model.train()
    images, masks = _batch()
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])
    targets = [{"labels": torch.tensor([1, 4]), "boxes": boxes}, _empty_target()]
    stages: dict = {}
    with torch.no_grad():
        out = model(images, masks, targets, intermediates=stages)
        inputs = stages["decoder_inputs"]
        pad = out["dn_meta"]["pad_size"]
        assert inputs.tgt.shape[1] == pad + 30 and inputs.self_attn_mask.shape == (pad + 30, pad + 30)
        assert inputs.memory is stages["memory"] and not inputs.anchors_unsig.requires_grad
        hs, refs = model.transformer.decoder(**inputs.kwargs())
        assert torch.equal(hs[-1], stages["transformer"]["hs"][-1])
        matching = inputs.without_denoising(pad)
        assert matching.tgt.shape[1] == 30 and matching.self_attn_mask is None
        hs_m, _ = model.transformer.decoder(**matching.kwargs())
        # the attention mask keeps the matching queries blind to the dn ones: same result without them
        assert torch.allclose(hs_m[-1], hs[-1][:, pad:], atol=1e-5)


def test_group_count_rule():
    assert num_dn_groups(100, 7) == 14          # 200 // 14
    assert num_dn_groups(10, 3) == 20           # < 100 total: GT count ignored (official rule, docs/dino.md)
    assert num_dn_groups(100, 0) == 1
    assert num_dn_groups(100, 150) == 1         # 200 // 300 == 0 -> 1


def test_denoising_layout_matches_official_mask(fixtures):
    ref = torch.load(fixtures / "dino_official_tiny" / "criterion.pt", map_location="cpu",
                     weights_only=False)  # trusted project fixture
    label_enc = torch.nn.Embedding(12, 64).double()
    torch.manual_seed(3)
    dn = prepare_denoising(ref["targets"], dn_number=10, label_noise_ratio=0.5, box_noise_scale=1.0,
                           num_classes=11, num_queries=30, label_enc=label_enc)
    assert (dn.pad_size, dn.num_groups) == (120, 20)
    assert torch.equal(dn.attn_mask, ref["dn_inputs"]["attn_mask"])
    assert torch.equal(dn.noised_labels < 0, ref["dn_inputs"]["noised_labels"] < 0)
    # padding slots hold zero queries (anchor 0.5), real slots hold label embeddings
    pad = dn.noised_labels < 0
    assert torch.all(dn.label_queries[pad] == 0) and torch.all(dn.box_queries_unsig[pad] == 0)
    real = ~pad
    assert torch.allclose(dn.label_queries[real], label_enc(dn.noised_labels[real]))


def test_attention_mask_pattern():
    m = dn_attention_mask(max_gt=2, num_groups=3, num_queries=5, device=torch.device("cpu"))
    pad = 12
    assert m.shape == (17, 17)
    assert m[pad:, :pad].all() and not m[pad:, pad:].any()      # matching queries never see dn
    for g in range(3):
        rows = slice(4 * g, 4 * g + 4)
        own = torch.zeros(pad, dtype=torch.bool)
        own[4 * g:4 * g + 4] = True
        assert torch.equal(m[rows, :pad], (~own).expand(4, -1))  # only their own group
        assert not m[rows, pad:].any()


def test_label_noise_statistics():
    torch.manual_seed(0)
    labels = torch.randint(0, 10, (200_000,))
    noised = noise_labels(labels, label_noise_ratio=0.5, num_classes=10)
    changed = (noised != labels).float().mean().item()
    # flip with probability 0.25 to a uniform class (which equals the old one 1/10 of the time)
    assert abs(changed - 0.25 * 0.9) < 0.005
    assert int(noised.min()) >= 0 and int(noised.max()) < 10


def test_box_noise_statistics():
    torch.manual_seed(0)
    k = 40_000
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2]]).repeat(k, 1)
    negative = torch.arange(k) % 2 == 1
    noised = noise_boxes(boxes, negative, box_noise_scale=1.0)
    # in half-sizes
    shift = (box_convert(noised, "cxcywh", "xyxy") - box_convert(boxes, "cxcywh", "xyxy")).abs() / 0.1
    pos, neg = shift[~negative], shift[negative]
    assert pos.max() < 1.0 and neg.min() >= 1.0 - 1e-6 and neg.max() < 2.0 + 1e-6
    assert abs(pos.mean().item() - 0.5) < 0.01 and abs(neg.mean().item() - 1.5) < 0.01


@pytest.mark.slow
def test_activation_checkpointing_gives_identical_gradients():
    """Non-reentrant checkpointing recomputes the encoder layers: same loss and gradients."""
    model, criterion, _ = _tiny(["model.dn_number=2"])
    model.train()
    images, masks = _batch(64, 64)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}, _empty_target()]

    def run(flag: bool):
        model.transformer.encoder.use_checkpoint = flag
        model.zero_grad()
        torch.manual_seed(5)
        total = _total(criterion, criterion(model(images, masks, targets), targets))
        total.backward()
        return total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_a, grads_a = run(False)
    loss_b, grads_b = run(True)
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6) and grads_a.keys() == grads_b.keys()
    assert max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a) < 1e-5


def test_bf16_autocast_keeps_boxes_in_float32():
    torch.manual_seed(0)
    model, criterion, _ = _tiny()
    model.train()
    images, masks = _batch(64, 96)
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.4, 0.5, 0.3, 0.2]])}, _empty_target()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, masks, targets)
    assert out["pred_boxes"].dtype == torch.float32
    assert out["dn_meta"]["output_known_lbs_bboxes"]["pred_boxes"].dtype == torch.float32
    assert out["interm_outputs"]["pred_boxes"].dtype == torch.float32
    total = _total(criterion, criterion(out, targets))
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()


@pytest.mark.slow
def test_r50_dino_5scale_forward_backward_cpu():
    """DINO-5scale R50 (official config, 900 queries) trains one step at a small input size."""
    cfg = load_config("dino_5scale_r50_coco", ["model.backbone_weights=none"])
    model, criterion, post = build_model(cfg)
    model.train()
    h, w = 96, 128  # 768 + 192 + 48 + 12 + 4 = 1024 encoder tokens >= 900 queries
    images = torch.randn(1, 3, h, w)
    masks = torch.zeros(1, h, w, dtype=torch.bool)
    targets = [{"labels": torch.tensor([1, 18]),
                "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.7, 0.1, 0.2]])}]
    out = model(images, masks, targets)
    assert out["pred_logits"].shape == (1, 900, 91) and len(out["aux_outputs"]) == 5
    assert out["dn_meta"]["num_dn_group"] == 50 and out["dn_meta"]["pad_size"] == 200
    losses = criterion(out, targets)
    assert len([k for k in losses if k in criterion.weight_dict]) == 39
    _total(criterion, losses).backward()
    frozen = model.backbone[0].body.layer1[0].conv1.weight
    assert frozen.grad is None and model.backbone[0].body.layer2[0].conv1.weight.grad is not None
    dets = post({k: v.detach() for k, v in out.items() if k in ("pred_logits", "pred_boxes")},
                torch.tensor([[480, 640]]))
    assert dets[0]["boxes"].shape == (300, 4)


@pytest.mark.slow
def test_timm_backbone_option():
    """timm `features_only` backbones plug in under backbone.0.body (timm ResNet indices 1..4 = layer1..4)."""
    model, _, _ = _tiny(["model.backbone=timm:resnet18", "model.return_interm_indices=[1,2,3,4]"])
    assert model.backbone.num_channels == [64, 128, 256, 512]
    assert "backbone.0.body.layer1.0.conv1.weight" in model.state_dict()
    model.eval()
    images, masks = _batch(64, 64)
    with torch.no_grad():
        out = model(images, masks)
    assert out["pred_boxes"].shape == (2, 30, 4) and torch.isfinite(out["pred_logits"]).all()


# ----------------------------------------------------------------------------------- configs
def test_named_configs_load_and_differ_as_documented():
    coco = load_config("dino_5scale_r50_coco")
    vis = load_config("dino_5scale_r50_visdrone")
    assert coco.model.dn_box_noise_scale == 1.0 and coco.model.num_queries == 900
    assert (vis.model.num_classes, vis.eval.max_dets, vis.data.dataset) == (10, 1500, "visdrone")
    assert vis.model.hidden_dim == coco.model.hidden_dim and vis.optim == coco.optim
    # VisDrone evaluates at the top of its small_object training scales
    assert (vis.data.eval_size, vis.data.eval_max_size) == (max(vis.data.small_object_scales),
                                                            vis.data.small_object_max_size)
    # the tiny CPU config keeps the 256 px synthetic scenes near their size (no ~700 px upscaling)
    tiny = load_config("dino_tiny").data
    side = max(tiny.synthetic_image_size)
    assert max(tiny.train_scales) <= 1.25 * side and tiny.eval_size == side
    assert tiny.train_max_size <= 2 * side


def test_overrides_are_type_checked():
    cfg = load_config("dino_tiny", ["model.num_queries=50", "model.use_checkpoint=true"])
    assert cfg.model.num_queries == 50 and cfg.model.use_checkpoint is True
    with pytest.raises(ConfigError, match="model.num_queries"):
        load_config("dino_tiny", ["model.num_queries=many"])
    with pytest.raises(ConfigError, match="num_querys"):
        load_config("dino_tiny", ["model.num_querys=5"])
    with pytest.raises(ConfigError, match="model.hidden_dim"):
        load_config("dino_tiny", ["model.hidden_dim=48"])
    with pytest.raises(ConfigError, match="model.dn_labelbook_size"):
        load_config("dino_tiny", ["model.num_classes=20"])
    with pytest.raises(ConfigError, match="model.backbone"):
        load_config("dino_tiny", ["model.backbone=vgg16"])


def test_from_official_args(fixtures):
    official = json.loads((fixtures / "dino_official_tiny" / "config.json").read_text())
    cfg = from_official_args(argparse.Namespace(**official))
    m = cfg.model
    assert (m.backbone, m.hidden_dim, m.nheads, m.enc_layers, m.num_queries, m.num_classes) == \
        ("resnet18", 64, 4, 2, 30, 11)
    assert m.dn_box_noise_scale == 0.4 and m.backbone_weights is None and cfg.eval.num_select == 300
    bad = dict(official, two_stage_type="no", use_deformable_box_attn=True, masks=True, num_patterns=2,
               decoder_sa_type="ca_label")
    with pytest.raises(ConfigError) as err:
        from_official_args(bad)
    for name in ("two_stage_type", "use_deformable_box_attn", "masks", "num_patterns", "decoder_sa_type"):
        assert name in str(err.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from_official_args(dict(official, some_future_option=3, device="cuda", output_dir="/x"))
    assert any("some_future_option" in str(w.message) for w in caught)
    assert not any("output_dir" in str(w.message) for w in caught)
    assert from_official_args(dict(official, use_dn=False)).model.dn_number == 0
    with pytest.raises(TypeError):
        from_official_args(["not", "args"])


def test_official_nms_option_reaches_the_post_processor_and_suppresses_duplicates(fixtures):
    official = json.loads((fixtures / "dino_official_tiny" / "config.json").read_text())
    assert from_official_args(dict(official, nms_iou_threshold=None)).eval.nms_iou_threshold == -1.0
    cfg = from_official_args(dict(official, nms_iou_threshold=0.5))
    assert cfg.eval.nms_iou_threshold == 0.5
    cfg.eval.num_select = 3
    _, _, post = build_model(cfg)
    assert post.nms_iou_threshold == 0.5
    # query 1 is a near-duplicate of query 0 (IoU 0.9) with a lower score, query 2 is elsewhere
    logits = torch.full((1, 3, cfg.model.num_classes), -10.0)
    logits[0, :, 1] = torch.tensor([3.0, 2.0, 1.0])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.51, 0.5, 0.18, 0.2], [0.1, 0.1, 0.1, 0.1]]])
    sizes = torch.tensor([[100, 100]])
    kept = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]
    assert kept["query_index"].tolist() == [0, 2]
    cfg.eval.nms_iou_threshold = -1.0
    assert build_model(cfg)[2]({"pred_logits": logits, "pred_boxes": boxes}, sizes)[0]["query_index"].tolist() \
        == [0, 1, 2]
    cfg.ugs.enabled, cfg.eval.nms_iou_threshold = True, 0.5
    ugs_post = build_model(cfg)[2]
    assert type(ugs_post).__name__ == "UGSPostProcess" and ugs_post.nms_iou_threshold == 0.5
    with pytest.raises(ConfigError, match="eval.nms_iou_threshold"):
        load_config("dino_tiny", ["eval.nms_iou_threshold=1.5"])


def test_channels_last_changes_memory_layout_not_results() -> None:
    """runtime.channels_last: the demo's UGS-DINO gives the same outputs and gradients (float64,
    so only the summation order differs) with its weights in NHWC as in NCHW."""
    cfg = load_config("demo_synthetic", ["model.num_queries=20", "model.dn_number=0"])
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    results = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)[0].double().eval()
        if channels_last:
            model.to(memory_format=torch.channels_last)
        out = model(images, masks)
        loss = out["pred_logits"].sum() + out["pred_boxes"].sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        results.append((out["pred_logits"], out["pred_boxes"], grads))
    (logits0, boxes0, grads0), (logits1, boxes1, grads1) = results
    torch.testing.assert_close(logits1, logits0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(boxes1, boxes0, rtol=1e-9, atol=1e-9)
    for g0, g1 in zip(grads0, grads1):
        if g0 is not None:
            torch.testing.assert_close(g1, g0, rtol=1e-7, atol=1e-9)

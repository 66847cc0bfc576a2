"""Swin DINO as a model: training step, activation checkpointing, frozen stages, small maps, and the
two ways official weights come in (official Swin DINO checkpoints; ImageNet Swin backbones)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from configs import from_official_args, load_config
from configs.ugs import apply_ablation_row
from models import build_model
from models.backbone import build_backbone
from models.swin import SWIN_VARIANTS, SwinTransformer, SwinVariant, build_swin
from util.checkpoint import CheckpointError, import_weights, load_weights_file

MANIFEST = Path(__file__).parent / "fixtures" / "dino_swinl_5scale_state_dict_keys.json"
SMALL_DINO = ["model.backbone=swin_T_224_1k", "model.backbone_weights=none", "model.hidden_dim=32",
              "model.nheads=4", "model.enc_layers=1", "model.dec_layers=1", "model.dim_feedforward=64",
              "model.num_queries=20", "model.dn_number=4"]


@pytest.fixture
def small_swin_t(monkeypatch):  # noqa: ANN001, ANN201
    """`swin_T_224_1k` made small for the DINO-level tests (the real variants: test_swin_conformance)."""
    monkeypatch.setitem(SWIN_VARIANTS, "swin_T_224_1k", SwinVariant(16, (2, 2, 2, 2), (1, 2, 2, 4), 7, 224))


def targets(num_classes: int) -> list[dict]:
    return [{"labels": torch.tensor([1, num_classes - 1]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3],
                                                                                 [0.6, 0.5, 0.1, 0.2]])},
            {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])}]


def images_and_masks() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randn(2, 3, 72, 100)
    masks = torch.zeros(2, 72, 100, dtype=torch.bool)
    masks[1, 60:, :] = True
    masks[1, :, 84:] = True
    images[masks.unsqueeze(1).expand_as(images)] = 0
    return images, masks


@pytest.mark.slow
@pytest.mark.parametrize("indices", [[0, 1, 2, 3], [1, 2, 3]])
def test_small_swin_dino_trains(indices, small_swin_t):
    torch.manual_seed(0)
    levels = 5 if len(indices) == 4 else 4
    cfg = load_config("dino_tiny", SMALL_DINO + [f"model.return_interm_indices={json.dumps(indices)}",
                                                 f"model.num_feature_levels={levels}",
                                                 "model.backbone_use_checkpoint=true",
                                                 "model.backbone_frozen_stages=2"])
    model, criterion, _ = build_model(cfg)
    model.train()
    swin = model.backbone[0]
    assert swin.num_channels == [16 * 2 ** i for i in indices]
    assert not swin.patch_embed.training and not swin.layers[0].training and swin.layers[1].training
    images, masks = images_and_masks()
    tgts = targets(cfg.model.num_classes)
    out = model(images, masks, tgts)
    losses = criterion(out, tgts)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert torch.isfinite(total)
    total.backward()
    frozen = [p for m in (swin.patch_embed, swin.layers[0]) for p in m.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    trained = [p for p in swin.layers[1].parameters()] + [getattr(swin, f"norm{indices[-1]}").weight]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert model.class_embed[0].weight.grad is not None


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    small = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=7, drop_path_rate=0.3)
    plain = SwinTransformer(**small).double().train()
    ckpt = SwinTransformer(**small, use_checkpoint=True).double().train()
    ckpt.load_state_dict(plain.state_dict())
    images = torch.randn(2, 3, 61, 90, dtype=torch.float64)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same stochastic-depth draws
        sum((f * torch.linspace(-1, 1, f.shape[-1], dtype=f.dtype)).sum() for f in model(images)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-12, rtol=1e-10), name
    # stochastic depth really draws in training (drop_path 0.3 at the last block)
    with torch.no_grad():
        a, b = plain(images)[3], plain(images)[3]
    assert not torch.equal(a, b)


def test_small_maps_keep_the_full_window():
    """A 32 x 32 image gives a 1 x 1 last stage: padded to the 7 x 7 window, never a smaller window."""
    model = build_swin("swin_T_224_1k", [0, 1, 2, 3]).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 30, 33))
    assert [tuple(f.shape[-2:]) for f in feats] == [(8, 9), (4, 5), (2, 3), (1, 2)]
    assert all(torch.isfinite(f).all() for f in feats)
    assert all(b.attn.window == 7 for s in model.layers for b in s.blocks)


def official_args(**changes) -> dict:
    args = json.loads(MANIFEST.read_text())["config"]
    args.update(backbone="swin_T_224_1k", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=1,
                dim_feedforward=64, num_queries=20, dn_number=4, use_checkpoint=True, **changes)
    return args


def test_official_swin_dino_checkpoint_fine_tunes_to_another_class_count(tmp_path, small_swin_t):
    """A small Swin DINO in the official release layout ({'model': DDP-prefixed state dict, 'args'})
    imports with tools/import_official.py (10 classes) and through main.py's --pretrained path (UGS)."""
    from tools.import_official import main

    torch.manual_seed(0)
    args = official_args()
    official_model, _, _ = build_model(from_official_args(args))
    state = official_model.state_dict()
    ckpt_path = tmp_path / "checkpoint_swin.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "args": argparse.Namespace(**args),
                "epoch": 11}, ckpt_path)

    out = tmp_path / "imported"
    overrides = ["model.num_classes=10", "model.dn_labelbook_size=10"]
    assert main([str(ckpt_path), str(out), "--opt", *overrides]) == 0
    report = (out / "import_report.txt").read_text()
    reinit = {k for k in state if "class_embed" in k or k == "label_enc.weight"}
    assert f"{len(state) - len(reinit)} loaded, {len(reinit)} re-initialised" in report
    assert "label_enc.weight" in report and "0 missing, 0 unexpected" in report
    cfg = load_config(str(out / "config.json"))
    assert cfg.model.backbone == "swin_T_224_1k" and cfg.model.backbone_use_checkpoint
    model, _, _ = build_model(cfg)
    assert import_weights(model, load_weights_file(out / "model.safetensors")).clean
    key = "backbone.0.layers.2.blocks.1.attn.relative_position_bias_table"
    assert torch.equal(model.state_dict()[key], state[key])

    # main.py --pretrained: load_weights_file + import_weights into a UGS model with 10 classes
    ugs_cfg = from_official_args(args)
    ugs_cfg.model.num_classes = ugs_cfg.model.dn_labelbook_size = 10
    apply_ablation_row(ugs_cfg.ugs, "full")
    ugs_model, criterion, _ = build_model(ugs_cfg)
    report = import_weights(ugs_model, load_weights_file(ckpt_path))
    bin_heads = {k for k in state if "bbox_embed" in k and ".layers.2." in k}
    assert set(report.reinitialised) == reinit | bin_heads
    assert not report.missing and not report.unexpected
    assert all(ugs_model.state_dict()[k].abs().sum() == 0 for k in bin_heads)
    assert torch.equal(ugs_model.state_dict()[key], state[key])


@pytest.mark.slow
def test_imagenet_swin_checkpoint_loads_into_the_backbone_alone(tmp_path, capsys):
    """Classification layout: {'model': ...} with head.*, the final norm, fixed attn_mask buffers
    and no per-stage norms, as swin_tiny_patch4_window7_224.pth."""
    torch.manual_seed(0)
    source = build_swin("swin_T_224_1k", [0, 1, 2, 3])
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("norm")}
    state.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768),
                  "head.weight": torch.zeros(1000, 768), "head.bias": torch.zeros(1000),
                  "layers.0.blocks.1.attn_mask": torch.zeros(64, 49, 49)})
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save({"model": state}, path)
    backbone = build_backbone("swin_T_224_1k", [1, 2, 3], 32, 20.0, 20.0, str(path))
    printed = capsys.readouterr().out
    assert "norm1.weight" in printed and "norm.weight" in printed and "attn_mask" in printed
    assert "head.weight" not in printed
    loaded = backbone[0].state_dict()
    for key in ("patch_embed.proj.weight", "layers.3.blocks.1.mlp.fc2.bias",
                "layers.2.downsample.reduction.weight"):
        assert torch.equal(loaded[key], state[key]), key

    # a window-12 model cannot take window-7 tables: one error naming the tensor and the field
    mismatch = "model.backbone_weights=.*shape mismatch for 'patch_embed.proj.weight'.*another Swin variant"
    with pytest.raises(CheckpointError, match=mismatch):
        build_backbone("swin_B_384_22k", [1, 2, 3], 32, 20.0, 20.0, str(path))
    with pytest.raises(CheckpointError, match="model.backbone_weights: checkpoint .*missing.pth does not"):
        build_backbone("swin_T_224_1k", [1, 2, 3], 32, 20.0, 20.0, str(tmp_path / "missing.pth"))
    # a DINO checkpoint given as backbone weights: pointed to --pretrained
    torch.save({"model": {f"backbone.0.{k}": v for k, v in state.items()}}, tmp_path / "dino.pth")
    with pytest.raises(CheckpointError, match="--pretrained"):
        build_backbone("swin_T_224_1k", [1, 2, 3], 32, 20.0, 20.0, str(tmp_path / "dino.pth"))


def test_import_tool_refuses_an_imagenet_swin_checkpoint(tmp_path, capsys):
    from tools.import_official import main

    path = tmp_path / "swin_large_patch4_window12_384_22k.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(192, 3, 4, 4),
                          "head.weight": torch.zeros(2, 2)}}, path)
    assert main([str(path), str(tmp_path / "out"), "--config", "dino_5scale_swinl_coco"]) == 2
    assert f"--opt model.backbone_weights={path}" in capsys.readouterr().err


@pytest.mark.parametrize("dataset", ["coco", "coco_ugs", "visdrone", "visdrone_ugs"])
def test_swin_l_configs_are_the_r50_ones_with_the_swin_l_backbone(dataset):
    from configs import to_dict

    swin = to_dict(load_config(f"dino_5scale_swinl_{dataset}"))
    r50 = to_dict(load_config(f"dino_5scale_r50_{dataset}"))
    changed = {f"{section}.{k}" for section in r50 if isinstance(r50[section], dict)
               for k in r50[section] if r50[section][k] != swin[section][k]}
    assert changed == {"model.backbone", "model.backbone_weights", "model.backbone_use_checkpoint"}
    assert swin["model"]["backbone"] == "swin_L_384_22k"
    assert swin["model"]["return_interm_indices"] == [0, 1, 2, 3]
    assert swin["optim"]["lr_backbone"] == 1e-5 and swin["optim"]["lr_backbone_names"] == ["backbone.0"]
    assert swin["name"] == f"dino_5scale_swinl_{dataset}"

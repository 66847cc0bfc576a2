"""Checkpoint files: atomic save, safe load, weight import report, safetensors export."""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from util import checkpoint as ckpt
from util.checkpoint import (CheckpointError, capture_rng_state, export_safetensors, extract_state_dict,
                             find_resume_checkpoint, import_weights, load_checkpoint, load_safetensors,
                             load_weights_file, restore_rng_state, save_checkpoint, save_training_checkpoint)


@dataclass
class NotAllowed:  # a type no checkpoint loader should unpickle without being told to
    value: int = 1


class _FrozenBN(nn.Module):
    """Four buffers, no num_batches_tracked, like the official FrozenBatchNorm2d."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, init in (("weight", torch.ones), ("bias", torch.zeros), ("running_mean", torch.zeros),
                           ("running_var", torch.ones)):
            self.register_buffer(name, init(n))


class _MLP(nn.Module):
    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, out)])
        nn.init.zeros_(self.layers[2].weight)
        nn.init.zeros_(self.layers[2].bias)


class TinyDetector(nn.Module):
    """The official DINO key layout at toy size: shared heads aliased under transformer.decoder."""

    def __init__(self, num_classes: int = 5, d: int = 8, layers: int = 2, ugs_bins: int = 0,
                 frozen_bn: bool = True, conv_out: int = 8) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.conv = nn.Conv2d(3, conv_out, 3)
        self.backbone.bn = _FrozenBN(conv_out) if frozen_bn else nn.BatchNorm2d(conv_out)
        self.transformer = nn.Module()
        self.transformer.decoder = nn.Module()
        self.transformer.decoder.norm = nn.LayerNorm(d)
        box = _MLP(d, 4 * (ugs_bins + 1) if ugs_bins else 4)
        cls = nn.Linear(d, num_classes)
        nn.init.constant_(cls.bias, -math.log(99.0))
        self.bbox_embed = nn.ModuleList([box] * layers)
        self.class_embed = nn.ModuleList([cls] * layers)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        self.transformer.decoder.class_embed = self.class_embed
        self.transformer.enc_out_bbox_embed = copy.deepcopy(box)
        self.transformer.enc_out_class_embed = copy.deepcopy(cls)
        self.label_enc = nn.Embedding(num_classes + 1, d)


def _randomised(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint-like state dict: every tensor random (zero-init layers too), float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
    return {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------
# saving and loading files
# ------------------------------------------------------------------------------------------
def test_atomic_save_survives_a_crash_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pth"
    save_checkpoint({"epoch": 1, "model": {"w": torch.arange(4.0)}}, path)

    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):  # noqa: ANN001
        f.write(b"PK\x03\x04 partial bytes of a zip archive")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint({"epoch": 2, "model": {"w": torch.zeros(4)}}, path)
    monkeypatch.setattr(torch, "save", real_save)

    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["model"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_last.pth"]  # no temp litter


def test_truncated_and_empty_checkpoints_give_clear_errors(tmp_path):
    good = save_checkpoint({"model": {"w": torch.randn(1000)}}, tmp_path / "good.pth")
    data = good.read_bytes()
    for name, payload in (("half.pth", data[: len(data) // 2]), ("head.pth", data[:64]), ("empty.pth", b"")):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(CheckpointError, match=rf"{name} is corrupt or truncated"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")


def test_official_style_checkpoint_with_namespace_loads_safely(tmp_path):
    model = TinyDetector()
    args = argparse.Namespace(num_classes=5, lr=1e-4, backbone="resnet50", return_interm_indices=[0, 1, 2, 3],
                              dn_number=100, frozen_weights=None, options={"dn_box_noise_scale": 1.0})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step so the optimizer state holds tensors
        p.grad = torch.ones_like(p)
    opt.step()
    official = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 11, "args": args,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 11).state_dict()}
    torch.save(official, tmp_path / "official.pth")  # a plain (non-atomic) save, as the official code does
    loaded = load_checkpoint(tmp_path / "official.pth")
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].dn_number == 100
    assert loaded["args"].options == {"dn_box_noise_scale": 1.0}
    sd = extract_state_dict(loaded)
    assert set(sd) == set(model.state_dict())
    assert loaded["optimizer"]["state"][0]["exp_avg"].shape == model.backbone.conv.weight.shape


def test_disallowed_global_is_named(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "extra": NotAllowed(3)}, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "odd.pth")
    message = str(info.value)
    assert "odd.pth" in message and "NotAllowed" in message and "extra_safe_globals" in message
    assert load_checkpoint(tmp_path / "odd.pth", extra_safe_globals=[NotAllowed])["extra"].value == 3


def test_last_and_best_and_resume_lookup(tmp_path):
    assert find_resume_checkpoint(tmp_path) is None
    save_training_checkpoint(tmp_path, {"epoch": 0, "ap": 0.2}, is_best=True)
    save_training_checkpoint(tmp_path, {"epoch": 1, "ap": 0.1}, is_best=False)
    assert load_checkpoint(tmp_path / "checkpoint_last.pth")["epoch"] == 1
    assert load_checkpoint(tmp_path / "checkpoint_best.pth")["epoch"] == 0
    assert find_resume_checkpoint(tmp_path) == tmp_path / "checkpoint_last.pth"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_best.pth", "checkpoint_last.pth"]


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in the numpy state
    save_checkpoint({"rng": capture_rng_state()}, tmp_path / "rng.pth")
    expected = (random.random(), np.random.randn(3), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    got = (random.random(), np.random.randn(3), torch.rand(3))
    assert got[0] == expected[0] and np.array_equal(got[1], expected[1]) and torch.equal(got[2], expected[2])


def test_extract_state_dict_strips_ddp_prefix():
    sd = {"module.a.weight": torch.ones(1), "module.b": torch.zeros(1)}
    assert set(extract_state_dict({"model": sd})) == {"a.weight", "b"}
    assert set(extract_state_dict(sd)) == {"a.weight", "b"}
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict({"model": {"a": 1}})


# ------------------------------------------------------------------------------------------
# import_weights
# ------------------------------------------------------------------------------------------
CLASS_KEYS = {f"{p}class_embed.{i}.{w}" for p in ("", "transformer.decoder.") for i in (0, 1)
              for w in ("weight", "bias")} | {"transformer.enc_out_class_embed.weight",
                                              "transformer.enc_out_class_embed.bias", "label_enc.weight"}
UGS_KEYS = {f"{p}bbox_embed.{i}.layers.2.{w}" for p in ("", "transformer.decoder.") for i in (0, 1)
            for w in ("weight", "bias")} | {"transformer.enc_out_bbox_embed.layers.2.weight",
                                            "transformer.enc_out_bbox_embed.layers.2.bias"}


def test_same_architecture_loads_everything_including_aliases():
    source = _randomised(TinyDetector())
    model = TinyDetector()
    report = import_weights(model, source)
    assert report.clean and set(report.loaded) == set(source)
    for key, value in model.state_dict().items():
        assert torch.equal(value, source[key].float()), key
    # the shared head is one module: both alias names hold the same loaded tensor
    alias = model.transformer.decoder.class_embed[0].weight
    assert model.class_embed[1].weight.data_ptr() == alias.data_ptr()


def test_class_count_change_reinitialises_exactly_the_class_tensors():
    source = _randomised(TinyDetector(num_classes=5))
    torch.manual_seed(0)
    model = TinyDetector(num_classes=3)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = import_weights(model, source)
    assert set(report.reinitialised) == CLASS_KEYS
    assert all("class count changed" in why for why in report.reinitialised.values())
    assert "[5, 8] vs model [3, 8]" in report.reinitialised["class_embed.0.weight"]
    assert "[6, 8] vs model [4, 8]" in report.reinitialised["label_enc.weight"]
    assert set(report.loaded) == set(source) - CLASS_KEYS and not report.missing and not report.unexpected
    state = model.state_dict()
    for key in CLASS_KEYS:  # fresh initialisation kept (prior bias for the class heads)
        assert torch.equal(state[key], fresh[key]), key
    assert torch.allclose(state["class_embed.0.bias"], torch.full((3,), -math.log(99.0)))
    for key in report.loaded:
        assert torch.equal(state[key], source[key].float()), key
    assert "re-initialised:" in str(report) and "label_enc.weight" in str(report)

    with pytest.raises(CheckpointError, match=r"class_embed\.0\.weight.*\[5, 8\] vs model \[3, 8\]"):
        import_weights(TinyDetector(num_classes=3), source, num_classes_changed_ok=False)


def test_ugs_box_head_is_zero_initialised_and_reported():
    source = _randomised(TinyDetector())
    model = TinyDetector(ugs_bins=8)
    with torch.no_grad():  # make sure the import itself writes the zeros
        for key, value in model.state_dict().items():
            if key in UGS_KEYS:
                value.fill_(7.0)
    report = import_weights(model, source)
    assert set(report.reinitialised) == UGS_KEYS
    assert all(why.startswith("UGS bin head: 8 + 1 bins") for why in report.reinitialised.values())
    state = model.state_dict()
    for key in UGS_KEYS:
        assert state[key].abs().sum() == 0, key
    assert state["bbox_embed.0.layers.2.weight"].shape == (36, 8)
    assert torch.equal(state["bbox_embed.1.layers.1.weight"], source["bbox_embed.1.layers.1.weight"].float())
    assert set(report.loaded) == set(source) - UGS_KEYS

    both = import_weights(TinyDetector(num_classes=3, ugs_bins=4), source)  # fine-tune + UGS at once
    assert set(both.reinitialised) == UGS_KEYS | CLASS_KEYS


def test_other_shape_mismatch_raises_or_is_skipped():
    source = _randomised(TinyDetector(conv_out=8, frozen_bn=True))
    with pytest.raises(CheckpointError, match=r"'backbone\.conv\.weight': checkpoint \[8, 3, 3, 3\] vs model "
                                              r"\[6, 3, 3, 3\]"):
        import_weights(TinyDetector(conv_out=6), source)
    model = TinyDetector(conv_out=6)
    before = model.backbone.conv.weight.detach().clone()
    report = import_weights(model, source, skip_mismatched=True)
    assert {"backbone.conv.weight", "backbone.bn.running_var"} <= set(report.skipped_mismatch)
    assert torch.equal(model.backbone.conv.weight, before)
    assert "skipped (shape mismatch)" in str(report)
    # a hidden-size change of a class head is not a class-count change
    with pytest.raises(CheckpointError, match="label_enc.weight"):
        import_weights(TinyDetector(d=16), {"label_enc.weight": torch.zeros(6, 8)})


def test_missing_unexpected_and_ignored_are_reported():
    source = _randomised(TinyDetector(frozen_bn=False))  # BatchNorm: has num_batches_tracked
    assert "backbone.bn.num_batches_tracked" in source
    source["extra.weight"] = torch.zeros(2)
    del source["label_enc.weight"]
    report = import_weights(TinyDetector(frozen_bn=True), source)
    assert report.ignored == ["backbone.bn.num_batches_tracked"]
    assert report.unexpected == ["extra.weight"] and report.missing == ["label_enc.weight"]
    assert not report.clean
    text = str(report)
    assert "1 missing" in text and "1 unexpected" in text and "1 ignored" in text


# ------------------------------------------------------------------------------------------
# safetensors
# ------------------------------------------------------------------------------------------
def test_safetensors_round_trip_keeps_aliases(tmp_path):
    model = TinyDetector()
    _randomised(model, seed=4)
    sd = model.state_dict()
    assert sd["class_embed.0.weight"].data_ptr() == sd["transformer.decoder.class_embed.1.weight"].data_ptr()
    path = export_safetensors(sd, tmp_path / "model.safetensors", metadata={"source": "test"})
    loaded = load_safetensors(path)
    assert set(loaded) == set(sd)
    for key, value in sd.items():
        assert torch.equal(loaded[key], value), key
    assert load_weights_file(path).keys() == loaded.keys()
    assert import_weights(TinyDetector(), loaded).clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="bad.safetensors is corrupt or truncated"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_patterns_cover_the_official_r50_key_list(fixtures):
    """Every class-dependent / box-head key of the official R50 model matches the pattern lists."""
    manifest = json.loads((fixtures / "dino_r50_5scale_state_dict_keys.json").read_text())
    keys = [e["key"] for e in manifest["state_dict"]]
    cls = [k for k in keys if ckpt._matches(k, ckpt.CLASS_DEPENDENT_PATTERNS)]
    box = [k for k in keys if ckpt._matches(k, ckpt.UGS_BOX_HEAD_PATTERNS)]
    assert len(cls) == 12 * 2 + 2 + 1  # 6 heads x 2 names x (w, b) + encoder head + label_enc
    assert {k for k in keys if "class_embed" in k or "label_enc" in k} == set(cls)
    assert len([k for k in box if ".layers.2." in k]) == 12 * 2 + 2


def test_tiny_official_checkpoint_loads_with_weights_only(fixtures):
    state = load_checkpoint(fixtures / "dino_official_tiny/checkpoint.pth")
    sd = extract_state_dict(state)
    assert len(sd) == 249 and sd["label_enc.weight"].shape == (12, 64)
    assert all(v.dtype == torch.float16 for v in sd.values())


# ------------------------------------------------------------------------------------------
# the real model and the official tiny fixture (official file format, float16 values)
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_import_official_tool_reproduces_official_outputs(fixtures, tmp_path):
    from configs import load_config
    from models import build_model
    from tools.import_official import main

    fixture = fixtures / "dino_official_tiny"
    assert main([str(fixture / "checkpoint.pth"), str(tmp_path), "--official-config",
                 str(fixture / "config.json"), "--strict"]) == 0
    model, _, _ = build_model(load_config(str(tmp_path / "config.json")))
    report = import_weights(model, load_safetensors(tmp_path / "model.safetensors"))
    assert report.clean and len(report.loaded) == 249
    official = extract_state_dict(load_checkpoint(fixture / "checkpoint.pth"))
    for key, value in model.state_dict().items():  # float16 -> float32 is exact
        assert torch.equal(value, official[key].float()), key
    inputs = torch.load(fixture / "inputs.pt", map_location="cpu", weights_only=False)
    expected = torch.load(fixture / "outputs_eval.pt", map_location="cpu", weights_only=False)["outputs"]
    model = model.double().eval()
    with torch.no_grad():
        out = model(inputs["tensors"], inputs["mask"])
    for key in ("pred_logits", "pred_boxes"):
        assert torch.allclose(out[key], expected[key], rtol=1e-6, atol=1e-6), key


@pytest.mark.slow
def test_fine_tune_import_to_another_class_count_and_ugs_heads(fixtures, tmp_path):
    from configs import from_official_args
    from configs.overrides import apply_overrides
    from models import build_model
    from tools.import_official import main

    fixture = fixtures / "dino_official_tiny"
    assert main([str(fixture / "checkpoint.pth"), str(tmp_path), "--official-config",
                 str(fixture / "config.json"), "--opt", "model.num_classes=3",
                 "model.dn_labelbook_size=3"]) == 0
    text = (tmp_path / "import_report.txt").read_text()
    assert "238 loaded, 11 re-initialised" in text and "label_enc.weight" in text

    official = extract_state_dict(load_checkpoint(fixture / "checkpoint.pth"))
    cfg = from_official_args(json.loads((fixture / "config.json").read_text()))
    cfg.model.num_classes, cfg.model.dn_labelbook_size = 3, 3
    cfg = apply_overrides(cfg, ["ugs.enabled=true", "ugs.grid.intervals=8"])  # UGS-DINO, 9 bins
    model, criterion, _ = build_model(cfg)
    report = import_weights(model, official)
    cls_keys = {k for k in official if "class_embed" in k or k == "label_enc.weight"}
    ugs_keys = {k for k in official if "bbox_embed" in k and ".layers.2." in k}
    assert len(cls_keys) == 11 and len(ugs_keys) == 10
    assert set(report.reinitialised) == cls_keys | ugs_keys
    assert not report.missing and not report.unexpected
    state = model.state_dict()
    assert state["bbox_embed.0.layers.2.weight"].shape == (36, 64)
    assert all(state[k].abs().sum() == 0 for k in ugs_keys)
    key = "bbox_embed.0.layers.1.weight"
    assert torch.equal(state[key], official[key].float())

    # the imported model trains: one forward + backward with 3-class targets
    inputs = torch.load(fixture / "inputs.pt", map_location="cpu", weights_only=False)
    targets = [{"labels": t["labels"] % 3, "boxes": t["boxes"].float()} for t in inputs["targets"]]
    model.train()
    out = model(inputs["tensors"].float(), inputs["mask"], targets)
    assert out["pred_logits"].shape[-1] == 3
    losses = criterion(out, targets)
    total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.class_embed[0].weight.grad is not None

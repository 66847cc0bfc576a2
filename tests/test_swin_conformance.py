"""Our Swin against the official DINO Swin: the tiny float64 fixture (<= 1e-10, masks equal) and the
DINO-5scale Swin-L state-dict manifest (exact). Fixtures: tests/fixtures/swin_official_tiny/README.md."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from configs.model import SWIN_BACKBONES
from models.backbone import downsample_mask
from models.swin import SWIN_VARIANTS, SwinTransformer, build_swin
from tools.check_official import main

FIXTURES = Path(__file__).parent / "fixtures"
SWIN_FIXTURE = FIXTURES / "swin_official_tiny"
SWINL_MANIFEST = FIXTURES / "dino_swinl_5scale_state_dict_keys.json"


def tiny_official_swin() -> tuple[SwinTransformer, dict]:
    config = json.loads((SWIN_FIXTURE / "config.json").read_text())
    model = SwinTransformer(config["embed_dim"], config["depths"], config["num_heads"], config["window_size"],
                            out_indices=config["out_indices"], drop_path_rate=config["drop_path_rate"])
    model.load_state_dict(torch.load(SWIN_FIXTURE / "state_dict.pt", weights_only=True), strict=True)
    return model.double().eval(), config


def test_tiny_official_swin_outputs_and_masks():
    model, config = tiny_official_swin()
    inputs = torch.load(SWIN_FIXTURE / "inputs.pt", weights_only=True)
    expected = torch.load(SWIN_FIXTURE / "outputs.pt", weights_only=True)
    with torch.no_grad():
        features = model(inputs["tensors"].double())
    assert len(features) == len(expected) == 4
    for i, feature in enumerate(features):
        ref = expected[str(i)]
        assert list(feature.shape) == config["output_shapes"][str(i)]
        assert (feature - ref["tensors"]).abs().max() <= 1e-10, i
        assert torch.equal(downsample_mask(inputs["mask"], feature.shape[-2:]), ref["mask"]), i
    assert sum(p.numel() for p in model.parameters()) == config["num_parameters"]


def test_check_official_recognises_the_swin_fixture(capsys):
    rc = main([str(SWIN_FIXTURE), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["pass"], summary
    assert set(summary["tensors"]) == {f"swin.{i}.{k}" for i in range(4) for k in ("tensors", "mask")}
    assert summary["max_abs_diff"] <= 1e-10
    assert all(summary["tensors"][f"swin.{i}.mask"] == 0 for i in range(4))


def test_check_official_fails_a_perturbed_swin_input(tmp_path, capsys):
    """One pixel moved by 1e-6 changes outputs by far less than the old 1e-6 tolerance, yet fails."""
    fixture = tmp_path / "swin"
    shutil.copytree(SWIN_FIXTURE, fixture)
    inputs = torch.load(fixture / "inputs.pt", weights_only=True)
    inputs["tensors"] = inputs["tensors"].double()
    inputs["tensors"][0, 0, 10, 10] += 1e-6
    (fixture / "inputs.pt").chmod(0o644)
    torch.save(inputs, fixture / "inputs.pt")
    rc = main([str(fixture), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 1 and not summary["pass"]
    assert 1e-10 < summary["tensors"]["swin.0.tensors"] < 1e-6


def test_swin_fixture_with_wrong_architecture_is_input_error(tmp_path, capsys):
    fixture = tmp_path / "swin"
    shutil.copytree(SWIN_FIXTURE, fixture)
    config = json.loads((fixture / "config.json").read_text())
    config["window_size"] = 12  # relative position tables of another size
    (fixture / "config.json").chmod(0o644)
    (fixture / "config.json").write_text(json.dumps(config))
    assert main([str(fixture)]) == 2
    assert "relative_position_bias_table" in capsys.readouterr().err
    config.update(window_size=7, mlp_ratio=2.0)  # an official option we do not implement
    (fixture / "config.json").write_text(json.dumps(config))
    assert main([str(fixture)]) == 2
    assert "mlp_ratio=2.0 (supported: 4.0)" in capsys.readouterr().err


@pytest.mark.slow
def test_swin_l_5scale_manifest_matches_exactly(capsys):
    rc = main(["--manifest", str(SWINL_MANIFEST), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["pass"], summary
    for key in ("state_dict.missing", "state_dict.unexpected", "state_dict.shape_or_dtype", "strict_load",
                "num_unique_parameters", "num_trainable_parameters", "shared_storage_groups"):
        assert summary["tensors"][key] == 0, key
    manifest = json.loads(SWINL_MANIFEST.read_text())
    assert manifest["num_entries"] == 722 and manifest["num_unique_parameters"] == 217_576_690


def test_official_names_and_channels():
    assert tuple(SWIN_VARIANTS) == SWIN_BACKBONES
    with torch.device("meta"):
        swin_l = build_swin("swin_L_384_22k", [0, 1, 2, 3])
        swin_t4 = build_swin("swin_T_224_1k", [1, 2, 3])
    assert swin_l.num_channels == [192, 384, 768, 1536]
    assert swin_t4.num_channels == [192, 384, 768]
    assert not hasattr(swin_t4, "norm0") and hasattr(swin_t4, "norm1")
    assert swin_l.layers[0].blocks[0].attn.relative_position_bias_table.shape == (23 * 23, 6)
    # stochastic depth: linear from 0 to 0.2 over the 24 blocks (official rule)
    rates = [b.drop_path for stage in swin_l.layers for b in stage.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and len(rates) == 24
    with pytest.raises(ValueError, match="swin_S"):
        build_swin("swin_S_224_1k", [0, 1, 2, 3])


def test_check_official_follows_the_fixture_out_indices(tmp_path, capsys):
    """The 4-scale form of the same official model (out_indices 1-3: no norm0, outputs renumbered
    from 0, as the official forward numbers them) is built from config.json and passes."""
    fixture = tmp_path / "swin_4scale"
    fixture.mkdir()
    config = json.loads((SWIN_FIXTURE / "config.json").read_text())
    config["out_indices"] = [1, 2, 3]
    (fixture / "config.json").write_text(json.dumps(config))
    state = torch.load(SWIN_FIXTURE / "state_dict.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("norm0.")}, fixture / "state_dict.pt")
    outputs = torch.load(SWIN_FIXTURE / "outputs.pt", weights_only=True)
    torch.save({str(i): outputs[str(i + 1)] for i in range(3)}, fixture / "outputs.pt")
    (fixture / "inputs.pt").symlink_to((SWIN_FIXTURE / "inputs.pt").resolve())
    rc = main([str(fixture), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["pass"], summary
    assert set(summary["tensors"]) == {f"swin.{i}.{k}" for i in range(3) for k in ("tensors", "mask")}

"""tools/check_official.py on the official-code fixtures, both modes (float64, tolerance 1e-6; the
manifest check is exact). See tests/fixtures/README.md."""
from __future__ import annotations

import json

import pytest

from tools.check_official import main


@pytest.mark.slow
def test_tiny_fixture_conforms(fixtures, capsys):
    rc = main([str(fixtures / "dino_official_tiny"), "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    failing = {k: v for k, v in summary["tensors"].items() if v == "inf" or v > 1e-6}
    assert rc == 0 and summary["pass"] and not failing, failing
    # every family of outputs was actually compared
    for prefix in ("eval.pred_logits", "eval.aux_outputs.0.pred_boxes", "eval.interm_outputs.pred_logits",
                   "intermediates.memory", "postprocess.1.labels",
                   "train.dn_meta.output_known_lbs_bboxes.pred_boxes",
                   "matcher.interm.1.0", "losses.loss_giou_dn_0", "weighted_total_loss",
                   "end_to_end.weighted_total_loss", "dn_generator.attn_mask"):
        assert prefix in summary["tensors"], prefix
    assert len(summary["tensors"]) > 90


@pytest.mark.slow
def test_r50_manifest_matches(fixtures, capsys):
    rc = main(["--manifest", str(fixtures / "dino_r50_5scale_state_dict_keys.json"), "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["pass"], summary
    assert summary["tensors"]["state_dict.missing"] == 0 and summary["tensors"]["strict_load"] == 0


def test_bad_fixture_dir_is_input_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "missing fixture file" in capsys.readouterr().err


def test_manifest_mismatch_fails(fixtures, tmp_path, capsys):
    """A manifest with one renamed key and one wrong shape must fail (exit 1), naming both."""
    manifest = json.loads((fixtures / "dino_r50_5scale_state_dict_keys.json").read_text())
    cfg = manifest["config"]
    # shrink the model so this stays fast: the check derives everything from the config
    cfg.update(backbone="resnet18", hidden_dim=64, nheads=4, enc_layers=1, dec_layers=1, dim_feedforward=64,
               num_queries=10)
    from configs import from_official_args
    from models import build_dino

    model = build_dino(from_official_args(cfg).model)
    entries = [{"key": k, "shape": list(v.shape), "dtype": "float32"} for k, v in model.state_dict().items()]
    entries[0]["key"] = "transformer.level_embed_renamed"
    entries[1]["shape"] = [1, 2]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"config": cfg, "state_dict": entries}))
    assert main(["--manifest", str(path)]) == 1
    out = capsys.readouterr().out
    assert "missing in ours: transformer.level_embed_renamed" in out
    assert f"shape/dtype differs: {entries[1]['key']}" in out

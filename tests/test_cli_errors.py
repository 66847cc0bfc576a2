"""A user's mistakes end in one message and a non-zero exit at start-up, not a traceback later.

Each case runs main.py's (or a tool's) entry function in-process with the tiny model (dino_tiny)
on a few 64 x 64 synthetic images, or with the fakes of tests/engine_fakes.py: the message
text and the exit status are checked, and no weights are downloaded when a checkpoint replaces
them (every download raises here).
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.engine_fakes import reset_accelerate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.synthetic_train_images=2", "data.synthetic_val_images=1", "data.synthetic_image_size=[64,64]",
        "data.synthetic_min_objects=1", "data.synthetic_max_objects=4", "data.train_policy=none",
        "data.eval_policy=none", "data.num_workers=0", "runtime.tensorboard=false",
        "eval.num_draw_images=0", "optim.batch_size=1"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()
    root = logging.getLogger()  # main.py's console handler writes to this test's captured stdout
    for handler in [h for h in root.handlers if getattr(h, "_detection_console", False)]:
        root.removeHandler(handler)


@pytest.fixture
def downloads(monkeypatch, tmp_path) -> list[str]:
    """Every download attempt raises (and is recorded); the weight caches are empty folders."""
    attempts: list[str] = []

    def refuse(url, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        url = getattr(url, "full_url", url)
        attempts.append(str(url))
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DINO_UGS_DEBUG", raising=False)
    return attempts


def tiny_checkpoint(path: Path, extra: list[str] | None = None) -> Path:
    """A dino_tiny weights checkpoint storing its config with the `extra` overrides (as training
    writes it); the weights are those of plain dino_tiny."""
    from configs import load_config, to_dict
    from models import build_model

    cfg = load_config("dino_tiny", TINY + list(extra or []))
    model, _, _ = build_model(load_config("dino_tiny", TINY))  # random weights, nothing downloaded
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": 1, "step": 2}, path)
    return path


def run_main(argv: list[str]) -> int:
    from main import main

    return main(argv)


# ------------------------------------------------------------------------------------------
# Offline: no download when a checkpoint replaces the weights; a clear message when one fails
# ------------------------------------------------------------------------------------------
def test_failed_backbone_download_says_what_to_fetch_and_the_ways_out(tmp_path, downloads, capsys) -> None:
    rc = run_main(["--config", "dino_tiny", "--output-dir", str(tmp_path / "run"),
                   "--opt", *TINY, "model.backbone_weights=IMAGENET1K_V1"])
    err = capsys.readouterr().err
    assert rc == 2 and downloads, err
    assert "Traceback" not in err and err.startswith("error: model.backbone_weights='IMAGENET1K_V1'")
    assert "torchvision ResNet18_Weights.IMAGENET1K_V1 from https://download.pytorch.org/models/" in err
    assert "--opt model.backbone_weights=/path/to/resnet18-f37072fd.pth" in err  # a local file
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in err  # the cache
    assert "--opt model.backbone_weights=null" in err and "--pretrained CHECKPOINT.pth" in err
    assert "https://github.com/IDEA-Research/DINO" in err and "--debug" in err


def test_no_download_when_evaluating_a_checkpoint(tmp_path, downloads, caplog) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth", ["model.backbone_weights=IMAGENET1K_V1"])
    with caplog.at_level(logging.INFO):
        rc = run_main(["--eval", "--resume", str(ckpt), "--output-dir", str(tmp_path / "eval")])
    assert rc == 0 and downloads == []
    assert "model.backbone_weights=IMAGENET1K_V1 not loaded: the weights of --resume" in caplog.text
    # the stored config is used (dino_tiny, not the default demo_synthetic) and the log says so
    assert f"config: the config stored in {ckpt}" in caplog.text
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_images"] == 1
    # the run directory's config keeps the user's setting (only this build skipped the download)
    saved = json.loads((tmp_path / "eval" / "config.json").read_text())
    assert saved["name"] == "dino_tiny" and saved["model"]["backbone_weights"] == "IMAGENET1K_V1"


def test_no_download_with_pretrained_weights(tmp_path, downloads, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    rc = run_main(["--config", "dino_tiny", "--eval", "--pretrained", str(ckpt), "--output-dir",
                   str(tmp_path / "ft"), "--opt", *TINY, "model.backbone_weights=IMAGENET1K_V1"])
    assert rc == 0 and downloads == [], capsys.readouterr().err


def test_backbone_weights_from_a_local_file(tmp_path, downloads, capsys) -> None:
    import torchvision

    from configs import load_config
    from models import build_model

    reference = torchvision.models.resnet18()  # stands in for the downloaded ImageNet file
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(load_config("dino_tiny", TINY + [f"model.backbone_weights={path}"]))[0]
    body = model.backbone[0].body
    assert torch.equal(body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    assert torch.equal(body.bn1.running_var, reference.bn1.running_var) and downloads == []
    missing = tmp_path / "nowhere.pth"
    assert run_main(["--config", "dino_tiny", "--output-dir", str(tmp_path / "run"), "--opt", *TINY,
                     f"model.backbone_weights={missing}"]) == 2
    assert f"error: model.backbone_weights='{missing}': no such file" in capsys.readouterr().err


def test_tools_build_without_download_and_read_config_beside_safetensors(tmp_path, downloads, capsys) -> None:
    """tools/infer.py on an export (model.safetensors + config.json): no 'stores no config'."""
    from configs import dump_config, load_config
    from models import build_model
    from tools.infer import main as infer_main
    from util.checkpoint import export_safetensors

    cfg = load_config("dino_tiny", TINY + ["model.backbone_weights=IMAGENET1K_V1"])
    built = load_config("dino_tiny", TINY)
    export_safetensors(build_model(built)[0].state_dict(), tmp_path / "export" / "model.safetensors")
    dump_config(cfg, tmp_path / "export" / "config.json")
    image = tmp_path / "img.png"
    from PIL import Image
    Image.new("RGB", (96, 80), (120, 90, 60)).save(image)  # >= 300 encoder tokens for 300 queries
    rc = infer_main([str(image), "--checkpoint", str(tmp_path / "export" / "model.safetensors"),
                     "--out", str(tmp_path / "pred"), "--no-draw"])
    out = capsys.readouterr().out
    assert rc == 0 and downloads == []
    assert f"config: {tmp_path / 'export' / 'config.json'} (beside model.safetensors)" in out
    assert isinstance(json.loads((tmp_path / "pred" / "results.json").read_text()), list)
    # main.py --eval reads the same export
    assert run_main(["--eval", "--resume", str(tmp_path / "export" / "model.safetensors"),
                     "--output-dir", str(tmp_path / "eval")]) == 0 and downloads == []


# ------------------------------------------------------------------------------------------
# Validation at start-up
# ------------------------------------------------------------------------------------------
def test_data_path_for_the_synthetic_dataset_is_an_error(tmp_path, capsys) -> None:
    rc = run_main(["--config", "dino_tiny", "--output-dir", str(tmp_path / "run"),
                   "--opt", *TINY, "data.train_images=/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.train_images='/nonexistent' given, but data.dataset='synthetic'" in err
    assert "--opt data.dataset=coco" in err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_missing_data_files_stop_the_run_before_building_anything(tmp_path, capsys) -> None:
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    rc = run_main(["--config", "dino_tiny", "--output-dir", str(tmp_path / "run"), "--opt", *TINY,
                   "data.dataset=coco", f"data.train_images={tmp_path}", f"data.train_annotations={ann}",
                   f"data.val_images={tmp_path / 'missing_images'}", f"data.val_annotations={tmp_path}"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"data.val_images='{tmp_path / 'missing_images'}' does not exist" in err
    assert f"data.val_annotations='{tmp_path}' is a folder; expected the val COCO annotation file" in err
    assert "data.train_images" not in err  # the paths that exist are not reported
    assert not (tmp_path / "run").exists()


def test_num_select_above_queries_times_classes_fails_at_start_up(tmp_path, capsys) -> None:
    rc = run_main(["--config", "dino_tiny", "--output-dir", str(tmp_path / "run"),
                   "--opt", *TINY, "eval.num_select=3000"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "eval.num_select=3000 exceeds model.num_queries x model.num_classes = 300 x 7 = 2100" in err
    assert "--opt eval.num_select=2100" in err
    assert not (tmp_path / "run").exists()  # before the first training step


def test_checkpoint_of_another_model_is_one_message(tmp_path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    rc = run_main(["--eval", "--resume", str(ckpt), "--config", "dino_tiny", "--output-dir",
                   str(tmp_path / "eval"), "--opt", *TINY, "model.dim_feedforward=96"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"--resume {ckpt} does not fit the model built from the config (12 tensor(s) of another" in err
    assert "checkpoint [128, 64] vs model [96, 64]" in err and "Drop --config" in err
    assert len(err.splitlines()) < 15


def test_pretrained_shape_mismatch_names_skip_mismatched_which_works(tmp_path, capsys) -> None:
    ckpt = tiny_checkpoint(tmp_path / "tiny.pth")
    argv = ["--config", "dino_tiny", "--eval", "--pretrained", str(ckpt), "--output-dir",
            str(tmp_path / "ft"),
            "--opt", *TINY, "model.dim_feedforward=96"]
    assert run_main(argv) == 2
    err = capsys.readouterr().err
    assert "shape mismatch for 'transformer.encoder.layers.0.linear1.weight'" in err
    assert "add --skip-mismatched" in err
    assert run_main([*argv, "--skip-mismatched"]) == 0
    assert "12 skipped (shape mismatch)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# Tracebacks only on request
# ------------------------------------------------------------------------------------------
def test_debug_flag_and_environment_variable_show_the_traceback(tmp_path, monkeypatch, capsys) -> None:
    from util.checkpoint import CheckpointError

    missing = str(tmp_path / "missing.pth")
    monkeypatch.delenv("DINO_UGS_DEBUG", raising=False)
    assert run_main(["--resume", missing]) == 2
    assert capsys.readouterr().err.startswith(f"error: checkpoint {missing} does not exist")
    with pytest.raises(CheckpointError, match="does not exist"):
        run_main(["--resume", missing, "--debug"])
    monkeypatch.setenv("DINO_UGS_DEBUG", "1")
    with pytest.raises(CheckpointError, match="does not exist"):
        run_main(["--resume", missing])


def test_scripts_exit_with_a_message_not_a_traceback(tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("DINO_UGS_DEBUG", None)
    missing = tmp_path / "missing.pth"
    done = subprocess.run([sys.executable, "main.py", "--resume", str(missing)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"error: checkpoint {missing} does not exist" in done.stderr


# ------------------------------------------------------------------------------------------
# Launchers and finished runs (the fakes of tests/engine_fakes.py)
# ------------------------------------------------------------------------------------------
def test_launcher_that_started_fewer_processes_is_reported(tmp_path, monkeypatch, caplog) -> None:
    from main import parse_args, run
    from tests.engine_fakes import build_fake_data, build_fake_model, fake_config
    from util.preflight import launcher_process_warning

    assert launcher_process_warning({}, 1) is None
    assert launcher_process_warning({"WORLD_SIZE": "2"}, 2) is None
    assert "WORLD_SIZE=2" in launcher_process_warning({"WORLD_SIZE": "2"}, 1)
    # `accelerate launch --cpu --num_processes 2`: MASTER_ADDR set, one process, no WORLD_SIZE
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29531")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    with caplog.at_level(logging.WARNING):
        run(parse_args([]), fake_config(tmp_path, ["optim.epochs=1"]), build_model_fn=build_fake_model,
            build_data_fn=build_fake_data)
    assert "accelerate started ONE" in caplog.text and "torchrun --nproc_per_node N" in caplog.text


def test_resume_auto_on_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys) -> None:
    from main import parse_args, run
    from tests.engine_fakes import build_fake_data, build_fake_model, fake_config

    first = run(parse_args([]), fake_config(tmp_path), build_model_fn=build_fake_model,
                build_data_fn=build_fake_data)
    assert first["state"].epoch == 2
    log_before = (tmp_path / "log.jsonl").read_text()
    ckpt_mtime = (tmp_path / "checkpoint_last.pth").stat().st_mtime_ns
    capsys.readouterr()
    again = run(parse_args(["--resume", "auto"]), fake_config(tmp_path), build_model_fn=build_fake_model,
                build_data_fn=build_fake_data)
    out = capsys.readouterr().out
    assert again["finished"] is True and again["state"].step == first["state"].step
    assert "this run is already finished (epoch 2 of optim.epochs=2); nothing to train" in out
    assert "--opt optim.epochs=N with N > 2" in out and "--eval --resume" in out
    assert (tmp_path / "log.jsonl").read_text() == log_before
    assert (tmp_path / "checkpoint_last.pth").stat().st_mtime_ns == ckpt_mtime


def test_tools_report_bad_input_files_as_one_message(tmp_path, capsys) -> None:
    import importlib

    visualize = importlib.import_module("tools.visualize_uncertainty")
    broken = tmp_path / "dets.json"
    broken.write_text("[{")
    assert visualize.main(["--detections", str(broken), "--out", str(tmp_path / "v.png")]) == 2
    assert f"error: results file {broken} is not valid JSON" in capsys.readouterr().err
    broken.write_text(json.dumps([{"image_id": 1, "bbox": [0, 0, 2, 2], "score": 0.9}]))
    assert visualize.main(["--detections", str(broken), "--out", str(tmp_path / "v.png")]) == 2
    assert "1 of 1 detections have no 'uncertainty'" in capsys.readouterr().err

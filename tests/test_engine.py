"""Training/evaluation machinery: main.run + util/engine.py with tiny fakes (tests/engine_fakes.py),
then the real tiny UGS-DINO on synthetic data (slow).

What could fail and is checked: the loop logs every step and lr; resume continues bit-exactly
(parameters, optimiser, log); a NaN loss skips the step with the image ids and aborts after K;
accumulation steps the optimiser once per K micro-batches; 2 processes score every image once to
the same metrics as 1; a corrupt checkpoint names the file; parameter groups follow official DINO.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.engine_fakes import (FakeCriterion, FakeDINO, build_fake_data, build_fake_model, fake_config,
                                reset_accelerate)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()


def _run(out: Path, argv: list[str] | None = None, extra: list[str] | None = None,
         criterion: FakeCriterion | None = None) -> dict:
    from main import parse_args, run

    def build(cfg):  # noqa: ANN001, ANN202
        model, crit, post = build_fake_model(cfg)
        return model, criterion or crit, post

    return run(parse_args(argv or []), fake_config(out, extra), build_model_fn=build,
               build_data_fn=build_fake_data)


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------
# Parameter groups and schedule
# ------------------------------------------------------------------------------------------
def test_box_head_last_layer_group_holds_exactly_the_bin_logit_layers() -> None:
    from configs import load_config
    from configs.overrides import ConfigError
    from models.build import build_model
    from util.optim import param_groups

    cfg = load_config("demo_synthetic")  # a UGS model from random weights (no download)
    model = build_model(cfg)[0]
    o = cfg.optim
    assert {g["name"] for g in param_groups(model, o.lr, o.lr_backbone, o.lr_backbone_names)} == {
        "main", "backbone"}
    groups = {g["name"]: g for g in param_groups(model, o.lr, o.lr_backbone, o.lr_backbone_names,
                                                 box_head_last_mult=10.0,
                                                 box_head_last_pattern=o.lr_box_head_last_pattern)}
    assert sorted(groups["box_head_last"]["param_names"]) == [
        "transformer.decoder.bbox_embed.0.layers.2.bias", "transformer.decoder.bbox_embed.0.layers.2.weight",
        "transformer.enc_out_bbox_embed.layers.2.bias", "transformer.enc_out_bbox_embed.layers.2.weight"]
    assert groups["box_head_last"]["lr"] == pytest.approx(10 * o.lr)
    names = [n for g in groups.values() for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, p in model.named_parameters() if p.requires_grad)  # each once
    with pytest.raises(ValueError, match="lr_box_head_last_pattern"):
        param_groups(model, o.lr, o.lr_backbone, o.lr_backbone_names, box_head_last_mult=10.0,
                     box_head_last_pattern="no_such_layer$")
    o.lr_box_head_last_pattern = "("
    with pytest.raises(ConfigError, match="lr_box_head_last_pattern"):
        o.check()


def test_param_groups_default_never_applies_linear_proj_mult() -> None:
    from configs.train import OptimConfig
    from models.build import build_optimizer, build_scheduler
    from util.optim import param_groups

    model = FakeDINO()
    model.class_head.bias.requires_grad_(False)  # frozen parameters are left out
    proj = OptimConfig().lr_linear_proj_names
    groups = {g["name"]: g for g in param_groups(model, 1e-4, 1e-5, ["backbone.0"], linear_proj_names=proj,
                                                 linear_proj_mult=0.1)}
    assert set(groups) == {"main", "backbone"}
    assert groups["backbone"]["lr"] == 1e-5 and groups["main"]["lr"] == 1e-4
    assert all(n.startswith("backbone.0.") for n in groups["backbone"]["param_names"])
    assert "sampling_offsets.weight" in groups["main"]["param_names"]  # multiplier inert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(groups["main"]["param_names"] + groups["backbone"]["param_names"]) == sorted(trainable)

    groups = {g["name"]: g for g in param_groups(model, 1e-4, 1e-5, ["backbone.0"], "ddetr_in_mmdet",
                                                 linear_proj_names=proj, linear_proj_mult=0.1)}
    assert groups["linear_proj"]["param_names"] == ["sampling_offsets.weight", "sampling_offsets.bias"]
    assert groups["linear_proj"]["lr"] == pytest.approx(1e-5)
    assert "sampling_offsets.weight" not in groups["main"]["param_names"]
    with pytest.raises(ValueError, match="param_dict_type 'mmdet'"):
        param_groups(model, 1e-4, 1e-5, ["backbone.0"], "mmdet")

    # the builders read the config: lr, weight decay, multiplier and schedule arrive in the optimizer
    cfg = OptimConfig(lr=1e-4, lr_drop=2, weight_decay=0.05, param_dict_type="ddetr_in_mmdet")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"main": 1e-4, "backbone": 1e-5, "linear_proj": 1e-5})
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, keeps the optimizer-before-scheduler order
        sched.step()
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-5, 1e-5])
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = build_scheduler(opt, OptimConfig(lr=1.0, lr_drop_list=[1, 3]))
    got = []
    for _ in range(4):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert got == pytest.approx([1.0, 0.1, 0.1, 0.01])


def test_ema_matches_the_blend_formula_and_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    """N updates equal `decay * ema + (1 - decay) * model` from the starting copy (the former
    hand-written EMA's rule), a shared tensor is averaged once, a floating buffer is averaged and an
    integer buffer copied; the state survives torch.save / torch.load(weights_only=True)."""
    from util.ema import ModelEMA

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    model = torch.nn.ModuleDict({"a": lin, "b": lin, "bn": torch.nn.BatchNorm1d(2)})  # one tensor, two names
    ema = ModelEMA(model, decay=0.9)
    expected = {k: v.detach().clone().double() for k, v in model.state_dict().items()}
    for _ in range(5):
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight))
            model["bn"].running_mean.add_(1.0)
            model["bn"].num_batches_tracked.add_(3)
        ema.update(model)
        for k, v in model.state_dict().items():
            expected[k] = (v.double() if not v.is_floating_point()
                           else 0.9 * expected[k] + 0.1 * v.detach().double())
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-6, atol=1e-6, msg=k)
    assert int(got["bn.num_batches_tracked"]) == 15 and ema.num_updates == 5
    assert not torch.equal(got["a.weight"], lin.weight)  # averaged, not copied
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training

    torch.save({"ema": ema.state_dict()}, tmp_path / "ckpt.pth")
    state = torch.load(tmp_path / "ckpt.pth", weights_only=True)["ema"]
    assert set(state) == {"model", "decay", "num_updates"} and "a.weight" in state["model"]
    restored = ModelEMA(model, decay=0.5)
    restored.load_state_dict(state)
    assert restored.decay == 0.9 and restored.num_updates == 5
    ema.update(model)
    restored.update(model)  # continues with the saved decay
    for k, v in ema.module.state_dict().items():
        assert torch.equal(restored.module.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------
# The loop, logs, pictures, checkpoints
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_train_and_evaluate_writes_logs_metrics_plots_checkpoints(tmp_path: Path) -> None:
    from util.checkpoint import load_checkpoint

    out = tmp_path / "run"
    result = _run(out, ["--export-safetensors"])
    records = _log(out)
    assert [r["step"] for r in records] == list(range(1, 9))  # 8 images / batch 2 x 2 epochs
    assert {"loss", "loss_ce", "loss_bbox", "lr_main", "lr_backbone", "grad_norm"} <= set(records[0])
    assert records[0]["lr_main"] == pytest.approx(1e-2) and records[-1]["lr_main"] == pytest.approx(1e-3)
    assert records[0]["loss"] == pytest.approx(records[0]["loss_ce"] + 5 * records[0]["loss_bbox"], rel=1e-5)
    history = [json.loads(x) for x in (out / "metrics_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [4, 8]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["max_dets"] == 8 and metrics["num_images"] == 7
    # The fake model reads every box with an error of at most 3% of the image, and its label: each
    # detection overlaps its object with IoU > 0.5, so AP50 is exactly 1 if the loop's boxes, labels,
    # image ids and category ids reach the evaluator intact; the jitter keeps AP itself below 1.
    assert metrics["AP50"] == pytest.approx(1.0) and metrics["AP"] < 0.9
    assert metrics == {**history[-1]}
    results = json.loads((out / "results_val.json").read_text())
    assert {r["image_id"] for r in results} == set(range(1, 8))
    assert {r["category_id"] for r in results} <= {1, 2}
    for name in ("loss_curves.png", "ap_history.png", "detections_last.png"):
        assert (out / "plots" / name).stat().st_size > 5000
    assert json.loads((out / "config.json").read_text())["optim"]["epochs"] == 2
    ckpt = load_checkpoint(out / "checkpoint_last.pth")
    assert {"model", "optimizer", "lr_scheduler", "epoch", "step", "rng", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert (out / "checkpoint_best.pth").is_file() and (out / "model.safetensors").is_file()
    assert result["metrics"]["AP"] == pytest.approx(metrics["AP"])


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path: Path) -> None:
    """2 epochs straight == 1 epoch, a crash that left extra log lines, --resume auto, 1 epoch."""
    from util.checkpoint import load_checkpoint

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(straight)
    _run(resumed, extra=["runtime.max_steps=4"])
    assert load_checkpoint(resumed / "checkpoint_last.pth")["step"] == 4
    with (resumed / "log.jsonl").open("a") as f:  # steps a crash lost after the checkpoint
        f.write(json.dumps({"step": 5, "epoch": 1, "loss": 123.0}) + "\n")
    _run(resumed, ["--resume", "auto"])
    assert _log(resumed) == _log(straight)  # same losses, same lrs, bit for bit
    a = load_checkpoint(straight / "checkpoint_last.pth")
    b = load_checkpoint(resumed / "checkpoint_last.pth")
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert a["lr_scheduler"] == b["lr_scheduler"]
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


class _CrashingCriterion(FakeCriterion):
    """Raises on its `crash_at`-th call, like a node failure in the middle of an epoch."""

    def __init__(self, crash_at: int) -> None:
        super().__init__()
        self.calls, self.crash_at = 0, crash_at

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().forward(outputs, targets)


@pytest.mark.slow
def test_resume_inside_an_epoch_continues_exactly(tmp_path: Path) -> None:
    """Checkpoints every 3 steps (4-step epochs); a crash in step 7 leaves the step-6 checkpoint,
    2 batches into epoch 1; `--resume auto` skips those 2 batches and ends bit-identical."""
    from util.checkpoint import load_checkpoint

    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    _run(straight, extra=["runtime.checkpoint_every_steps=3"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crashed, extra=["runtime.checkpoint_every_steps=3"], criterion=_CrashingCriterion(crash_at=7))
    ckpt = load_checkpoint(crashed / "checkpoint_last.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["train_state"]["batches_in_epoch"]) == (6, 1, 2)
    reset_accelerate()
    _run(crashed, ["--resume", "auto"], extra=["runtime.checkpoint_every_steps=3"])
    assert _log(crashed) == _log(straight)  # steps 1-6, then 7-8 from the resumed run
    a = load_checkpoint(straight / "checkpoint_last.pth")
    b = load_checkpoint(crashed / "checkpoint_last.pth")
    assert (b["step"], b["epoch"], b["train_state"]["batches_in_epoch"]) == (8, 2, 0)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"][0]["torch"], b["rng"][0]["torch"])


def test_train_time_limit_stops_mid_epoch_then_evaluates_and_resume_continues(tmp_path: Path) -> None:
    """runtime.max_train_minutes (a limit already past after the first step): training stops after
    that step, inside epoch 0 of 4-step epochs, evaluates and saves with the epoch kept open;
    `--resume auto` without the limit then ends bit-identical to an uninterrupted run."""
    from util.checkpoint import load_checkpoint

    straight, limited = tmp_path / "straight", tmp_path / "limited"
    _run(straight)
    result = _run(limited, extra=["runtime.max_train_minutes=1e-9"])
    assert result["state"].deadline_reached and result["metrics"] is not None
    ckpt = load_checkpoint(limited / "checkpoint_last.pth")
    assert (ckpt["step"], ckpt["epoch"], ckpt["train_state"]["batches_in_epoch"]) == (1, 0, 1)
    assert "deadline_reached" not in ckpt["train_state"]  # this invocation only
    assert (limited / "metrics.json").is_file() and [r["step"] for r in _log(limited)] == [1]
    reset_accelerate()
    _run(limited, ["--resume", "auto"])
    assert _log(limited) == _log(straight)
    a = load_checkpoint(straight / "checkpoint_last.pth")
    b = load_checkpoint(limited / "checkpoint_last.pth")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_fresh_run_starts_new_logs_and_resume_keeps_them(tmp_path: Path) -> None:
    from util.logging import RunLogger, read_jsonl

    first = RunLogger(tmp_path, tensorboard=False, truncate_after_step=-1)
    for step in (1, 2, 3):
        first.log_step({"step": step, "loss": float(step)})
    first.log_metrics({"AP": 0.1}, epoch=1, step=3)
    RunLogger(tmp_path, tensorboard=False, truncate_after_step=2)  # resume from step 2
    assert [r["step"] for r in read_jsonl(tmp_path / "log.jsonl")] == [1, 2]
    assert read_jsonl(tmp_path / "metrics_history.jsonl") == []
    fresh = RunLogger(tmp_path, tensorboard=False, truncate_after_step=-1)
    fresh.log_step({"step": 1, "loss": 9.0})
    assert read_jsonl(tmp_path / "log.jsonl") == [{"step": 1, "loss": 9.0}]
    RunLogger(tmp_path, tensorboard=False, truncate_after_step=None)  # --eval: appends only
    assert len(read_jsonl(tmp_path / "log.jsonl")) == 1


def test_stale_detection_pictures_are_dropped_like_the_logs(tmp_path: Path) -> None:
    from main import _drop_stale_detection_pictures

    plots = tmp_path / "plots"
    plots.mkdir()
    for step in (100, 200, 300):
        (plots / f"detections_step{step:07d}.png").write_bytes(b"png")
    (plots / "loss_curves.png").write_bytes(b"png")
    assert _drop_stale_detection_pictures(plots, None) == 0  # --eval keeps everything
    assert _drop_stale_detection_pictures(plots, 200) == 1  # resume at step 200
    assert sorted(p.name for p in plots.iterdir()) == ["detections_step0000100.png", "detections_step0000200.png",
                                                       "loss_curves.png"]
    assert _drop_stale_detection_pictures(plots, -1) == 2  # fresh run
    assert [p.name for p in plots.iterdir()] == ["loss_curves.png"]


def test_detection_plot_falls_back_to_top_scores_for_a_weak_model(tmp_path: Path) -> None:
    from util.engine import EvalSample
    from util.plots import plot_detections

    weak = EvalSample(image_id=1, image=torch.rand(3, 32, 32),
                      boxes_xyxy=torch.tensor([[2.0, 2, 10, 10], [5, 5, 20, 20], [0, 0, 4, 4]]),
                      scores=torch.tensor([0.05, 0.2, 0.01]), labels=torch.tensor([0, 1, 0]),
                      gt_boxes_xyxy=torch.tensor([[2.0, 2, 10, 10], [6, 6, 18, 18]]))
    import matplotlib.pyplot as plt

    titles = []
    real_subplots = plt.subplots

    def spy(*a, **k):
        fig, axes = real_subplots(*a, **k)
        titles.append(axes[0][0])
        return fig, axes

    plt.subplots = spy
    try:
        assert plot_detections([weak], tmp_path / "d.png", score_threshold=0.3) is not None
    finally:
        plt.subplots = real_subplots
    ax = titles[0]
    assert "2 top-scored dets (none >= 0.3)" in ax.get_title()
    assert len(ax.patches) == 2 + 2  # 2 GT + the 2 best-scored detections (one per GT box)


def test_corrupt_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    from util.checkpoint import CheckpointError

    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth.*corrupt or truncated"):
        _run(tmp_path / "run", ["--resume", str(bad)])
    with pytest.raises(CheckpointError, match="does not exist"):
        _run(tmp_path / "run", ["--resume", str(tmp_path / "missing.pth")])
    weights_only = tmp_path / "weights.pth"
    torch.save({"model": FakeDINO().state_dict()}, weights_only)
    with pytest.raises(CheckpointError, match="not a training checkpoint.*--pretrained"):
        _run(tmp_path / "run", ["--resume", str(weights_only)])


# ------------------------------------------------------------------------------------------
# Guards
# ------------------------------------------------------------------------------------------
def test_nonfinite_loss_skips_step_with_image_ids(tmp_path: Path, caplog) -> None:
    crit = FakeCriterion()
    crit.nan_image_ids = {3}
    out = tmp_path / "nan"
    with caplog.at_level(logging.WARNING):
        _run(out, extra=["optim.epochs=1"], criterion=crit)
    records = _log(out)
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 1 and 3 in skipped[0]["image_ids"] and skipped[0]["nonfinite_terms"] == [
        "loss", "loss_bbox"]
    assert len(records) == 4  # the skipped step still advances the step counter
    assert "skipped: non-finite loss" in caplog.text and "image ids [" in caplog.text
    from util.checkpoint import load_checkpoint
    weights = load_checkpoint(out / "checkpoint_last.pth")["model"]
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_nonfinite_loss_aborts_after_k_consecutive(tmp_path: Path) -> None:
    from util.engine import NonFiniteLossError

    crit = FakeCriterion()
    crit.nan_image_ids = set(range(1, 100))
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps"):
        _run(tmp_path / "nan", extra=["optim.max_nonfinite_steps=2"], criterion=crit)
    assert len(_log(tmp_path / "nan")) == 2


def test_gradient_accumulation_steps_once_per_k_batches(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "2")
    crit = FakeCriterion()
    out = tmp_path / "accum"
    _run(out, extra=["optim.epochs=1"], criterion=crit)
    assert [r["step"] for r in _log(out)] == [1, 2]  # 4 micro-batches -> 2 optimizer steps


def test_out_of_memory_names_image_sizes_and_knobs(caplog) -> None:
    from accelerate import Accelerator

    from datasets.collate import collate_detection
    from util.engine import TrainSettings, TrainState, train_one_epoch

    class Exploding(FakeDINO):
        def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    data = build_fake_data(None)
    loader = torch.utils.data.DataLoader(data.train, batch_size=2, collate_fn=collate_detection)
    model = Exploding()
    acc = Accelerator(cpu=True)
    with caplog.at_level(logging.ERROR), pytest.raises(RuntimeError, match="out of memory"):
        train_one_epoch(model, FakeCriterion(), loader, torch.optim.AdamW(model.parameters()), acc, 0,
                        TrainState(), TrainSettings())
    assert "(h, w)=(32, 32)" in caplog.text and "optim.batch_size" in caplog.text
    assert "activation checkpointing" in caplog.text and "maximum image size" in caplog.text


# ------------------------------------------------------------------------------------------
# Distributed evaluation
# ------------------------------------------------------------------------------------------
def _metrics_from(stdout: str) -> dict:
    lines = [x for x in stdout.splitlines() if x.startswith("METRICS ")]
    assert lines, stdout[-3000:]
    return json.loads(lines[-1][len("METRICS "):])


@pytest.mark.slow
def test_two_processes_score_every_image_once_with_same_metrics(tmp_path: Path) -> None:
    """7 validation images, batch 2, 2 processes: the sampler pads with a repeat; it is removed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = str(ROOT / "tests" / "engine_fakes.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one"), "--eval"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", script, str(tmp_path / "two"), "--eval"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stdout + two.stderr
    m1, m2 = _metrics_from(one.stdout), _metrics_from(two.stdout)
    assert m2["num_images_predicted"] == m1["num_images_predicted"] == 7
    assert m2["num_detections"] == m1["num_detections"] == 7 * 8
    for k in ("AP", "AP50", "AP75", "AR"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-12), k
    r1 = json.loads((tmp_path / "one" / "results_val.json").read_text())
    r2 = json.loads((tmp_path / "two" / "results_val.json").read_text())
    assert sorted(r["image_id"] for r in r2) == sorted(r["image_id"] for r in r1)


# ------------------------------------------------------------------------------------------
# The real thing: the demo's UGS-DINO on synthetic data, tiny sizes
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_demo_model_trains_evaluates_and_resumes(tmp_path: Path) -> None:
    from configs import load_config
    from main import parse_args, run
    from models import build_model
    from util.checkpoint import load_checkpoint

    def cfg(max_steps: int):  # noqa: ANN202
        return load_config("demo_synthetic", [
            f"runtime.output_dir={tmp_path}", f"runtime.max_steps={max_steps}", "runtime.tensorboard=false",
            "data.synthetic_train_images=8", "data.synthetic_val_images=3", "data.synthetic_image_size=[96,96]",
            "data.synthetic_max_objects=8", "eval.num_draw_images=1"])

    built = {}

    def recording_build_model(c):  # noqa: ANN001, ANN202
        parts = build_model(c)
        built["model"] = parts[0]
        return parts

    first = run(parse_args([]), cfg(2), build_model_fn=recording_build_model)  # one epoch of 2 steps (8 images, batch 4)
    conv = next(p for p in built["model"].parameters() if p.dim() == 4 and p.shape[-1] > 1)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()  # runtime.channels_last
    records = _log(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    assert all(isinstance(r["loss"], float) and r["loss"] > 0 for r in records)
    assert {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_interm"} <= set(records[0])
    assert first["metrics"]["num_images"] == 3 and first["metrics"]["max_dets"] == 100
    reset_accelerate()
    second = run(parse_args(["--resume", "auto"]), cfg(4))
    assert second["state"].step == 4 and [r["step"] for r in _log(tmp_path)] == [1, 2, 3, 4]
    ckpt = load_checkpoint(tmp_path / "checkpoint_last.pth")
    assert ckpt["epoch"] == 2 and ckpt["config"]["name"] == "demo_synthetic"
    assert "backbone.0.body.layer2.0.conv1.weight" in ckpt["model"]  # official key layout


FIT_STEPS = 30
FIT_MIN_AP50 = 0.3


@pytest.mark.slow
def test_real_demo_model_fits_two_images(tmp_path: Path) -> None:
    """The demo's UGS-DINO from random weights, trained on two 96x96 scenes (2-4 objects each) for
    30 steps and evaluated on the same two scenes, must localise and classify them: AP50 >= 0.3.
    Measured on CPU (torch 2.14, 1 thread), `runtime.seed` 0-3: AP50 0.89 / 0.60 / 0.50 / 1.00; after 10
    steps 0.01, so the threshold separates a model that learns from one that does not."""
    import main
    from configs import load_config

    cfg = load_config("demo_synthetic", [
        f"runtime.output_dir={tmp_path}", f"runtime.max_steps={FIT_STEPS}", "runtime.max_train_minutes=0",
        "runtime.tensorboard=false", "runtime.num_threads=1", "runtime.log_interval=1000",
        "data.synthetic_train_images=2", "data.synthetic_image_size=[96,96]", "data.synthetic_min_objects=2",
        "data.synthetic_max_objects=4", "optim.batch_size=2", "optim.epochs=1", "optim.lr_drop=1",
        "eval.interval=1", "eval.num_draw_images=0", "runtime.seed=0"])

    def same_two_scenes(c):  # noqa: ANN001, ANN202 - train on them (repeated: one epoch), evaluate on them
        data = main.build_data(c)
        return main.Data(train=torch.utils.data.ConcatDataset([data.train] * FIT_STEPS), val=data.train,
                         collate=data.collate, label_to_category_id=data.label_to_category_id,
                         coco_gt=data.train.coco_gt(), class_names=data.class_names)

    result = main.run(main.parse_args([]), cfg, build_data_fn=same_two_scenes)
    assert result["state"].step == FIT_STEPS
    assert result["metrics"]["num_images"] == 2
    assert result["metrics"]["AP50"] >= FIT_MIN_AP50, result["metrics"]



def test_tf32_switch_sets_both_flags_and_none_keeps_pytorchs(caplog) -> None:
    from configs import load_config
    from util.precision import set_tf32

    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        assert load_config("dino_tiny", []).runtime.tf32 is None
        assert load_config("dino_tiny", ["runtime.tf32=true"]).runtime.tf32 is True
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        with caplog.at_level(logging.INFO):
            assert set_tf32(None) == (False, True)  # untouched
        assert "PyTorch defaults" in caplog.text
        assert set_tf32(True) == (True, True)
        assert set_tf32(False) == (False, False)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_weighted_loss_leaves_out_zero_weights_but_not_their_value() -> None:
    """Same total and gradients as the official sum over every weighted key; a zero-weighted term
    gets no backward and its NaN does not poison the total; unweighted keys are ignored."""
    from util.engine import weighted_loss

    x = torch.tensor([1.0, -2.0], requires_grad=True)
    logged_only = (x * 3).abs().sum()
    losses = {"loss_ce": (x ** 2).sum(), "loss_bbox": logged_only, "loss_giou": x.sum(), "class_error": x.max()}
    weights = {"loss_ce": 2.0, "loss_bbox": 0.0, "loss_giou": 0.5}
    total = weighted_loss(losses, weights)
    official = sum(losses[k] * w for k, w in weights.items())
    assert total.item() == pytest.approx(official.item())
    (grad,) = torch.autograd.grad(total, x, retain_graph=True)
    (grad_official,) = torch.autograd.grad(official, x, retain_graph=True)
    torch.testing.assert_close(grad, grad_official)
    seen = []
    logged_only.register_hook(lambda g: seen.append(g))
    weighted_loss(losses, weights).backward()
    assert seen == []  # no backward through the zero-weighted term
    nan_losses = {**losses, "loss_bbox": torch.tensor(float("nan"))}
    assert torch.isfinite(weighted_loss(nan_losses, weights))
    # all weights zero: a zero total that still has a graph; no weighted key at all: an error
    zero = weighted_loss(losses, {"loss_ce": 0.0})
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(KeyError, match="no loss"):
        weighted_loss(losses, {"loss_other": 1.0})


def test_batches_move_to_the_gpu_without_blocking_only_from_pinned_memory() -> None:
    from main import loader_transfers_non_blocking

    assert loader_transfers_non_blocking(pin_memory=True, cuda=True)
    assert not loader_transfers_non_blocking(pin_memory=False, cuda=True)
    assert not loader_transfers_non_blocking(pin_memory=True, cuda=False)

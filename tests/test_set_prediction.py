"""Fast unit tests of the set-prediction pieces: box ops, matcher, criterion, post-processor."""
from __future__ import annotations

import itertools
import math
import socket

import pytest
import torch
from torchvision.ops import box_convert

from models.criterion import (
    GIoUBoxLoss,
    L1BoxLoss,
    MatchedPairs,
    SetCriterion,
    denoising_indices,
    expand_weight_dict,
)
from models.matcher import HungarianMatcher, assign
from models.postprocess import PostProcess
from util.box_ops import generalized_box_iou, inverse_sigmoid

NUM_CLASSES = 5
BASE_WEIGHTS = {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}


# ---------------------------------------------------------------------------- helpers
def _criterion(num_layers: int = 3, box_losses=None, extra_weights=None) -> SetCriterion:
    base = dict(BASE_WEIGHTS, **(extra_weights or {}))
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0), expand_weight_dict(base, num_layers),
                        focal_alpha=0.25, box_losses=box_losses).train()


def _random_set(bs: int, q: int, gen: torch.Generator) -> dict:
    logits = torch.randn(bs, q, NUM_CLASSES, generator=gen, dtype=torch.float64)
    boxes = torch.rand(bs, q, 4, generator=gen, dtype=torch.float64) * 0.5 + 0.2
    return {"pred_logits": logits.requires_grad_(), "pred_boxes": boxes.requires_grad_()}


def _outputs(targets: list[dict], num_layers: int = 3, q: int = 8, groups: int = 2, seed: int = 0) -> dict:
    """A full DINO-shaped output dict with denoising laid out for `targets`."""
    gen = torch.Generator().manual_seed(seed)
    bs = len(targets)
    out = _random_set(bs, q, gen)
    out["aux_outputs"] = [_random_set(bs, q, gen) for _ in range(num_layers - 1)]
    out["interm_outputs"] = _random_set(bs, q, gen)
    max_gt = max(len(t["labels"]) for t in targets)
    pad = 2 * groups * max_gt
    known = _random_set(bs, pad, gen)
    known["aux_outputs"] = [_random_set(bs, pad, gen) for _ in range(num_layers - 1)]
    out["dn_meta"] = {"pad_size": pad, "num_dn_group": groups if max_gt else 1, "output_known_lbs_bboxes": known}
    return out


def _targets(counts: list[int], seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, NUM_CLASSES, (n,), generator=gen),
             "boxes": torch.cat([torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.6 + 0.2,
                                 torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.2 + 0.05], dim=1)}
            for n in counts]


def _keys(suffixes: list[str], final_log: bool = True) -> set[str]:
    per_set = ["loss_ce", "loss_bbox", "loss_xy", "loss_hw", "loss_giou", "cardinality_error"]
    keys = {f"{k}{s}" for s in suffixes for k in per_set}
    return keys | ({"class_error"} if final_log else set())


# ---------------------------------------------------------------------------- box ops
def test_box_convert_is_the_official_arithmetic_bit_for_bit():
    """torchvision's box_convert replaces the official box_cxcywh_to_xyxy / box_xyxy_to_cxcywh: the
    same float64 result to the last bit (written out here as the official code writes it)."""
    boxes = torch.rand(2, 50, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(-1)
    official_xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)
    assert torch.equal(box_convert(boxes, "cxcywh", "xyxy"), official_xyxy)
    x0, y0, x1, y1 = boxes.unbind(-1)
    official_cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)
    assert torch.equal(box_convert(boxes, "xyxy", "cxcywh"), official_cxcywh)
    one = box_convert(torch.tensor([0.5, 0.4, 0.2, 0.6]), "cxcywh", "xyxy")
    assert one.tolist() == pytest.approx([0.4, 0.1, 0.6, 0.7])


def test_giou_identical_and_disjoint_hand_computed():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    # Identical: iou = 1 / (1 + 1e-6), enclosing box == union -> no penalty.
    assert generalized_box_iou(a, a).item() == pytest.approx(1 / (1 + 1e-6), abs=1e-15)
    assert generalized_box_iou(a, a).item() == pytest.approx(1.0, abs=2e-6)
    # Disjoint unit squares 1 apart: iou 0, union 2, enclosing 3 -> giou = -(3 - 2) / (3 + 1e-6).
    assert generalized_box_iou(a, b).item() == pytest.approx(-1 / (3 + 1e-6), abs=1e-15)
    # Half overlap: inter 0.5, union 1.5, enclosing 1.5 -> giou = iou = 0.5 / (1.5 + 1e-6).
    c = torch.tensor([[0.5, 0.0, 1.5, 1.0]], dtype=torch.float64)
    assert generalized_box_iou(a, c).item() == pytest.approx(0.5 / (1.5 + 1e-6), abs=1e-15)


def test_giou_inverted_boxes_error_names_rows():
    good = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    bad = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 0.2, 1.0]])
    with pytest.raises(ValueError, match=r"boxes2: 1 box.*row 1: \[0.5, 0.0, 0.2"):
        generalized_box_iou(good, bad)
    with pytest.raises(ValueError, match="boxes1"):
        generalized_box_iou(torch.tensor([[0.0, float("nan"), 1.0, 1.0]]), good)


def test_inverse_sigmoid_clamps_with_eps_1e3():
    x = torch.tensor([-0.5, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    expected = [math.log(1e-3 / 1), math.log(1e-3 / 1), 0.0, math.log(1 / 1e-3), math.log(1 / 1e-3)]
    assert inverse_sigmoid(x).tolist() == pytest.approx(expected, abs=1e-12)
    y = torch.tensor([0.2, 0.7], dtype=torch.float64)
    assert torch.allclose(inverse_sigmoid(y).sigmoid(), y, atol=1e-15)


# ---------------------------------------------------------------------------- matcher
def test_assign_hand_made_cost_matrix_is_optimal():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0], [9.0, 9.0, 0.5]])
    pred, tgt = assign(cost)
    assert pred.dtype == tgt.dtype == torch.int64
    assert pred.tolist() == [0, 1, 3] and tgt.tolist() == [1, 0, 2]  # 1 + 2 + 0.5, rows ascending
    best = min(sum(cost[r, c] for r, c in zip(rows, range(3))) for rows in itertools.permutations(range(4), 3))
    assert cost[pred, tgt].sum().item() == pytest.approx(best.item())


def test_assign_non_finite_cost_names_image():
    cost = torch.ones(3, 2)
    cost[1, 0] = float("nan")
    with pytest.raises(ValueError, match="image 4: .*query 1, target 0"):
        assign(cost, image_index=4)


def test_matcher_with_empty_targets():
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    gen = torch.Generator().manual_seed(0)
    outputs = _random_set(2, 6, gen)
    targets = _targets([0, 0])
    for pred, tgt in matcher(outputs, targets):
        assert pred.numel() == tgt.numel() == 0 and pred.dtype == torch.int64
    mixed = matcher(outputs, _targets([0, 3]))
    assert mixed[0][0].numel() == 0 and sorted(mixed[1][1].tolist()) == [0, 1, 2]
    assert torch.all(mixed[1][0][1:] > mixed[1][0][:-1])  # ascending query order


def test_matcher_finds_the_obvious_assignment_and_ignores_extra_keys():
    targets = [{"labels": torch.tensor([1, 3]),
                "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.6, 0.3, 0.2]], dtype=torch.float64),
                "ignore_boxes": torch.tensor([[0.5, 0.5, 0.9, 0.9]]), "image_id": torch.tensor(7)}]
    logits = torch.full((1, 4, NUM_CLASSES), -5.0, dtype=torch.float64)
    boxes = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    logits[0, 3, 1] = 5.0
    boxes[0, 3] = targets[0]["boxes"][0]
    logits[0, 0, 3] = 5.0
    boxes[0, 0] = targets[0]["boxes"][1]
    pred, tgt = HungarianMatcher(2.0, 5.0, 2.0)({"pred_logits": logits, "pred_boxes": boxes}, targets)[0]
    assert pred.tolist() == [0, 3] and tgt.tolist() == [1, 0]


def test_matcher_non_finite_predictions_name_the_image():
    outputs = _random_set(3, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs["pred_boxes"][2, 1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"image\(s\) \[2\]"):
        HungarianMatcher(2.0, 5.0, 2.0)(outputs, _targets([1, 1, 1]))


# ---------------------------------------------------------------------------- criterion
def test_expected_loss_keys_for_aux_interm_dn():
    targets = _targets([3, 1])
    losses = _criterion(num_layers=3)(_outputs(targets, num_layers=3), targets)
    assert set(losses) == _keys(["", "_0", "_1", "_interm", "_dn", "_dn_0", "_dn_1"])
    assert all(torch.isfinite(v) for v in losses.values())
    # The official R50 weight_dict has 39 entries for 6 decoder layers.
    assert len(expand_weight_dict(BASE_WEIGHTS, 6)) == 39


def test_perfect_predictions_give_near_zero_box_losses():
    targets = _targets([3, 2])
    outputs = _outputs(targets)
    for out in [outputs, *outputs["aux_outputs"], outputs["interm_outputs"]]:
        with torch.no_grad():
            out["pred_logits"].fill_(-30.0)
            for b, t in enumerate(targets):
                n = len(t["labels"])
                out["pred_boxes"][b, :n] = t["boxes"]
                out["pred_logits"][b, torch.arange(n), t["labels"]] = 30.0
    criterion = _criterion().eval()  # dn off: zeros
    losses = criterion(outputs, targets)
    for s in ["", "_0", "_1", "_interm"]:
        assert losses[f"loss_bbox{s}"].item() == 0.0
        assert losses[f"loss_giou{s}"].item() < 1e-3  # only the 1e-6 eps of GIoU remains
        assert losses[f"loss_ce{s}"].item() < 1e-10
    assert losses["class_error"].item() == 0.0


def test_no_objects_gives_finite_losses_and_dn_zeros():
    targets = _targets([0, 0])
    outputs = _outputs(_targets([0, 0]))
    assert outputs["dn_meta"]["pad_size"] == 0
    losses = _criterion()(outputs, targets)
    assert set(losses) == _keys(["", "_0", "_1", "_interm", "_dn", "_dn_0", "_dn_1"])
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(losses[k].item() == 0.0 for k in losses if "_dn" in k)
    assert losses["loss_bbox"].item() == 0.0 and losses["loss_ce"].item() > 0  # all queries are background
    total = sum(losses[k] * w for k, w in _criterion().weight_dict.items())
    total.backward()
    assert torch.isfinite(outputs["pred_logits"].grad).all()


def test_images_without_targets_next_to_images_with_targets():
    targets = _targets([0, 2])
    outputs = _outputs(targets)
    losses, indices = _criterion()(outputs, targets, return_indices=True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert indices["_dn"][0][0].numel() == 0
    assert indices["_dn"][1][0].tolist() == [0, 1, 4, 5]  # 2 groups of 2M = 4 slots, positives first
    assert losses["loss_bbox_dn"].item() > 0


def test_denoising_indices_layout_and_errors():
    targets = _targets([3, 1])
    idx = denoising_indices(targets, pad_size=18, num_groups=3)  # M = 3, 2M = 6
    assert idx[0][0].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14] and idx[0][1].tolist() == [0, 1, 2] * 3
    assert idx[1][0].tolist() == [0, 6, 12] and idx[1][1].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="not a multiple"):
        denoising_indices(targets, pad_size=17, num_groups=3)
    with pytest.raises(ValueError, match="image 0 has 3 targets"):
        denoising_indices(targets, pad_size=12, num_groups=3)


def test_num_boxes_is_clamped_to_one():
    criterion = _criterion()
    assert criterion.num_boxes(_targets([0, 0]), torch.device("cpu")) == 1.0
    assert criterion.num_boxes(_targets([3, 2]), torch.device("cpu")) == 5.0


def test_dn_normaliser_is_num_boxes_times_groups():
    targets = _targets([2])
    outputs = _outputs(targets, groups=3)
    losses = _criterion()(outputs, targets)
    known = outputs["dn_meta"]["output_known_lbs_bboxes"]
    idx = denoising_indices(targets, outputs["dn_meta"]["pad_size"], 3)[0][0]
    l1 = (known["pred_boxes"][0, idx] - targets[0]["boxes"].repeat(3, 1)).abs().sum() / (2 * 3)
    assert losses["loss_bbox_dn"].item() == pytest.approx(l1.item(), abs=1e-12)


def test_bad_targets_are_clear_errors():
    targets = _targets([2, 1])
    outputs = _outputs(targets)
    targets[1]["labels"] = torch.tensor([NUM_CLASSES])
    with pytest.raises(ValueError, match=r"target 1: labels must be integers in \[0, 5\)"):
        _criterion()(outputs, targets)
    with pytest.raises(ValueError, match="2 targets for a batch of 3"):
        _criterion()(_outputs(_targets([1, 1, 1])), _targets([1, 1]))


def test_custom_box_loss_term_plugs_in_and_is_zero_filled():
    class CountTerm:
        names = ("loss_count",)

        def __call__(self, matched: MatchedPairs) -> dict:
            assert matched.gather("pred_boxes").shape == matched.src_boxes_cxcywh.shape
            return {"loss_count": matched.src_boxes_cxcywh.new_tensor(float(len(matched.batch_idx)))}

    criterion = _criterion(box_losses=[GIoUBoxLoss(), CountTerm()], extra_weights={"loss_count": 0.5})
    targets = _targets([3, 2])
    losses = criterion(_outputs(targets, groups=2), targets)
    assert "loss_bbox" not in losses and losses["loss_count"].item() == 5 and losses["loss_count_dn"].item() == 10
    assert criterion.weight_dict["loss_count_dn_1"] == 0.5
    assert criterion.eval()(_outputs(targets), targets)["loss_count_dn_0"].item() == 0.0
    with pytest.raises(TypeError, match="names"):
        SetCriterion(NUM_CLASSES, HungarianMatcher(), {}, box_losses=[lambda m: {}])
    assert isinstance(L1BoxLoss(), torch.nn.Module)


def test_bf16_outputs_give_float32_losses():
    targets = _targets([2, 1])
    outputs = _outputs(targets)
    sets = [outputs, *outputs["aux_outputs"], outputs["interm_outputs"]]
    for out in sets:
        for key in ("pred_logits", "pred_boxes"):
            out[key] = out[key].detach().to(torch.bfloat16)
    outputs["dn_meta"] = None
    losses = _criterion()(outputs, targets)
    assert losses["loss_ce"].dtype == torch.float32 and losses["loss_giou_0"].dtype == torch.float32


# ---------------------------------------------------------------------------- post-processing
def test_postprocess_topk_labels_boxes_and_errors():
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 2, 1] = 3.0
    logits[0, 0, 0] = 2.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.1, 0.1, 0.1, 0.1], [0.25, 0.5, 0.5, 1.0]]])
    extra = torch.arange(3.0).view(1, 3, 1).expand(1, 3, 4)
    out = PostProcess(num_select=2, extra_keys=["pred_box_std_cxcywh"])(
        {"pred_logits": logits, "pred_boxes": boxes, "pred_box_std_cxcywh": extra}, torch.tensor([[100, 200]]))
    det = out[0]
    assert det["labels"].tolist() == [1, 0] and det["query_index"].tolist() == [2, 0]
    assert det["scores"][0] > det["scores"][1]
    expected = torch.tensor([[0.0, 0.0, 100.0, 100.0], [80.0, 30.0, 120.0, 70.0]])  # x by w, y by h
    assert torch.allclose(det["boxes"], expected, atol=1e-4)
    assert det["pred_box_std_cxcywh"][:, 0].tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="num_select 7 exceeds num_queries x num_classes = 3 x 2 = 6"):
        PostProcess(num_select=7)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        PostProcess(num_select=2)({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([100, 200]))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RANK_COUNTS = ([3, 2], [1])  # target boxes per image on rank 0 and rank 1: 6 in all, 3 per process


def _two_process_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: num_boxes of small and empty batches, and the losses of a step."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        criterion = _criterion()
        cpu = torch.device("cpu")
        targets = _targets(_RANK_COUNTS[rank], seed=rank + 1)
        result = {
            "mean": criterion.num_boxes(targets, cpu),
            "clamped": criterion.num_boxes(_targets([1] if rank == 0 else [0]), cpu),  # (1 + 0) / 2 -> 1
            "losses": {k: v.detach() for k, v in criterion(_outputs(targets, seed=rank), targets).items()},
        }
        torch.save(result, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_num_boxes_is_the_mean_over_two_real_processes(tmp_path):
    """Two gloo processes on localhost: num_boxes is the all-reduced mean (clamped at 1) on both,
    and each process's losses are normalized by it rather than by its own count."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not built in")
    mp.spawn(_two_process_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["mean"] for r in results] == [3.0, 3.0]
    assert [r["clamped"] for r in results] == [1.0, 1.0]
    for rank, result in enumerate(results):
        targets = _targets(_RANK_COUNTS[rank], seed=rank + 1)
        alone = _criterion()(_outputs(targets, seed=rank), targets)  # normalized by its own count
        local = float(sum(_RANK_COUNTS[rank]))
        for key, value in alone.items():
            scale = local / 3.0 if key.startswith("loss_") else 1.0  # error percentages: not normalized
            torch.testing.assert_close(result["losses"][key], value.detach() * scale, rtol=1e-12, atol=1e-12,
                                       msg=f"rank {rank} {key}")

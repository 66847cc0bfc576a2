"""The criterion's host-side batching gives the same results as one set at a time.

Matching all output sets in one matcher call, moving all matched pairs to the device in one copy
and the O(N) paired GIoU are there for the GPU's sake (fewer syncs and launches); these tests
pin that they change nothing else.
"""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_convert

from models.criterion import (
    SetCriterion,
    cardinality_error,
    class_error,
    expand_weight_dict,
    sigmoid_focal_loss,
)
from models.matched_pairs import indices_to_device
from models.matcher import HungarianMatcher, assign_all, default_threads
from tests.test_set_prediction import BASE_WEIGHTS, NUM_CLASSES, _outputs, _random_set, _targets
from util.box_ops import generalized_box_iou, paired_generalized_box_iou


def _box_pairs(n: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.cat([torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.3], 1)
    b = torch.cat([torch.rand(n, 2, generator=gen) * 0.8 + 0.1, torch.rand(n, 2, generator=gen) * 0.3], 1)
    b[:3] = a[:3]  # identical pairs
    b[3, 2:] = 0.0  # a degenerate (zero-size) target
    return box_convert(a.to(dtype), "cxcywh", "xyxy"), box_convert(b.to(dtype), "cxcywh", "xyxy")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_paired_giou_equals_the_pairwise_diagonal_bit_for_bit(dtype):
    a, b = _box_pairs(40, dtype)
    a1, a2 = a.clone().requires_grad_(), a.clone().requires_grad_()
    diag = torch.diag(generalized_box_iou(a1, b))
    paired = paired_generalized_box_iou(a2, b)
    assert torch.equal(paired, diag)
    assert (paired[:3] > 0.95).all() and (paired >= -1).all() and (paired <= 1).all()
    weights = torch.linspace(0.5, 2.0, 40, dtype=dtype)
    ((1 - diag) * weights).sum().backward()
    ((1 - paired) * weights).sum().backward()
    assert torch.equal(a1.grad, a2.grad)


def test_paired_giou_shape_error_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3, 4\) and \(2, 4\)"):
        paired_generalized_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))


def test_matcher_forward_sets_equals_one_set_at_a_time():
    gen = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    targets = _targets([3, 0, 5], seed=4)
    sets = [_random_set(3, 8, gen), _random_set(3, 8, gen), _random_set(3, 12, gen)]
    sets.append({k: v.float() for k, v in _random_set(3, 8, gen).items()})  # another dtype: own group
    together = matcher.forward_sets(sets, targets)
    assert len(together) == len(sets)
    for out, got in zip(sets, together):
        alone = matcher(out, targets)
        assert len(got) == 3
        for (p1, t1), (p2, t2) in zip(got, alone):
            assert torch.equal(p1, p2) and torch.equal(t1, t2) and p1.dtype == torch.int64
    assert [len(p) for p, _ in together[2]] == [3, 0, 5]
    assert matcher.forward_sets([], targets) == []


def test_matcher_forward_sets_errors_name_set_image_and_target():
    gen = torch.Generator().manual_seed(5)
    matcher = HungarianMatcher(2.0, 5.0, 2.0)
    targets = _targets([2, 2], seed=6)
    sets = [_random_set(2, 6, gen) for _ in range(3)]
    with torch.no_grad():
        sets[2]["pred_logits"][1, 4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"image\(s\) \[1\] \(output set 2\)"):
        matcher.forward_sets(sets, targets)
    with torch.no_grad():
        sets[2]["pred_logits"][1, 4, 0] = 0.0
        sets[0]["pred_boxes"][0, 1, 3] = -0.1  # negative height: the GIoU cost would be meaningless
    with pytest.raises(ValueError, match=r"negative w/h\) in image\(s\) \[0\]"):
        matcher.forward_sets(sets, targets)
    with torch.no_grad():
        sets[0]["pred_boxes"][0, 1, 3] = 0.1
    targets[1]["boxes"][0, 2] = float("nan")
    with pytest.raises(ValueError, match="target 1 has non-finite boxes"):
        matcher.forward_sets(sets, targets)
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        matcher.forward_sets(sets, _targets([1, 1, 1]))


class _CountingMatcher(HungarianMatcher):
    def __init__(self) -> None:
        super().__init__(2.0, 5.0, 2.0)
        self.calls: list[int] = []

    def forward_sets(self, output_sets, targets):  # noqa: ANN001, ANN201
        self.calls.append(len(output_sets))
        return super().forward_sets(output_sets, targets)


class _PerSetMatcher(torch.nn.Module):
    """A matcher with only HungarianMatcher.forward's signature (no forward_sets)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = HungarianMatcher(2.0, 5.0, 2.0)
        self.calls = 0

    def forward(self, outputs, targets):  # noqa: ANN001, ANN201
        self.calls += 1
        return self.inner(outputs, targets)


def test_criterion_matches_every_set_in_one_call_with_the_same_losses():
    targets = _targets([3, 1, 4])
    outputs = _outputs(targets, num_layers=4)
    weights = expand_weight_dict(BASE_WEIGHTS, 4)
    batched, per_set = _CountingMatcher(), _PerSetMatcher()
    crit_a = SetCriterion(NUM_CLASSES, batched, weights).train()
    crit_b = SetCriterion(NUM_CLASSES, per_set, weights).train()
    losses_a, used_a = crit_a(outputs, targets, return_indices=True)
    losses_b, used_b = crit_b(outputs, targets, return_indices=True)
    assert batched.calls == [5]  # final + 3 aux + interm; denoising pairs are fixed
    assert per_set.calls == 5
    assert losses_a.keys() == losses_b.keys()
    for k in losses_a:
        assert torch.equal(losses_a[k], losses_b[k]), k
    for s in used_a:
        assert all(torch.equal(p, q) and torch.equal(t, u) for (p, t), (q, u) in zip(used_a[s], used_b[s]))
    # reusing the indices runs no matcher at all
    crit_a(outputs, targets, indices=used_a)
    assert batched.calls == [5, 0]


def test_indices_to_device_gathers_each_sets_matched_targets():
    targets = _targets([2, 0, 3])
    sets = [[(torch.tensor([4, 1]), torch.tensor([1, 0])), (torch.zeros(0, dtype=torch.int64),) * 2,
             (torch.tensor([0, 2, 5]), torch.tensor([2, 0, 1]))],
            [(torch.tensor([7]), torch.tensor([0])), (torch.zeros(0, dtype=torch.int64),) * 2,
             (torch.tensor([3]), torch.tensor([2]))]]
    moved = indices_to_device(sets, targets, torch.device("cpu"))
    for indices, pairs in zip(sets, moved):
        assert pairs.batch_idx.tolist() == [b for b, (p, _) in enumerate(indices) for _ in range(len(p))]
        assert pairs.query_idx.tolist() == torch.cat([p for p, _ in indices]).tolist()
        assert torch.equal(pairs.target_boxes, torch.cat([targets[b]["boxes"][t] for b, (_, t) in enumerate(indices)]))
        labels = torch.cat([targets[b]["labels"][t] for b, (_, t) in enumerate(indices)])
        assert torch.equal(pairs.target_labels, labels)
    with pytest.raises(ValueError, match="matching has 2 images, the batch 3"):
        indices_to_device([sets[0][:2]], targets, torch.device("cpu"))


def test_box_losses_of_all_sets_at_once_equal_each_set_by_hand():
    targets = _targets([3, 1, 4])
    outputs = _outputs(targets, num_layers=3)
    criterion = SetCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0), expand_weight_dict(BASE_WEIGHTS, 3)).train()
    losses, used = criterion(outputs, targets, return_indices=True)
    num_boxes = float(sum(len(t["labels"]) for t in targets))
    sets = {"": outputs, "_0": outputs["aux_outputs"][0], "_1": outputs["aux_outputs"][1],
            "_interm": outputs["interm_outputs"], "_dn": outputs["dn_meta"]["output_known_lbs_bboxes"]}
    for suffix, out in sets.items():
        src = torch.cat([out["pred_boxes"][b, p] for b, (p, _) in enumerate(used[suffix])])
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, used[suffix])])
        scale = outputs["dn_meta"]["num_dn_group"] if suffix == "_dn" else 1
        l1 = (src - tgt).abs()
        giou = torch.diag(generalized_box_iou(box_convert(src, "cxcywh", "xyxy"),
                                              box_convert(tgt, "cxcywh", "xyxy")))
        torch.testing.assert_close(losses[f"loss_bbox{suffix}"], l1.sum() / (num_boxes * scale), rtol=1e-14, atol=0)
        torch.testing.assert_close(losses[f"loss_xy{suffix}"], l1[:, :2].sum() / (num_boxes * scale),
                                   rtol=1e-14, atol=0)
        torch.testing.assert_close(losses[f"loss_giou{suffix}"], (1 - giou).sum() / (num_boxes * scale),
                                   rtol=1e-14, atol=0)
        onehot = torch.zeros_like(out["pred_logits"])
        for b, ((p, j), t) in enumerate(zip(used[suffix], targets)):
            onehot[b, p, t["labels"][j]] = 1
        focal = sigmoid_focal_loss(out["pred_logits"], onehot, num_boxes * scale)
        torch.testing.assert_close(losses[f"loss_ce{suffix}"], focal, rtol=1e-14, atol=0)
        assert torch.equal(losses[f"cardinality_error{suffix}"], cardinality_error(out["pred_logits"], targets))
    assert losses["class_error"] == class_error(
        outputs["pred_logits"][torch.cat([torch.full_like(p, b) for b, (p, _) in enumerate(used[""])]),
                               torch.cat([p for p, _ in used[""]])],
        torch.cat([t["labels"][j] for t, (_, j) in zip(targets, used[""])]))
    # gradients reach every set's boxes and logits
    sum(losses[k] for k in losses if k.startswith(("loss_bbox", "loss_giou", "loss_ce"))).backward()
    for out in sets.values():
        assert out["pred_boxes"].grad is not None and out["pred_boxes"].grad.abs().sum() > 0
        assert out["pred_logits"].grad is not None and out["pred_logits"].grad.abs().sum() > 0


def test_threaded_assignment_equals_sequential_and_keeps_errors():
    gen = torch.Generator().manual_seed(7)
    targets = _targets([4, 0, 6, 2], seed=8)
    sets = [_random_set(4, 10, gen) for _ in range(3)]
    one = HungarianMatcher(2.0, 5.0, 2.0, threads=1).forward_sets(sets, targets)
    four = HungarianMatcher(2.0, 5.0, 2.0, threads=4).forward_sets(sets, targets)
    assert HungarianMatcher(threads=0).threads >= 1
    for a, b in zip(one, four):
        assert all(torch.equal(p, q) and torch.equal(t, u) for (p, t), (q, u) in zip(a, b))
    costs = [torch.rand(5, 3, generator=gen, dtype=torch.float64) for _ in range(4)]
    costs[2][1, 1] = float("inf")
    with pytest.raises(ValueError, match="image 2: matching cost has 1 non-finite"):
        assign_all(costs, [0, 1, 2, 3], threads=3)
    with pytest.raises(ValueError, match="threads must be >= 0"):
        HungarianMatcher(threads=-1)


def test_default_threads_share_the_cpus_among_the_node_processes(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    alone = default_threads()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1000")
    assert 1 <= alone <= 8 and default_threads() == 1


def test_matcher_threads_config_reaches_the_matcher_and_is_checked():
    from configs import load_config
    from configs.overrides import ConfigError
    from models.build import build_model

    _model, criterion, _post = build_model(load_config("dino_tiny", ["model.matcher_threads=3"]))
    assert criterion.matcher.threads == 3
    with pytest.raises(ConfigError, match="model.matcher_threads must be >= 0"):
        load_config("dino_tiny", ["model.matcher_threads=-1"])

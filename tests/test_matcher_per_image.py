"""The matcher costs each image's queries against that image's targets only (padded to the
batch's largest count): every matrix handed to the solver equals the matching block of the
full-batch cost (float64), for DINO's cost and UGS's bins cost, images with no targets included."""
from __future__ import annotations

import pytest
import torch

import models.matcher as matcher_module
import ugs
from models.matcher import HungarianMatcher, bbox_cost, focal_class_cost, giou_cost
from models.ugs_matcher import UGSBinsMatcher
from util.box_ops import generalized_box_iou, paired_generalized_box_iou

F64 = torch.float64
COUNTS = [4, 0, 7]  # targets per image: uneven, one empty
Q, C, N_BINS = 6, 3, 6


def _batch(seed: int) -> tuple[dict, list[dict]]:
    gen = torch.Generator().manual_seed(seed)
    b = len(COUNTS)
    bin_logits = 2.0 * torch.randn(b, Q, 4, N_BINS + 1, generator=gen, dtype=F64)
    ref = torch.randn(b, Q, 4, generator=gen, dtype=F64) - torch.tensor([0.0, 0.0, 2.0, 2.0], dtype=F64)
    grid = ugs.make_grid(3.0, 1.0, N_BINS, dtype=F64)
    out = {"pred_logits": torch.randn(b, Q, C, generator=gen, dtype=F64),
           "pred_boxes": torch.sigmoid(ref + ugs.expectation(bin_logits, grid)),
           "pred_box_logits": bin_logits, "ref_boxes_logit": ref}
    targets = [{"labels": torch.randint(0, C, (m,), generator=gen),
                "boxes": torch.cat([torch.rand(m, 2, generator=gen, dtype=F64) * 0.8 + 0.1,
                                    torch.rand(m, 2, generator=gen, dtype=F64) * 0.3 + 0.02], 1)}
               for m in COUNTS]
    return out, targets


def _record_costs(monkeypatch) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    real = matcher_module.assign_all

    def recording(costs, *args):
        seen.extend(costs)
        return real(costs, *args)

    monkeypatch.setattr(matcher_module, "assign_all", recording)
    return seen


def _full_batch_blocks(matcher: HungarianMatcher, kind, out: dict, targets: list[dict]) -> list[torch.Tensor]:
    """The old way: every query of the batch against every target, then each image's block."""
    labels = torch.cat([t["labels"] for t in targets])
    boxes = torch.cat([t["boxes"] for t in targets])
    flat = {k: v.flatten(0, 1)[None] for k, v in out.items()}
    full = matcher.group_cost(kind, [flat], flat["pred_logits"][0], flat["pred_boxes"][0], labels, boxes)
    blocks = full.view(len(targets), Q, -1).split(COUNTS, dim=-1)
    return [block[b] for b, block in enumerate(blocks)]


@pytest.mark.parametrize("bins", [False, True], ids=["dino_l1", "ugs_bins"])
def test_per_image_costs_equal_the_full_batch_blocks(monkeypatch, bins):
    out, targets = _batch(seed=3)
    grid = ugs.make_grid(3.0, 1.0, N_BINS, dtype=F64)
    matcher = UGSBinsMatcher(grid, grid, ce_cost=1.3, threads=1) if bins else HungarianMatcher(threads=1)
    seen = _record_costs(monkeypatch)
    computed = []
    real_group_cost = matcher.group_cost

    def recording_group_cost(*args):
        cost = real_group_cost(*args)
        computed.append(tuple(cost.shape))
        return cost

    monkeypatch.setattr(matcher, "group_cost", recording_group_cost)
    names = ["_0", ""]
    found = matcher.forward_sets([out, out], targets, set_names=names)
    monkeypatch.setattr(matcher, "group_cost", real_group_cost)
    # the work: each image's queries x the largest image's count, not x every target of the batch
    kinds = {matcher.cost_kind(n) for n in names}
    assert computed == [(2 * len(COUNTS) // len(kinds), Q, max(COUNTS))] * len(kinds)
    assert len(seen) == 2 * len(COUNTS)
    for s, name in enumerate(names):
        want = _full_batch_blocks(matcher, matcher.cost_kind(name), out, targets)
        for b, m in enumerate(COUNTS):
            got = seen[s * len(COUNTS) + b]
            assert got.shape == (Q, m), (name, b)
            torch.testing.assert_close(got, want[b], rtol=0, atol=1e-12)
            pred_idx, tgt_idx = found[s][b]
            assert len(pred_idx) == len(tgt_idx) == min(Q, m)
            want_pred, want_tgt = matcher_module.assign(want[b], b)
            assert (pred_idx.tolist(), tgt_idx.tolist()) == (want_pred.tolist(), want_tgt.tolist())


def test_cost_terms_broadcast_over_leading_dims():
    out, targets = _batch(seed=5)
    labels = torch.stack([torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(b)) for b in range(3)])
    tgt = torch.rand(3, 5, 4, dtype=F64) * 0.4 + 0.1
    prob, boxes = out["pred_logits"].sigmoid(), out["pred_boxes"]
    batched = (focal_class_cost(prob, labels, 0.25, 2.0), bbox_cost(boxes, tgt), giou_cost(boxes, tgt))
    for b in range(3):
        single = (focal_class_cost(prob[b], labels[b], 0.25, 2.0), bbox_cost(boxes[b], tgt[b]),
                  giou_cost(boxes[b], tgt[b]))
        for got, want in zip(batched, single):
            assert got.shape == (3, Q, 5)
            torch.testing.assert_close(got[b], want, rtol=0, atol=1e-14)


def test_batched_giou_check_names_the_flattened_row():
    good = torch.tensor([[[0.0, 0.0, 1.0, 1.0]], [[0.1, 0.1, 0.5, 0.5]]])
    bad = good.clone()
    bad[1, 0] = torch.tensor([0.5, 0.5, 0.1, 0.1])
    assert generalized_box_iou(good, good).shape == (2, 1, 1)
    with pytest.raises(ValueError, match="row 1"):
        generalized_box_iou(good, bad)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_pairwise_giou_is_the_paired_arithmetic_bit_for_bit(dtype):
    """The matcher's pairwise GIoU (one coordinate plane at a time) equals the loss's paired GIoU of
    every pair exactly, identical, nested, touching and disjoint boxes included; gradients too."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 9, 4, generator=gen, dtype=F64) * 0.5
    a[..., 2:] += a[..., :2] + 0.01
    b = torch.rand(2, 6, 4, generator=gen, dtype=F64) * 0.5
    b[..., 2:] += b[..., :2] + 0.01
    b[:, 0] = a[:, 0]  # identical
    b[:, 1] = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=F64)  # encloses every box of a
    b[:, 2] = torch.tensor([a[0, 1, 2].item(), 0.0, 1.0, 0.2], dtype=F64)  # touches a[0, 1]
    a, b = a.to(dtype), b.to(dtype)
    got = generalized_box_iou(a, b)
    n, m = a.shape[1], b.shape[1]
    want = paired_generalized_box_iou(a[:, :, None].expand(2, n, m, 4).reshape(-1, 4),
                                      b[:, None].expand(2, n, m, 4).reshape(-1, 4)).view(2, n, m)
    assert torch.equal(got, want)
    if dtype == F64:
        assert torch.autograd.gradcheck(generalized_box_iou, (a[0].clone().requires_grad_(), b[0].clone().requires_grad_()))

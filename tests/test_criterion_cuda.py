"""The criterion on a GPU: same losses as on the CPU, and the host waits for the device only twice.

Every host sync drains the GPU's queue, after which the decoder's small kernels run only as fast as
the host launches them. The criterion is written to wait exactly twice per call: the label-range
check of the targets and the matcher's one copy of all cost matrices to the host. torch's sync
debug mode reports every synchronising call (`.item()`, blocking copies in either direction,
GPU tensors indexed with CPU indices), so these tests count them.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from configs import load_config
from models.build import build_model
from models.criterion import SetCriterion, expand_weight_dict
from models.matcher import HungarianMatcher
from tests.test_set_prediction import BASE_WEIGHTS, NUM_CLASSES, _outputs, _targets

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _to(tree, device):  # noqa: ANN001, ANN202
    if isinstance(tree, torch.Tensor):
        return tree.detach().to(device).requires_grad_(tree.requires_grad)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_to(v, device) for v in tree]
    return tree


def _count_syncs(fn):  # noqa: ANN001, ANN202
    """(fn(), the messages of the synchronising CUDA calls it made)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def _criterion() -> SetCriterion:
    return SetCriterion(NUM_CLASSES, HungarianMatcher(2.0, 5.0, 2.0), expand_weight_dict(BASE_WEIGHTS, 3)).train()


def test_criterion_on_cuda_equals_cpu_and_waits_twice():
    targets = _targets([3, 0, 5])
    outputs = _outputs(targets, num_layers=3)
    cpu_losses, cpu_used = _criterion()(outputs, targets, return_indices=True)
    gpu_targets, gpu_outputs = _to(targets, "cuda"), _to(outputs, "cuda")
    criterion = _criterion().cuda()
    criterion(gpu_outputs, gpu_targets)  # warm-up (pinned-memory pool, kernels)
    (losses, used), syncs = _count_syncs(lambda: criterion(gpu_outputs, gpu_targets, return_indices=True))
    assert len(syncs) == 2, syncs
    for s in cpu_used:
        assert all(torch.equal(p, q) and torch.equal(t, u) for (p, t), (q, u) in zip(cpu_used[s], used[s])), s
    for k, v in cpu_losses.items():
        torch.testing.assert_close(losses[k].cpu(), v, rtol=1e-12, atol=1e-12, msg=k)


def test_ugs_criterion_with_ur_adds_no_wait():
    torch.manual_seed(0)
    cfg = load_config("dino_tiny", ["model.num_queries=40", "model.dn_number=4", "ugs.ablation=full",
                                    "model.backbone_weights=none"])
    model, criterion, _post = build_model(cfg)
    model, criterion = model.cuda().train(), criterion.cuda().train()
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 64, 64, generator=gen).cuda()
    masks = torch.zeros(2, 64, 64, dtype=torch.bool, device="cuda")
    targets = _to([{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.1, 0.1], [0.6, 0.5, 0.2, 0.3]])},
                   {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.05, 0.06]])}], "cuda")
    for _ in range(2):  # the second step is the measured one
        outputs = model(images, masks, targets)
        passes = criterion.ur_passes
        losses, syncs = _count_syncs(lambda: criterion(outputs, targets))
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if w)
        total.backward()
        model.zero_grad(set_to_none=True)
    assert criterion.ur_passes == passes + 1 and torch.isfinite(total)
    assert len(syncs) == 2, syncs  # the same two as DINO's criterion: the UR pass never waits

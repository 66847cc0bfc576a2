"""The decoder's hand-written parts against their definitions (float64): the query self-attention
against nn.MultiheadAttention (same parameters, init stream, outputs and gradients) and the box
sine embedding against its per-coordinate formula."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.position_encoding import _sine, box_sine_embedding, sine_divisors
from models.self_attention import SelfAttention


def _pair(seed: int = 0, d: int = 64, heads: int = 8) -> tuple[nn.MultiheadAttention, SelfAttention]:
    torch.manual_seed(seed)
    reference = nn.MultiheadAttention(d, heads, batch_first=True).double()
    torch.manual_seed(seed)
    ours = SelfAttention(d, heads).double()
    return reference, ours


def test_self_attention_has_multihead_attention_parameters_and_init():
    reference, ours = _pair()
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)  # official checkpoint keys self_attn.*
    for key, value in ref_state.items():
        assert torch.equal(our_state[key], value), key  # same random stream from the same seed


@pytest.mark.parametrize("masked", [False, True])
def test_self_attention_equals_multihead_attention(masked):
    reference, ours = _pair(seed=1)
    ours.load_state_dict(reference.state_dict())
    gen = torch.Generator().manual_seed(2)
    tgt = torch.randn(2, 30, 64, dtype=torch.float64, generator=gen)
    pos = torch.randn(2, 30, 64, dtype=torch.float64, generator=gen)
    mask = None
    if masked:  # True = blocked, e.g. denoising groups; every query keeps itself
        mask = torch.rand(30, 30, generator=gen) > 0.6
        mask.fill_diagonal_(False)
    reference.train()
    ours.train()
    query = tgt + pos
    expected = reference(query, query, tgt, attn_mask=mask, need_weights=False)[0]
    actual = ours(query, tgt, mask)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    weights = torch.randn(expected.shape, dtype=torch.float64, generator=gen)
    grads_ref = torch.autograd.grad((expected * weights).sum(), list(reference.parameters()))
    grads_ours = torch.autograd.grad((actual * weights).sum(), list(ours.parameters()))
    for g_ref, g_ours in zip(grads_ref, grads_ours):
        torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-12)
    if masked:  # the mask is used: without it the result differs
        assert not torch.allclose(ours(query, tgt, None), expected, atol=1e-6)


def test_self_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(30, 8)


def test_box_sine_embedding_equals_per_coordinate_formula():
    """(y, x, w, h) order, one `_sine` per coordinate of the 2*pi-scaled box: bit for bit."""
    boxes = torch.rand(3, 17, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    scaled = boxes * (2 * math.pi)
    x, y, w, h = scaled.unbind(-1)
    expected = torch.cat([_sine(v, 32, 10000.0) for v in (y, x, w, h)], dim=-1)
    actual = box_sine_embedding(boxes, 32)
    assert actual.shape == (3, 17, 128)
    assert torch.equal(actual, expected)
    # the decoder computes the divisors once per forward: same result
    divisors = sine_divisors(32, 10000.0, boxes.dtype, boxes.device)
    assert torch.equal(box_sine_embedding(boxes, 32, divisors=divisors), expected)
    # half precision in, float32 out (as before)
    assert box_sine_embedding(boxes.to(torch.bfloat16), 32).dtype == torch.float32

"""The PyTorch reference checked against dense attention computed independently (SDPA, float64)."""

import math

import pytest
import torch
import torch.nn.functional as F

from pagedattn.ops import reference
from tests.ops.problems import make_decode_problem


def dense_decode(p, scale, sliding_window=0, softcap=0.0):
    """Gather each sequence's K/V contiguously and attend with SDPA (or by hand for soft-cap)."""
    outs, lses = [], []
    block_size = p.key_cache.shape[1]
    for i, n in enumerate(p.seq_lens.tolist()):
        pos = torch.arange(n)
        blocks = p.block_tables[i].long()[pos // block_size]
        k = p.key_cache[blocks, pos % block_size].double()  # [n, kvh, d]
        v = p.value_cache[blocks, pos % block_size].double()
        group = p.query.shape[1] // k.shape[1]
        q = p.query[i].double()[:, None, :]  # [h, 1, d]
        k = k.transpose(0, 1).repeat_interleave(group, 0)  # [h, n, d]
        v = v.transpose(0, 1).repeat_interleave(group, 0)
        bias = torch.zeros((q.shape[0], 1, n), dtype=torch.float64)
        if sliding_window:
            bias[..., : max(0, n - sliding_window)] = float("-inf")
        if p.alibi_slopes is not None:
            bias += p.alibi_slopes.double()[:, None, None] * (pos - (n - 1)).double()[None, None, :]
        if softcap:
            s = torch.einsum("hqd,hkd->hqk", q, k) * scale
            s = softcap * torch.tanh(s / softcap) + bias
            o = torch.softmax(s, -1) @ v
            lse = torch.logsumexp(s, -1)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
            lse = torch.logsumexp(torch.einsum("hqd,hkd->hqk", q, k) * scale + bias, -1)
        outs.append(o[:, 0])
        lses.append(lse[:, 0])
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("features", [{}, {"sliding_window": 5}, {"softcap": 3.0}, {"alibi": True},
                                      {"sliding_window": 3, "softcap": 1.5, "alibi": True}])
@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_reference_decode_matches_dense_attention(features, layout):
    features = dict(features)
    g = torch.Generator().manual_seed(11)
    p = make_decode_problem([1, 7, 8, 9, 30], 8, 2, 64, 8, torch.float32, "cpu", layout=layout,
                            alibi=features.pop("alibi", False), repeat_ids=True, generator=g)
    scale = 0.7 / math.sqrt(64)
    out = torch.empty(p.query.shape)
    lse = torch.empty(p.query.shape[:2])
    reference.paged_decode(out, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale,
                           features.get("sliding_window", 0), features.get("softcap", 0.0), p.alibi_slopes, lse)
    want_out, want_lse = dense_decode(p, scale, **features)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)


def test_reference_decode_empty_sequence_gives_zero_and_neg_inf():
    g = torch.Generator().manual_seed(3)
    p = make_decode_problem([0, 4], 2, 1, 64, 4, torch.float32, "cpu", generator=g)
    out = torch.full(p.query.shape, 7.0)
    lse = torch.zeros(p.query.shape[:2])
    reference.paged_decode(out, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.125, 0, 0.0,
                           None, lse)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all() and torch.isfinite(lse[1]).all()


def test_reference_reshape_and_cache_skips_padding_and_out_of_range():
    key_cache = torch.randn(3, 2, 1, 64)
    value_cache = torch.randn(3, 2, 1, 64)
    before_k, before_v = key_cache.clone(), value_cache.clone()
    key, value = torch.randn(4, 1, 64), torch.randn(4, 1, 64)
    reference.reshape_and_cache(key, value, key_cache, value_cache, torch.tensor([5, -1, 6, 2]))
    assert torch.equal(key_cache[2, 1], key[0]) and torch.equal(value_cache[1, 0], value[3])
    # slot 6 is beyond 3 blocks x 2 slots and -1 is padding: neither written
    changed = (key_cache != before_k).any(-1).any(-1)
    assert changed.nonzero().tolist() == [[1, 0], [2, 1]]
    assert torch.equal((value_cache != before_v).any(-1).any(-1), changed)

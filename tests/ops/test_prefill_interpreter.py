"""Paged prefill: the Triton kernel on small cases (interpreted on the CPU), and the reference
checked against dense causal attention computed independently."""

import pytest
import torch

from pagedattn.ops import config, reference
from tests.ops.problems import make_prefill_problem, run_prefill_and_check
from tests.ops.test_reference import dense_decode  # noqa: F401  (same independent construction below)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def triton_backend():
    config.set_backend("triton")
    yield
    config.set_backend("auto")


PREFILL_CASES = [
    # dtype, heads, kv heads, head, block, seq_lens, query_lens, features
    (torch.float32, 4, 2, 64, 4, [9, 6, 1], [9, 6, 1], {}),                      # plain prefill, no prefix
    (torch.float32, 4, 1, 64, 4, [13, 8, 20], [4, 1, 7], {"sliding_window": 5}),  # prefix ending mid-block
    (torch.bfloat16, 2, 2, 128, 8, [16, 17, 3], [8, 1, 2], {"softcap": 3.0}),    # prefix on a block boundary
    (torch.float16, 8, 2, 80, 2, [11, 30], [10, 16], {"alibi": True, "repeat_ids": True}),
    (torch.float32, 2, 1, 96, 1, [5, 4, 7], [1, 1, 1], {"max_query_len": 1}),   # decode rows through prefill
    (torch.float32, 4, 2, 64, 16, [40, 2], [33, 2], {"max_query_len": 0, "return_lse": False}),
    (torch.float32, 4, 4, 256, 32, [70, 5], [3, 5], {"sliding_window": 9, "alibi": True}),
]


@pytest.mark.parametrize("case", PREFILL_CASES, ids=lambda c: f"{str(c[0])[6:]}-d{c[3]}-b{c[4]}-q{c[6]}")
def test_prefill_kernel_matches_reference(case, triton_backend):
    dtype, heads, kv_heads, head, block, lens, qlens, feats = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(sum(lens) * 7 + head)
    p = make_prefill_problem(lens, qlens, heads, kv_heads, head, block, dtype, DEVICE,
                             alibi=feats.pop("alibi", False), repeat_ids=feats.pop("repeat_ids", False), generator=g)
    run_prefill_and_check(p, dtype, what=str(case), **feats)


def test_prefill_kernel_masks_bad_values(triton_backend):
    """Garbage cu_seqlens_q, block ids and lengths: in-bounds, and the same result as the reference."""
    g = torch.Generator().manual_seed(3)
    p = make_prefill_problem([12, 9, 10], [5, 3, 4], 4, 2, 64, 4, torch.float32, DEVICE, generator=g)
    p.paged.key_cache.nan_to_num_(0.5)
    p.paged.value_cache.nan_to_num_(0.25)
    p.paged.block_tables[0, 1] = 999
    p.paged.seq_lens[1] = 2  # fewer context tokens than new tokens: the early queries see nothing
    p.cu_seqlens_q[2] = 50  # beyond the packed query: clamped
    run_prefill_and_check(p, torch.float32, what="bad values")


def dense_prefill(p, scale, sliding_window=0):
    """Each sequence's K/V gathered contiguously; a bottom-right causal mask; SDPA in float64."""
    import torch.nn.functional as F

    c = p.paged
    block_size = c.key_cache.shape[1]
    outs = []
    cu = p.cu_seqlens_q.tolist()
    for i, n in enumerate(c.seq_lens.tolist()):
        q_len = cu[i + 1] - cu[i]
        pos = torch.arange(n)
        blocks = c.block_tables[i].long()[pos // block_size]
        group = p.query.shape[1] // c.key_cache.shape[2]
        k = c.key_cache[blocks, pos % block_size].double().transpose(0, 1).repeat_interleave(group, 0)
        v = c.value_cache[blocks, pos % block_size].double().transpose(0, 1).repeat_interleave(group, 0)
        q = p.query[cu[i]:cu[i + 1]].double().transpose(0, 1)
        q_pos = torch.arange(n - q_len, n)
        allowed = pos[None, :] <= q_pos[:, None]
        if sliding_window:
            allowed &= pos[None, :] > q_pos[:, None] - sliding_window
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("window", [0, 4])
def test_reference_prefill_matches_dense_causal_attention(window):
    g = torch.Generator().manual_seed(8)
    p = make_prefill_problem([7, 16, 21, 1], [7, 5, 1, 1], 8, 2, 64, 4, torch.float32, "cpu", repeat_ids=True,
                             generator=g)
    c = p.paged
    out = torch.empty(p.query.shape)
    reference.paged_prefill(out, p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens, p.cu_seqlens_q,
                            0.125, window, 0.0, None, None)
    torch.testing.assert_close(out.double(), dense_prefill(p, 0.125, window), atol=1e-5, rtol=1e-5)

"""Registration: opcheck for every op, and torch.compile(fullgraph=True) with no graph break."""

import os

import pytest
import torch

import pagedattn.ops as ops
from tests.ops.conftest import use_backend
from tests.ops.problems import make_decode_problem

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def decode_args(device, dtype=torch.float32, lse=True):
    g = torch.Generator().manual_seed(0)
    p = make_decode_problem([3, 9], 4, 2, 64, 4, dtype, device, alibi=True, generator=g)
    p.key_cache.nan_to_num_(0.0)
    p.value_cache.nan_to_num_(0.0)
    out = torch.empty_like(p.query)
    lse_t = torch.empty(p.query.shape[:2], device=device) if lse else None
    return (out, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 0.125, 5, 2.0, p.alibi_slopes,
            lse_t, 0, 0, False)


def cache_args(device):
    g = torch.Generator().manual_seed(1)
    kc, vc = ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, device)
    kc.copy_(torch.randn(kc.shape, generator=g))
    vc.copy_(torch.randn(vc.shape, generator=g))
    key = torch.randn((5, 2, 64), generator=g).to(device)
    value = torch.randn((5, 2, 64), generator=g).to(device)
    slots = torch.tensor([0, 3, -1, 9, 15], device=device)
    return key, value, kc, vc, slots


@pytest.fixture(params=["auto", "triton", "cuda"])
def backend(request):
    device = request.node.callspec.params.get("device", "cpu")
    if request.param == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 (set on machines without CUDA)")
    if request.param == "cuda" and device == "cpu":
        pytest.skip("the cuda backend runs the reference on CPU tensors (as auto does)")
    yield from use_backend(request.param)


@pytest.fixture(params=["auto", "cuda"])
def compile_backend(request):
    """auto (Triton on CUDA tensors, the reference on CPU tensors), then the cuda backend on CUDA tensors."""
    if request.param == "cuda" and request.node.callspec.params.get("device", "cpu") == "cpu":
        pytest.skip("the cuda backend runs the reference on CPU tensors (as auto does)")
    yield from use_backend(request.param)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_paged_decode(device, backend):
    torch.library.opcheck(torch.ops.pagedattn.paged_decode.default, decode_args(device))
    torch.library.opcheck(torch.ops.pagedattn.paged_decode.default, decode_args(device, lse=False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_paged_prefill(device, backend):
    from tests.ops.problems import make_prefill_problem

    g = torch.Generator().manual_seed(3)
    p = make_prefill_problem([6, 9], [6, 2], 4, 2, 64, 4, torch.float32, device, alibi=True, generator=g)
    c = p.paged
    c.key_cache.nan_to_num_(0.0)
    c.value_cache.nan_to_num_(0.0)
    for lse in (torch.empty(p.query.shape[:2], device=device), None):
        args = (torch.empty_like(p.query), p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens,
                p.cu_seqlens_q, 6, 0.125, 4, 2.0, c.alibi_slopes, lse, False)
        torch.library.opcheck(torch.ops.pagedattn.paged_prefill.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_reshape_and_cache(device, backend):
    torch.library.opcheck(torch.ops.pagedattn.reshape_and_cache.default, (*cache_args(device), False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_copy_blocks(device, backend):
    _, _, kc, vc, _ = cache_args(device)
    mapping = torch.tensor([[0, 2], [1, 3]], device=device)
    torch.library.opcheck(torch.ops.pagedattn.copy_blocks.default, ([kc], [vc], mapping, False))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_swap_blocks(device, backend):
    src, _ = ops.allocate_kv_cache(4, 4, 2, 64, torch.float32, device)
    src.copy_(torch.randn(src.shape))
    dst, _ = ops.allocate_kv_cache(3, 4, 2, 64, torch.float32, "cpu", pin_memory=device == "cuda")
    dst.copy_(torch.randn(dst.shape))
    torch.library.opcheck(torch.ops.pagedattn.swap_blocks.default, (src, dst, torch.tensor([[3, 0], [1, 2]])))


def step(query, key, value, key_cache, value_cache, slots, block_tables, seq_lens, mapping, cpu_cache, swap_map):
    """One decode step touching every op, as a model layer and an engine would call them."""
    ops.reshape_and_cache(key, value, key_cache, value_cache, slots)
    out, lse = ops.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, sliding_window=6,
                                          softcap=3.0, return_lse=True)
    cu_seqlens_q = torch.arange(query.shape[0] + 1, dtype=torch.int32, device=query.device)
    out_prefill = ops.paged_prefill_attention(query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q,
                                              max_query_len=1, sliding_window=6, softcap=3.0)
    out = out + out_prefill
    ops.copy_blocks([key_cache], [value_cache], mapping)
    ops.swap_blocks(key_cache, cpu_cache, swap_map)
    return out * 2, lse


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_calls_every_op_without_graph_breaks(device, compile_backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(4)
    p = make_decode_problem([5, 12], 4, 2, 64, 4, torch.float32, device, generator=g)
    p.key_cache.nan_to_num_(0.5)
    p.value_cache.nan_to_num_(0.5)
    key = torch.randn((2, 2, 64), generator=g).to(device)
    value = torch.randn((2, 2, 64), generator=g).to(device)
    slots = (p.block_tables[:, 0].long() * 4 + 2).to(device)
    mapping = torch.tensor([[p.block_tables[0, 0].item(), p.key_cache.shape[0] - 1]], device=device)
    cpu_cache = torch.empty_strided((2,) + tuple(p.key_cache.shape[1:]), p.key_cache.stride(),
                                    pin_memory=device == "cuda").zero_()
    swap_map = torch.tensor([[int(p.block_tables[1, 0]), 1]])
    state = [p.key_cache, p.value_cache, cpu_cache]
    eager_state = [t.clone() for t in state]
    eager_cpu = torch.empty_strided(cpu_cache.shape, cpu_cache.stride()).copy_(cpu_cache)
    args = (p.query, key, value)
    want_out, want_lse = step(*args, eager_state[0], eager_state[1], slots, p.block_tables, p.seq_lens, mapping,
                              eager_cpu, swap_map)
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(step, fullgraph=True)
    got_out, got_lse = compiled(*args, p.key_cache, p.value_cache, slots, p.block_tables, p.seq_lens, mapping,
                                cpu_cache, swap_map)
    if device == "cuda":
        torch.cuda.synchronize()
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p.key_cache, eager_state[0])
    torch.testing.assert_close(cpu_cache, eager_cpu)

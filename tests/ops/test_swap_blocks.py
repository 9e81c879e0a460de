"""swap_blocks: copies between caches, coalescing runs of consecutive blocks (the same plain copies on
every backend; the GPU tests still run once per kernel backend)."""

import pytest
import torch

import pagedattn.ops as ops
from pagedattn.ops.swap import coalesce_pairs


def test_coalesce_pairs_merges_consecutive_runs_only():
    pairs = [(3, 0), (4, 1), (5, 2), (9, 3), (7, 4), (8, 5)]
    assert coalesce_pairs(pairs) == [(3, 0, 3), (9, 3, 1), (7, 4, 2)]
    assert coalesce_pairs([]) == []


@pytest.mark.parametrize("layout", ["HND", "NHD"])
def test_swap_blocks_cpu_roundtrip(layout):
    g = torch.Generator().manual_seed(0)
    src, _ = ops.allocate_kv_cache(10, 4, 2, 64, torch.bfloat16, "cpu", layout)
    src.copy_(torch.randn(src.shape, generator=g))
    dst, _ = ops.allocate_kv_cache(6, 4, 2, 64, torch.bfloat16, "cpu", layout)
    dst.copy_(torch.randn(dst.shape, generator=g))
    before = dst.clone()
    mapping = torch.tensor([[3, 0], [4, 1], [9, 5], [0, 3]])
    ops.swap_blocks(src, dst, mapping)
    for s, d in mapping.tolist():
        assert torch.equal(dst[d], src[s])
    for untouched in (2, 4):
        assert torch.equal(dst[untouched], before[untouched])
    back, _ = ops.allocate_kv_cache(10, 4, 2, 64, torch.bfloat16, "cpu", layout)
    back.zero_()
    ops.swap_blocks(dst, back, mapping.flip(1))
    for s, _ in mapping.tolist():
        assert torch.equal(back[s], src[s])


@pytest.mark.gpu
def test_swap_blocks_gpu_to_pinned_cpu_and_back_async(gpu_backend):
    g = torch.Generator().manual_seed(1)
    gpu, _ = ops.allocate_kv_cache(64, 16, 8, 128, torch.float16, "cuda")
    gpu.copy_(torch.randn(gpu.shape, generator=g))
    cpu, _ = ops.allocate_kv_cache(32, 16, 8, 128, torch.float16, "cpu", pin_memory=True)
    cpu.zero_()
    out_map = torch.tensor([[5, 0], [6, 1], [7, 2], [40, 9], [1, 31]])
    ops.swap_blocks(gpu, cpu, out_map)
    torch.cuda.current_stream().synchronize()
    for s, d in out_map.tolist():
        assert torch.equal(cpu[d], gpu[s].cpu())
    gpu2, _ = ops.allocate_kv_cache(64, 16, 8, 128, torch.float16, "cuda")
    gpu2.fill_(float("nan"))
    ops.swap_blocks(cpu, gpu2, out_map.flip(1))
    torch.cuda.synchronize()
    for s, _ in out_map.tolist():
        assert torch.equal(gpu2[s], gpu[s])


@pytest.mark.gpu
def test_swap_blocks_with_pageable_cpu_cache_is_still_correct(gpu_backend):
    """torch.compile's functionalization may hand the op an unpinned copy: it must still be right."""
    g = torch.Generator().manual_seed(2)
    gpu, _ = ops.allocate_kv_cache(4, 16, 2, 64, torch.float16, "cuda")
    gpu.copy_(torch.randn(gpu.shape, generator=g))
    cpu, _ = ops.allocate_kv_cache(4, 16, 2, 64, torch.float16, "cpu")
    cpu.zero_()
    ops.swap_blocks(gpu, cpu, torch.tensor([[0, 3], [2, 1]]))
    torch.cuda.synchronize()
    assert torch.equal(cpu[3], gpu[0].cpu()) and torch.equal(cpu[1], gpu[2].cpu())

"""GPU tests of reshape_and_cache and copy_blocks against the reference, and in CUDA graphs, for each
kernel backend (the ``gpu_backend`` fixture: Triton, then CUDA)."""

import itertools

import pytest
import torch

import pagedattn.ops as ops
from pagedattn.ops import reference

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_backend")]  # Triton, then CUDA (CuPy)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def random_caches(num_blocks, block_size, kv_heads, head, dtype, layout, g):
    kc, vc = ops.allocate_kv_cache(num_blocks, block_size, kv_heads, head, dtype, "cuda", layout)
    kc.copy_(torch.randn(kc.shape, generator=g))
    vc.copy_(torch.randn(vc.shape, generator=g))
    return kc, vc


@pytest.mark.parametrize("dtype,head,block_size,kv_heads,layout", list(itertools.product(
    DTYPES, (64, 80, 128, 256), (1, 16, 256), (1, 8), ("HND", "NHD"))))
def test_reshape_and_cache_matches_reference(dtype, head, block_size, kv_heads, layout):
    g = torch.Generator().manual_seed(head + block_size + kv_heads)
    num_blocks = 4 + 600 // block_size
    kc, vc = random_caches(num_blocks, block_size, kv_heads, head, dtype, layout, g)
    ref_k, ref_v = kc.clone(), vc.clone()
    num_tokens = 300
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[::7] = -1  # padding
    slots[3] = num_blocks * block_size + 5  # beyond the cache: skipped
    slots = slots.cuda()
    key = torch.randn((num_tokens, kv_heads, head), generator=g).to("cuda", dtype)
    value = torch.randn((num_tokens, kv_heads, head), generator=g).to("cuda", dtype)
    ops.reshape_and_cache(key, value, kc, vc, slots)
    reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("dtype,block_size,layers,layout", list(itertools.product(
    DTYPES, (1, 16, 256), (1, 3), ("HND", "NHD"))))
def test_copy_blocks_matches_reference(dtype, block_size, layers, layout):
    g = torch.Generator().manual_seed(block_size * 10 + layers)
    num_blocks = 64
    pairs = [random_caches(num_blocks, block_size, 4, 128, dtype, layout, g) for _ in range(layers)]
    key_caches, value_caches = [p[0] for p in pairs], [p[1] for p in pairs]
    expected_k = [c.clone() for c in key_caches]
    expected_v = [c.clone() for c in value_caches]
    perm = torch.randperm(num_blocks, generator=g)
    mapping = torch.stack([perm[:20], perm[20:40]], 1)
    mapping[5, 1] = num_blocks + 3  # out of range: skipped
    mapping = mapping.cuda()
    ops.copy_blocks(key_caches, value_caches, mapping)
    reference.copy_blocks(expected_k, expected_v, mapping)
    for got, want in zip(key_caches + value_caches, expected_k + expected_v):
        assert torch.equal(got, want)


def test_cache_ops_in_a_cuda_graph():
    g = torch.Generator().manual_seed(0)
    kc, vc = random_caches(32, 16, 8, 128, torch.bfloat16, "HND", g)
    key = torch.randn((24, 8, 128), generator=g).to("cuda", torch.bfloat16)
    value = torch.randn((24, 8, 128), generator=g).to("cuda", torch.bfloat16)
    slots = torch.arange(24, device="cuda")
    mapping = torch.tensor([[0, 5]], device="cuda")

    def call():
        ops.reshape_and_cache(key, value, kc, vc, slots)
        ops.copy_blocks([kc], [vc], mapping)

    call()  # warm-up (compiles, uploads the cache pointer table)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(2):
        perm = torch.randperm(32 * 16, generator=g)[:24].cuda()
        slots.copy_(perm)
        key.normal_()
        value.normal_()
        src, dst = torch.randperm(32, generator=g)[:2].tolist()
        mapping.copy_(torch.tensor([[src, dst]]))
        ref_k, ref_v = kc.clone(), vc.clone()
        reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
        reference.copy_blocks([ref_k], [ref_v], mapping)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)



@pytest.mark.parametrize("dtype,offset", [(torch.float16, 1), (torch.float16, 2), (torch.float32, 1),
                                          (torch.bfloat16, 4)])
def test_reshape_and_cache_unaligned_views_and_int32_slots(dtype, offset):
    """Keys and values that are views at an element offset (narrower vector accesses), int32 slots."""
    g = torch.Generator().manual_seed(offset)
    kc, vc = random_caches(12, 8, 3, 40, dtype, "NHD", g)
    ref_k, ref_v = kc.clone(), vc.clone()
    big = torch.randn((20, 3, 40 + offset), generator=g).to("cuda", dtype)
    key, value = big[:, :, offset:], big.flip(0)[:, :, :40]
    slots = torch.randperm(12 * 8, generator=g)[:20].to(torch.int32)
    slots[[2, 9]] = torch.tensor([-3, 12 * 8], dtype=torch.int32)
    slots = slots.cuda()
    ops.reshape_and_cache(key, value, kc, vc, slots)
    reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@pytest.mark.parametrize("head", [1, 6, 64])
def test_copy_blocks_strided_int32_mapping_and_odd_head_sizes(head):
    g = torch.Generator().manual_seed(head)
    caches = [random_caches(16, 4, 1, head, torch.float16, "NHD", g) for _ in range(2)]
    key_caches, value_caches = [c[0] for c in caches], [c[1] for c in caches]
    expected_k, expected_v = [c.clone() for c in key_caches], [c.clone() for c in value_caches]
    mapping = torch.tensor([[1, 2, -1, 3], [9, 10, 4, 99]], dtype=torch.int32).cuda().t()  # strides (1, 4)
    ops.copy_blocks(key_caches, value_caches, mapping)
    reference.copy_blocks(expected_k, expected_v, mapping)
    for got, want in zip(key_caches + value_caches, expected_k + expected_v):
        assert torch.equal(got, want)

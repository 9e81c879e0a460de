"""GPU tests of reshape_and_cache and copy_blocks against the reference, and in CUDA graphs."""

import itertools

import pytest
import torch

import pagedattn.ops as ops
from pagedattn.ops import reference

pytestmark = pytest.mark.gpu

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


def test_sanitizer_script_runs_clean_under_compute_sanitizer():
    """memcheck over every op, with out-of-range ids, slots and lengths (see sanitize_ops.py)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not Path(tool).exists():
        pytest.skip("compute-sanitizer not installed")
    script = Path(__file__).with_name("sanitize_ops.py")
    result = subprocess.run([tool, "--tool", "memcheck", "--error-exitcode", "3", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "ERROR SUMMARY: 0 errors" in result.stdout

"""The CUDA backend without a GPU: cuda_runtime's argument checks and kernel cache, the cache ops'
launch plans, and cache.cu itself run on the CPU by the host C++ compiler (tests/ops/cuda_emulator.py)."""

import itertools
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import pagedattn.ops as ops
from pagedattn.ops import cuda_cache, cuda_runtime, reference
from tests.ops import cuda_emulator

# ---------------------------------------------------------------------------------------------
# cuda_runtime
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("position,value,error,message", [
    (1, 3, TypeError, "kernel argument 1 is a Python int (3): wrap it in a numpy scalar"),
    (1, 0.5, TypeError, "kernel argument 1 is a Python float"),
    (1, True, TypeError, "kernel argument 1 is a Python bool"),
    (1, None, TypeError, "kernel argument 1 is None"),
    (1, "x", TypeError, "kernel argument 1 must be a torch.Tensor or a numpy scalar, got str"),
    (1, torch.zeros(2), ValueError, "kernel argument 1 must be a CUDA tensor, got one on cpu"),
])
def test_launch_rejects_untyped_arguments_naming_the_position(position, value, error, message):
    args = (np.int32(1), value)
    with pytest.raises(error) as info:
        cuda_runtime.launch(object(), (1, 1, 1), (32, 1, 1), args)  # fails before touching CuPy or a GPU
    assert message in str(info.value)


def test_numpy_scalars_pass_as_they_are():
    args = (np.int32(-1), np.int64(2**40), np.float32(0.5), np.uint64(7))
    converted, device = cuda_runtime.convert_args(args)
    assert device is None and all(type(a) is type(b) and a == b for a, b in zip(converted, args))
    with pytest.raises(TypeError, match="args must be a tuple"):
        cuda_runtime.convert_args([np.int32(1)])


@pytest.mark.parametrize("grid,block,shared_mem,message", [
    ((1, 1), (32, 1, 1), 0, "grid must be a tuple of three ints"),
    ((1, 1, -1), (32, 1, 1), 0, "grid must be a tuple of three ints >= 0"),
    ((1, 1, 1), [32, 1, 1], 0, "block must be a tuple of three ints"),
    ((1, 1, 1), (32, 1, 1), -4, "shared_mem must be an int >= 0"),
    ((1, 1, 1), (0, 1, 1), 0, "block must have three dims >= 1"),
])
def test_launch_rejects_bad_launch_shapes(grid, block, shared_mem, message):
    with pytest.raises(ValueError, match=message):
        cuda_runtime.launch(object(), grid, block, (np.int32(1),), shared_mem=shared_mem)


def test_an_empty_grid_launches_nothing():
    cuda_runtime.launch(object(), (0, 1, 1), (32, 1, 1), (np.int32(1),))  # no CuPy needed: returns first


def test_kernel_key_includes_the_defines_in_any_order():
    key = cuda_runtime.kernel_key
    assert key("cache.cu", "k", {"VEC": 16, "INDEX_BYTES": 4}, 0) == key("cache.cu", "k", {"INDEX_BYTES": 4, "VEC": 16},
                                                                          0)
    assert key("cache.cu", "k", {"VEC": 16}, 0) != key("cache.cu", "k", {"VEC": 8}, 0)
    assert key("cache.cu", "k", {"VEC": 16}, 0) != key("cache.cu", "k", {"VEC": 16}, 1)
    assert key("cache.cu", "k", None, 0) == key("cache.cu", "k", {}, 0)


def test_get_kernel_compiles_once_per_defines_and_device(monkeypatch):
    compiled = []
    monkeypatch.setattr(cuda_runtime, "_KERNELS", {})
    monkeypatch.setattr(cuda_runtime, "_compile", lambda *a: compiled.append(a) or object())
    first = cuda_runtime.get_kernel("cache.cu", "copy_blocks_kernel", {"VEC": 16, "INDEX_BYTES": 8}, 0)
    assert cuda_runtime.get_kernel("cache.cu", "copy_blocks_kernel", {"INDEX_BYTES": 8, "VEC": 16}, 0) is first
    assert cuda_runtime.get_kernel("cache.cu", "copy_blocks_kernel", {"VEC": 8, "INDEX_BYTES": 8}, 0) is not first
    cuda_runtime.get_kernel("cache.cu", "copy_blocks_kernel", {"VEC": 16, "INDEX_BYTES": 8}, 1)
    assert len(compiled) == 3


def test_compile_options_and_their_checks():
    options = cuda_runtime.compile_options({"VEC": 16, "ELEM": "__half", "CAUSAL": True})
    assert options[0] == "-std=c++17" and options[1] == f"-I{cuda_runtime.SOURCE_DIR}"
    assert set(options[2:]) == {"-DVEC=16", "-DELEM=__half", "-DCAUSAL=1"}
    with pytest.raises(ValueError, match="not a C identifier"):
        cuda_runtime.compile_options({"1X": 1})
    with pytest.raises(TypeError, match=r"defines\['X'\] must be an int or a str, got float"):
        cuda_runtime.compile_options({"X": 1.5})


def test_a_compile_error_is_a_runtime_error_naming_the_kernel(monkeypatch):
    class FakeModule:
        def __init__(self, code, options):
            assert "reshape_and_cache_kernel" in code and "-DVEC=3" in options

        def get_function(self, name):
            raise Exception('cache.cu(27): catastrophic error: #error directive: "VEC must be 16, 8, 4 or 2"')

    class FakeDevice:
        def __init__(self, index):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    fake = types.SimpleNamespace(RawModule=FakeModule, cuda=types.SimpleNamespace(Device=FakeDevice))
    monkeypatch.setattr(cuda_runtime, "_cupy", lambda: fake)
    monkeypatch.setattr(cuda_runtime, "_KERNELS", {})
    with pytest.raises(RuntimeError, match=r"compiling kernel 'reshape_and_cache_kernel' of cache.cu with "
                                           r"-DINDEX_BYTES=4 -DVEC=3 for cuda:0 failed: .*VEC must be 16, 8, 4 or 2"):
        cuda_runtime.get_kernel("cache.cu", "reshape_and_cache_kernel", {"VEC": 3, "INDEX_BYTES": 4}, 0)


def test_sources_are_read_from_cuda_src_only():
    assert "copy_blocks_kernel" in cuda_runtime.read_source("cache.cu")
    for bad in ("missing.cu", "../config.py", "/etc/passwd"):
        with pytest.raises(FileNotFoundError):
            cuda_runtime.read_source(bad)


def test_the_sources_ship_as_package_data():
    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    assert '"pagedattn.ops" = ["cuda_src/*.cu", "cuda_src/*.cuh"]' in text
    assert 'cuda = ["cupy-cuda13x"]' in text


def test_device_queries_use_cuda_python_or_fall_back_to_cupy(monkeypatch):
    props = types.SimpleNamespace(multiProcessorCount=132, sharedMemPerBlockOptin=232448, major=9, minor=0, warpSize=32)
    calls = []
    fake_rt = types.SimpleNamespace(cudaGetDeviceProperties=lambda i: (0, props), cudaGetDevice=lambda: (0, 0),
                                    cudaSetDevice=lambda i: calls.append(i) or (0,), cudaMemGetInfo=lambda: (0, 5, 80))
    expected = {"multiprocessor_count": 132, "max_shared_memory_per_block_optin": 232448, "compute_capability": 90,
                "warp_size": 32}
    cuda_runtime.device_attributes.cache_clear()
    monkeypatch.setattr(cuda_runtime, "_cudart", lambda: fake_rt)
    assert cuda_runtime.device_attributes(3) == expected
    assert cuda_runtime.memory_info(1) == (5, 80) and calls == [1, 0]  # the current device is restored
    cuda_runtime.device_attributes.cache_clear()
    monkeypatch.setattr(cuda_runtime, "_cudart", lambda: None)
    cupy_props = {"multiProcessorCount": 132, "sharedMemPerBlockOptin": 232448, "major": 9, "minor": 0, "warpSize": 32}
    fake_cupy = types.SimpleNamespace(cuda=types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceProperties=lambda i: cupy_props)))
    monkeypatch.setattr(cuda_runtime, "_cupy", lambda: fake_cupy)
    assert cuda_runtime.device_attributes(3) == expected
    cuda_runtime.device_attributes.cache_clear()


# ---------------------------------------------------------------------------------------------
# cuda_cache plans, and cache.cu run on the CPU
# ---------------------------------------------------------------------------------------------


def test_vector_width_is_the_widest_every_address_allows():
    assert cuda_cache.vector_bytes((256, 512), (4096, 256), 256) == 16
    assert cuda_cache.vector_bytes((256, 520), (4096,), 256) == 8
    assert cuda_cache.vector_bytes((256, 512), (4100,), 256) == 4
    assert cuda_cache.vector_bytes((258,), (), 256) == 2
    assert cuda_cache.vector_bytes((256,), (), 6) == 2


needs_compiler = pytest.mark.skipif(cuda_emulator.compiler() is None, reason="no host C++ compiler (g++ or clang++)")


def filled_caches(num_blocks, block_size, heads, head, dtype, layout, g):
    kc, vc = ops.allocate_kv_cache(num_blocks, block_size, heads, head, dtype, "cpu", layout)
    kc.copy_(torch.randn(kc.shape, generator=g))
    vc.copy_(torch.randn(vc.shape, generator=g))
    return kc, vc


@needs_compiler
@pytest.mark.parametrize("dtype,layout,block_size,offset,slot_dtype,vec", [
    (torch.float16, "HND", 16, 0, torch.int64, 16), (torch.bfloat16, "NHD", 1, 0, torch.int32, 16),
    (torch.float32, "HND", 256, 0, torch.int32, 16), (torch.float16, "NHD", 4, 1, torch.int64, 2),
    (torch.float16, "HND", 8, 2, torch.int32, 4), (torch.float32, "NHD", 2, 1, torch.int64, 4),
])
def test_reshape_and_cache_kernel_matches_the_reference(tmp_path_factory, dtype, layout, block_size, offset, slot_dtype,
                                                        vec):
    g = torch.Generator().manual_seed(block_size + offset)
    heads, head, num_blocks, num_tokens = 3, 24, 5 + 40 // block_size, 30
    kc, vc = filled_caches(num_blocks, block_size, heads, head, dtype, layout, g)
    ref_k, ref_v = kc.clone(), vc.clone()
    big = torch.randn((num_tokens, heads, head + offset), generator=g).to(dtype)
    key, value = big[:, :, offset:], big.flip(0)[:, :, :head]  # an element offset narrows the vectors
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens].to(slot_dtype)
    slots[::6] = -1
    slots[1], slots[2] = num_blocks * block_size, -(2**31)
    plan = cuda_cache.reshape_and_cache_plan(key, value, kc, vc, slots)
    assert plan[0] == {"VEC": vec, "INDEX_BYTES": slot_dtype.itemsize}
    cuda_emulator.run("reshape_and_cache", plan, tmp_path_factory.getbasetemp() / "emulator")
    reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
    assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)


@needs_compiler
@pytest.mark.parametrize("dtype,head,block_size,layers,map_dtype", list(itertools.product(
    (torch.float16, torch.float32), (1, 6, 64), (1, 16), (1, 2), (torch.int32, torch.int64)))[::3])
def test_copy_blocks_kernel_matches_the_reference(tmp_path_factory, dtype, head, block_size, layers, map_dtype):
    g = torch.Generator().manual_seed(head * block_size + layers)
    num_blocks = 12
    pairs = [filled_caches(num_blocks, block_size, 2, head, dtype, "HND", g) for _ in range(layers)]
    caches = [p[0] for p in pairs] + [p[1] for p in pairs]
    expected = [c.clone() for c in caches]
    mapping = torch.tensor([[0, 5], [7, 1], [-1, 2], [3, 99], [4, 11], [9, 6]], dtype=map_dtype).t().contiguous().t()
    table = torch.tensor([c.data_ptr() for c in caches], dtype=torch.int64)
    plan = cuda_cache.copy_blocks_plan(caches, mapping, table, tuple(table.tolist()))
    cuda_emulator.run("copy_blocks", plan, tmp_path_factory.getbasetemp() / "emulator")
    reference.copy_blocks(expected[:layers], expected[layers:], mapping)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_copy_blocks_plan_covers_large_blocks_with_a_bounded_grid():
    cache = torch.empty((3, 256, 64, 256), dtype=torch.float32)  # 16 MiB blocks
    table = torch.zeros(1, dtype=torch.int64)
    defines, grid, block, args = cuda_cache.copy_blocks_plan([cache], torch.zeros((5, 2), dtype=torch.int64), table,
                                                             (cache.data_ptr(),))
    block_bytes, chunk_bytes = int(args[-1]), block[0] * defines["VEC"] * defines["UNROLL"]
    assert defines["VEC"] == 16 and block == (256, 1, 1) and grid[:2] == (5, 1)
    assert grid[2] * chunk_bytes >= block_bytes and grid[2] <= 65535


# ---------------------------------------------------------------------------------------------
# cuda_attention's decode plan: shared memory of the K/V stages
# ---------------------------------------------------------------------------------------------


def test_decode_stage_bytes_are_two_padded_tiles():
    from pagedattn.ops import cuda_attention as ca

    # bfloat16, head 128: rows of 16 (odd) 16-byte units -> 17 x 16 bytes; K and V, 32 keys
    assert ca.decode_stage_bytes(128, torch.bfloat16, 32) == 2 * 32 * 17 * 16
    # float32, head 256: 64 units of four floats -> 65
    assert ca.decode_stage_bytes(256, torch.float32, 8) == 2 * 8 * 65 * 16
    # two stages at every supported head size and dtype fit 48 KB beside the static arrays (at most ~12 KB:
    # 8 query rows of head 256 in float32, the partial scores), so every card runs the minimum pipeline
    for head in ops.SUPPORTED_HEAD_SIZES:
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            two = 2 * ca.decode_stage_bytes(head, dtype, ca.decode_tile_n(head, dtype))
            assert two + 12 * 1024 <= 48 * 1024, (head, dtype, two)


def test_decode_kv_stages_are_lowered_to_fit_and_checked(monkeypatch):
    from pagedattn.ops import cuda_attention as ca

    h100_optin = 227 * 1024
    monkeypatch.setitem(ca.DECODE_TUNING, "kv_stages", 4)
    assert ca.decode_kv_stages(17408, h100_optin) == 4
    # 48 KB cards: 4 stages of 17 KB do not fit beside the static arrays, 2 always run
    assert ca.decode_kv_stages(17408, 48 * 1024) == 2
    monkeypatch.setitem(ca.DECODE_TUNING, "kv_stages", 8)
    assert ca.decode_kv_stages(30000, h100_optin) == 7
    assert ca.decode_kv_stages(17408, 100 * 1024) == 4
    for bad in (1, 9, True, 2.5, "3"):
        monkeypatch.setitem(ca.DECODE_TUNING, "kv_stages", bad)
        with pytest.raises(ValueError, match=r"DECODE_TUNING\['kv_stages'\]"):
            ca.decode_kv_stages(17408, h100_optin)

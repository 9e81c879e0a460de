"""Runs the CUDA backend's cache kernels (``cuda_src/cache.cu``) on the CPU, for tests without a GPU.

The source is compiled with the host C++ compiler behind a few definitions (``__global__``,
``blockIdx``, ``threadIdx``, the vector types) and every thread of every block runs one after the
other. That is exact for kernels without shared memory or barriers, as these are, so the launchers'
plans (pointers, byte strides, vector widths, grids) and the kernels' indexing and masking can be
checked against the reference on CPU tensors.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from pagedattn.ops import cuda_runtime

HARNESS = r"""
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct dim3_t { unsigned x, y, z; };
static dim3_t blockIdx, threadIdx, gridDim, blockDim;
#define __global__
#include "cache.cu"

#define FOR_EACH_THREAD(gx, gy, gz, bx, CALL)                                          \
  gridDim = {gx, gy, gz}; blockDim = {bx, 1, 1};                                       \
  for (unsigned z = 0; z < gz; ++z) for (unsigned y = 0; y < gy; ++y)                  \
    for (unsigned x = 0; x < gx; ++x) for (unsigned t = 0; t < bx; ++t) {              \
      blockIdx = {x, y, z}; threadIdx = {t, 0, 0}; CALL; }

extern "C" void run_reshape_and_cache(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
    const char* key, i64 ksn, i64 ksh, const char* value, i64 vsn, i64 vsh,
    char* kc, i64 kcb, i64 kct, i64 kch, char* vc, i64 vcb, i64 vct, i64 vch,
    const index_t* slots, i64 num_tokens, i64 num_slots, int log2_bs, int heads, int vecs) {
  FOR_EACH_THREAD(gx, gy, gz, bx, reshape_and_cache_kernel(key, ksn, ksh, value, vsn, vsh, kc, kcb, kct, kch,
                                                           vc, vcb, vct, vch, slots, num_tokens, num_slots,
                                                           log2_bs, heads, vecs))
}

extern "C" void run_copy_blocks(unsigned gx, unsigned gy, unsigned gz, unsigned bx,
    const unsigned long long* ptrs, int num_caches, const index_t* mapping, i64 sp, i64 sc, i64 num_pairs,
    i64 num_blocks, i64 block_bytes) {
  FOR_EACH_THREAD(gx, gy, gz, bx, copy_blocks_kernel(ptrs, num_caches, mapping, sp, sc, num_pairs, num_blocks,
                                                     block_bytes))
}
"""

_LIBS: dict[tuple, ctypes.CDLL] = {}


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


def library(defines: dict, build_dir: Path) -> ctypes.CDLL:
    key = tuple(sorted(defines.items()))
    lib = _LIBS.get(key)
    if lib is None:
        build_dir.mkdir(parents=True, exist_ok=True)
        tag = "_".join(f"{k}{v}" for k, v in key)
        src, out = build_dir / f"harness_{tag}.cpp", build_dir / f"harness_{tag}.so"
        src.write_text(HARNESS)
        flags = [f"-D{k}={v}" for k, v in key]
        subprocess.run([compiler(), "-std=c++17", "-O1", "-shared", "-fPIC", "-fno-strict-aliasing",
                        f"-I{cuda_runtime.SOURCE_DIR}", *flags, str(src), "-o", str(out)],
                       check=True, capture_output=True, text=True)
        lib = _LIBS[key] = ctypes.CDLL(str(out))
    return lib


def _c(value):
    if isinstance(value, torch.Tensor):
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, np.int64):
        return ctypes.c_longlong(int(value))
    if isinstance(value, np.int32):
        return ctypes.c_int(int(value))
    raise TypeError(f"unexpected kernel argument {value!r}")


def run(kernel: str, plan, build_dir: Path) -> None:
    """Run a launcher's plan ``(defines, grid, block, args)`` of ``kernel`` on CPU tensors."""
    defines, grid, block, args = plan
    function = getattr(library(defines, build_dir), f"run_{kernel}")
    function(*(ctypes.c_uint(d) for d in (*grid, block[0])), *(_c(a) for a in args))

"""The CUDA backend's cache ops: ``reshape_and_cache`` and ``copy_blocks`` as CuPy RawKernels
(``cuda_src/cache.cu``).

Same signatures and semantics as :func:`pagedattn.ops.launchers.reshape_and_cache` and
:func:`pagedattn.ops.launchers.copy_blocks` (the caller, :mod:`pagedattn.ops.registry`, has checked
every argument): slots outside ``[0, num_blocks * block_size)`` (negative ones are padding) and
(src, dst) pairs with an id outside ``[0, num_blocks)`` are skipped, never read or written. Both
kernels move bytes in the widest vector (16, 8, 4 or 2 bytes) that every pointer, stride and row
allows, on torch's current stream.

``swap_blocks`` needs no kernel here: the registry runs :func:`pagedattn.ops.swap.swap_blocks` for every
backend, one ``cudaMemcpyAsync`` per coalesced run of blocks on the current stream (``Tensor.copy_`` of
two same-strided dense runs, which torch turns into a plain memcpy, pageable CPU memory included), with
no Triton, so a second implementation would add nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedattn.ops import cuda_runtime
from pagedattn.ops.pointer_tables import cache_pointer_table

SOURCE = "cache.cu"
#: Threads of a thread block, at most.
MAX_THREADS = 256
#: Vectors each thread copies per chunk of a block in copy_blocks (the kernel's UNROLL).
COPY_UNROLL = 4
MAX_GRID_X = 2**31 - 1
MAX_GRID_YZ = 65535


def vector_bytes(pointers, byte_strides, row_bytes: int) -> int:
    """The widest access (16, 8, 4 or 2 bytes) that keeps every address aligned: it divides every
    pointer, every byte stride and the bytes of one contiguous row."""
    for vec in (16, 8, 4):
        if row_bytes % vec == 0 and all(p % vec == 0 for p in pointers) and all(s % vec == 0 for s in byte_strides):
            return vec
    return 2


def _byte_strides(tensor: torch.Tensor, dims) -> list[int]:
    """Byte strides of ``dims``; 0 for a dim of size 1 (its index is always 0, whatever its stride)."""
    size = tensor.element_size()
    return [tensor.stride(d) * size if tensor.shape[d] > 1 else 0 for d in dims]


def _threads(work_items: int) -> int:
    return max(32, min(MAX_THREADS, -(-work_items // 32) * 32))


def reshape_and_cache_plan(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                           value_cache: torch.Tensor, slot_mapping: torch.Tensor):
    """``(defines, grid, block, args)`` of one launch, or ``None`` when there is nothing to write."""
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0 or head_size == 0:
        return None
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    row_bytes = head_size * key.element_size()
    ks, vs = _byte_strides(key, (0, 1)), _byte_strides(value, (0, 1))
    kcs, vcs = _byte_strides(key_cache, (0, 1, 2)), _byte_strides(value_cache, (0, 1, 2))
    pointers = (key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr())
    vec = vector_bytes(pointers, ks + vs + kcs + vcs, row_bytes)
    vecs_per_head = row_bytes // vec
    if num_kv_heads * vecs_per_head >= 2**31:
        raise ValueError(f"key: {num_kv_heads} heads of {head_size} elements is too large for one token's work")
    defines = {"VEC": vec, "INDEX_BYTES": slot_mapping.element_size()}
    args = (key, np.int64(ks[0]), np.int64(ks[1]),
            value, np.int64(vs[0]), np.int64(vs[1]),
            key_cache, np.int64(kcs[0]), np.int64(kcs[1]), np.int64(kcs[2]),
            value_cache, np.int64(vcs[0]), np.int64(vcs[1]), np.int64(vcs[2]),
            slot_mapping, np.int64(num_tokens), np.int64(num_blocks * block_size),
            np.int32(block_size.bit_length() - 1), np.int32(num_kv_heads), np.int32(vecs_per_head))
    grid = (min(num_tokens, MAX_GRID_X), 1, 1)
    return defines, grid, (_threads(num_kv_heads * vecs_per_head), 1, 1), args


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write token ``t``'s keys and values at slot ``slot_mapping[t]`` of the caches.

    Args:
        key, value: [num_tokens, num_kv_heads, head_size], the caches' dtype, last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], any strides with
            head_size innermost.
        slot_mapping: [num_tokens] int32 or int64, contiguous: ``block_id * block_size + offset``;
            slots outside the cache are skipped.
    """
    plan = reshape_and_cache_plan(key, value, key_cache, value_cache, slot_mapping)
    if plan is None:
        return
    defines, grid, block, args = plan
    kernel = cuda_runtime.get_kernel(SOURCE, "reshape_and_cache_kernel", defines, key.device.index)
    cuda_runtime.launch(kernel, grid, block, args)


def copy_blocks_plan(caches: list[torch.Tensor], block_mapping: torch.Tensor, table: torch.Tensor,
                     pointers: tuple[int, ...]):
    """``(defines, grid, block, args)`` of one launch, or ``None`` when there is nothing to copy."""
    num_pairs = block_mapping.shape[0]
    first = caches[0]
    block_bytes = first[0].numel() * first.element_size()
    if num_pairs == 0 or block_bytes == 0:
        return None
    vec = vector_bytes(pointers, (), block_bytes)
    threads = _threads(-(-block_bytes // vec))
    chunk_bytes = threads * vec * COPY_UNROLL
    num_chunks = -(-block_bytes // chunk_bytes)
    defines = {"VEC": vec, "INDEX_BYTES": block_mapping.element_size(), "UNROLL": COPY_UNROLL}
    args = (table, np.int32(len(caches)),
            block_mapping, np.int64(block_mapping.stride(0)), np.int64(block_mapping.stride(1)), np.int64(num_pairs),
            np.int64(first.shape[0]), np.int64(block_bytes))
    grid = (min(num_pairs, MAX_GRID_X), min(len(caches), MAX_GRID_YZ), min(num_chunks, MAX_GRID_YZ))
    return defines, grid, (threads, 1, 1), args


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """For every cache, copy block ``src`` to block ``dst`` for each row of ``block_mapping``, in one launch.

    Args:
        key_caches, value_caches: one cache per layer each, all of one shape
            [num_blocks, block_size, num_kv_heads, head_size], dtype, strides and device, each block dense.
        block_mapping: [num_pairs, 2] int32 or int64 (src, dst) on the caches' device, any strides; pairs
            with an id outside ``[0, num_blocks)`` are skipped. Copies of one launch have no order.
    """
    caches = list(key_caches) + list(value_caches)
    if block_mapping.shape[0] == 0 or not caches:
        return
    table, pointers = cache_pointer_table(caches)
    plan = copy_blocks_plan(caches, block_mapping, table, pointers)
    if plan is None:
        return
    defines, grid, block, args = plan
    kernel = cuda_runtime.get_kernel(SOURCE, "copy_blocks_kernel", defines, block_mapping.device.index)
    cuda_runtime.launch(kernel, grid, block, args)

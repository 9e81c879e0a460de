"""The CUDA backend's attention ops: paged decode and prefill as CuPy RawKernels (``cuda_src/attention.cu``,
``cuda_src/attention_prefill.cu``, sharing ``cuda_src/attention_common.cuh``).

Same signatures and semantics as :func:`pagedattn.ops.launchers.paged_decode` and
:func:`pagedattn.ops.launchers.paged_prefill` (the caller, :mod:`pagedattn.ops.registry`, has checked every
argument): these functions only choose tile shapes, translate tensors into pointers, strides and
compile-time constants, and launch on torch's current stream (CUDA graph capture included, once each
kernel has been compiled outside capture).

Kernel shapes (the comment above each kernel in ``cuda_src/`` gives its tensors and mapping):

- decode: one thread block per (sequence, KV head, up to ``MAX_ROWS`` query heads of its group, context
  split), 128 threads; K/V tiles of ``TILE_N`` keys in a cp.async pipeline of ``DECODE_TUNING["kv_stages"]``
  stages through dynamic shared memory.
  Long contexts with few (sequence, KV head) pairs are split (flash-decoding, same rule as the Triton
  launcher) and merged by a second kernel.
- prefill: one thread block per (``BLOCK_M / ROWS`` query tokens x ``ROWS`` heads of a group, KV head),
  128 threads, float32 CUDA-core products over shared-memory tiles.
"""

from __future__ import annotations

import functools
import zlib
from typing import Optional

import numpy as np
import torch

from pagedattn.ops import cuda_runtime

SOURCE = "attention.cu"             # paged_decode_kernel, merge_splits_kernel
PREFILL_SOURCE = "attention_prefill.cu"
COMMON_HEADER = "attention_common.cuh"
NTHREADS = 128
#: Query heads of one GQA group that a thread block takes (a larger group spans several blocks).
MAX_ROWS = 8
DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
#: Decode tuning. The split rule (the Triton launcher's defaults, ``launchers.DECODE_TUNING``): split the context
#: when fewer than ``split_below_waves`` waves of thread blocks (one per SM) would run, into up to
#: ``target_waves`` waves, no split shorter than ``min_tokens_per_split`` tokens. ``kv_stages``: the K/V
#: pipeline's stages (``kv_stages - 1`` tiles in flight while one is computed; fewer when the card's shared
#: memory cannot hold them). bench/NOTES.md "CUDA decode v2".
DECODE_TUNING = {"target_waves": 8, "min_tokens_per_split": 512, "split_below_waves": 1, "kv_stages": 3}
#: Static shared memory the decode kernel may need besides its K/V stages (queries, partial scores, softmax).
DECODE_STATIC_SHARED_BYTES = 16 * 1024
INT32_MAX = 2**31 - 1


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def group_rows(group_size: int) -> tuple[int, int]:
    """``(rows, num_subgroups)``: a GQA group of ``group_size`` query heads in blocks of ``rows`` heads."""
    num_subgroups = cdiv(group_size, MAX_ROWS)
    return cdiv(group_size, num_subgroups), num_subgroups


def decode_tile_n(head_size: int, dtype: torch.dtype) -> int:
    """Keys per decode tile: two stages of K and V tiles stay under 48 KB of shared memory (no opt-in needed)."""
    if dtype == torch.float32:
        return 8 if head_size > 128 else 16
    return 16 if head_size > 128 else 32


def prefill_tiles(head_size: int, dtype: torch.dtype, rows: int, query_len_hint: int) -> tuple[int, int]:
    """``(BLOCK_M, TILE_N)`` of a prefill launch: the largest row tile that fits 48 KB of shared memory and
    64 accumulators a thread, shrunk to 16 or 32 rows when the queries are short (decode-like batches)."""
    big = head_size > 128
    if dtype == torch.float32:
        max_m, tile_n = (16, 8) if big else (32, 16)
    else:
        max_m, tile_n = (32, 16) if big else (64, 32)
    block_m = 16
    while block_m < max_m and block_m < rows * query_len_hint:
        block_m *= 2
    return block_m, tile_n


def decode_stage_bytes(head_size: int, dtype: torch.dtype, tile_n: int) -> int:
    """Shared-memory bytes of one K/V stage of the decode kernel: K and V rows of ``tile_n`` keys, each row
    padded to an odd number of 16-byte units (``RS`` in attention_common.cuh)."""
    size = dtype.itemsize  # no tensor made: this runs at every decode launch
    vec = 16 // size
    return 2 * tile_n * ((head_size // vec) | 1) * vec * size


def decode_kv_stages(stage_bytes: int, shared_optin: int) -> int:
    """``DECODE_TUNING["kv_stages"]``, lowered (to 2 at least) until the stages fit ``shared_optin`` bytes of
    shared memory a block beside the kernel's static arrays."""
    stages = DECODE_TUNING["kv_stages"]
    if isinstance(stages, bool) or not isinstance(stages, int) or not 2 <= stages <= 8:
        raise ValueError(f"DECODE_TUNING['kv_stages'] must be an int in [2, 8], got {stages!r}")
    while stages > 2 and stages * stage_bytes > shared_optin - DECODE_STATIC_SHARED_BYTES:
        stages -= 1
    return stages


@functools.lru_cache(maxsize=None)
def num_multiprocessors(device_index: int) -> int:
    return cuda_runtime.device_attributes(device_index)["multiprocessor_count"]


@functools.lru_cache(maxsize=None)
def shared_memory_optin(device_index: int) -> int:
    return cuda_runtime.device_attributes(device_index)["max_shared_memory_per_block_optin"]


def choose_num_splits(num_seqs: int, programs_per_seq: int, max_seq_len: int, device: torch.device) -> int:
    """Split the context when the blocks of one split would not fill the GPU (the uniform rule of
    ``launchers.num_splits_for``)."""
    if device.type != "cuda":
        return 1
    programs = num_seqs * programs_per_seq
    num_sms = num_multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= DECODE_TUNING["split_below_waves"] * num_sms:
        return 1
    target = DECODE_TUNING["target_waves"] * num_sms
    by_length = max(1, max_seq_len // DECODE_TUNING["min_tokens_per_split"])
    return max(1, min(cdiv(target, programs), by_length, 256))


def kv_rows_aligned(key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """Whether every K/V row starts 16-byte aligned (dims of size 1 never move the address)."""
    size = key_cache.element_size()
    for cache in (key_cache, value_cache):
        if cache.data_ptr() % 16:
            return False
        if any(cache.shape[d] > 1 and cache.stride(d) * size % 16 for d in range(3)):
            return False
    return True


@functools.lru_cache(maxsize=None)
def source_hash() -> int:
    """CRC-32 of the shared header, passed as a define: CuPy's disk cache is keyed by a .cu file's text and
    the options, not by the headers it includes, so an edited header must change the options."""
    return zlib.crc32((cuda_runtime.SOURCE_DIR / COMMON_HEADER).read_bytes())


def _kernel(device: torch.device, source: str, name: str, **defines):
    """The kernel ``name`` of ``source`` compiled with ``defines`` for ``device`` (the tensors' GPU)."""
    return cuda_runtime.get_kernel(source, name, {**defines, "SOURCE_HASH": source_hash()}, device.index)


def _strides(tensor: torch.Tensor, dims) -> tuple:
    return tuple(np.int64(tensor.stride(d)) for d in dims)


def _cache_args(key_cache: torch.Tensor, value_cache: torch.Tensor) -> tuple:
    return (key_cache, *_strides(key_cache, (0, 1, 2)), value_cache, *_strides(value_cache, (0, 1, 2)))


def _lse_args(lse: Optional[torch.Tensor], dummy: torch.Tensor) -> tuple:
    if lse is None:
        return dummy, np.int64(0), np.int64(0)
    return lse, *_strides(lse, (0, 1))


def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                 max_seq_len: int, num_splits: int) -> None:
    num_seqs, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if num_seqs == 0:
        return
    group_size = num_heads // num_kv_heads
    rows, num_subgroups = group_rows(group_size)
    tile_n = decode_tile_n(head_size, query.dtype)
    capacity = block_tables.shape[1] * block_size
    max_len = min(max_seq_len, capacity) if max_seq_len > 0 else capacity
    if num_splits <= 0:
        num_splits = choose_num_splits(num_seqs, num_kv_heads * num_subgroups, max_len, query.device)
    tokens_per_split = cdiv(cdiv(max(max_len, 1), num_splits), tile_n) * tile_n
    num_splits = max(1, min(num_splits, cdiv(max(max_len, 1), tokens_per_split)))
    tokens_per_split = min(tokens_per_split, INT32_MAX)

    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, num_splits, head_size), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    dtype = DTYPE_CODE[query.dtype]
    stage_bytes = decode_stage_bytes(head_size, query.dtype, tile_n)
    device_index = query.device.index if query.device.index is not None else torch.cuda.current_device()
    stages = decode_kv_stages(stage_bytes, shared_memory_optin(device_index))
    kernel = _kernel(query.device, SOURCE, "paged_decode_kernel", KERNEL_DECODE=1, DTYPE=dtype,
                     HEAD_SIZE=head_size, ROWS=rows, TILE_N=tile_n, KV_STAGES=stages,
                     ALIGNED=int(kv_rows_aligned(key_cache, value_cache)))
    args = (query, *_strides(query, (0, 1)),
            *_cache_args(key_cache, value_cache),
            block_tables, *_strides(block_tables, (0, 1)), seq_lens,
            alibi_slopes if alibi_slopes is not None else out,
            out, *_strides(out, (0, 1)),
            *_lse_args(lse, out),
            part_out, part_lse,
            np.float32(scale), np.float32(softcap),
            np.int32(num_blocks), np.int32(block_tables.shape[1]), np.int32(block_size.bit_length() - 1),
            np.int32(group_size), np.int32(num_subgroups), np.int32(num_heads),
            np.int32(min(sliding_window, INT32_MAX)), np.int32(tokens_per_split),
            np.int32(alibi_slopes is not None), np.int32(lse is not None))
    cuda_runtime.launch(kernel, (num_seqs, num_kv_heads * num_subgroups, num_splits), (NTHREADS, 1, 1), args,
                        shared_mem=stages * stage_bytes)
    if num_splits > 1:
        merge = _kernel(query.device, SOURCE, "merge_splits_kernel", KERNEL_MERGE=1, DTYPE=dtype)
        cuda_runtime.launch(merge, (num_seqs, num_heads, 1), (NTHREADS, 1, 1),
                            (part_out, part_lse, out, *_strides(out, (0, 1)), *_lse_args(lse, out),
                             np.int32(num_splits), np.int32(head_size), np.int32(lse is not None)))


def paged_prefill(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_query_len: int,
                  scale: float, sliding_window: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
                  lse: Optional[torch.Tensor]) -> None:
    num_tokens, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    group_size = num_heads // num_kv_heads
    rows, num_subgroups = group_rows(group_size)
    hint = max_query_len if max_query_len > 0 else num_tokens
    block_m, tile_n = prefill_tiles(head_size, query.dtype, rows, min(hint, num_tokens))
    # sequence s owns programs cu[s] // BLOCK_Q + s, ...: this many cover every sequence
    num_programs = num_tokens // (block_m // rows) + num_seqs
    kernel = _kernel(query.device, PREFILL_SOURCE, "paged_prefill_kernel", KERNEL_PREFILL=1,
                     DTYPE=DTYPE_CODE[query.dtype], HEAD_SIZE=head_size, ROWS=rows, BLOCK_M=block_m, TILE_N=tile_n,
                     ALIGNED=int(kv_rows_aligned(key_cache, value_cache)))
    args = (query, *_strides(query, (0, 1)),
            *_cache_args(key_cache, value_cache),
            block_tables, *_strides(block_tables, (0, 1)), seq_lens, cu_seqlens_q,
            alibi_slopes if alibi_slopes is not None else out,
            out, *_strides(out, (0, 1)),
            *_lse_args(lse, out),
            np.float32(scale), np.float32(softcap),
            np.int32(num_tokens), np.int32(num_seqs), np.int32(num_blocks), np.int32(block_tables.shape[1]),
            np.int32(block_size.bit_length() - 1), np.int32(group_size), np.int32(num_subgroups),
            np.int32(min(sliding_window, INT32_MAX)), np.int32(alibi_slopes is not None), np.int32(lse is not None))
    cuda_runtime.launch(kernel, (num_programs, num_kv_heads * num_subgroups, 1), (NTHREADS, 1, 1), args)

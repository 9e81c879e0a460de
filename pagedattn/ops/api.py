"""The Python API over ``torch.ops.pagedattn.*``: defaults, output allocation, documentation.

Cache layout (shared by every op)
---------------------------------
``key_cache`` and ``value_cache`` are two tensors of logical shape
``[num_blocks, block_size, num_kv_heads, head_size]``: token ``t`` of a sequence lives in block
``block_tables[seq, t // block_size]`` at offset ``t % block_size``, i.e. at slot
``block_id * block_size + offset``. Any strides are accepted as long as ``head_size`` is the
innermost (stride-1) dimension, so both memory orders work with the same kernels:

- ``"NHD"``: memory ``[num_blocks, block_size, num_kv_heads, head_size]`` (flash-attn's order);
- ``"HND"``: memory ``[num_blocks, num_kv_heads, block_size, head_size]`` (each head's tokens of a
  block contiguous), seen through a permuted view with the logical shape above.

:func:`allocate_kv_cache` makes either; :data:`DEFAULT_LAYOUT` is the one that measured fastest
(``bench/NOTES.md``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from pagedattn.ops import checks, registry  # noqa: F401  (registry registers the ops)

#: The cache memory order used unless asked otherwise (see bench/NOTES.md for the measurement).
DEFAULT_LAYOUT = "HND"
LAYOUTS = ("NHD", "HND")


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                      dtype: torch.dtype = torch.float16, device: Union[str, torch.device] = "cuda",
                      layout: str = DEFAULT_LAYOUT, pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate one layer's key and value caches.

    Args:
        num_blocks: physical blocks in the pool.
        block_size: tokens per block, a power of two from 1 to 256.
        num_kv_heads: key/value heads.
        head_size: elements per head.
        dtype: float16, bfloat16 or float32.
        device: where the caches live.
        layout: memory order, ``"NHD"`` or ``"HND"`` (see the module docstring).
        pin_memory: pin a CPU cache (needed for asynchronous swapping).

    Returns:
        ``(key_cache, value_cache)``, each of logical shape
        ``[num_blocks, block_size, num_kv_heads, head_size]``, uninitialized.
    """
    checks.check_int("num_blocks", num_blocks, minimum=1)
    checks.check_int("num_kv_heads", num_kv_heads, minimum=1)
    checks.check_int("head_size", head_size, minimum=1)
    if block_size not in checks.SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be a power of two from 1 to 256, got {block_size}")
    if dtype not in checks.SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    caches = []
    for _ in range(2):
        if layout == "NHD":
            cache = torch.empty((num_blocks, block_size, num_kv_heads, head_size), dtype=dtype, device=device,
                                pin_memory=pin_memory)
        else:
            cache = torch.empty((num_blocks, num_kv_heads, block_size, head_size), dtype=dtype, device=device,
                                pin_memory=pin_memory).permute(0, 2, 1, 3)
        caches.append(cache)
    return caches[0], caches[1]


def _attention_defaults(query, query_dims: str, scale, out, lse, return_lse: bool):
    """Fill in the default scale and allocate ``out`` (and ``lse`` when asked for)."""
    if not isinstance(query, torch.Tensor):
        raise TypeError(f"query must be a torch.Tensor, got {type(query).__name__}")
    if query.dim() != 3:
        raise ValueError(f"query must have 3 dimensions {query_dims}, got shape {tuple(query.shape)}")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if out is None:
        out = torch.empty_like(query)
    if return_lse and lse is None:
        lse = torch.empty(query.shape[:2], dtype=torch.float32, device=query.device)
    return scale, out, lse


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    max_seq_len: Optional[int] = None,
    num_splits: Optional[int] = None,
    validate: bool = False,
):
    """Decode attention over a paged KV cache: one query token per sequence.

    The query of sequence ``i`` sits at position ``seq_lens[i] - 1`` and attends to positions
    ``0 .. seq_lens[i] - 1`` of its context (its own key and value must already be in the cache,
    written by :func:`reshape_and_cache`).

    Args:
        query: [num_seqs, num_heads, head_size], float16/bfloat16/float32, last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size], the query's
            dtype; ``num_heads`` must be a multiple of ``num_kv_heads`` (MHA, GQA, MQA).
            head_size in {64, 80, 96, 112, 128, 192, 256}; block_size a power of two <= 256.
        block_tables: [num_seqs, max_blocks_per_seq] int32 block ids of each sequence.
        seq_lens: [num_seqs] int32 context lengths (including the query token).
        scale: softmax scale; default ``1 / sqrt(head_size)``.
        sliding_window: attend only to the last ``sliding_window`` positions (None or 0: all).
        softcap: logits soft-cap ``c``: ``score = c * tanh(score / c)`` (None or 0: off).
        alibi_slopes: [num_heads] float32; adds ``slope * (key_pos - query_pos)`` to the scores.
        out: [num_seqs, num_heads, head_size] output to write (allocated when None).
        lse: [num_seqs, num_heads] float32 to receive each head's natural-log sum of exp of its
            scores (allocated when ``return_lse`` and None). ``-inf`` where nothing is attended.
        return_lse: also return the log-sum-exp.
        max_seq_len: an upper bound of ``seq_lens`` (a hint for splitting long contexts; larger
            sequences are still computed in full). Default: the block table's capacity.
        num_splits: split each context across this many programs (None: chosen automatically).
        validate: check block ids and lengths (syncs the device); also ``PAGEDATTN_VALIDATE=1``.

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.
    """
    scale, out, lse = _attention_defaults(query, "[num_seqs, num_heads, head_size]", scale, out, lse, return_lse)
    torch.ops.pagedattn.paged_decode(
        out, query, key_cache, value_cache, block_tables, seq_lens, float(scale),
        int(sliding_window or 0), float(softcap or 0.0), alibi_slopes, lse,
        int(max_seq_len or 0), int(num_splits or 0), bool(validate))
    return (out, lse) if return_lse else out


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    max_query_len: Optional[int] = None,
    scale: Optional[float] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    validate: bool = False,
):
    """Causal attention of many new tokens per sequence over a paged context (prefill, append,
    chunked prefill, prefix-cache hits and mixed prefill + decode batches in one call).

    Sequence ``s`` has ``q_len = cu_seqlens_q[s + 1] - cu_seqlens_q[s]`` new tokens, packed in
    ``query[cu_seqlens_q[s]:cu_seqlens_q[s + 1]]``, and ``seq_lens[s]`` tokens of context in all,
    the new ones included (their keys and values already written by :func:`reshape_and_cache`).
    New token ``i`` sits at position ``seq_lens[s] - q_len + i`` and sees positions up to its own.

    Args:
        query: [num_tokens, num_heads, head_size], float16/bfloat16/float32, last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] (see the module
            docstring); ``num_heads`` a multiple of ``num_kv_heads``.
        block_tables: [num_seqs, max_blocks_per_seq] int32.
        seq_lens: [num_seqs] int32 total context lengths.
        cu_seqlens_q: [num_seqs + 1] int32 cumulative query lengths (0 first, num_tokens last).
        max_query_len: the longest ``q_len``, or 0 when unknown; it must not be below the real
            longest (validation mode checks it). 1 with one query per sequence
            (``num_tokens == num_seqs``) runs the decode kernel; otherwise the hint picks tile
            shapes, and a larger one only costs speed.
        scale, sliding_window, softcap, alibi_slopes: as in :func:`paged_decode_attention`
            (the window and ALiBi are relative to each query's own position).
        out: [num_tokens, num_heads, head_size] output (allocated when None).
        lse: [num_tokens, num_heads] float32 log-sum-exp output (allocated when ``return_lse``).
        return_lse: also return the log-sum-exp.
        validate: check lengths, ``cu_seqlens_q`` and block ids (syncs the device).

    Returns:
        ``out``, or ``(out, lse)`` when ``return_lse``.
    """
    scale, out, lse = _attention_defaults(query, "[num_tokens, num_heads, head_size]", scale, out, lse, return_lse)
    torch.ops.pagedattn.paged_prefill(
        out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, int(max_query_len or 0),
        float(scale), int(sliding_window or 0), float(softcap or 0.0), alibi_slopes, lse, bool(validate))
    return (out, lse) if return_lse else out


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, *, validate: bool = False) -> None:
    """Write new tokens' keys and values into the paged caches.

    Args:
        key, value: [num_tokens, num_kv_heads, head_size], the caches' dtype, last dim contiguous.
        key_cache, value_cache: [num_blocks, block_size, num_kv_heads, head_size] (see the module
            docstring), written in place.
        slot_mapping: [num_tokens] int64 (or int32) slots ``block_id * block_size + offset``; a
            negative slot marks padding and is skipped. Slots beyond the cache are skipped too
            (or raise in validation mode). Two tokens with one slot: one of them wins.
        validate: raise on a slot beyond the cache (syncs the device).
    """
    torch.ops.pagedattn.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, bool(validate))


def copy_blocks(key_caches: Sequence[torch.Tensor], value_caches: Sequence[torch.Tensor],
                block_mapping: torch.Tensor, *, validate: bool = False) -> None:
    """Copy whole blocks within every layer's caches, in one launch (copy-on-write after a fork).

    Args:
        key_caches, value_caches: one cache per layer, all of the same shape, strides, dtype and
            device, each block stored densely.
        block_mapping: [num_pairs, 2] int64 (src, dst) block ids on the caches' device.
            Destinations must be distinct and not also sources (pairs run in no order).
            A pair with an id outside the pool is skipped (raises in validation mode).
        validate: check the ids and the pairs' independence (syncs the device).
    """
    torch.ops.pagedattn.copy_blocks(list(key_caches), list(value_caches), block_mapping, bool(validate))


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks between a GPU cache and a pinned CPU cache, asynchronously on the current stream.

    Call it once for the key cache and once for the value cache of each layer. Synchronize the
    stream (or wait on an event) before the host reads or reuses the CPU blocks.

    Args:
        src_cache, dst_cache: caches with the same block shape and strides; one on a GPU and one
            on the CPU (or both on one device). The CPU cache must be pinned for the copy to be
            asynchronous (``allocate_kv_cache(..., pin_memory=True)``); from pageable memory it is
            still correct, but the host waits for it.
        block_mapping: [num_pairs, 2] int64 CPU tensor of (src, dst) block ids; every id is
            checked (for free: it is on the host) and raises ``ValueError`` when out of range.
    """
    torch.ops.pagedattn.swap_blocks(src_cache, dst_cache, block_mapping)

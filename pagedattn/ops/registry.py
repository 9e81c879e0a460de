"""The ops, registered with ``torch.library`` as ``torch.ops.pagedattn.*``.

Each op checks its arguments on the host (metadata only, so it also runs on fake tensors while
``torch.compile`` traces), optionally validates index values, then runs one implementation,
chosen per device by :func:`pagedattn.ops.config.resolve_backend` and run by
:mod:`pagedattn.ops.dispatch`: the Triton kernels (:mod:`pagedattn.ops.launchers`), the CUDA C++
kernels (:mod:`pagedattn.ops.cuda_attention`, :mod:`pagedattn.ops.cuda_cache`) or the PyTorch
reference (:mod:`pagedattn.ops.reference`).
The checks are the same for every backend, so bad input fails the same way on each.
Every op writes into caller-given tensors and returns nothing, so it is safe to capture in a
CUDA graph and cheap to trace.
"""

from __future__ import annotations

from typing import Optional

import torch

from pagedattn.ops import checks, config, reference, swap, validation
from pagedattn.ops.dispatch import run_kernels


# ---------------------------------------------------------------------------------------------
# paged_decode
# ---------------------------------------------------------------------------------------------

def check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, softcap,
                    alibi_slopes, lse, query_dims: str) -> int:
    """Checks shared by the attention ops; returns ``num_seqs`` (the rows of ``seq_lens``)."""
    checks.check_tensor("query", query, ndim=3, dtypes=checks.SUPPORTED_DTYPES)
    num_blocks, block_size, num_kv_heads, head_size = checks.check_kv_cache(key_cache, value_cache)
    num_rows, num_heads, q_head_size = query.shape
    checks.check_same_dtype("key_cache", key_cache, "query", query)
    checks.check_same_device("key_cache", key_cache, "query", query)
    if q_head_size != head_size:
        raise ValueError(f"query head_size (dim 2) must equal the cache's head_size {head_size}, got {q_head_size}")
    checks.check_attention_head_size(head_size)
    checks.check_heads(num_heads, num_kv_heads)
    checks.check_last_dim_contiguous("query", query)

    checks.check_tensor("out", out, ndim=3)
    checks.check_same_dtype("out", out, "query", query)
    checks.check_same_device("out", out, "query", query)
    checks.check_shape("out", out, query.shape, query_dims)
    checks.check_last_dim_contiguous("out", out)

    checks.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    checks.check_same_device("seq_lens", seq_lens, "query", query)
    checks.check_contiguous("seq_lens", seq_lens)
    num_seqs = seq_lens.shape[0]
    checks.check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    checks.check_same_device("block_tables", block_tables, "query", query)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables must have shape [num_seqs, max_blocks_per_seq] with num_seqs = {num_seqs}, "
                         f"got {tuple(block_tables.shape)}")
    if block_tables.shape[1] < 1:
        raise ValueError("block_tables must have at least one column (max_blocks_per_seq >= 1)")

    checks.check_float("scale", scale)
    checks.check_int("sliding_window", sliding_window, minimum=0)
    checks.check_float("softcap", softcap, minimum=0.0)
    if alibi_slopes is not None:
        checks.check_tensor("alibi_slopes", alibi_slopes, ndim=1, dtypes=(torch.float32,))
        checks.check_same_device("alibi_slopes", alibi_slopes, "query", query)
        checks.check_shape("alibi_slopes", alibi_slopes, (num_heads,), "[num_heads]")
        checks.check_contiguous("alibi_slopes", alibi_slopes)
    if lse is not None:
        checks.check_tensor("lse", lse, ndim=2, dtypes=(torch.float32,))
        checks.check_same_device("lse", lse, "query", query)
        checks.check_shape("lse", lse, (num_rows, num_heads), f"{query_dims[:query_dims.rindex(',')]}]")
    return num_seqs


def check_paged_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
                       softcap, alibi_slopes, lse, max_seq_len, num_splits) -> None:
    checks.check_tensor("query", query, ndim=3, dtypes=checks.SUPPORTED_DTYPES)
    checks.check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,))
    checks.check_shape("seq_lens", seq_lens, query.shape[:1], "[num_seqs] (one query token per sequence)")
    check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window, softcap,
                    alibi_slopes, lse, "[num_seqs, num_heads, head_size]")
    checks.check_int("max_seq_len", max_seq_len, minimum=0)
    checks.check_int("num_splits", num_splits, minimum=0)


@torch.library.custom_op("pagedattn::paged_decode", mutates_args=("out", "lse"))
def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                 max_seq_len: int, num_splits: int, validate: bool) -> None:
    """Paged decode attention; see :func:`pagedattn.ops.paged_decode_attention` for the arguments."""
    check_paged_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
                       softcap, alibi_slopes, lse, max_seq_len, num_splits)
    if validate or config.validation_enabled():
        validation.validate_paged_context(block_tables, seq_lens, key_cache)
    if not run_kernels(query.device, "paged_decode", out, query, key_cache, value_cache, block_tables, seq_lens,
                       scale, sliding_window, softcap, alibi_slopes, lse, max_seq_len, num_splits):
        reference.paged_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale,
                               sliding_window, softcap, alibi_slopes, lse)


@paged_decode.register_fake
def _paged_decode_fake(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
                       softcap, alibi_slopes, lse, max_seq_len, num_splits, validate) -> None:
    check_paged_decode(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
                       softcap, alibi_slopes, lse, max_seq_len, num_splits)


# ---------------------------------------------------------------------------------------------
# paged_prefill
# ---------------------------------------------------------------------------------------------

def check_paged_prefill(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len,
                        scale, sliding_window, softcap, alibi_slopes, lse) -> None:
    num_seqs = check_attention(out, query, key_cache, value_cache, block_tables, seq_lens, scale, sliding_window,
                               softcap, alibi_slopes, lse, "[num_tokens, num_heads, head_size]")
    checks.check_tensor("cu_seqlens_q", cu_seqlens_q, ndim=1, dtypes=(torch.int32,))
    checks.check_same_device("cu_seqlens_q", cu_seqlens_q, "query", query)
    checks.check_shape("cu_seqlens_q", cu_seqlens_q, (num_seqs + 1,), "[num_seqs + 1]")
    checks.check_contiguous("cu_seqlens_q", cu_seqlens_q)
    checks.check_int("max_query_len", max_query_len, minimum=0)


@torch.library.custom_op("pagedattn::paged_prefill", mutates_args=("out", "lse"))
def paged_prefill(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_query_len: int,
                  scale: float, sliding_window: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
                  lse: Optional[torch.Tensor], validate: bool) -> None:
    """Paged prefill/append attention; see :func:`pagedattn.ops.paged_prefill_attention` for the arguments."""
    check_paged_prefill(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len,
                        scale, sliding_window, softcap, alibi_slopes, lse)
    if validate or config.validation_enabled():
        validation.validate_paged_context(block_tables, seq_lens, key_cache)
        validation.validate_cu_seqlens_q(cu_seqlens_q, seq_lens, query.shape[0], max_query_len)
    if max_query_len == 1 and query.shape[0] == seq_lens.shape[0]:
        # One query per sequence: every backend's decode kernel (it splits long contexts over programs
        # when few sequences run; Triton's prefill kernel took 1.22x its time for such rows on an H100).
        ran = run_kernels(query.device, "paged_decode", out, query, key_cache, value_cache, block_tables,
                          seq_lens, scale, sliding_window, softcap, alibi_slopes, lse, 0, 0)
    else:
        ran = run_kernels(query.device, "paged_prefill", out, query, key_cache, value_cache, block_tables,
                          seq_lens, cu_seqlens_q, max_query_len, scale, sliding_window, softcap, alibi_slopes, lse)
    if not ran:
        reference.paged_prefill(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale,
                                sliding_window, softcap, alibi_slopes, lse)


@paged_prefill.register_fake
def _paged_prefill_fake(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len,
                        scale, sliding_window, softcap, alibi_slopes, lse, validate) -> None:
    check_paged_prefill(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, max_query_len,
                        scale, sliding_window, softcap, alibi_slopes, lse)


# ---------------------------------------------------------------------------------------------
# reshape_and_cache
# ---------------------------------------------------------------------------------------------

def check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping) -> None:
    checks.check_tensor("key", key, ndim=3, dtypes=checks.SUPPORTED_DTYPES)
    checks.check_tensor("value", value, ndim=3, dtypes=checks.SUPPORTED_DTYPES)
    _, _, num_kv_heads, head_size = checks.check_kv_cache(key_cache, value_cache)
    expected = (key.shape[0], num_kv_heads, head_size)
    checks.check_shape("key", key, expected, "[num_tokens, num_kv_heads, head_size]")
    checks.check_shape("value", value, expected, "[num_tokens, num_kv_heads, head_size]")
    checks.check_same_dtype("key", key, "key_cache", key_cache)
    checks.check_same_dtype("value", value, "key_cache", key_cache)
    checks.check_same_device("key", key, "key_cache", key_cache)
    checks.check_same_device("value", value, "key_cache", key_cache)
    checks.check_last_dim_contiguous("key", key)
    checks.check_last_dim_contiguous("value", value)
    checks.check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=(torch.int64, torch.int32))
    checks.check_same_device("slot_mapping", slot_mapping, "key_cache", key_cache)
    checks.check_shape("slot_mapping", slot_mapping, (key.shape[0],), "[num_tokens]")
    checks.check_contiguous("slot_mapping", slot_mapping)


@torch.library.custom_op("pagedattn::reshape_and_cache", mutates_args=("key_cache", "value_cache"))
def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, validate: bool) -> None:
    """Write new keys/values into the caches by slot; see :func:`pagedattn.ops.reshape_and_cache`."""
    check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    if validate or config.validation_enabled():
        validation.validate_slot_mapping(slot_mapping, key_cache.shape[0] * key_cache.shape[1])
    if not run_kernels(key.device, "reshape_and_cache", key, value, key_cache, value_cache, slot_mapping):
        reference.reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


@reshape_and_cache.register_fake
def _reshape_and_cache_fake(key, value, key_cache, value_cache, slot_mapping, validate) -> None:
    check_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)


# ---------------------------------------------------------------------------------------------
# copy_blocks
# ---------------------------------------------------------------------------------------------

def check_copy_blocks(key_caches, value_caches, block_mapping) -> None:
    caches = [("key_caches", i, c) for i, c in enumerate(key_caches)]
    caches += [("value_caches", i, c) for i, c in enumerate(value_caches)]
    if len(key_caches) != len(value_caches):
        raise ValueError(f"key_caches and value_caches must have one cache per layer each, got "
                         f"{len(key_caches)} and {len(value_caches)}")
    if not caches:
        raise ValueError("key_caches must hold at least one cache")
    first_name = "key_caches[0]"
    first = checks.check_tensor(first_name, caches[0][2], ndim=4, dtypes=checks.SUPPORTED_DTYPES)
    for group, i, cache in caches:
        name = f"{group}[{i}]"
        checks.check_tensor(name, cache, ndim=4, dtypes=checks.SUPPORTED_DTYPES)
        checks.check_same_dtype(name, cache, first_name, first)
        checks.check_same_device(name, cache, first_name, first)
        if cache.shape != first.shape or cache.stride() != first.stride():
            raise ValueError(f"{name} must have the shape and strides of {first_name} "
                             f"({tuple(first.shape)}, {first.stride()}), got {tuple(cache.shape)}, {cache.stride()}")
        checks.check_block_dense(name, cache)
    checks.check_tensor("block_mapping", block_mapping, ndim=2, dtypes=(torch.int64, torch.int32))
    checks.check_same_device("block_mapping", block_mapping, first_name, first)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must have shape [num_pairs, 2] (src, dst), got {tuple(block_mapping.shape)}")


def validate_copy_pairs(block_mapping: torch.Tensor, num_blocks: int) -> None:
    validation.validate_block_mapping(block_mapping, num_blocks, num_blocks)
    pairs = block_mapping.tolist()
    dsts = [d for _, d in pairs]
    if len(set(dsts)) != len(dsts):
        raise ValueError("block_mapping destination ids must be distinct (two copies into one block race)")
    overlap = set(dsts) & {s for s, _ in pairs}
    if overlap:
        raise ValueError(f"block_mapping block {min(overlap)} is both a source and a destination "
                         "(copies in one launch have no order)")


@torch.library.custom_op("pagedattn::copy_blocks", mutates_args=("key_caches", "value_caches"))
def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor], block_mapping: torch.Tensor,
                validate: bool) -> None:
    """Copy blocks (src, dst) in every layer's caches in one launch; see :func:`pagedattn.ops.copy_blocks`."""
    check_copy_blocks(key_caches, value_caches, block_mapping)
    if validate or config.validation_enabled():
        validate_copy_pairs(block_mapping, key_caches[0].shape[0])
    if not run_kernels(block_mapping.device, "copy_blocks", key_caches, value_caches, block_mapping):
        reference.copy_blocks(key_caches, value_caches, block_mapping)


@copy_blocks.register_fake
def _copy_blocks_fake(key_caches, value_caches, block_mapping, validate) -> None:
    check_copy_blocks(key_caches, value_caches, block_mapping)


# ---------------------------------------------------------------------------------------------
# swap_blocks
# ---------------------------------------------------------------------------------------------

def check_swap_blocks(src_cache, dst_cache, block_mapping) -> None:
    checks.check_tensor("src_cache", src_cache, dtypes=checks.SUPPORTED_DTYPES)
    checks.check_tensor("dst_cache", dst_cache, dtypes=checks.SUPPORTED_DTYPES)
    checks.check_same_dtype("dst_cache", dst_cache, "src_cache", src_cache)
    if src_cache.dim() < 1 or src_cache.shape[1:] != dst_cache.shape[1:]:
        raise ValueError(f"dst_cache must have the block shape of src_cache {tuple(src_cache.shape[1:])}, "
                         f"got {tuple(dst_cache.shape[1:])}")
    if src_cache.stride()[1:] != dst_cache.stride()[1:]:
        raise ValueError(f"dst_cache must have the strides of src_cache {src_cache.stride()}, got {dst_cache.stride()}")
    devices = {src_cache.device.type, dst_cache.device.type}
    if devices - {"cpu", "cuda"}:
        raise ValueError(f"swap_blocks copies between CUDA and CPU caches, got {src_cache.device} and {dst_cache.device}")
    if src_cache.device.type == "cuda" and dst_cache.device.type == "cuda" and src_cache.device != dst_cache.device:
        raise ValueError(f"src_cache and dst_cache must be on one GPU or one on the CPU, got {src_cache.device} "
                         f"and {dst_cache.device}")
    checks.check_tensor("block_mapping", block_mapping, ndim=2, dtypes=(torch.int64, torch.int32))
    if block_mapping.device.type != "cpu":
        raise ValueError(f"block_mapping must be a CPU tensor (the host drives the copies), got {block_mapping.device}")
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must have shape [num_pairs, 2] (src, dst), got {tuple(block_mapping.shape)}")


@torch.library.custom_op("pagedattn::swap_blocks", mutates_args=("dst_cache",))
def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy blocks between a GPU and a pinned CPU cache; see :func:`pagedattn.ops.swap_blocks`."""
    check_swap_blocks(src_cache, dst_cache, block_mapping)
    swap.swap_blocks(src_cache, dst_cache, block_mapping)


@swap_blocks.register_fake
def _swap_blocks_fake(src_cache, dst_cache, block_mapping) -> None:
    check_swap_blocks(src_cache, dst_cache, block_mapping)

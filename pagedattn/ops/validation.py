"""Validation mode: checks of index *values*, run only when asked for.

These read tensor contents, so they synchronize with the device. Each raises ``ValueError``
describing the first offending entry. Without validation mode the kernels mask bad values
instead (see :mod:`pagedattn.ops.config`).
"""

from __future__ import annotations

import torch


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0].tolist())


def validate_seq_lens(seq_lens: torch.Tensor, max_blocks_per_seq: int, block_size: int) -> None:
    capacity = max_blocks_per_seq * block_size
    bad = (seq_lens < 0) | (seq_lens > capacity)
    if bool(bad.any()):
        (i,) = _first(bad)
        raise ValueError(f"seq_lens[{i}] = {int(seq_lens[i])} is outside [0, {capacity}] "
                         f"(max_blocks_per_seq {max_blocks_per_seq} x block_size {block_size})")


def validate_block_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                          num_blocks: int) -> None:
    """Check the block ids each sequence actually uses (the first ceil(seq_len / block_size))."""
    num_used = (seq_lens.clamp(min=0).to(torch.int64) + block_size - 1) // block_size
    cols = torch.arange(block_tables.shape[1], device=block_tables.device)
    used = cols[None, :] < num_used[:, None]
    bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
    if bool(bad.any()):
        i, j = _first(bad)
        raise ValueError(f"block_tables[{i}, {j}] = {int(block_tables[i, j])} is not a block id in "
                         f"[0, {num_blocks}) (used by sequence {i} of length {int(seq_lens[i])})")


def validate_paged_context(block_tables: torch.Tensor, seq_lens: torch.Tensor, key_cache: torch.Tensor) -> None:
    """The attention ops' shared value checks: lengths within the tables, used block ids in the pool."""
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    validate_seq_lens(seq_lens, block_tables.shape[1], block_size)
    validate_block_tables(block_tables, seq_lens, block_size, num_blocks)


def validate_slot_mapping(slot_mapping: torch.Tensor, num_slots: int) -> None:
    bad = slot_mapping >= num_slots
    if bool(bad.any()):
        (i,) = _first(bad)
        raise ValueError(f"slot_mapping[{i}] = {int(slot_mapping[i])} is beyond the cache's "
                         f"{num_slots} slots (num_blocks x block_size); use a negative slot for padding")


def validate_block_mapping(block_mapping: torch.Tensor, num_src_blocks: int, num_dst_blocks: int,
                           name: str = "block_mapping") -> None:
    src, dst = block_mapping[:, 0], block_mapping[:, 1]
    for col, values, limit in (("source", src, num_src_blocks), ("destination", dst, num_dst_blocks)):
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            (i,) = _first(bad)
            raise ValueError(f"{name}[{i}] {col} block id {int(values[i])} is not in [0, {limit})")


def validate_cu_seqlens_q(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int,
                          max_query_len: int) -> None:
    """cu_seqlens_q starts at 0, never decreases, ends at num_tokens; no sequence has more new
    tokens than context; the max_query_len hint (when given) is not below a real length."""
    cu = cu_seqlens_q.to(torch.int64).cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"cu_seqlens_q[0] must be 0, got {int(cu[0])}")
    if int(cu[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens_q[-1] must equal num_tokens = {num_tokens} (query rows), got {int(cu[-1])}")
    q_lens = cu[1:] - cu[:-1]
    bad = q_lens < 0
    if bool(bad.any()):
        (i,) = _first(bad)
        raise ValueError(f"cu_seqlens_q must not decrease: cu_seqlens_q[{i + 1}] = {int(cu[i + 1])} < "
                         f"cu_seqlens_q[{i}] = {int(cu[i])}")
    lens = seq_lens.to(torch.int64).cpu()
    bad = q_lens > lens
    if bool(bad.any()):
        (i,) = _first(bad)
        raise ValueError(f"sequence {i} has {int(q_lens[i])} query tokens but seq_lens[{i}] = {int(lens[i])}: "
                         "seq_lens counts the whole context, new tokens included")
    if max_query_len > 0 and q_lens.numel() and int(q_lens.max()) > max_query_len:
        raise ValueError(f"max_query_len = {max_query_len} is below the longest query ({int(q_lens.max())} tokens)")

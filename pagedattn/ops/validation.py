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

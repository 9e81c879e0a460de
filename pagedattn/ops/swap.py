"""Block swap between two caches (GPU <-> pinned CPU, or within one device).

The block mapping lives on the host, so each (src, dst) pair is checked for free and runs of
consecutive pairs (src and dst both advancing by one) are merged into one asynchronous copy on
the current stream. Between a CUDA cache and a CPU cache the CPU side must be pinned, so the
copies are truly asynchronous; callers synchronize (or record an event) before reading or
reusing the CPU blocks.
"""

from __future__ import annotations

import torch


def coalesce_pairs(pairs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Merge (src, dst) pairs into (src_start, dst_start, count) runs, keeping their order."""
    runs: list[tuple[int, int, int]] = []
    for src, dst in pairs:
        if runs:
            s0, d0, n = runs[-1]
            if src == s0 + n and dst == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def check_block_pairs(block_mapping: torch.Tensor, num_src_blocks: int, num_dst_blocks: int) -> list[tuple[int, int]]:
    """Return the pairs as Python ints, raising ``ValueError`` for an id outside either cache."""
    pairs = [(int(s), int(d)) for s, d in block_mapping.tolist()]
    for i, (src, dst) in enumerate(pairs):
        if not 0 <= src < num_src_blocks:
            raise ValueError(f"block_mapping[{i}] source block id {src} is not in [0, {num_src_blocks})")
        if not 0 <= dst < num_dst_blocks:
            raise ValueError(f"block_mapping[{i}] destination block id {dst} is not in [0, {num_dst_blocks})")
    return pairs


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """Copy ``src_cache[src]`` into ``dst_cache[dst]`` for every pair, asynchronously."""
    pairs = check_block_pairs(block_mapping, src_cache.shape[0], dst_cache.shape[0])
    non_blocking = src_cache.device.type != dst_cache.device.type or src_cache.device.type == "cuda"
    for src, dst, count in coalesce_pairs(pairs):
        dst_cache[dst:dst + count].copy_(src_cache[src:src + count], non_blocking=non_blocking)

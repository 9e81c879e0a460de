"""Figures of a block manager: free blocks, usage, KV utilization, prefix-cache hit rate.

Mixed into :class:`~pagedattn.alloc.block_manager.BlockManager`; all are O(1) except
:meth:`FiguresMixin.kv_utilization`, which walks the live sequences once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FiguresMixin"]


class FiguresMixin:
    """Read-only figures of the block manager."""

    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu_pool.num_blocks

    @property
    def num_cpu_blocks(self) -> int:
        return self.cpu_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free GPU blocks (cached ones included: they are evictable)."""
        return self.gpu_pool.num_free_blocks

    @property
    def num_free_cpu_blocks(self) -> int:
        return self.cpu_pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of GPU blocks in use."""
        return self.gpu_pool.usage

    @property
    def num_evictions(self) -> int:
        """Cached GPU blocks evicted (taken from the free queue for new content) so far."""
        return self.gpu_pool.num_evictions

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / prompt tokens allocated (0.0 if none)."""
        return self._num_hit_tokens / self._num_query_tokens if self._num_query_tokens else 0.0

    def kv_utilization(self) -> float:
        """Token slots holding tokens / token slots of the GPU blocks in use (0.0 if none).

        A block shared by several sequences counts once; only a sequence's last block can be
        partly filled, so the waste is below one block per distinct last block.
        """
        used = self.gpu_pool.num_used_blocks
        if used == 0:
            return 0.0
        bs, arrays = self.block_size, self.arrays
        rows = np.fromiter((seq.row for seq in self._seqs.values() if not seq.swapped), np.intp)
        n = arrays.num_tokens[rows]
        fill = n % bs
        part = fill > 0
        # a partly filled last block shared by several sequences (after a fork) counts once
        last_blocks = arrays.block_tables[rows[part], (n[part] - 1) // bs]
        distinct, first = np.unique(last_blocks, return_index=True)
        filled = (used - distinct.shape[0]) * bs + int(fill[part][first].sum())
        return filled / (used * bs)

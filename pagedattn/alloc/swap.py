"""Swapping sequence groups between the GPU pool and the CPU pool, all or nothing.

A group (e.g. a request's parallel samples) moves as a whole: a block shared inside the group
gets one copy, so the sharing survives the round trip. Swapping out returns GPU-to-CPU block
pairs and frees the group's GPU blocks (cached ones stay in the GPU prefix cache as evictable
free blocks); swapping in returns CPU-to-GPU pairs, and a full block whose content is still
cached on the GPU is revived instead of copied.

These methods are mixed into :class:`~pagedattn.alloc.block_manager.BlockManager` and use its
pools, sequences and arrays.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

from pagedattn.alloc.errors import InvalidArgumentError, SwapError

if TYPE_CHECKING:
    from pagedattn.alloc.block import KVCacheBlock
    from pagedattn.alloc.block_manager import AllocStatus
    from pagedattn.alloc.sequence_state import SequenceState

__all__ = ["SwapMixin"]


class SwapMixin:
    """``swap_out``/``swap_in`` and their admission checks for the block manager."""

    def _swap_group(self, seq_ids: Iterable[Hashable], action: str, swapped: bool
                    ) -> tuple[list[SequenceState], dict[int, list]]:
        """Validate a group; return its sequences and ``{block_id: [block, num_holders]}``."""
        seq_ids = list(seq_ids)
        seqs = []
        for seq_id in seq_ids:
            seq = self._get_seq(seq_id, action)
            if seq.swapped != swapped:
                where = "swapped out to the CPU" if seq.swapped else "running on the GPU"
                raise SwapError(f"cannot {action} sequence {seq_id!r}: it is {where}")
            seqs.append(seq)
        if len({id(s) for s in seqs}) != len(seqs):
            dup = next(s for i, s in enumerate(seq_ids) if s in seq_ids[:i])
            raise InvalidArgumentError(f"cannot {action} sequence {dup!r} twice in one group")
        distinct: dict[int, list] = {}
        for seq in seqs:
            for block in seq.blocks:
                entry = distinct.get(block.block_id)
                if entry is None:
                    distinct[block.block_id] = [block, 1]
                else:
                    entry[1] += 1
        return seqs, distinct

    def can_swap_out(self, seq_ids: Iterable[Hashable]) -> bool:
        """Whether the CPU pool has room for the group's distinct blocks."""
        _, distinct = self._swap_group(seq_ids, "swap out", False)
        return len(distinct) <= self.cpu_pool.num_free_blocks

    def can_swap_in(self, seq_ids: Iterable[Hashable]) -> AllocStatus:
        """Whether the group fits on the GPU with the watermark kept free (cache hits not counted)."""
        from pagedattn.alloc.block_manager import AllocStatus

        _, distinct = self._swap_group(seq_ids, "swap in", True)
        required = len(distinct)
        if self.num_gpu_blocks - required < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.num_free_blocks - required >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    def swap_out(self, seq_ids: Iterable[Hashable]) -> list[tuple[int, int]]:
        """Move a group of running sequences to the CPU pool.

        Args:
            seq_ids: the group's sequences (distinct, all running).

        Returns:
            ``[(gpu_block_id, cpu_block_id)]``, one pair per distinct block: the copies the
            engine must run before the GPU blocks are reused.

        Raises:
            UnknownSequenceError / FreedSequenceError: a sequence is not live.
            SwapError: a sequence is already swapped out.
            OutOfBlocksError: the CPU pool cannot hold the whole group; nothing moves.
        """
        seq_ids = list(seq_ids)
        seqs, distinct = self._swap_group(seq_ids, "swap out", False)
        for seq in seqs:
            self._check_not_pending(seq, "swap out")
        self.cpu_pool.check_available(len(distinct), f"swap out sequences {seq_ids!r}")
        cpu_blocks = self.cpu_pool.get_new_blocks(len(distinct))
        mapping: dict[int, KVCacheBlock] = {}
        pairs = []
        for (gpu_block, holders), cpu_block in zip(distinct.values(), cpu_blocks):
            cpu_block.ref_cnt = holders
            # The CPU copy keeps the block's cache identity so swap-in can re-register it.
            cpu_block.block_key = gpu_block.block_key
            cpu_block.block_hash = gpu_block.block_hash
            cpu_block.extra_keys = gpu_block.extra_keys
            mapping[gpu_block.block_id] = cpu_block
            pairs.append((gpu_block.block_id, cpu_block.block_id))
        self.gpu_pool.free_blocks([b for seq in seqs for b in reversed(seq.blocks)])
        for seq in seqs:
            seq.blocks = [mapping[b.block_id] for b in seq.blocks]
            seq.swapped = True
            self.arrays.block_tables[seq.row] = self.arrays.pad_block_id
            self.arrays.clear_maybe_shared(seq.row)
        self._epoch += 1
        return pairs

    def swap_in(self, seq_ids: Iterable[Hashable]) -> list[tuple[int, int]]:
        """Move a swapped-out group back to the GPU pool.

        Args:
            seq_ids: the group's sequences (distinct, all swapped out).

        Returns:
            ``[(cpu_block_id, gpu_block_id)]`` for the blocks to copy back; full blocks still
            cached on the GPU are revived in place and need no copy.

        Raises:
            UnknownSequenceError / FreedSequenceError: a sequence is not live.
            SwapError: a sequence is not swapped out.
            OutOfBlocksError: the GPU pool cannot hold the whole group; nothing moves.
        """
        seq_ids = list(seq_ids)
        seqs, distinct = self._swap_group(seq_ids, "swap in", True)
        gpu = self.gpu_pool
        reused: dict[int, KVCacheBlock] = {}  # cpu block id -> cached GPU block
        to_copy = []
        for cpu_block, _ in distinct.values():
            hit = None
            if gpu.enable_caching and cpu_block.block_key is not None:
                hit = gpu.get_cached_block(cpu_block.block_key, cpu_block.extra_keys)
            if hit is None:
                to_copy.append(cpu_block)
            else:
                reused[cpu_block.block_id] = hit
        num_revived = len({b.block_id for b in reused.values() if b.ref_cnt == 0})
        gpu.check_available(len(to_copy) + num_revived, f"swap in sequences {seq_ids!r}")
        # -- mutation starts here: nothing below can fail.
        mapping: dict[int, KVCacheBlock] = {}
        for cpu_id, gpu_block in reused.items():
            gpu.touch([gpu_block] * distinct[cpu_id][1])
            mapping[cpu_id] = gpu_block
        pairs = []
        for cpu_block, gpu_block in zip(to_copy, gpu.get_new_blocks(len(to_copy))):
            gpu_block.ref_cnt = distinct[cpu_block.block_id][1]
            if cpu_block.block_key is not None:
                gpu.cache_block(gpu_block, cpu_block.block_key, cpu_block.block_hash,
                                cpu_block.extra_keys)
            mapping[cpu_block.block_id] = gpu_block
            pairs.append((cpu_block.block_id, gpu_block.block_id))
        self.cpu_pool.free_blocks([b for seq in seqs for b in reversed(seq.blocks)])
        for seq in seqs:
            seq.blocks = [mapping[b.block_id] for b in seq.blocks]
            seq.swapped = False
            self.arrays.set_row(seq.row, [b.block_id for b in seq.blocks],
                                int(self.arrays.num_tokens[seq.row]))
            if self.arrays.num_tokens[seq.row] % self.block_size:
                self.arrays.flag_maybe_shared(seq.row)  # cleared by the next append's check
        self._epoch += 1
        return pairs

"""Block tables of sequences: allocate, append, fork with copy-on-write, free, prefix hits.

The :class:`BlockManager` is the allocator an engine talks to. It owns a GPU
:class:`~pagedattn.alloc.block_pool.BlockPool` (with the prefix cache), a CPU pool for swapping
(:mod:`pagedattn.alloc.swap`), and per-sequence numpy rows
(:class:`~pagedattn.alloc.seq_arrays.SequenceArrays`) from which batch metadata is built.

Every method checks everything first and mutates after, so a call that raises leaves the
manager exactly as it was.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from pagedattn.alloc.append import AppendMixin
from pagedattn.alloc.figures import FiguresMixin
from pagedattn.alloc.block import KVCacheBlock
from pagedattn.alloc.sequence_state import SequenceState
from pagedattn.alloc.block_pool import BlockPool
from pagedattn.alloc.errors import (
    DoubleFreeError,
    DuplicateSequenceError,
    FreedSequenceError,
    InvalidArgumentError,
    SwapError,
    UnknownSequenceError,
)
from pagedattn.alloc import hashing
from pagedattn.alloc.hashing import (TOKEN_DTYPE, as_token_array, encode_extra_keys, root_hash,
                                     split_token_blocks)
from pagedattn.alloc.metadata import BatchMetadata, build_batch_metadata
from pagedattn.alloc.prompt_hashes import PromptBlockHashes, check_block_hashes
from pagedattn.alloc.seq_arrays import SequenceArrays
from pagedattn.alloc.swap import SwapMixin

__all__ = ["AllocStatus", "BlockManager", "SequenceState"]

_hash_fn = hashing._hash_fn  # the block hash constructor (a module global, so tests can swap it)


class AllocStatus(enum.Enum):
    """Answer to "can I allocate?": now, after some sequences finish, or never."""

    OK = "ok"
    LATER = "later"
    NEVER = "never"


class BlockManager(AppendMixin, SwapMixin, FiguresMixin):
    """Paged KV-cache allocator: block tables, copy-on-write, prefix caching and swapping.

    Args:
        num_gpu_blocks: blocks in the GPU pool.
        block_size: token slots per block.
        num_cpu_blocks: blocks in the CPU pool used for swapping (0: no swapping).
        enable_prefix_caching: share full blocks between prompts with a common prefix.
        watermark: fraction of GPU blocks ``can_allocate`` keeps free for running sequences.
        pad_block_id: block-table value past a sequence's last block.
        max_freed_ids: how many freed sequence ids are remembered to report a double free as
            :class:`DoubleFreeError` (older ones report :class:`UnknownSequenceError`).
    """

    def __init__(self, num_gpu_blocks: int, block_size: int, num_cpu_blocks: int = 0, *,
                 enable_prefix_caching: bool = True, watermark: float = 0.01,
                 pad_block_id: int = 0, max_freed_ids: int = 65536) -> None:
        if not isinstance(block_size, int) or block_size < 1:
            raise InvalidArgumentError(f"block_size must be a positive int, got {block_size!r}")
        if not isinstance(num_gpu_blocks, int) or num_gpu_blocks < 1:
            raise InvalidArgumentError(f"num_gpu_blocks must be a positive int, got {num_gpu_blocks!r}")
        if not isinstance(num_cpu_blocks, int) or num_cpu_blocks < 0:
            raise InvalidArgumentError(f"num_cpu_blocks must be an int >= 0, got {num_cpu_blocks!r}")
        if not 0.0 <= watermark < 1.0:
            raise InvalidArgumentError(f"watermark must be in [0, 1), got {watermark!r}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.watermark_blocks = int(watermark * num_gpu_blocks)
        self.gpu_pool = BlockPool(num_gpu_blocks, enable_prefix_caching, "gpu")
        self.cpu_pool = BlockPool(num_cpu_blocks, False, "cpu")
        self.arrays = SequenceArrays(block_size, pad_block_id)
        self._seqs: dict[Hashable, SequenceState] = {}
        self._row_seqs: dict[int, SequenceState] = {}
        self._freed_ids: OrderedDict[Hashable, None] = OrderedDict()
        self._max_freed_ids = max_freed_ids
        self._num_query_tokens = 0
        self._num_hit_tokens = 0
        self._epoch = 0  # bumped whenever the set of running sequences or their rows change
        self._batch_key: tuple | None = None
        self._batch_epoch = -1
        self._batch_rows = np.zeros(0, np.intp)

    # ------------------------------------------------------------------------------ queries
    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    @property
    def num_seqs(self) -> int:
        return len(self._seqs)

    def seq_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def get_block_table(self, seq_id: Hashable) -> list[int]:
        """Block ids of the sequence, first block first (CPU block ids while swapped out)."""
        return [b.block_id for b in self._get_seq(seq_id, "get the block table of").blocks]

    def get_num_tokens(self, seq_id: Hashable) -> int:
        return int(self.arrays.num_tokens[self._get_seq(seq_id, "get the length of").row])

    def is_swapped(self, seq_id: Hashable) -> bool:
        return self._get_seq(seq_id, "query").swapped

    # ---------------------------------------------------------------------------- admission
    def can_allocate(self, num_tokens: int) -> AllocStatus:
        """Whether a prompt of ``num_tokens`` fits while keeping the watermark free.

        Prefix hits are not counted, so the answer is conservative.
        """
        required = -(-num_tokens // self.block_size)
        if self.num_gpu_blocks - required < self.watermark_blocks:
            return AllocStatus.NEVER
        if self.num_free_blocks - required >= self.watermark_blocks:
            return AllocStatus.OK
        return AllocStatus.LATER

    # ---------------------------------------------------------------------------- allocate
    def allocate(self, seq_id: Hashable, token_ids: Sequence[int] | np.ndarray,
                 extra_keys: Any = None, *, block_hashes: PromptBlockHashes | None = None) -> int:
        """Give a new sequence blocks for its prompt, reusing the longest cached prefix.

        Full blocks of the prompt are registered in the prefix cache right away, before their
        KV exists: a prompt that hits them must not be computed before the step that writes
        them (the same step is fine: the cache write precedes attention). An engine that
        prefills in chunks allocates the first chunk and appends the rest with
        ``append_slots``, so only blocks it is about to compute get registered.

        Args:
            seq_id: a new sequence id (any hashable).
            token_ids: the prompt's token ids (a 1-D int32 array avoids a conversion).
            extra_keys: keys hashed into every block besides the tokens: a per-tenant salt,
                an adapter id, ... (see :func:`~pagedattn.alloc.hashing.encode_extra_keys`).
            block_hashes: the prompt's block hashes computed beforehand (when the request
                arrived) by :func:`~pagedattn.alloc.prompt_hashes.hash_prompt_blocks` with the
                same token ids, block size and extra keys; ``allocate`` then hashes nothing.
                The result is the same as without them.

        Returns:
            The number of prompt tokens whose KV is already cached (a multiple of
            ``block_size``, at most ``len(token_ids) - 1`` so the last token is computed).

        Raises:
            DuplicateSequenceError: ``seq_id`` is live.
            InvalidArgumentError: bad token ids or extra keys, or ``block_hashes`` not computed
                for these token ids, this block size and these extra keys.
            OutOfBlocksError: not enough free GPU blocks; nothing is allocated.
        """
        seqs = self._seqs
        if seq_id in seqs:
            raise DuplicateSequenceError(f"cannot allocate sequence {seq_id!r}: it is already allocated")
        if type(token_ids) is np.ndarray and token_ids.dtype is TOKEN_DTYPE and token_ids.ndim == 1:
            tokens = token_ids  # the common case, checked without a call
        else:
            tokens = as_token_array(token_ids, "token_ids")
        extra = b"" if extra_keys is None else encode_extra_keys(extra_keys)
        bs, pool = self.block_size, self.gpu_pool
        if block_hashes is not None:
            check_block_hashes(block_hashes, tokens, bs, extra)
        num_tokens = len(tokens)
        num_full, num_tail = divmod(num_tokens, bs)
        caching = self.enable_prefix_caching
        last_hash = root_hash(extra)
        hits: list[KVCacheBlock] = []
        if caching:
            # The longest cached prefix (inlined _cached_prefix), at most (num_tokens - 1) // bs
            # blocks so the last token is computed.
            get = pool.cached_blocks.get
            if block_hashes is None:
                chunks = split_token_blocks(tokens, bs, num_full)
                for chunk in chunks[: (num_tokens - 1) // bs]:
                    block = get(last_hash + chunk)
                    if block is None or block.extra_keys != extra:
                        break
                    hits.append(block)
                    last_hash = block.block_hash
            else:
                for key in block_hashes.block_keys[: (num_tokens - 1) // bs]:
                    block = get(key)
                    if block is None or block.extra_keys != extra:
                        break
                    hits.append(block)
        num_hits = len(hits)
        num_new = num_full + (num_tail != 0) - num_hits
        if hits:
            num_revived = sum(1 for b in hits if b.ref_cnt == 0)
            if num_new + num_revived > pool.free_block_queue.num_free_blocks:
                pool.check_available(num_new + num_revived,
                                     f"allocate sequence {seq_id!r} ({num_tokens} tokens)")
            # -- mutation starts here: nothing below can fail.
            pool.touch(hits)
        elif num_new > pool.free_block_queue.num_free_blocks:
            pool.check_available(num_new, f"allocate sequence {seq_id!r} ({num_tokens} tokens)")
        if caching:
            # Take the blocks, hash and register the new full blocks, in one pass.
            if block_hashes is None:
                blocks, last_hash = pool.get_new_cached_blocks(
                    num_new, chunks[num_hits:] if hits else chunks, last_hash, extra, _hash_fn)
            else:
                digests = block_hashes.block_hashes
                blocks = pool.take_hashed_blocks(num_new, block_hashes.block_keys[num_hits:],
                                                 digests[num_hits:], extra)
                if digests:
                    last_hash = digests[-1]
            if hits:
                blocks[:0] = hits
                self._num_hit_tokens += num_hits * bs
            self._num_query_tokens += num_tokens
        else:
            blocks = pool.get_new_blocks(num_new)
        arrays = self.arrays
        row = arrays.alloc_row()
        arrays.set_row(row, [b.block_id for b in blocks], num_tokens)
        if num_tail:
            arrays.last_block_tokens[row, :num_tail] = tokens[num_full * bs:]
        seq = SequenceState(seq_id, row, blocks, extra, last_hash)
        seqs[seq_id] = seq  # _add_seq inlined
        self._row_seqs[row] = seq
        if self._freed_ids:
            self._freed_ids.pop(seq_id, None)
        self._epoch += 1
        return num_hits * bs

    # ---------------------------------------------------------------------------- fork/free
    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make ``child_id`` share every block of ``parent_id`` (no copy until a write).

        Raises:
            UnknownSequenceError / FreedSequenceError: the parent is not live.
            SwapError: the parent is swapped out.
            DuplicateSequenceError: ``child_id`` is live.
        """
        parent = self._get_running(parent_id, "fork")
        self._check_not_pending(parent, "fork")
        if child_id in self._seqs:
            raise DuplicateSequenceError(
                f"cannot fork sequence {parent_id!r} into {child_id!r}: {child_id!r} already exists")
        self.gpu_pool.touch(parent.blocks)
        row = self.arrays.alloc_row()
        self.arrays.copy_row(parent.row, row)
        if self.arrays.num_tokens[row] % self.block_size:
            self.arrays.flag_maybe_shared(parent.row)
            self.arrays.flag_maybe_shared(row)
        self._add_seq(SequenceState(child_id, row, list(parent.blocks), parent.extra_keys,
                                    parent.last_hash))

    def free(self, seq_id: Hashable) -> None:
        """Release a sequence's blocks (last block first, so it is evicted first).

        Raises:
            DoubleFreeError: the sequence was already freed.
            UnknownSequenceError: the sequence was never allocated.
        """
        seq = self._seqs.get(seq_id)
        if seq is None:
            if seq_id in self._freed_ids:
                raise DoubleFreeError(f"cannot free sequence {seq_id!r}: it was already freed")
            raise UnknownSequenceError(f"cannot free sequence {seq_id!r}: it was never allocated")
        pool = self.cpu_pool if seq.swapped else self.gpu_pool
        pool.free_blocks(reversed(seq.blocks))
        del self._seqs[seq_id]
        del self._row_seqs[seq.row]
        self.arrays.release_row(seq.row)
        self._freed_ids[seq_id] = None
        if len(self._freed_ids) > self._max_freed_ids:
            self._freed_ids.popitem(last=False)
        self._epoch += 1

    # ---------------------------------------------------------------------------- metadata
    def build_metadata(self, seq_ids: Sequence[Hashable], num_new_tokens: int | np.ndarray = 1,
                       num_computed_tokens: np.ndarray | None = None, *,
                       max_num_blocks: int | None = None,
                       num_padded_tokens: int | None = None) -> BatchMetadata:
        """Block tables and slot mapping of a step (see :func:`build_batch_metadata`).

        Args:
            seq_ids: the step's running sequences, in batch order.
            num_new_tokens: tokens each computes this step (1 for decode).
            num_computed_tokens: tokens each has computed before (default: all but the new ones).
            max_num_blocks: fixed block-table width; default the batch's widest sequence.
            num_padded_tokens: pad the slot mapping to this many tokens with -1.
        """
        rows = self._rows_for(seq_ids, "build metadata for")
        return build_batch_metadata(self.arrays.block_tables, self.arrays.num_tokens, rows,
                                    self.block_size, num_new_tokens, num_computed_tokens,
                                    max_num_blocks=max_num_blocks,
                                    num_padded_tokens=num_padded_tokens,
                                    pad_block_id=self.arrays.pad_block_id)

    def reset_prefix_cache(self) -> bool:
        """Drop every block of the GPU prefix cache (e.g. between benchmark runs), if no
        sequence is allocated or swapped out.

        Returns:
            Whether the cache was reset (False, and nothing changed, while any sequence exists).
        """
        if self._seqs:
            return False
        return self.gpu_pool.reset_prefix_cache()

    def check_invariants(self) -> None:
        """Verify all bookkeeping (slow; for tests). Raises :class:`InvariantViolation`."""
        from pagedattn.alloc.invariants import check_invariants

        check_invariants(self)

    def probe_prefix(self, token_ids: Sequence[int] | np.ndarray, extra_keys: Any = None
                     ) -> tuple[int, int]:
        """What ``allocate`` would find in the prefix cache, without allocating anything.

        Args:
            token_ids: a prompt's token ids.
            extra_keys: its extra keys, as for ``allocate``.

        Returns:
            ``(num_cached_tokens, num_free_cached_blocks)``: the tokens ``allocate`` would report
            cached (at most ``len(token_ids) - 1``), and how many of those blocks sit in the free
            queue (a hit revives them, so they stop counting as free).
        """
        if not self.enable_prefix_caching:
            return 0, 0
        tokens = as_token_array(token_ids, "token_ids")
        max_hits = (len(tokens) - 1) // self.block_size
        hits, _ = self._cached_prefix(tokens[: max(max_hits, 0) * self.block_size].tobytes(),
                                      encode_extra_keys(extra_keys), max_hits)
        return len(hits) * self.block_size, sum(1 for b in hits if b.ref_cnt == 0)

    # ----------------------------------------------------------------------------- helpers
    def _cached_prefix(self, data: bytes, extra: bytes, max_hits: int
                       ) -> tuple[list[KVCacheBlock], bytes]:
        """The longest chain of cached blocks matching ``data`` (token bytes of full blocks),
        at most ``max_hits`` long, and the hash the chain ends on (the root hash if empty)."""
        cached = self.gpu_pool.cached_blocks
        stride = self.block_size * TOKEN_DTYPE.itemsize
        last_hash = root_hash(extra)
        hits: list[KVCacheBlock] = []
        offset = 0
        while len(hits) < max_hits:
            block = cached.get(last_hash + data[offset:offset + stride])
            if block is None or block.extra_keys != extra:
                break
            hits.append(block)
            last_hash = block.block_hash
            offset += stride
        return hits, last_hash

    def _get_seq(self, seq_id: Hashable, action: str) -> SequenceState:
        seq = self._seqs.get(seq_id)
        if seq is None:
            if seq_id in self._freed_ids:
                raise FreedSequenceError(f"cannot {action} sequence {seq_id!r}: it was freed")
            raise UnknownSequenceError(f"cannot {action} sequence {seq_id!r}: it was never allocated")
        return seq

    def _get_running(self, seq_id: Hashable, action: str) -> SequenceState:
        seq = self._get_seq(seq_id, action)
        if seq.swapped:
            raise SwapError(f"cannot {action} sequence {seq_id!r}: it is swapped out to the CPU")
        return seq

    def _rows_for(self, seq_ids: Sequence[Hashable], action: str) -> np.ndarray:
        """Rows of running sequences, cached while the batch and the live set are unchanged."""
        key = seq_ids if isinstance(seq_ids, tuple) else tuple(seq_ids)
        if self._batch_epoch == self._epoch and key == self._batch_key:
            return self._batch_rows
        rows = [self._get_running(seq_id, action).row for seq_id in key]
        if len(set(rows)) != len(rows):
            dup = next(s for i, s in enumerate(key) if s in key[:i])
            raise InvalidArgumentError(f"cannot {action} sequence {dup!r} twice in one batch")
        self._batch_rows = np.array(rows, dtype=np.intp)
        self._batch_key, self._batch_epoch = key, self._epoch
        return self._batch_rows

    def _add_seq(self, seq: SequenceState) -> None:
        self._seqs[seq.seq_id] = seq
        self._row_seqs[seq.row] = seq
        self._freed_ids.pop(seq.seq_id, None)
        self._epoch += 1

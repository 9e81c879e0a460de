"""Appending tokens to running sequences: new blocks, copy-on-write, caching filled blocks.

A sequence gets a new block only when its last block is full. Appending to a last block that is
shared (after a fork) and partly filled first copies it (copy-on-write): the allocator returns
``(src, dst)`` block pairs and the engine's copy op runs them before the step writes KV. A block
that an append fills is hashed and registered in the prefix cache.

:meth:`AppendMixin.append_slots_batch` is the decode-step fast path: numpy over the batch, Python
only for the few sequences that need a new block, a copy-on-write check or a block hash.

With an engine that schedules step ``t + 1`` while the GPU still samples step ``t`` (or runs
several decode steps from one schedule), a decode append can name its token :data:`PENDING_TOKEN`:
the slot is appended as usual, and the block it fills is hashed once
:meth:`AppendMixin.set_last_tokens` gives the real ids, oldest first. A sequence may hold several
pending tokens (always its last ones: a known token cannot follow a pending one); a full block
that still has pending tokens keeps a copy of its token ids until they are all given. Fork and
swap-out wait for every pending token to be given.

These methods are mixed into :class:`~pagedattn.alloc.block_manager.BlockManager`.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from pagedattn.alloc.errors import InvalidArgumentError
from pagedattn.alloc import hashing
from pagedattn.alloc.hashing import as_token_array

if TYPE_CHECKING:
    from pagedattn.alloc.block import KVCacheBlock
    from pagedattn.alloc.sequence_state import SequenceState

__all__ = ["AppendMixin", "PENDING_TOKEN"]

_hash_fn = hashing._hash_fn

#: A token id for :meth:`AppendMixin.append_slots_batch` that is not known yet (see the module doc).
PENDING_TOKEN = -1


class AppendMixin:
    """``append_slots``, ``append_slots_batch`` and their admission checks."""

    def num_blocks_to_append(self, seq_ids: Iterable[Hashable], num_new_tokens: int = 1) -> int:
        """GPU blocks that appending ``num_new_tokens`` to each sequence, in order, takes.

        Counts new blocks plus copy-on-write copies (a shared partly filled last block is
        copied for each appending holder except the last one, when no other sequence holds it).
        """
        bs = self.block_size
        ids = seq_ids if isinstance(seq_ids, (list, tuple)) else list(seq_ids)
        rows = self._rows_for(ids, "append to")
        n = self.arrays.num_tokens[rows]
        k = num_new_tokens
        total = int(((n + k + bs - 1) // bs - (n + bs - 1) // bs).sum())
        if k <= 0 or not self.arrays.num_maybe_shared:
            return total
        # Copy-on-write: only a flagged row can have a shared, partly filled last block.
        holders: dict[int, int] = {}
        for r in rows[self.arrays.maybe_shared[rows]].tolist():
            seq = self._row_seqs[r]
            if self.arrays.num_tokens[r] % bs and seq.blocks[-1].ref_cnt > 1:
                bid = seq.blocks[-1].block_id
                holders[bid] = holders.get(bid, 0) + 1
        for bid, h in holders.items():
            total += h if self.gpu_pool.blocks[bid].ref_cnt > h else h - 1
        return total

    def can_append_slots(self, seq_ids: Iterable[Hashable], num_new_tokens: int = 1) -> bool:
        """Whether appending ``num_new_tokens`` to each of ``seq_ids`` is sure to succeed."""
        return self.num_blocks_to_append(seq_ids, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq_id: Hashable, token_ids: Sequence[int] | np.ndarray | int
                     ) -> list[tuple[int, int]]:
        """Add slots for new tokens of a running sequence (a new block only when the last is full).

        Args:
            seq_id: a running sequence.
            token_ids: the new tokens' ids (one int, or a sequence for several tokens); blocks
                they fill are hashed and registered in the prefix cache.

        Returns:
            Copy-on-write pairs ``[(src_block_id, dst_block_id)]``: the sequence's last block was
            shared and partly filled, so the engine must copy ``src`` to ``dst`` before writing.

        Raises:
            UnknownSequenceError / FreedSequenceError: the sequence is not live.
            SwapError: the sequence is swapped out.
            OutOfBlocksError: not enough free GPU blocks; nothing changes.
        """
        seq = self._get_running(seq_id, "append to")
        if isinstance(token_ids, (int, np.integer)):
            token_ids = [token_ids]
        tokens = as_token_array(token_ids, "token_ids")
        self._check_not_pending(seq, "append to")
        if (tokens == PENDING_TOKEN).any():
            raise InvalidArgumentError("append_slots takes known token ids only; a pending token "
                                       "(PENDING_TOKEN) goes through append_slots_batch")
        k = len(tokens)
        if k == 0:
            return []
        bs, arrays, row = self.block_size, self.arrays, seq.row
        n = int(arrays.num_tokens[row])
        num_new = -(-(n + k) // bs) - -(-n // bs)
        cow = bool(n % bs) and seq.blocks[-1].ref_cnt > 1
        self.gpu_pool.check_available(num_new + cow, f"append {k} token(s) to sequence {seq_id!r}")
        pairs: list[tuple[int, int]] = []
        if cow:
            self._copy_on_write(seq, pairs)
        arrays.clear_maybe_shared(row)
        self._add_blocks(seq, self.gpu_pool.get_new_blocks(num_new))
        lbt, i = arrays.last_block_tokens, 0
        while i < k:
            off = n % bs
            take = min(bs - off, k - i)
            lbt[row, off:off + take] = tokens[i:i + take]
            n += take
            i += take
            if n % bs == 0:
                self._cache_full_block(seq, seq.blocks[n // bs - 1], lbt[row])
        arrays.num_tokens[row] = n
        return pairs

    def append_slots_batch(self, seq_ids: Sequence[Hashable], token_ids: Sequence[int] | np.ndarray
                           ) -> list[tuple[int, int]]:
        """One decode step: append one token to each running sequence, all or nothing.

        Vectorized over the batch: only sequences that need a new block, a copy-on-write check
        or a full-block hash (about 2 in ``block_size``) run Python code.

        Args:
            seq_ids: distinct running sequences.
            token_ids: one new token id per sequence; :data:`PENDING_TOKEN` where it is not known
                yet (the sequence's block it fills is then hashed by :meth:`set_last_tokens`), and
                always for a sequence that already has pending tokens.

        Returns:
            Copy-on-write pairs ``[(src_block_id, dst_block_id)]`` for the engine's copy op.

        Raises:
            As :meth:`append_slots`, plus InvalidArgumentError for repeated ids or a length
            mismatch. On any error nothing changes.
        """
        rows = self._rows_for(seq_ids, "append to")
        tokens = as_token_array(token_ids, "token_ids")
        if tokens.shape[0] != rows.shape[0]:
            raise InvalidArgumentError(f"token_ids has {tokens.shape[0]} tokens for "
                                       f"{rows.shape[0]} sequences; expected one per sequence")
        bs, arrays, pool, row_seqs = self.block_size, self.arrays, self.gpu_pool, self._row_seqs
        pending = tokens == PENDING_TOKEN
        any_pending = bool(pending.any())
        caching = self.enable_prefix_caching
        pos = arrays.num_tokens[rows]
        off = pos % bs
        had_pending = arrays.pending[rows] > 0 if arrays.num_pending else None
        if had_pending is not None and (had_pending & ~pending).any():
            seq = row_seqs[int(rows[had_pending & ~pending][0])]
            raise InvalidArgumentError(f"cannot append a known token to sequence {seq.seq_id!r}: its last "
                                       f"token is pending (append PENDING_TOKEN, or call set_last_tokens first)")
        flagged = arrays.num_maybe_shared > 0
        maybe_shared = arrays.maybe_shared[rows] if flagged else None
        # Python runs only for the slow rows: a new block (offset 0), a block this token fills
        # (offset bs - 1, to hash it) or a last block that may be shared (copy-on-write check).
        slow_mask = off == 0
        if caching:
            slow_mask |= off == bs - 1
        if flagged:
            slow_mask |= maybe_shared
        slow = np.flatnonzero(slow_mask)
        slow_rows, slow_offs = rows[slow].tolist(), off[slow].tolist()
        slow_pending = pending[slow].tolist() if any_pending else None
        slow_shared = maybe_shared[slow].tolist() if flagged else [False] * len(slow_rows)
        num_new = slow_offs.count(0)
        # Copies needed: a block with ref_cnt r appended to by h sequences of the batch needs h
        # copies if r > h, else h - 1 (the last to append is its only holder and writes in place).
        num_copies = 0
        if flagged and any(slow_shared):
            holders: dict[int, int] = {}
            for r, o, m in zip(slow_rows, slow_offs, slow_shared):
                if m and o:
                    bid = row_seqs[r].blocks[-1].block_id
                    holders[bid] = holders.get(bid, 0) + 1
            for bid, h in holders.items():
                num_copies += h if pool.blocks[bid].ref_cnt > h else h - 1
        if num_new + num_copies > pool.num_free_blocks:
            pool.check_available(num_new + num_copies,
                                 f"append a token to each of {rows.shape[0]} sequences")
        # -- mutation starts here: nothing below can fail.
        # A full last block with pending tokens is hashed later: keep its token ids before the
        # new block's tokens take the row.
        kept: dict[int, np.ndarray] = {}
        if caching and had_pending is not None:
            for r in rows[had_pending & (off == 0)].tolist():
                kept[r] = arrays.last_block_tokens[r].copy()
        arrays.last_block_tokens[rows, off] = tokens
        arrays.num_tokens[rows] = pos + 1
        # Blocks are handed out in batch order and claimed one by one, so block ids, pairs and
        # cache registrations are exactly those of append_slots called for each in turn.
        free_blocks = iter(pool.take_free_blocks(num_new + num_copies))
        pairs: list[tuple[int, int]] = []
        new_rows, new_cols, new_ids = [], [], []
        lbt, claim, width = arrays.last_block_tokens, pool.claim_block, arrays.width
        if any_pending:
            arrays.pending[rows[pending]] += 1
            arrays.num_pending += int(pending.sum())
        for j, (r, o, m) in enumerate(zip(slow_rows, slow_offs, slow_shared)):
            seq = row_seqs[r]
            if o == 0:
                if kept and r in kept:
                    if seq.unhashed is None:
                        seq.unhashed = []
                    seq.unhashed.append((seq.blocks[-1], kept[r]))
                block = next(free_blocks)
                claim(block)
                new_rows.append(r)
                new_cols.append(len(seq.blocks))
                new_ids.append(block.block_id)
                seq.blocks.append(block)
                if len(seq.blocks) > width:
                    arrays.ensure_width(len(seq.blocks))
                    width = arrays.width
            elif m:
                if seq.blocks[-1].ref_cnt > 1:
                    dst = next(free_blocks)
                    claim(dst)
                    self._copy_on_write(seq, pairs, dst)
                arrays.clear_maybe_shared(r)
            if o == bs - 1 and caching and not (any_pending and slow_pending[j]):
                self._cache_full_block(seq, seq.blocks[-1], lbt[r])
        if new_rows:  # (flags are only ever set on partly filled blocks: none to clear here)
            arrays.block_tables[new_rows, new_cols] = new_ids
        return pairs

    def set_last_tokens(self, seq_ids: Sequence[Hashable], token_ids: Sequence[int] | np.ndarray) -> None:
        """Give the ids of tokens appended as :data:`PENDING_TOKEN`: each sequence's oldest
        pending token, one per sequence (with one pending token, its last token).

        A block whose tokens are then all known is hashed and registered in the prefix cache (its
        chain continues from it); blocks are hashed in chain order, since tokens are given oldest
        first.

        Args:
            seq_ids: distinct live sequences with at least one pending token.
            token_ids: one known token id per sequence.

        Raises:
            UnknownSequenceError / FreedSequenceError: a sequence is not live.
            InvalidArgumentError: repeated ids, a length mismatch, a sequence with no pending
                token, or a pending token id given. On any error nothing changes.
        """
        rows = self._rows_for(seq_ids, "set the last token of")
        tokens = as_token_array(token_ids, "token_ids")
        if tokens.shape[0] != rows.shape[0]:
            raise InvalidArgumentError(f"token_ids has {tokens.shape[0]} tokens for "
                                       f"{rows.shape[0]} sequences; expected one per sequence")
        arrays, bs = self.arrays, self.block_size
        count = arrays.pending[rows]
        if (count == 0).any():
            seq = self._row_seqs[int(rows[count == 0][0])]
            raise InvalidArgumentError(f"sequence {seq.seq_id!r} has no pending token to set")
        if (tokens == PENDING_TOKEN).any():
            raise InvalidArgumentError("token_ids must be known ids, not PENDING_TOKEN")
        n = arrays.num_tokens[rows]
        oldest = n - count                          # position of each sequence's oldest pending token
        in_last = oldest >= (n - 1) // bs * bs      # it lies in the sequence's last block
        off = oldest % bs
        if in_last.all():
            arrays.last_block_tokens[rows, off] = tokens
        else:
            arrays.last_block_tokens[rows[in_last], off[in_last]] = tokens[in_last]
        arrays.pending[rows] = count - 1
        arrays.num_pending -= rows.shape[0]
        if not self.enable_prefix_caching:
            return
        for i in np.flatnonzero(~in_last | (off == bs - 1)).tolist():
            seq = self._row_seqs[int(rows[i])]
            if in_last[i]:  # the last block is full and now known
                self._cache_full_block(seq, seq.blocks[-1], arrays.last_block_tokens[seq.row])
                continue
            block, kept = seq.unhashed[0]  # the oldest pending token is in the oldest kept block
            kept[off[i]] = tokens[i]
            if off[i] == bs - 1:
                del seq.unhashed[0]
                if not seq.unhashed:
                    seq.unhashed = None
                self._cache_full_block(seq, block, kept)

    def _check_not_pending(self, seq: SequenceState, action: str) -> None:
        if self.arrays.pending[seq.row]:
            raise InvalidArgumentError(f"cannot {action} sequence {seq.seq_id!r}: it has pending "
                                       f"tokens (call set_last_tokens first)")

    def _add_blocks(self, seq: SequenceState, blocks: list[KVCacheBlock]) -> None:
        if blocks:
            start = len(seq.blocks)
            seq.blocks.extend(blocks)
            self.arrays.ensure_width(len(seq.blocks))
            self.arrays.block_tables[seq.row, start:len(seq.blocks)] = [b.block_id for b in blocks]

    def _copy_on_write(self, seq: SequenceState, pairs: list[tuple[int, int]],
                       dst: KVCacheBlock | None = None) -> None:
        """Replace the shared last block by a private copy ``dst`` (default: a new block)."""
        src = seq.blocks[-1]
        if dst is None:
            dst = self.gpu_pool.get_new_blocks(1)[0]
        self.gpu_pool.free_blocks((src,))  # shared, so it stays in use
        seq.blocks[-1] = dst
        self.arrays.block_tables[seq.row, len(seq.blocks) - 1] = dst.block_id
        pairs.append((src.block_id, dst.block_id))

    def _cache_full_block(self, seq: SequenceState, block: KVCacheBlock, tokens: np.ndarray) -> None:
        """Hash a block that just became full and register it; advance the sequence's chain."""
        if not self.enable_prefix_caching:
            return
        key = seq.last_hash + tokens.tobytes()
        existing = self.gpu_pool.cached_blocks.get(key)
        if existing is not None and existing.extra_keys == seq.extra_keys:
            seq.last_hash = existing.block_hash
            return
        seq.last_hash = _hash_fn(key).digest()
        self.gpu_pool.cache_block(block, key, seq.last_hash, seq.extra_keys)

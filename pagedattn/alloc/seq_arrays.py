"""Per-sequence state kept in numpy rows, so a decode step is a few vectorized operations.

Each live sequence owns one row. The rows persist across steps and are written only where a
sequence changes (a token appended, a block added or replaced), never rebuilt from Python lists.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

import numpy as np

from pagedattn.alloc.hashing import TOKEN_DTYPE

__all__ = ["SequenceArrays"]


class SequenceArrays:
    """Row storage of per-sequence numbers, grown by doubling.

    Attributes:
        num_tokens: int64 ``[capacity]``, tokens held by the sequence in the row.
        block_tables: int32 ``[capacity, width]``, the GPU block ids of each sequence, padded
            with ``pad_block_id`` past its last block (zeroed while the sequence is swapped out).
        last_block_tokens: ``[capacity, block_size]`` token ids of each sequence's last
            (partly filled) block, needed to hash it once it is full.
        maybe_shared: bool ``[capacity]``; ``False`` guarantees the sequence's last block is not
            shared, so appending to it needs no copy-on-write check. Set (``flag_maybe_shared``)
            only for a partly filled last block, on fork or swap-in; cleared by the next append.
        num_maybe_shared: number of set ``maybe_shared`` flags (0 lets a decode step skip them).
        pending: int32 ``[capacity]``, how many of the sequence's last tokens were appended as
            :data:`~pagedattn.alloc.append.PENDING_TOKEN` (their ids not known yet).
        num_pending: the sum of ``pending`` (0 lets a step skip the checks).

    Args:
        block_size: tokens per block.
        pad_block_id: value of block-table entries past a sequence's last block.
        capacity: initial number of rows.
        width: initial number of block-table columns.
    """

    def __init__(self, block_size: int, pad_block_id: int = 0, capacity: int = 64,
                 width: int = 16) -> None:
        self.block_size = block_size
        self.pad_block_id = pad_block_id
        self.num_tokens = np.zeros(capacity, np.int64)
        self.block_tables = np.full((capacity, width), pad_block_id, np.int32)
        self.last_block_tokens = np.zeros((capacity, block_size), TOKEN_DTYPE)
        self.maybe_shared = np.zeros(capacity, bool)
        self.num_maybe_shared = 0
        self.pending = np.zeros(capacity, np.int32)
        self.num_pending = 0
        self._free_rows = list(range(capacity - 1, -1, -1))
        self._tables_changed()

    def _tables_changed(self) -> None:
        """Refresh the raw byte view of ``block_tables`` (after it is replaced by a bigger one)."""
        # set_row writes a row's block ids through this view: one memcpy of packed ids, where
        # numpy would convert a list of Python ints item by item.
        self._table_bytes = memoryview(self.block_tables).cast("B")
        self._row_bytes = self.block_tables.shape[1] * 4

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_table_bytes"]  # a memoryview cannot be copied or pickled
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tables_changed()

    @property
    def capacity(self) -> int:
        return self.num_tokens.shape[0]

    @property
    def width(self) -> int:
        return self.block_tables.shape[1]

    def alloc_row(self) -> int:
        """A zeroed row for a new sequence."""
        if not self._free_rows:
            self._grow_rows()
        return self._free_rows.pop()

    def release_row(self, row: int) -> None:
        """Return a row; it is reset so the next owner starts clean."""
        self.num_tokens[row] = 0
        self.block_tables[row] = self.pad_block_id
        self.clear_maybe_shared(row)
        if self.pending[row]:
            self.num_pending -= int(self.pending[row])
            self.pending[row] = 0
        self._free_rows.append(row)

    def flag_maybe_shared(self, row: int) -> None:
        """Mark the row's (partly filled) last block as possibly shared."""
        if not self.maybe_shared[row]:
            self.maybe_shared[row] = True
            self.num_maybe_shared += 1

    def clear_maybe_shared(self, row: int) -> None:
        """The row's last block is known private (or the row is going away)."""
        if self.maybe_shared[row]:
            self.maybe_shared[row] = False
            self.num_maybe_shared -= 1

    def ensure_width(self, num_blocks: int) -> None:
        """Make room for ``num_blocks`` block-table columns."""
        width = self.width
        if num_blocks <= width:
            return
        while width < num_blocks:
            width *= 2
        grown = np.full((self.capacity, width), self.pad_block_id, np.int32)
        grown[:, : self.width] = self.block_tables
        self.block_tables = grown
        self._tables_changed()

    def set_row(self, row: int, block_ids: list[int], num_tokens: int) -> None:
        """Write a sequence's block table and token count into a row that is all padding
        (a fresh row, or one cleared by a swap-out)."""
        n = len(block_ids)
        if n > self.block_tables.shape[1]:
            self.ensure_width(n)
        start = row * self._row_bytes
        pack = _packers.get(n) or _packer(n)
        self._table_bytes[start:start + 4 * n] = pack(*block_ids)
        self.num_tokens[row] = num_tokens

    def copy_row(self, src: int, dst: int) -> None:
        """Make row ``dst`` a copy of row ``src`` (for fork)."""
        self.num_tokens[dst] = self.num_tokens[src]
        self.block_tables[dst] = self.block_tables[src]
        self.last_block_tokens[dst] = self.last_block_tokens[src]

    def _grow_rows(self) -> None:
        old = self.capacity
        new = max(2 * old, 1)
        self.num_tokens = np.concatenate([self.num_tokens, np.zeros(new - old, np.int64)])
        self.block_tables = np.concatenate(
            [self.block_tables, np.full((new - old, self.width), self.pad_block_id, np.int32)])
        self.last_block_tokens = np.concatenate(
            [self.last_block_tokens, np.zeros((new - old, self.block_size), TOKEN_DTYPE)])
        self.maybe_shared = np.concatenate([self.maybe_shared, np.zeros(new - old, bool)])
        self.pending = np.concatenate([self.pending, np.zeros(new - old, np.int32)])
        self._free_rows.extend(range(new - 1, old - 1, -1))
        self._tables_changed()


def _packer(n: int) -> Callable[..., bytes]:
    """``struct`` packing of ``n`` native int32 (the layout of a ``block_tables`` row)."""
    if len(_packers) >= 4096:  # a memo only
        _packers.clear()
    pack = _packers[n] = struct.Struct(f"={n}i").pack
    return pack


_packers: dict[int, Callable[..., bytes]] = {}

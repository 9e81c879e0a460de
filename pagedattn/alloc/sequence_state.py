"""The allocator's bookkeeping of one live sequence (its numbers live in ``SequenceArrays`` rows)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from pagedattn.alloc.block import KVCacheBlock

__all__ = ["SequenceState"]


@dataclass(slots=True, eq=False)
class SequenceState:
    """Bookkeeping of one live sequence (the token count lives in ``SequenceArrays``).

    Attributes:
        seq_id: the engine's id of the sequence.
        row: its row in the manager's :class:`SequenceArrays`.
        blocks: its block table, first block first (CPU blocks while swapped out).
        extra_keys: its encoded extra keys (salt, adapter id), hashed into every block.
        last_hash: hash of its last full block (the root hash while it has none).
        swapped: whether its blocks are in the CPU pool.
        unhashed: full blocks not hashed yet because some of their tokens are pending, oldest
            first, each with a copy of its token ids (pending ones filled in by
            ``set_last_tokens``); ``None`` when there are none.
    """

    seq_id: Hashable
    row: int
    blocks: list[KVCacheBlock]
    extra_keys: bytes
    last_hash: bytes
    swapped: bool = False
    unhashed: list[tuple[KVCacheBlock, np.ndarray]] | None = None

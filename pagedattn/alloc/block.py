"""A physical KV-cache block and the queue of free blocks.

The free queue is an intrusive doubly linked list threaded through the blocks themselves, so
taking a block out of the middle (a prefix-cache hit reviving a free cached block) is O(1), and
the order of the list is the eviction order: blocks are appended at the tail when their last
reference goes away and new blocks are taken from the head, so the cached free block evicted
first is the one freed longest ago (least recently used).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from pagedattn.alloc.errors import OutOfBlocksError

__all__ = ["KVCacheBlock", "FreeKVCacheBlockQueue"]


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    """One physical block of ``block_size`` token slots.

    Attributes:
        block_id: index of the block in its pool (and in the KV-cache tensor).
        ref_cnt: number of block tables holding the block; 0 means it is in the free queue.
        block_hash: BLAKE2b digest identifying the block's content and its whole prefix, set
            while the block is registered in the prefix cache, else ``None``.
        block_key: the exact bytes that were hashed (parent hash + token ids); the prefix-cache
            map is keyed by it, so a hit compares content byte for byte. ``None`` when uncached.
        extra_keys: the encoded extra keys (salt, adapter id) the block was hashed under, or
            ``None`` when uncached; compared on every hit so different salts never share.
        prev_free_block: previous block in the free queue (``None`` when not in the queue).
        next_free_block: next block in the free queue (``None`` when not in the queue).
    """

    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None
    block_key: bytes | None = None
    extra_keys: bytes | None = None
    prev_free_block: KVCacheBlock | None = None
    next_free_block: KVCacheBlock | None = None

    @property
    def is_cached(self) -> bool:
        """Whether the block is registered in the prefix cache."""
        return self.block_key is not None

    def reset_hash(self) -> None:
        """Forget the block's prefix-cache identity (on eviction)."""
        self.block_hash = None
        self.block_key = None
        self.extra_keys = None

    def __repr__(self) -> str:
        digest = self.block_hash.hex()[:12] if self.block_hash is not None else None
        return f"KVCacheBlock(block_id={self.block_id}, ref_cnt={self.ref_cnt}, block_hash={digest})"


class FreeKVCacheBlockQueue:
    """Free blocks in eviction order: a doubly linked list with O(1) removal from the middle.

    Two sentinel blocks (``block_id == -1``) bracket the list so that no operation needs a
    special case for the ends. A block is in the queue exactly when its ``prev_free_block`` is
    set.

    Args:
        blocks: the blocks that start free, head (first to be taken) first.
        device: name of the pool's device, used in error messages.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock], device: str = "gpu") -> None:
        self.device = device
        self._head = KVCacheBlock(-1)
        self._tail = KVCacheBlock(-1)
        self._head.next_free_block = self._tail
        self._tail.prev_free_block = self._head
        self.num_free_blocks = 0
        self.append_n(list(blocks))

    def popleft(self) -> KVCacheBlock:
        """Take the block at the head (the least recently freed one).

        Raises:
            OutOfBlocksError: if the queue is empty.
        """
        return self.popleft_n(1)[0]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        """Take ``n`` blocks from the head, in queue order.

        Raises:
            OutOfBlocksError: if fewer than ``n`` blocks are free (the queue is unchanged).
        """
        if n > self.num_free_blocks:
            raise OutOfBlocksError(
                f"{self.device} free queue has {self.num_free_blocks} blocks, {n} were requested",
                device=self.device, num_required=n, num_free=self.num_free_blocks)
        out: list[KVCacheBlock] = []
        if n <= 0:
            return out
        append = out.append
        block = self._head.next_free_block
        for _ in range(n):
            append(block)
            nxt = block.next_free_block
            block.prev_free_block = block.next_free_block = None
            block = nxt
        self._head.next_free_block = block
        block.prev_free_block = self._head
        self.num_free_blocks -= n
        return out

    def remove(self, block: KVCacheBlock) -> None:
        """Take ``block`` out of the queue wherever it is (O(1))."""
        prev, nxt = block.prev_free_block, block.next_free_block
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free_block = nxt
        nxt.prev_free_block = prev
        block.prev_free_block = block.next_free_block = None
        self.num_free_blocks -= 1

    def append(self, block: KVCacheBlock) -> None:
        """Put ``block`` at the tail (it will be evicted last)."""
        self.append_n((block,))

    def append_n(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Put ``blocks`` at the tail in the given order."""
        tail = self._tail
        last = tail.prev_free_block
        n = 0
        for block in blocks:
            last.next_free_block = block
            block.prev_free_block = last
            last = block
            n += 1
        last.next_free_block = tail
        tail.prev_free_block = last
        self.num_free_blocks += n

    def __iter__(self) -> Iterator[KVCacheBlock]:
        """Iterate from head to tail (eviction order); for tests and debugging."""
        block = self._head.next_free_block
        tail = self._tail
        while block is not tail:
            yield block
            block = block.next_free_block

    def get_all_free_blocks(self) -> list[KVCacheBlock]:
        """All free blocks, head first."""
        return list(self)

    def __len__(self) -> int:
        return self.num_free_blocks

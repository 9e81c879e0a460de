"""A pool of physical KV-cache blocks with a prefix cache.

The pool owns the blocks of one device, the free queue (eviction order) and the map from a
block's hash key to the cached block. It knows nothing about sequences: the
:class:`~pagedattn.alloc.block_manager.BlockManager` builds block tables on top of it.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import repeat

from pagedattn.alloc.block import FreeKVCacheBlockQueue, KVCacheBlock
from pagedattn.alloc.cached_take import CachedTakeMixin
from pagedattn.alloc.errors import DoubleFreeError, OutOfBlocksError

__all__ = ["BlockPool"]


class BlockPool(CachedTakeMixin):
    """Blocks of one device: allocation, reference counting, free queue and prefix cache.

    A block is *used* while ``ref_cnt > 0`` and *free* (in the free queue) when ``ref_cnt == 0``.
    A free block may still be *cached*: it keeps its hash and can be revived by a prefix hit
    until it reaches the head of the free queue and is taken for new content (an eviction).

    Args:
        num_blocks: number of blocks in the pool.
        enable_caching: keep full blocks in the prefix cache.
        device: ``"gpu"`` or ``"cpu"``, for error messages.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True, device: str = "gpu") -> None:
        if not isinstance(num_blocks, int) or num_blocks < 0:
            raise ValueError(f"num_blocks must be a non-negative int, got {num_blocks!r}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.device = device
        self.blocks: list[KVCacheBlock] = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeKVCacheBlockQueue(self.blocks, device)
        # block_key (parent hash + token bytes) -> the block cached under it.
        self.cached_blocks: dict[bytes, KVCacheBlock] = {}
        self.num_evictions = 0

    # ----------------------------------------------------------------------------- figures
    @property
    def num_free_blocks(self) -> int:
        """Blocks in the free queue (cached free blocks included: they are evictable)."""
        return self.free_block_queue.num_free_blocks

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by at least one block table."""
        return self.num_blocks - self.free_block_queue.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache (used or free)."""
        return len(self.cached_blocks)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    # ------------------------------------------------------------------------- operations
    def check_available(self, num_blocks: int, what: str) -> None:
        """Raise :class:`OutOfBlocksError` unless ``num_blocks`` blocks can be taken.

        Args:
            num_blocks: blocks the caller is about to take from the free queue.
            what: the request, for the message (e.g. ``"allocate sequence 3 (40 tokens)"``).
        """
        num_free = self.free_block_queue.num_free_blocks
        if num_blocks > num_free:
            raise OutOfBlocksError(
                f"cannot {what}: needs {num_blocks} free {self.device} blocks, "
                f"{num_free} of {self.num_blocks} are free",
                device=self.device, num_required=num_blocks, num_free=num_free)

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take ``num_blocks`` blocks from the head of the free queue, with ``ref_cnt == 1``.

        A cached block taken this way is evicted from the prefix cache (LRU order).

        Raises:
            OutOfBlocksError: if fewer blocks are free; nothing is taken.
        """
        queue = self.free_block_queue
        if num_blocks > queue.num_free_blocks or num_blocks <= 0:
            return queue.popleft_n(num_blocks)  # raises, or [] for 0
        # popleft_n, evict() and the ref count inlined into one pass: this loop runs for every
        # allocated block.
        blocks: list[KVCacheBlock] = []
        append = blocks.append
        head = queue._head
        block = head.next_free_block
        if self.cached_blocks:
            uncache = self.cached_blocks.__delitem__
            num_evicted = 0
            for _ in repeat(None, num_blocks):
                append(block)
                if block.block_key is not None:
                    uncache(block.block_key)
                    block.block_hash = block.block_key = block.extra_keys = None
                    num_evicted += 1
                block.ref_cnt = 1
                nxt = block.next_free_block
                block.prev_free_block = block.next_free_block = None
                block = nxt
            self.num_evictions += num_evicted
        else:
            for _ in repeat(None, num_blocks):
                append(block)
                block.ref_cnt = 1
                nxt = block.next_free_block
                block.prev_free_block = block.next_free_block = None
                block = nxt
        head.next_free_block = block
        block.prev_free_block = head
        queue.num_free_blocks -= num_blocks
        return blocks

    def take_free_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Take blocks off the free queue's head *without* claiming them yet.

        For a batch that hands blocks out one by one: each block must then get
        ``claim_block`` before anything else uses the pool, which makes the batch behave
        exactly like ``get_new_blocks(1)`` calls made in turn (a block still waiting for its
        claim keeps its cache entry, as it would have in the queue).
        """
        return self.free_block_queue.popleft_n(num_blocks)

    def claim_block(self, block: KVCacheBlock) -> None:
        """Finish taking a block from ``take_free_blocks``: evict it if cached, ``ref_cnt = 1``."""
        if block.block_key is not None:
            self.evict(block)
        block.ref_cnt = 1

    def evict(self, block: KVCacheBlock) -> None:
        """Drop a free block's prefix-cache entry (it is about to hold new content)."""
        del self.cached_blocks[block.block_key]
        block.block_hash = block.block_key = block.extra_keys = None
        self.num_evictions += 1

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block if none is in use (returns whether it did; not counted as
        evictions, the free queue keeps its order)."""
        if self.num_used_blocks:
            return False
        for block in self.cached_blocks.values():
            block.block_hash = block.block_key = block.extra_keys = None
        self.cached_blocks.clear()
        return True

    def get_cached_block(self, block_key: bytes, extra_keys: bytes) -> KVCacheBlock | None:
        """The cached block with exactly this key and these extra keys, else ``None``."""
        block = self.cached_blocks.get(block_key)
        if block is not None and block.extra_keys == extra_keys:
            return block
        return None

    def cache_block(self, block: KVCacheBlock, block_key: bytes, block_hash: bytes,
                    extra_keys: bytes) -> bool:
        """Register a full block under its key, unless another block already holds that key.

        Returns:
            Whether the block was registered.
        """
        if not self.enable_caching or block_key in self.cached_blocks:
            return False
        block.block_key = block_key
        block.block_hash = block_hash
        block.extra_keys = extra_keys
        self.cached_blocks[block_key] = block
        return True

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Add a reference to each block, taking free ones out of the free queue (O(1) each)."""
        remove = self.free_block_queue.remove
        for block in blocks:
            if block.ref_cnt == 0:
                remove(block)
            block.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference to each block; blocks reaching zero join the free queue's tail.

        Args:
            ordered_blocks: the blocks in the order they should become evictable (pass a
                sequence's table reversed so its last blocks are evicted first).

        Raises:
            DoubleFreeError: if a block (counting repeats) has no reference left to drop;
                nothing is freed.
        """
        ordered_blocks = list(ordered_blocks)
        drops: dict[int, int] = {}
        for block in ordered_blocks:
            n = drops.get(block.block_id, 0) + 1
            if n > block.ref_cnt:
                raise DoubleFreeError(
                    f"{self.device} block {block.block_id} freed {n} time(s) but has "
                    f"ref_cnt {block.ref_cnt}")
            drops[block.block_id] = n
        now_free = []
        for block in ordered_blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                now_free.append(block)
        self.free_block_queue.append_n(now_free)
        if not self.enable_caching:
            for block in now_free:
                block.block_hash = block.block_key = block.extra_keys = None

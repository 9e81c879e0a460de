"""A pool of physical KV-cache blocks with a prefix cache.

The pool owns the blocks of one device, the free queue (eviction order) and the map from a
block's hash key to the cached block. It knows nothing about sequences: the
:class:`~pagedattn.alloc.block_manager.BlockManager` builds block tables on top of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from itertools import repeat
from typing import Any

from pagedattn.alloc.block import FreeKVCacheBlockQueue, KVCacheBlock
from pagedattn.alloc.errors import DoubleFreeError, OutOfBlocksError
from pagedattn.alloc.hashing import _hash_fn, _new_blake2b

__all__ = ["BlockPool"]


class BlockPool:
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

    def get_new_cached_blocks(self, num_blocks: int, chunks: Sequence[bytes], parent_hash: bytes,
                              extra_keys: bytes, hash_fn: Callable[..., Any] = _hash_fn
                              ) -> tuple[list[KVCacheBlock], bytes]:
        """``get_new_blocks(num_blocks)``, registering the first ``len(chunks)`` blocks in the
        prefix cache along the hash chain, in one pass over the blocks.

        Block ``i`` gets ``key_i = hash_{i-1} + chunks[i]`` (``hash_{-1} = parent_hash``) and
        ``hash_i = hash_fn(key_i)``. A key already held by another block keeps that block (its
        hash continues the chain), except that a block this call takes from the free queue
        loses its entry first: the result is exactly ``get_new_blocks`` followed by
        registering each key in turn.

        Args:
            num_blocks: blocks to take (``len(chunks)`` or one more, a partly filled tail).
            chunks: token bytes of the full blocks, first block first.
            parent_hash: the hash the chain starts from.
            extra_keys: encoded extra keys stored on each registered block.
            hash_fn: the block hash constructor (default :func:`hashlib.blake2b`).

        Returns:
            ``(blocks, last_hash)``: the blocks taken, in queue order, and the chain's last hash.

        Raises:
            OutOfBlocksError: if fewer blocks are free; nothing is taken.
        """
        num_full = len(chunks)
        self._check_take(num_blocks, num_full, "chunks")
        cached = self.cached_blocks
        # Copying an empty state is cheaper than calling the constructor.
        new_hasher = _new_blake2b if hash_fn is _hash_fn else hash_fn().copy
        block = self.free_block_queue._head.next_free_block
        blocks: list[KVCacheBlock] = []
        append = blocks.append
        setdefault = cached.setdefault
        # Evictions are counted from the map's size afterwards: each one deletes a key, each
        # registration inserts one (num_kept counts the keys found held by another block).
        size_before, num_kept = len(cached), 0
        for chunk in chunks:
            # Take the block (popleft_n and evict() inlined), hash its key and register it.
            append(block)
            old_key = block.block_key
            if old_key is not None:
                del cached[old_key]
            key = parent_hash + chunk
            h = new_hasher()
            h.update(key)
            parent_hash = h.digest()
            if setdefault(key, block) is block:
                block.block_key = key
                block.block_hash = parent_hash
                block.extra_keys = extra_keys
            else:
                if old_key is not None:
                    block.block_hash = block.block_key = block.extra_keys = None
                num_kept += not self._register_held_key(block, key, parent_hash,
                                                        num_blocks - len(blocks), extra_keys)
            block.ref_cnt = 1
            block.prev_free_block = None
            nxt = block.next_free_block
            block.next_free_block = None
            block = nxt
        self._finish_take(blocks, block, num_blocks - num_full,
                          size_before + num_full - num_kept - len(cached))
        return blocks, parent_hash

    def take_hashed_blocks(self, num_blocks: int, block_keys: Sequence[bytes],
                           block_hashes: Sequence[bytes], extra_keys: bytes
                           ) -> list[KVCacheBlock]:
        """``get_new_cached_blocks`` with the chain already hashed: take ``num_blocks`` blocks
        and register the first ``len(block_keys)`` under the given keys, in one pass.

        The result is exactly that of ``get_new_cached_blocks`` for the chunks these keys were
        made of (same blocks, same map, same evictions); only the hashing is skipped.

        Args:
            num_blocks: blocks to take (``len(block_keys)`` or one more, a partly filled tail).
            block_keys: ``key_i`` of the blocks to register, first block first.
            block_hashes: ``hash_i``, the digest of each ``key_i``.
            extra_keys: encoded extra keys stored on each registered block.

        Returns:
            The blocks taken, in queue order.

        Raises:
            OutOfBlocksError: if fewer blocks are free; nothing is taken.
        """
        num_full = len(block_keys)
        self._check_take(num_blocks, num_full, "keys")
        cached = self.cached_blocks
        block = self.free_block_queue._head.next_free_block
        blocks: list[KVCacheBlock] = []
        append = blocks.append
        setdefault = cached.setdefault
        # Evictions are counted from the map's size afterwards: each one deletes a key, each
        # registration inserts one (num_kept counts the keys found held by another block).
        size_before, num_kept = len(cached), 0
        # get_new_cached_blocks' loop without the hashing. Not shared: calling hash_chain then this
        # from get_new_cached_blocks cost its allocate 7% more instructions (cachegrind).
        for key, block_hash in zip(block_keys, block_hashes):
            append(block)
            old_key = block.block_key
            if old_key is not None:
                del cached[old_key]
            if setdefault(key, block) is block:
                block.block_key = key
                block.block_hash = block_hash
                block.extra_keys = extra_keys
            else:
                if old_key is not None:
                    block.block_hash = block.block_key = block.extra_keys = None
                num_kept += not self._register_held_key(block, key, block_hash,
                                                        num_blocks - len(blocks), extra_keys)
            block.ref_cnt = 1
            block.prev_free_block = None
            nxt = block.next_free_block
            block.next_free_block = None
            block = nxt
        self._finish_take(blocks, block, num_blocks - num_full,
                          size_before + num_full - num_kept - len(cached))
        return blocks

    def _check_take(self, num_blocks: int, num_full: int, what: str) -> None:
        """Raise unless ``num_blocks`` blocks are free and hold the ``num_full`` full ones
        (``what``: the full blocks' name in the message)."""
        if num_blocks < num_full:
            raise ValueError(f"{num_full} {what} for {num_blocks} blocks")
        if num_blocks > self.free_block_queue.num_free_blocks:
            self.free_block_queue.popleft_n(num_blocks)  # raises OutOfBlocksError

    def _finish_take(self, blocks: list[KVCacheBlock], block: KVCacheBlock, num_tail: int,
                     num_evicted: int) -> None:
        """End a multi-block take whose full blocks are in ``blocks``: take ``num_tail`` more
        uncached blocks from ``block`` on (evicting cached ones), relink the queue's head and
        count the evictions.

        Args:
            blocks: the blocks taken so far; the tail blocks are appended to it.
            block: the first block not taken yet.
            num_tail: blocks still to take (0 or 1: a partly filled last block).
            num_evicted: evictions made by the blocks taken so far.
        """
        queue = self.free_block_queue
        if num_tail:
            cached = self.cached_blocks
            for _ in repeat(None, num_tail):
                blocks.append(block)
                if block.block_key is not None:
                    del cached[block.block_key]
                    block.block_hash = block.block_key = block.extra_keys = None
                    num_evicted += 1
                block.ref_cnt = 1
                block.prev_free_block = None
                nxt = block.next_free_block
                block.next_free_block = None
                block = nxt
        head = queue._head
        head.next_free_block = block
        block.prev_free_block = head
        queue.num_free_blocks -= len(blocks)
        self.num_evictions += num_evicted

    def _register_held_key(self, block: KVCacheBlock, key: bytes, block_hash: bytes,
                           num_left: int, extra_keys: bytes) -> bool:
        """The take loops' rare case: ``key`` is held by another block.

        If the holder is a free block among the ``num_left`` blocks this call is still to take
        (from ``block.next_free_block`` on), it would have been evicted before any
        registration: evict it now (deleting its key) and register ``block`` under the key.

        Returns:
            Whether ``block`` was registered.
        """
        holder = self.cached_blocks[key]
        if holder.ref_cnt == 0:
            nxt = block.next_free_block
            for _ in range(num_left):
                if nxt is holder:
                    holder.block_hash = holder.block_key = holder.extra_keys = None
                    del self.cached_blocks[key]
                    self.cached_blocks[key] = block
                    block.block_key = key
                    block.block_hash = block_hash
                    block.extra_keys = extra_keys
                    return True
                nxt = nxt.next_free_block
        return False

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

"""Taking blocks for a prompt and registering its full blocks in the prefix cache, in one pass.

Mixed into :class:`~pagedattn.alloc.block_pool.BlockPool`, whose free queue, prefix-cache map and
eviction count it uses: the take loops run for every block a prompt allocates, so each is written out
whole (the free queue's ``popleft_n``, ``evict`` and the registration inlined).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat
from typing import Any

from pagedattn.alloc.block import KVCacheBlock
from pagedattn.alloc.hashing import _EMPTY_BLAKE2B, _hash_fn

__all__ = ["CachedTakeMixin"]


class CachedTakeMixin:
    """``get_new_cached_blocks`` (hashing the chain) and ``take_hashed_blocks`` (hashed beforehand)."""

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
        empty = _EMPTY_BLAKE2B if hash_fn is _hash_fn else hash_fn()
        block = self.free_block_queue._head.next_free_block
        blocks: list[KVCacheBlock] = []
        setdefault = cached.setdefault
        # Evictions are counted from the map's size afterwards: each one deletes a key, each
        # registration inserts one (num_kept counts the keys found held by another block).
        size_before, num_kept = len(cached), 0
        for chunk in chunks:
            # Take the block (popleft_n and evict() inlined), hash its key and register it.
            blocks.append(block)
            old_key = block.block_key
            if old_key is not None:
                del cached[old_key]
            key = parent_hash + chunk
            h = empty.copy()
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
        setdefault = cached.setdefault
        # Evictions are counted from the map's size afterwards: each one deletes a key, each
        # registration inserts one (num_kept counts the keys found held by another block).
        size_before, num_kept = len(cached), 0
        # get_new_cached_blocks' loop without the hashing. Not shared: calling hash_chain then this
        # from get_new_cached_blocks cost its allocate 7% more instructions (cachegrind).
        for key, block_hash in zip(block_keys, block_hashes):
            blocks.append(block)
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

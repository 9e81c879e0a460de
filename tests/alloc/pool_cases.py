"""Shared pieces of the allocator tests: the documented hash chain written out independently, a colliding
hash, the pool's full state, a random warm pool."""

from __future__ import annotations

import hashlib
import random

import numpy as np

from pagedattn.alloc import BlockPool, encode_extra_keys


def reference_chain(tokens, block_size, extra_keys=None):
    """The chain as the hashing module's docstring states it: [(block_key, block_hash)] per full block."""
    parent = hashlib.blake2b(b"pagedattn.alloc.root/1\x00" + encode_extra_keys(extra_keys)).digest()
    data = np.asarray(tokens, dtype="<i4").tobytes()
    stride = 4 * block_size
    out = []
    for i in range(len(tokens) // block_size):
        key = parent + data[i * stride:(i + 1) * stride]
        parent = hashlib.blake2b(key).digest()
        out.append((key, parent))
    return out


class TinyHash:
    """A hash with 3 values, so that keys and hashes collide all the time."""

    def __init__(self, data=b""):
        self.data = bytes(data)

    def copy(self):
        return TinyHash(self.data)

    def update(self, data):
        self.data += bytes(data)

    def digest(self):
        return bytes([sum(self.data) % 3]) * 4


def ids(blocks):
    return [b.block_id for b in blocks]


def pool_state(pool: BlockPool):
    """Everything a pool holds: each block's fields and links, the free queue, the cache map, the counts."""
    return ([(b.block_id, b.ref_cnt, b.block_key, b.block_hash, b.extra_keys,
              b.prev_free_block is None, b.next_free_block is None) for b in pool.blocks],
            ids(pool.free_block_queue), sorted((k, b.block_id) for k, b in pool.cached_blocks.items()),
            pool.num_evictions, pool.num_free_blocks)


def random_cached_pool(rng: random.Random, num_blocks: int = 10) -> BlockPool:
    """A pool with some blocks cached under colliding TinyHash keys and extra keys b"" / b"x", some of
    them freed again in a random order (cached free blocks), the rest in use."""
    pool = BlockPool(num_blocks)
    taken = pool.get_new_blocks(rng.randint(0, num_blocks))
    for block in taken:
        if rng.random() < 0.8:
            key = bytes([rng.randrange(3)]) * 4 + bytes([rng.randrange(3)])
            pool.cache_block(block, key, TinyHash(key).digest(), rng.choice([b"", b"x"]))
    rng.shuffle(taken)
    pool.free_blocks(taken[: rng.randint(0, len(taken))])
    return pool

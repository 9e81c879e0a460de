"""Unit tests of the block, the free queue and the block pool."""

import hashlib

import pytest

from pagedattn.alloc import (BlockPool, DoubleFreeError, FreeKVCacheBlockQueue, KVCacheBlock,
                             OutOfBlocksError)
from tests.alloc.pool_cases import TinyHash, ids, pool_state, random_cached_pool


def test_queue_pops_from_head_and_appends_at_tail():
    blocks = [KVCacheBlock(i) for i in range(5)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert ids(queue) == [0, 1, 2, 3, 4]
    assert queue.popleft().block_id == 0
    assert ids(queue.popleft_n(2)) == [1, 2]
    queue.append(blocks[0])
    queue.append_n([blocks[2], blocks[1]])
    assert ids(queue) == [3, 4, 0, 2, 1]
    assert len(queue) == queue.num_free_blocks == 5


def test_queue_removes_from_the_middle_in_constant_time():
    blocks = [KVCacheBlock(i) for i in range(4)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[2])
    assert ids(queue) == [0, 1, 3]
    assert blocks[2].prev_free_block is None and blocks[2].next_free_block is None
    queue.remove(blocks[0])
    queue.remove(blocks[3])
    assert ids(queue) == [1]
    assert queue.num_free_blocks == 1
    with pytest.raises(ValueError, match="block 2 is not in the free queue"):
        queue.remove(blocks[2])


def test_queue_popleft_n_too_many_raises_and_changes_nothing():
    queue = FreeKVCacheBlockQueue([KVCacheBlock(i) for i in range(3)], device="cpu")
    with pytest.raises(OutOfBlocksError, match="cpu free queue has 3 blocks, 4 were requested") as e:
        queue.popleft_n(4)
    assert e.value.device == "cpu" and e.value.num_required == 4 and e.value.num_free == 3
    assert ids(queue) == [0, 1, 2]


def test_pool_new_blocks_have_ref_one_and_free_appends_in_given_order():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(4)
    assert ids(blocks) == [0, 1, 2, 3]
    assert all(b.ref_cnt == 1 for b in blocks)
    assert pool.num_free_blocks == 2 and pool.num_used_blocks == 4
    assert pool.usage == pytest.approx(4 / 6)
    pool.free_blocks(reversed(blocks))
    assert ids(pool.free_block_queue) == [4, 5, 3, 2, 1, 0]
    assert pool.num_free_blocks == 6


def test_pool_evicts_cached_free_blocks_in_lru_order():
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    for block, tag in ((a, b"a"), (b, b"b"), (c, b"c")):
        key = bytes(32) + tag
        assert pool.cache_block(block, key, hashlib.blake2b(key).digest(), b"")
    pool.free_blocks([b])  # freed first -> least recently used
    pool.free_blocks([a])
    pool.free_blocks([c])
    assert pool.num_cached_blocks == 3 and pool.num_evictions == 0
    (first,) = pool.get_new_blocks(1)
    assert first is b and b.block_hash is None and b.block_key is None
    assert pool.num_evictions == 1
    assert pool.get_cached_block(bytes(32) + b"b", b"") is None
    assert pool.get_cached_block(bytes(32) + b"a", b"") is a


def test_pool_touch_revives_a_free_cached_block():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(3)
    key = bytes(32) + b"x"
    pool.cache_block(blocks[1], key, hashlib.blake2b(key).digest(), b"salt")
    pool.free_blocks(blocks)
    assert pool.get_cached_block(key, b"other salt") is None
    hit = pool.get_cached_block(key, b"salt")
    assert hit is blocks[1]
    pool.touch([hit])
    assert hit.ref_cnt == 1 and ids(pool.free_block_queue) == [0, 2]


def test_pool_refuses_a_second_block_under_a_cached_key():
    pool = BlockPool(2)
    a, b = pool.get_new_blocks(2)
    key = bytes(32) + b"k"
    digest = hashlib.blake2b(key).digest()
    assert pool.cache_block(a, key, digest, b"")
    assert not pool.cache_block(b, key, digest, b"")
    assert b.block_key is None and pool.cached_blocks[key] is a


def test_pool_with_caching_off_registers_nothing():
    pool = BlockPool(2, enable_caching=False)
    (a,) = pool.get_new_blocks(1)
    assert not pool.cache_block(a, b"k", b"h", b"")
    assert pool.num_cached_blocks == 0


def test_pool_double_free_raises_and_changes_nothing():
    pool = BlockPool(3)
    a, b = pool.get_new_blocks(2)
    pool.free_blocks([a])
    with pytest.raises(DoubleFreeError, match="gpu block 0 freed 1 time"):
        pool.free_blocks([b, a])
    assert b.ref_cnt == 1 and ids(pool.free_block_queue) == [2, 0]
    pool.touch([b])
    with pytest.raises(DoubleFreeError, match="block 1 freed 3 time"):
        pool.free_blocks([b, b, b])
    assert b.ref_cnt == 2


def test_pool_out_of_blocks_message_names_the_request():
    pool = BlockPool(2)
    with pytest.raises(OutOfBlocksError, match=r"cannot allocate seq 7: needs 3 free gpu blocks, "
                                                r"2 of 2 are free"):
        pool.check_available(3, "allocate seq 7")
    with pytest.raises(OutOfBlocksError):
        pool.get_new_blocks(3)
    assert pool.num_free_blocks == 2


def test_pool_rejects_bad_size():
    with pytest.raises(ValueError, match="num_blocks must be a non-negative int"):
        BlockPool(-1)


def _reference_get_new_cached_blocks(pool, num_blocks, chunks, parent, extra, hash_fn):
    """get_new_blocks, then each key registered in turn (the allocator before the fused loop)."""
    blocks = pool.get_new_blocks(num_blocks)
    for block, chunk in zip(blocks, chunks):
        key = parent + chunk
        holder = pool.cached_blocks.setdefault(key, block)
        if holder is block:
            parent = block.block_hash = hash_fn(key).digest()
            block.block_key, block.extra_keys = key, extra
        elif holder.extra_keys == extra:
            parent = holder.block_hash
        else:
            parent = hash_fn(key).digest()
    return blocks, parent


@pytest.mark.parametrize("seed", range(300))
def test_fused_take_and_register_equals_take_then_register(seed):
    """get_new_cached_blocks == get_new_blocks + registering the chain, block by block, even
    when a key is held by a free block the same call evicts, by a used block, or by a block
    under other extra keys."""
    import copy
    import random

    rng = random.Random(seed)
    pool = random_cached_pool(rng)
    num_free = pool.num_free_blocks
    num_blocks = rng.randint(0, num_free)
    num_chunks = max(0, num_blocks - rng.randint(0, 1))
    chunks = [bytes([rng.randrange(3)]) for _ in range(num_chunks)]
    parent = bytes([rng.randrange(3)]) * 4
    extra = rng.choice([b"", b"x"])
    ref = copy.deepcopy(pool)
    got_blocks, got_hash = pool.get_new_cached_blocks(num_blocks, chunks, parent, extra, TinyHash)
    want_blocks, want_hash = _reference_get_new_cached_blocks(ref, num_blocks, chunks, parent,
                                                              extra, TinyHash)
    assert (ids(got_blocks), got_hash) == (ids(want_blocks), want_hash)
    assert pool_state(pool) == pool_state(ref)
    for key, block in pool.cached_blocks.items():
        assert block.block_key == key


def test_fused_take_and_register_out_of_blocks_changes_nothing():
    pool = BlockPool(2)
    before = pool_state(pool)
    with pytest.raises(OutOfBlocksError):
        pool.get_new_cached_blocks(3, [b"a", b"b", b"c"], b"p", b"", hashlib.blake2b)
    assert pool_state(pool) == before

"""The allocator's fast paths: multi-block takes from the free queue (order, LRU, evictions),
the fused take-hash-register loop with the real hash, block splitting through ``struct`` and
block-table rows written through a byte view."""

import copy
import hashlib
import pickle
from collections import Counter

import numpy as np
import pytest

from pagedattn.alloc import (BlockManager, BlockPool, FreeKVCacheBlockQueue, KVCacheBlock,
                             OutOfBlocksError, SequenceArrays, hash_token_blocks, root_hash)
from pagedattn.alloc.hashing import split_token_blocks
from pagedattn.alloc.invariants import check_pool


def ids(blocks):
    return [b.block_id for b in blocks]


def chunks_of(tokens, block_size=2):
    arr = np.asarray(tokens, dtype="<i4")
    return [arr[i:i + block_size].tobytes() for i in range(0, len(arr) - block_size + 1, block_size)]


def cached_pool(num_blocks, num_cached, free_order):
    """A pool whose blocks ``0..num_cached-1`` are cached, freed in ``free_order`` (LRU first)."""
    pool = BlockPool(num_blocks)
    taken = pool.get_new_blocks(num_blocks)
    for block in taken[:num_cached]:
        key = bytes(64) + bytes([block.block_id]) * 8
        assert pool.cache_block(block, key, hashlib.blake2b(key).digest(), b"")
    pool.free_blocks([taken[i] for i in free_order])
    return pool


# ------------------------------------------------------------------------- free queue
def test_popleft_n_takes_the_head_in_order_and_relinks_the_rest():
    blocks = [KVCacheBlock(i) for i in range(6)]
    queue = FreeKVCacheBlockQueue(blocks)
    assert queue.popleft_n(0) == [] and ids(queue) == [0, 1, 2, 3, 4, 5]
    taken = queue.popleft_n(4)
    assert ids(taken) == [0, 1, 2, 3] and ids(queue) == [4, 5] and queue.num_free_blocks == 2
    assert all(b.prev_free_block is None and b.next_free_block is None for b in taken)
    assert blocks[4].prev_free_block is queue._head and queue._head.next_free_block is blocks[4]
    assert ids(queue.popleft_n(2)) == [4, 5] and ids(queue) == [] and len(queue) == 0
    assert queue._head.next_free_block is queue._tail and queue._tail.prev_free_block is queue._head
    queue.append_n(reversed(taken))  # a freed table joins the tail, last block first
    assert ids(queue) == [3, 2, 1, 0]


def test_popleft_n_after_removals_from_the_middle():
    blocks = [KVCacheBlock(i) for i in range(6)]
    queue = FreeKVCacheBlockQueue(blocks)
    queue.remove(blocks[1])
    queue.remove(blocks[4])
    assert ids(queue.popleft_n(3)) == [0, 2, 3] and ids(queue) == [5]
    with pytest.raises(OutOfBlocksError):
        queue.popleft_n(2)
    assert ids(queue) == [5]


# ------------------------------------------------------------------------- pool takes
@pytest.mark.parametrize("with_tail", [False, True])
def test_multi_block_cached_take_is_lru_and_evicts_what_it_takes(with_tail):
    # Blocks 0-5 cached, freed in the order 3, 0, 5, 1, 4, 2 (3 is the least recently used);
    # blocks 6, 7 uncached and freed last.
    pool = cached_pool(8, 6, [3, 0, 5, 1, 4, 2, 6, 7])
    old_keys = {b.block_id: b.block_key for b in pool.blocks}
    tokens = list(range(8))
    chunks = chunks_of(tokens)
    num_blocks = len(chunks) + with_tail
    parent = root_hash(b"")
    blocks, last_hash = pool.get_new_cached_blocks(num_blocks, chunks, parent, b"")
    taken = [3, 0, 5, 1, 4][:num_blocks]
    assert ids(blocks) == taken
    assert ids(pool.free_block_queue) == [b for b in [3, 0, 5, 1, 4, 2, 6, 7] if b not in taken]
    assert pool.num_evictions == num_blocks  # every block taken was cached
    for bid in taken:
        assert old_keys[bid] not in pool.cached_blocks
    chain = hash_token_blocks(parent, np.asarray(tokens, dtype=np.int32), 2)
    assert [(b.block_key, b.block_hash) for b in blocks[:4]] == chain
    assert last_hash == chain[-1][1]
    if with_tail:
        assert blocks[4].block_key is None and blocks[4].block_hash is None
    assert all(b.ref_cnt == 1 and b.extra_keys == (b"" if b.block_key else None) for b in blocks)
    check_pool(pool, Counter(ids(blocks)))
    # Cached survivors are still hits, and the oldest of them is the next to be evicted.
    survivors = [4, 2] if not with_tail else [2]
    assert all(pool.cached_blocks[old_keys[b]] is pool.blocks[b] for b in survivors)
    assert pool.get_new_blocks(1)[0].block_id == survivors[0]
    assert pool.num_evictions == num_blocks + 1


def test_cached_take_of_uncached_blocks_counts_no_eviction():
    pool = BlockPool(4)
    chunks = chunks_of([5, 6, 7, 8])
    blocks, _ = pool.get_new_cached_blocks(3, chunks, root_hash(b"s"), b"s")
    assert ids(blocks) == [0, 1, 2] and pool.num_evictions == 0 and pool.num_cached_blocks == 2
    assert all(b.extra_keys == b"s" for b in blocks[:2]) and blocks[2].block_key is None


def test_cached_take_out_of_blocks_or_bad_chunks_changes_nothing():
    pool = cached_pool(4, 2, [1, 0, 2, 3])
    before = ([(b.block_key, b.ref_cnt) for b in pool.blocks], ids(pool.free_block_queue),
              dict(pool.cached_blocks), pool.num_evictions)
    with pytest.raises(OutOfBlocksError):
        pool.get_new_cached_blocks(5, chunks_of(range(10)), root_hash(b""), b"")
    with pytest.raises(ValueError, match="3 chunks for 2 blocks"):
        pool.get_new_cached_blocks(2, chunks_of(range(6)), root_hash(b""), b"")
    after = ([(b.block_key, b.ref_cnt) for b in pool.blocks], ids(pool.free_block_queue),
             dict(pool.cached_blocks), pool.num_evictions)
    assert after == before


def test_a_freed_prompt_is_revived_until_its_blocks_are_evicted():
    """A prompt re-allocated after its blocks were freed hits them; once they are evicted by
    other prompts it is registered afresh under the same keys."""
    mgr = BlockManager(8, 2, watermark=0.0)
    prompt = np.arange(7, dtype=np.int32)
    assert mgr.allocate("a", prompt) == 0
    mgr.free("a")
    assert mgr.allocate("b", prompt) == 6  # three cached blocks revived
    mgr.free("b")
    mgr.allocate("c", np.arange(100, 115, dtype=np.int32))  # 8 blocks: evicts everything
    assert mgr.num_evictions == 3 and mgr.gpu_pool.num_cached_blocks == 7
    mgr.free("c")
    assert mgr.allocate("d", prompt) == 0
    mgr.check_invariants()


# ------------------------------------------------------------------------- splitting
@pytest.mark.parametrize("block_size", [1, 2, 3, 16])
def test_split_matches_tobytes_for_views_and_copies(block_size):
    rng = np.random.default_rng(block_size)
    base = rng.integers(-2**31, 2**31, 200, dtype=np.int64).astype(np.int32)
    base[::7] = 0  # zero bytes at the ends of some blocks
    for tokens in (base, base[3:], base[::2], base[5:150][::3], base[::-1], base[::-1].copy()):
        n = len(tokens) // block_size
        for num_blocks in (0, 1, n // 2, n):
            want = tuple(tokens[i * block_size:(i + 1) * block_size].tobytes()
                         for i in range(num_blocks))
            assert split_token_blocks(tokens, block_size, num_blocks) == want


def test_split_memo_is_bounded_and_stays_correct(monkeypatch):
    from pagedattn.alloc import hashing

    monkeypatch.setattr(hashing, "_splitters", {})
    tokens = np.arange(64, dtype=np.int32)
    for n in range(1, 5000):
        bs = 1 + n % 7
        got = split_token_blocks(tokens, bs, min(n % 9, 64 // bs))
        assert len(got) == min(n % 9, 64 // bs)
    assert len(hashing._splitters) <= 4096
    assert split_token_blocks(tokens, 4, 2) == (tokens[:4].tobytes(), tokens[4:8].tobytes())


# ------------------------------------------------------------------------- table rows
def test_set_row_writes_through_growth_of_width_and_rows():
    arrays = SequenceArrays(block_size=4, pad_block_id=-1, capacity=2, width=2)
    rows = [arrays.alloc_row() for _ in range(2)]
    arrays.set_row(rows[0], [5, 6], 8)
    arrays.set_row(rows[1], [7, 8, 9], 9)  # wider than the table: it grows first
    assert arrays.width >= 3
    row2 = arrays.alloc_row()  # more rows than the capacity: the arrays grow
    arrays.set_row(row2, [1, 2, 3, 4, 5], 17)
    assert arrays.block_tables[rows[0], :3].tolist() == [5, 6, -1]
    assert arrays.block_tables[rows[1], :4].tolist() == [7, 8, 9, -1]
    assert arrays.block_tables[row2, :6].tolist() == [1, 2, 3, 4, 5, -1]
    assert arrays.num_tokens[[rows[0], rows[1], row2]].tolist() == [8, 9, 17]
    arrays.release_row(rows[1])
    assert (arrays.block_tables[rows[1]] == -1).all()


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda a: pickle.loads(pickle.dumps(a))])
def test_copied_arrays_write_their_own_tables(clone):
    arrays = SequenceArrays(block_size=2)
    row = arrays.alloc_row()
    arrays.set_row(row, [3, 4], 4)
    twin = clone(arrays)
    twin_row = twin.alloc_row()
    twin.set_row(twin_row, [9, 9, 9], 6)
    assert twin.block_tables[row, :2].tolist() == [3, 4]
    assert twin.block_tables[twin_row, :3].tolist() == [9, 9, 9]
    assert (arrays.block_tables[twin_row] == 0).all()  # the original is untouched


def test_manager_deepcopy_allocates_independently():
    mgr = BlockManager(16, 2)
    mgr.allocate("a", list(range(5)))
    twin = copy.deepcopy(mgr)
    twin.allocate("b", list(range(9)))
    assert "b" not in mgr and twin.get_block_table("b")[:2] == mgr.get_block_table("a")[:2]
    mgr.check_invariants()
    twin.check_invariants()


# ------------------------------------------------------------------------- token lists
@pytest.mark.parametrize("tokens", [
    [0], [5, -1, 2**31 - 1, -2**31], list(range(1000)), (3, 4, 5), [np.int64(7), 8, np.int32(-3)],
    [1, True, False], [np.uint16(9), 2],
])
def test_list_fast_path_equals_numpy(tokens):
    from pagedattn.alloc.hashing import TOKEN_DTYPE, as_token_array

    got = as_token_array(tokens)
    assert got.dtype == TOKEN_DTYPE and got.ndim == 1 and got.flags.writeable
    assert got.tolist() == np.asarray(tokens, dtype=np.int64).tolist()
    got[0] = 1  # a fresh array: writing to it touches nothing else


@pytest.mark.parametrize("bad, match", [
    ([2**31], "outside"), ([0, -2**31 - 1], "outside"), ([2**70], "integer token ids"),
    ([1, 2.5], "got dtype float64"), ([1, "a"], "integer token ids"),
    ([[1, 2], [3, 4]], "1-D sequence"), ([True, False], "got dtype bool"),
])
def test_list_fast_path_falls_back_for_the_exact_error(bad, match):
    from pagedattn.alloc import InvalidArgumentError
    from pagedattn.alloc.hashing import as_token_array

    with pytest.raises(InvalidArgumentError, match=match):
        as_token_array(bad)


def test_allocate_from_a_list_hashes_like_from_an_array():
    prompt = list(range(-5, 40))
    a, b = BlockManager(32, 4), BlockManager(32, 4)
    a.allocate("s", prompt, extra_keys=("t", 1))
    b.allocate("s", np.asarray(prompt, dtype=np.int32), extra_keys=("t", 1))
    assert [(x.block_key, x.block_hash) for x in a.gpu_pool.blocks] == \
        [(x.block_key, x.block_hash) for x in b.gpu_pool.blocks]
    a.check_invariants()


@pytest.mark.parametrize("prehashed", [False, True])
def test_digests_from_copies_of_the_shared_empty_state_are_plain_blake2b(prehashed):
    """allocate and hash_prompt_blocks hash each key with ``_EMPTY_BLAKE2B.copy()``: every registered
    block's hash is ``hashlib.blake2b(key).digest()``, and the shared empty state is never updated
    (it still gives BLAKE2b's digest of nothing after several prompts)."""
    from pagedattn.alloc import hash_prompt_blocks
    from pagedattn.alloc.hashing import _EMPTY_BLAKE2B

    empty_digest = hashlib.blake2b().digest()
    mgr = BlockManager(64, 4, watermark=0.0)
    rng = np.random.default_rng(3)
    for i in range(4):
        prompt = rng.integers(0, 1000, 4 * (i + 2) + i % 2).astype(np.int32)
        hashes = hash_prompt_blocks(prompt, 4, extra_keys=("t", i)) if prehashed else None
        mgr.allocate(i, prompt, extra_keys=("t", i), block_hashes=hashes)
        assert _EMPTY_BLAKE2B.digest() == empty_digest
    cached = mgr.gpu_pool.cached_blocks
    assert len(cached) == 2 + 3 + 4 + 5
    for key, block in cached.items():
        assert block.block_hash == hashlib.blake2b(key).digest()
    mgr.check_invariants()

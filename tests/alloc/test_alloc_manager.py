"""Unit tests of the block manager: tables, appends, fork/copy-on-write, prefix caching, errors."""

import numpy as np
import pytest

from pagedattn.alloc import (AllocStatus, BlockManager, DoubleFreeError, DuplicateSequenceError,
                             FreedSequenceError, InvalidArgumentError, OutOfBlocksError,
                             SwapError, UnknownSequenceError, snapshot_state)


@pytest.fixture
def mgr():
    return BlockManager(num_gpu_blocks=16, block_size=4, num_cpu_blocks=8, watermark=0.0)


def refs(mgr, seq_id):
    return [mgr.gpu_pool.blocks[b].ref_cnt for b in mgr.get_block_table(seq_id)]


def free_queue(mgr):
    return [b.block_id for b in mgr.gpu_pool.free_block_queue]


# ------------------------------------------------------------------------------- allocation
def test_allocate_gives_ceil_blocks_and_only_the_last_is_partial(mgr):
    assert mgr.allocate(1, list(range(10))) == 0
    assert mgr.get_block_table(1) == [0, 1, 2]
    assert mgr.get_num_tokens(1) == 10
    assert mgr.num_free_blocks == 13
    assert mgr.kv_utilization() == pytest.approx(10 / 12)
    assert mgr.allocate(2, []) == 0 and mgr.get_block_table(2) == []
    assert mgr.allocate(3, list(range(20, 28))) == 0 and len(mgr.get_block_table(3)) == 2
    mgr.check_invariants()


def test_prefix_hit_reuses_the_longest_cached_chain(mgr):
    mgr.allocate("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert mgr.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 0, 0]) == 8
    assert mgr.get_block_table("b")[:2] == mgr.get_block_table("a")[:2]
    assert mgr.get_block_table("b")[2] != mgr.get_block_table("a")[2]
    assert refs(mgr, "b") == [2, 2, 1]
    # Divergence in block 1: only block 0 is reused.
    assert mgr.allocate("c", [1, 2, 3, 4, 5, 6, 0, 8]) == 4
    assert mgr.prefix_cache_hit_rate == pytest.approx((0 + 8 + 4) / (9 + 10 + 8))
    mgr.check_invariants()


def test_probe_prefix_reports_what_allocate_will_find(mgr):
    assert mgr.probe_prefix([1, 2, 3]) == (0, 0)
    mgr.allocate("a", list(range(12)))
    assert mgr.probe_prefix(list(range(8)) + [5]) == (8, 0)
    assert mgr.probe_prefix(list(range(8)) + [5], extra_keys="salt") == (0, 0)
    mgr.free("a")
    before = snapshot_state(mgr)
    assert mgr.probe_prefix(list(range(12)) + [0]) == (12, 3)  # all free: a hit revives them
    assert mgr.probe_prefix(list(range(12))) == (8, 2)  # the last token is always computed
    assert snapshot_state(mgr) == before
    assert mgr.allocate("b", list(range(12)) + [0]) == 12
    assert mgr.num_free_blocks == 16 - 4


def test_prefix_hit_leaves_the_last_token_to_compute(mgr):
    mgr.allocate("a", list(range(8)))
    # The whole prompt is cached, but at most len - 1 tokens are reported (block granularity).
    assert mgr.allocate("b", list(range(8))) == 4
    assert mgr.get_block_table("b")[0] == mgr.get_block_table("a")[0]
    assert mgr.get_block_table("b")[1] != mgr.get_block_table("a")[1]
    mgr.check_invariants()


def test_different_salts_never_share(mgr):
    mgr.allocate("a", list(range(9)), extra_keys=("tenant-1",))
    assert mgr.allocate("b", list(range(9)), extra_keys=("tenant-2",)) == 0
    assert mgr.allocate("c", list(range(9))) == 0
    assert mgr.allocate("d", list(range(9)), extra_keys=("tenant-1",)) == 8
    assert not set(mgr.get_block_table("a")) & set(mgr.get_block_table("b"))
    assert not set(mgr.get_block_table("a")) & set(mgr.get_block_table("c"))
    mgr.check_invariants()


def test_freed_blocks_stay_cached_and_are_revived_from_the_middle_of_the_queue(mgr):
    mgr.allocate("a", list(range(12)))
    mgr.allocate("x", [99] * 4)
    table = mgr.get_block_table("a")
    mgr.free("a")
    mgr.free("x")
    # Reverse order: the last block of a sequence is evicted first.
    assert free_queue(mgr)[-4:-1] == list(reversed(table))
    assert mgr.allocate("b", list(range(8)) + [0, 0]) == 8
    assert mgr.get_block_table("b")[:2] == table[:2]
    assert table[0] not in free_queue(mgr) and table[2] in free_queue(mgr)
    assert mgr.num_evictions == 0
    mgr.check_invariants()


def test_eviction_takes_the_least_recently_freed_cached_block():
    mgr = BlockManager(6, 2, watermark=0.0)
    table = {}
    for s, tok in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        mgr.allocate(s, [tok, tok])
        (table[s],) = mgr.get_block_table(s)
    for s in ("b", "d", "a", "c"):
        mgr.free(s)
    assert free_queue(mgr) == [4, 5, table["b"], table["d"], table["a"], table["c"]]
    mgr.allocate("e", [5, 5, 6, 6, 7, 7, 8, 8])
    assert mgr.get_block_table("e") == [4, 5, table["b"], table["d"]]
    assert mgr.num_evictions == 2
    assert mgr.gpu_pool.blocks[table["a"]].block_key is not None
    assert mgr.gpu_pool.blocks[table["c"]].block_key is not None
    assert mgr.allocate("c2", [3, 3, 0]) == 2  # revived from the tail of the queue
    assert mgr.get_block_table("c2")[0] == table["c"]
    assert mgr.num_evictions == 3  # c2's second block evicted a
    mgr.free("c2")
    mgr.free("e")
    assert mgr.allocate("a2", [1, 1, 0]) == 0
    assert mgr.allocate("b2", [2, 2, 0]) == 0
    mgr.check_invariants()


def test_reset_prefix_cache_only_when_nothing_is_allocated(mgr):
    mgr.allocate(1, list(range(9)))
    before = snapshot_state(mgr)
    assert mgr.reset_prefix_cache() is False  # a sequence holds blocks: nothing changes
    assert snapshot_state(mgr) == before
    mgr.free(1)
    queue = free_queue(mgr)
    assert mgr.gpu_pool.num_cached_blocks == 2
    assert mgr.reset_prefix_cache() is True
    assert mgr.gpu_pool.num_cached_blocks == 0 and free_queue(mgr) == queue
    assert all(b.block_hash is None and b.block_key is None for b in mgr.gpu_pool.blocks)
    assert mgr.probe_prefix(list(range(9))) == (0, 0)
    assert mgr.allocate(2, list(range(9))) == 0  # no hit: computed again
    assert mgr.gpu_pool.num_evictions == 0
    mgr.check_invariants()


def test_prefix_caching_off_never_hits():
    mgr = BlockManager(8, 2, enable_prefix_caching=False)
    mgr.allocate("a", [1, 2, 3])
    assert mgr.allocate("b", [1, 2, 3]) == 0
    assert mgr.gpu_pool.num_cached_blocks == 0 and mgr.prefix_cache_hit_rate == 0.0
    mgr.append_slots("a", [4])
    assert mgr.gpu_pool.num_cached_blocks == 0
    mgr.check_invariants()


# ---------------------------------------------------------------------------------- append
def test_append_takes_a_new_block_only_when_the_last_is_full(mgr):
    mgr.allocate(1, [1, 2, 3])
    assert mgr.append_slots(1, 4) == []
    assert len(mgr.get_block_table(1)) == 1
    assert mgr.append_slots(1, [5]) == []
    assert len(mgr.get_block_table(1)) == 2 and mgr.get_num_tokens(1) == 5
    assert mgr.append_slots(1, list(range(6, 15))) == []  # several blocks at once
    assert mgr.get_num_tokens(1) == 14 and len(mgr.get_block_table(1)) == 4
    assert mgr.append_slots(1, []) == []
    mgr.check_invariants()


def test_blocks_filled_by_appends_are_cached_for_later_prompts(mgr):
    mgr.allocate(1, [1, 2])
    mgr.append_slots(1, [3, 4, 5, 6, 7, 8, 9])
    assert mgr.allocate(2, list(range(1, 10)) + [0]) == 8
    assert mgr.get_block_table(2)[:2] == mgr.get_block_table(1)[:2]
    mgr.check_invariants()


def test_fork_shares_and_copy_on_write_returns_the_pair(mgr):
    mgr.allocate("p", list(range(6)))
    mgr.fork("p", "c")
    parent_table = mgr.get_block_table("p")
    assert mgr.get_block_table("c") == parent_table and refs(mgr, "p") == [2, 2]
    pairs = mgr.append_slots("c", [42])
    child_table = mgr.get_block_table("c")
    assert pairs == [(parent_table[1], child_table[1])]
    assert child_table[0] == parent_table[0] and child_table[1] != parent_table[1]
    assert refs(mgr, "p") == [2, 1] and mgr.get_block_table("p") == parent_table
    # The parent is now the only holder: it writes in place.
    assert mgr.append_slots("p", [7]) == []
    assert mgr.get_block_table("p") == parent_table
    mgr.check_invariants()


def test_fork_of_a_full_last_block_needs_no_copy(mgr):
    mgr.allocate("p", list(range(8)))
    mgr.fork("p", "c")
    assert mgr.append_slots("c", [1]) == []
    assert len(mgr.get_block_table("c")) == 3
    assert mgr.get_block_table("c")[:2] == mgr.get_block_table("p")
    mgr.check_invariants()


def test_batch_append_matches_sequential_appends():
    rng = np.random.default_rng(1)
    a = BlockManager(256, 4, watermark=0.0)
    b = BlockManager(256, 4, watermark=0.0)
    for m in (a, b):
        for s in range(6):
            m.allocate(s, (np.arange(s * 3 + 1) % 5).tolist())
        m.fork(2, 10)
        m.fork(3, 11)
    seqs = [0, 1, 2, 3, 4, 5, 10, 11]
    for _ in range(13):
        tokens = rng.integers(0, 5, len(seqs))
        pairs_a = a.append_slots_batch(seqs, tokens)
        pairs_b = [p for s, t in zip(seqs, tokens) for p in b.append_slots(s, int(t))]
        assert pairs_a == pairs_b
        a.check_invariants()
    for s in seqs:
        assert a.get_block_table(s) == b.get_block_table(s)
        assert a.get_num_tokens(s) == b.get_num_tokens(s)
    assert snapshot_state(a)["gpu"] == snapshot_state(b)["gpu"]


def test_batch_copy_on_write_copies_once_when_all_holders_append(mgr):
    mgr.allocate("p", [1, 2])
    mgr.fork("p", "c")
    shared = mgr.get_block_table("p")[0]
    assert mgr.num_blocks_to_append(["p", "c"]) == 1
    pairs = mgr.append_slots_batch(["p", "c"], [3, 4])
    assert len(pairs) == 1 and pairs[0][0] == shared
    assert mgr.get_block_table("c") == [shared]  # the last holder kept the original
    mgr.check_invariants()


def test_batch_append_is_all_or_nothing():
    mgr = BlockManager(3, 2, watermark=0.0)
    mgr.allocate("a", [1, 2])
    mgr.allocate("b", [3, 4])
    mgr.allocate("c", [5])
    before = snapshot_state(mgr)
    with pytest.raises(OutOfBlocksError, match="append a token to each of 3 sequences: needs 2"):
        mgr.append_slots_batch(["a", "b", "c"], [0, 0, 0])
    assert snapshot_state(mgr) == before
    assert mgr.append_slots_batch(["c"], [6]) == []
    mgr.check_invariants()


# --------------------------------------------------------------------------------- figures
def test_figures_count_a_shared_block_once(mgr):
    mgr.allocate("a", list(range(6)))  # 2 blocks, 6 tokens
    mgr.fork("a", "b")
    assert mgr.usage == pytest.approx(2 / 16)
    assert mgr.kv_utilization() == pytest.approx(6 / 8)
    mgr.append_slots("b", [1])  # copy-on-write: 3 blocks, 4 + 2 + 3 tokens
    assert mgr.kv_utilization() == pytest.approx(9 / 12)
    assert mgr.num_free_blocks == 13


def test_can_allocate_honours_the_watermark():
    mgr = BlockManager(100, 4, watermark=0.1)
    assert mgr.watermark_blocks == 10
    assert mgr.can_allocate(4 * 90) is AllocStatus.OK
    assert mgr.can_allocate(4 * 91) is AllocStatus.NEVER
    mgr.allocate("a", [0] * (4 * 50))
    assert mgr.can_allocate(4 * 40) is AllocStatus.OK
    assert mgr.can_allocate(4 * 41) is AllocStatus.LATER


def test_can_append_slots(mgr):
    mgr.allocate("a", [0] * 60)  # 15 blocks, 1 free
    assert mgr.can_append_slots(["a"], 4)
    assert not mgr.can_append_slots(["a"], 5)


# ------------------------------------------------------------------------------ bad input
def test_allocate_out_of_blocks_changes_nothing(mgr):
    mgr.allocate("a", list(range(40)))
    mgr.free("a")  # 10 cached free blocks
    mgr.allocate("b", [7] * 20)
    before = snapshot_state(mgr)
    with pytest.raises(OutOfBlocksError, match=r"cannot allocate sequence 'c' \(60 tokens\): "
                                                r"needs 15 free gpu blocks, 11 of 16 are free") as e:
        mgr.allocate("c", list(range(40)) + [1] * 20)  # 10 hits would be revived, 5 new
    assert (e.value.num_required, e.value.num_free, e.value.device) == (15, 11, "gpu")
    assert snapshot_state(mgr) == before
    assert "c" not in mgr
    mgr.check_invariants()


def test_allocate_duplicate_and_bad_tokens(mgr):
    mgr.allocate(1, [1])
    before = snapshot_state(mgr)
    with pytest.raises(DuplicateSequenceError, match="cannot allocate sequence 1: it is already"):
        mgr.allocate(1, [2])
    with pytest.raises(InvalidArgumentError, match="token_ids must be int32 token ids"):
        mgr.allocate(2, np.array([2**33]))
    assert snapshot_state(mgr) == before


def test_double_free_and_unknown_free(mgr):
    mgr.allocate("a", [1, 2, 3])
    mgr.free("a")
    before = snapshot_state(mgr)
    with pytest.raises(DoubleFreeError, match="cannot free sequence 'a': it was already freed"):
        mgr.free("a")
    with pytest.raises(UnknownSequenceError, match="cannot free sequence 'zz': it was never"):
        mgr.free("zz")
    assert snapshot_state(mgr) == before


def test_append_to_freed_unknown_or_swapped_sequence(mgr):
    mgr.allocate("a", [1, 2, 3])
    mgr.allocate("s", [1])
    mgr.swap_out(["s"])
    mgr.free("a")
    before = snapshot_state(mgr)
    with pytest.raises(FreedSequenceError, match="cannot append to sequence 'a': it was freed"):
        mgr.append_slots("a", [4])
    with pytest.raises(FreedSequenceError, match="cannot append to sequence 'a': it was freed"):
        mgr.append_slots_batch(["a"], [4])
    with pytest.raises(UnknownSequenceError, match="cannot append to sequence 'q': it was never"):
        mgr.append_slots("q", [4])
    with pytest.raises(SwapError, match="cannot append to sequence 's': it is swapped out"):
        mgr.append_slots("s", [4])
    assert snapshot_state(mgr) == before


def test_append_out_of_blocks_changes_nothing():
    mgr = BlockManager(2, 2, watermark=0.0)
    mgr.allocate("p", [1])
    mgr.fork("p", "c")
    mgr.allocate("x", [1, 2])
    before = snapshot_state(mgr)
    with pytest.raises(OutOfBlocksError, match="cannot append 1 token"):
        mgr.append_slots("c", [5])  # needs a copy-on-write block
    assert snapshot_state(mgr) == before


def test_fork_errors(mgr):
    mgr.allocate("p", [1, 2])
    mgr.allocate("q", [3])
    before = snapshot_state(mgr)
    with pytest.raises(DuplicateSequenceError, match="cannot fork sequence 'p' into 'q': 'q' already"):
        mgr.fork("p", "q")
    with pytest.raises(UnknownSequenceError, match="cannot fork sequence 'nope'"):
        mgr.fork("nope", "r")
    assert snapshot_state(mgr) == before


def test_batch_argument_errors(mgr):
    mgr.allocate("a", [1])
    mgr.allocate("b", [1])
    before = snapshot_state(mgr)
    with pytest.raises(InvalidArgumentError, match="cannot append to sequence 'a' twice"):
        mgr.append_slots_batch(["a", "b", "a"], [1, 2, 3])
    with pytest.raises(InvalidArgumentError, match="token_ids has 1 tokens for 2 sequences"):
        mgr.append_slots_batch(["a", "b"], [1])
    assert snapshot_state(mgr) == before


@pytest.mark.parametrize("kwargs, match", [
    ({"num_gpu_blocks": 0, "block_size": 4}, "num_gpu_blocks must be a positive int"),
    ({"num_gpu_blocks": 4, "block_size": 0}, "block_size must be a positive int"),
    ({"num_gpu_blocks": 4, "block_size": 4, "num_cpu_blocks": -1}, "num_cpu_blocks must be"),
    ({"num_gpu_blocks": 4, "block_size": 4, "watermark": 1.0}, r"watermark must be in \[0, 1\)"),
])
def test_constructor_rejects_bad_sizes(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        BlockManager(**kwargs)


def test_freed_ids_are_remembered_up_to_a_bound_and_can_be_reused():
    mgr = BlockManager(8, 2, max_freed_ids=2)
    for s in range(3):
        mgr.allocate(s, [s])
        mgr.free(s)
    with pytest.raises(UnknownSequenceError, match="sequence 0: it was never allocated"):
        mgr.free(0)
    with pytest.raises(DoubleFreeError):
        mgr.free(2)
    mgr.allocate(2, [5, 5, 5])  # an id may be reused once freed
    assert mgr.get_num_tokens(2) == 3
    mgr.free(2)
    mgr.check_invariants()
    assert mgr.num_free_blocks == 8

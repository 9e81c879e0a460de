"""Swapping sequence groups between the GPU and the CPU pool."""

import pytest

from pagedattn.alloc import (AllocStatus, BlockManager, FreedSequenceError, InvalidArgumentError,
                             OutOfBlocksError, SwapError, UnknownSequenceError, snapshot_state)


@pytest.fixture
def mgr():
    return BlockManager(num_gpu_blocks=12, block_size=4, num_cpu_blocks=6, watermark=0.0)


def test_swap_out_returns_one_pair_per_distinct_block_and_frees_gpu_blocks(mgr):
    mgr.allocate("p", list(range(10)))  # 3 blocks
    mgr.fork("p", "c")
    mgr.append_slots("c", [1])  # copy-on-write: c has its own last block
    gpu_tables = {s: mgr.get_block_table(s) for s in ("p", "c")}
    pairs = mgr.swap_out(["p", "c"])
    assert len(pairs) == 4
    assert [g for g, _ in pairs] == gpu_tables["p"] + gpu_tables["c"][2:]
    assert mgr.is_swapped("p") and mgr.is_swapped("c")
    assert mgr.num_free_blocks == 12 and mgr.num_free_cpu_blocks == 2
    cpu_of = dict(pairs)
    for s in ("p", "c"):
        assert mgr.get_block_table(s) == [cpu_of[g] for g in gpu_tables[s]]
    # Sharing survives: the two shared blocks have one CPU copy held twice.
    assert [mgr.cpu_pool.blocks[b].ref_cnt for b in mgr.get_block_table("p")] == [2, 2, 1]
    mgr.check_invariants()


def test_swap_round_trip_restores_tables_and_sharing(mgr):
    mgr.allocate("p", list(range(6)))
    mgr.fork("p", "c")  # shares a partly filled last block
    mgr.swap_out(["p", "c"])
    mgr.allocate("other", list(range(100, 148)))  # all 12 blocks: evicts p's cached block
    mgr.free("other")
    pairs = mgr.swap_in(["p", "c"])
    assert len(pairs) == 2  # two distinct blocks copied back
    assert mgr.get_block_table("p") == mgr.get_block_table("c")
    assert mgr.num_free_cpu_blocks == 6
    assert not mgr.is_swapped("p")
    # The shared partly filled block still needs copy-on-write after the round trip.
    cow = mgr.append_slots("c", [9])
    assert len(cow) == 1 and cow[0][0] == mgr.get_block_table("p")[1]
    mgr.check_invariants()


def test_swap_in_revives_blocks_still_cached_on_the_gpu(mgr):
    mgr.allocate("a", list(range(9)))  # 2 full cached blocks + 1 partial
    table = mgr.get_block_table("a")
    mgr.swap_out(["a"])
    assert all(mgr.gpu_pool.blocks[b].block_key is not None for b in table[:2])
    cpu_table = mgr.get_block_table("a")
    pairs = mgr.swap_in(["a"])
    assert pairs == [(cpu_table[2], mgr.get_block_table("a")[2])]  # only the partial block
    assert mgr.get_block_table("a")[:2] == table[:2]  # revived in place, no copy
    mgr.check_invariants()


def test_swapped_blocks_keep_their_cache_identity_for_prefix_hits(mgr):
    mgr.allocate("a", list(range(9)))
    mgr.swap_out(["a"])
    mgr.allocate("filler", list(range(100, 148)))  # 12 blocks: evicts everything on the GPU
    mgr.free("filler")
    mgr.swap_in(["a"])  # copied back and re-registered
    assert mgr.allocate("b", list(range(8)) + [0]) == 8
    assert mgr.get_block_table("b")[:2] == mgr.get_block_table("a")[:2]
    mgr.check_invariants()


def test_swap_out_without_cpu_room_refuses_the_whole_group(mgr):
    mgr.allocate("a", list(range(16)))  # 4 blocks
    mgr.allocate("b", list(range(20, 32)))  # 3 blocks
    assert not mgr.can_swap_out(["a", "b"]) and mgr.can_swap_out(["a"])
    before = snapshot_state(mgr)
    with pytest.raises(OutOfBlocksError, match=r"cannot swap out sequences \['a', 'b'\]: needs 7 "
                                                r"free cpu blocks, 6 of 6 are free") as e:
        mgr.swap_out(["a", "b"])
    assert e.value.device == "cpu"
    assert snapshot_state(mgr) == before


def test_swap_in_without_gpu_room_refuses_the_whole_group(mgr):
    mgr.allocate("a", list(range(12)))
    mgr.allocate("b", list(range(20, 28)))
    mgr.swap_out(["a", "b"])
    mgr.allocate("hog", list(range(200, 236)))  # 9 of 12 GPU blocks
    assert mgr.can_swap_in(["a", "b"]) is AllocStatus.LATER
    before = snapshot_state(mgr)
    with pytest.raises(OutOfBlocksError, match=r"cannot swap in sequences \['a', 'b'\]: needs 5 "
                                                r"free gpu blocks, 3 of 12 are free"):
        mgr.swap_in(["a", "b"])
    assert snapshot_state(mgr) == before
    mgr.free("hog")
    assert mgr.can_swap_in(["a", "b"]) is AllocStatus.OK
    mgr.swap_in(["a", "b"])
    mgr.check_invariants()


def test_can_swap_in_never_when_larger_than_the_gpu():
    mgr = BlockManager(4, 2, num_cpu_blocks=8, watermark=0.0)
    mgr.allocate("a", [1] * 8)
    mgr.swap_out(["a"])
    mgr2 = BlockManager(4, 2, num_cpu_blocks=8, watermark=0.5)  # 2 blocks of watermark
    mgr2.allocate("a", [1] * 6)
    mgr2.swap_out(["a"])
    assert mgr.can_swap_in(["a"]) is AllocStatus.OK
    assert mgr2.can_swap_in(["a"]) is AllocStatus.NEVER


def test_swap_state_errors_leave_everything_intact(mgr):
    mgr.allocate("run", [1, 2])
    mgr.allocate("out", [3, 4])
    mgr.allocate("gone", [5])
    mgr.swap_out(["out"])
    mgr.free("gone")
    before = snapshot_state(mgr)
    with pytest.raises(SwapError, match="cannot swap in sequence 'run': it is running on the GPU"):
        mgr.swap_in(["out", "run"])
    with pytest.raises(SwapError, match="cannot swap out sequence 'out': it is swapped out"):
        mgr.swap_out(["run", "out"])
    with pytest.raises(FreedSequenceError, match="cannot swap out sequence 'gone': it was freed"):
        mgr.swap_out(["gone"])
    with pytest.raises(UnknownSequenceError, match="cannot swap in sequence 'x': it was never"):
        mgr.swap_in(["x"])
    with pytest.raises(InvalidArgumentError, match="cannot swap out sequence 'run' twice"):
        mgr.swap_out(["run", "run"])
    with pytest.raises(SwapError, match="cannot fork sequence 'out': it is swapped out"):
        mgr.fork("out", "child")
    with pytest.raises(SwapError, match="cannot build metadata for sequence 'out': it is swapped"):
        mgr.build_metadata(["out"])
    assert snapshot_state(mgr) == before


def test_free_a_swapped_sequence_returns_its_cpu_blocks(mgr):
    mgr.allocate("a", list(range(9)))
    mgr.swap_out(["a"])
    assert mgr.num_free_cpu_blocks == 3
    mgr.free("a")
    assert mgr.num_free_cpu_blocks == 6 and mgr.num_free_blocks == 12
    mgr.check_invariants()


def test_no_cpu_pool_means_no_swap():
    mgr = BlockManager(4, 2)
    mgr.allocate("a", [1, 2, 3])
    with pytest.raises(OutOfBlocksError, match="needs 2 free cpu blocks, 0 of 0 are free"):
        mgr.swap_out(["a"])

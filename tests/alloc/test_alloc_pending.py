"""Pending tokens: a decode append whose token id comes later (``PENDING_TOKEN`` + ``set_last_tokens``)."""

import random

import pytest

from pagedattn.alloc import PENDING_TOKEN, BlockManager, InvalidArgumentError, snapshot_state


def _pair(block_size=4, caching=True, num_cpu_blocks=0):
    return [BlockManager(64, block_size, num_cpu_blocks, enable_prefix_caching=caching) for _ in range(2)]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_pending_then_set_equals_known_appends(seed, caching):
    """Appending PENDING then setting the ids leaves the manager exactly as appending the ids."""
    rng = random.Random(seed)
    known, deferred = _pair(caching=caching)
    prompts = {i: [rng.randrange(50) for _ in range(rng.randrange(1, 11))] for i in range(5)}
    for mgr in (known, deferred):
        for i, p in prompts.items():
            mgr.allocate(i, p)
    for _ in range(13):
        ids = [i for i in prompts if rng.random() < 0.8]
        toks = [rng.randrange(50) for _ in ids]
        assert known.append_slots_batch(ids, toks) == deferred.append_slots_batch(ids, [PENDING_TOKEN] * len(ids))
        deferred.check_invariants()
        deferred.set_last_tokens(ids, toks)
        deferred.check_invariants()
        assert snapshot_state(known) == snapshot_state(deferred)


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_several_pending_tokens_then_set_oldest_first_equals_known_appends(seed, caching):
    """Up to 7 pending tokens a sequence (blocks of 3: a pending run spans up to 4 blocks), their
    ids given oldest first in as many calls, interleaved with more pending appends: the same
    manager as appending the ids, and no block is hashed before all its ids are known."""
    rng = random.Random(seed)
    known, deferred = (BlockManager(96, 3, enable_prefix_caching=caching) for _ in range(2))
    prompts = {i: [rng.randrange(50) for _ in range(rng.randrange(1, 8))] for i in range(6)}
    for mgr in (known, deferred):
        for i, p in prompts.items():
            mgr.allocate(i, p)
    queued: dict[int, list[int]] = {i: [] for i in prompts}  # per sequence, ids not given yet
    for _ in range(30):
        if rng.random() < 0.6:
            ids = [i for i in prompts if rng.random() < 0.7 and len(queued[i]) < 7]
            toks = [rng.randrange(50) for _ in ids]
            assert known.append_slots_batch(ids, toks) == deferred.append_slots_batch(
                ids, [PENDING_TOKEN] * len(ids))
            for i, t in zip(ids, toks):
                queued[i].append(t)
        else:
            ids = [i for i in prompts if queued[i] and rng.random() < 0.7]
            deferred.set_last_tokens(ids, [queued[i].pop(0) for i in ids])
        deferred.check_invariants()
        for i in prompts:
            assert int(deferred.arrays.pending[deferred._seqs[i].row]) == len(queued[i])
        if caching:  # cached blocks: exactly those whose ids are all known
            assert set(deferred.gpu_pool.cached_blocks) <= set(known.gpu_pool.cached_blocks)
    ids = [i for i in prompts if queued[i]]
    while ids:
        deferred.set_last_tokens(ids, [queued[i].pop(0) for i in ids])
        deferred.check_invariants()
        ids = [i for i in ids if queued[i]]
    assert snapshot_state(known) == snapshot_state(deferred)
    for i in prompts:
        known.free(i)
        deferred.free(i)
    assert snapshot_state(known) == snapshot_state(deferred)


def test_mixed_known_and_pending_rows():
    known, deferred = _pair(block_size=2)
    for mgr in (known, deferred):
        mgr.allocate("a", [1])
        mgr.allocate("b", [2])
    known.append_slots_batch(["a", "b"], [7, 8])
    deferred.append_slots_batch(["a", "b"], [7, PENDING_TOKEN])  # "b" fills its block while pending
    assert known.probe_prefix([2, 8, 9])[0] == 2
    assert deferred.probe_prefix([2, 8, 9])[0] == 0  # not hashed while its last id is unknown
    deferred.set_last_tokens(["b"], [8])
    assert deferred.probe_prefix([2, 8, 9])[0] == 2
    assert snapshot_state(known) == snapshot_state(deferred)


def test_pending_sequence_refuses_append_fork_swap_and_state_is_kept():
    mgr = BlockManager(16, 4, 8)
    mgr.allocate("a", [1, 2, 3])
    mgr.append_slots_batch(["a"], [PENDING_TOKEN])
    mgr.append_slots_batch(["a"], [PENDING_TOKEN])  # a second pending token (a new block)
    before = snapshot_state(mgr)
    with pytest.raises(InvalidArgumentError, match="pending"):
        mgr.append_slots_batch(["a"], [5])
    with pytest.raises(InvalidArgumentError, match="pending"):
        mgr.append_slots("a", [5])
    with pytest.raises(InvalidArgumentError, match="pending"):
        mgr.fork("a", "b")
    with pytest.raises(InvalidArgumentError, match="pending"):
        mgr.swap_out(["a"])
    with pytest.raises(InvalidArgumentError, match="known ids"):
        mgr.set_last_tokens(["a"], [PENDING_TOKEN])
    with pytest.raises(InvalidArgumentError, match="one per sequence"):
        mgr.set_last_tokens(["a"], [4, 5])
    assert snapshot_state(mgr) == before
    mgr.set_last_tokens(["a"], [4])
    with pytest.raises(InvalidArgumentError, match="pending"):
        mgr.fork("a", "b")  # one token still pending
    mgr.set_last_tokens(["a"], [6])
    assert mgr.probe_prefix([1, 2, 3, 4, 6])[0] == 4
    with pytest.raises(InvalidArgumentError, match="no pending token"):
        mgr.set_last_tokens(["a"], [4])
    mgr.append_slots("a", [5])
    mgr.check_invariants()


def test_append_slots_rejects_pending_token_and_free_clears_the_flag():
    mgr = BlockManager(16, 4)
    mgr.allocate("a", [1])
    with pytest.raises(InvalidArgumentError, match="append_slots_batch"):
        mgr.append_slots("a", [PENDING_TOKEN])
    mgr.append_slots_batch(["a"], [PENDING_TOKEN])
    mgr.free("a")
    mgr.check_invariants()
    assert mgr.arrays.num_pending == 0
    mgr.allocate("b", [1, 2])
    mgr.append_slots_batch(["b"], [3])  # the reused row is not pending
    mgr.check_invariants()

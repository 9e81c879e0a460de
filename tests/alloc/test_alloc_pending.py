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
    with pytest.raises(InvalidArgumentError, match="no pending last token"):
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

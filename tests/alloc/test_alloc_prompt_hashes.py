"""Block hashes computed before ``allocate`` (``hash_prompt_blocks`` and
``allocate(..., block_hashes=...)``): the same digests as the documented chain, the same allocator
state as the plain path, the pool's pre-hashed take equal to taking then registering in turn,
and every mismatch refused with the manager unchanged."""

import copy
import random

import numpy as np
import pytest

from pagedattn.alloc import (BlockManager, BlockPool, InvalidArgumentError, OutOfBlocksError,
                             PromptBlockHashes, encode_extra_keys, hash_prompt_blocks,
                             snapshot_state)
from tests.alloc.pool_cases import TinyHash, ids, pool_state, random_cached_pool, reference_chain


# ------------------------------------------------------------------------- hash_prompt_blocks
@pytest.mark.parametrize("convert", [list, tuple, lambda p: np.asarray(p, np.int32),
                                     lambda p: np.asarray(p, np.int64),
                                     lambda p: np.repeat(np.asarray(p, np.int32), 2)[::2]])
@pytest.mark.parametrize("extra", [None, "tenant-7", ("adapter", 3)])
def test_hash_prompt_blocks_is_the_documented_chain(convert, extra):
    prompt = [7, 0, 0, 0, 3, 2**31 - 1, 0, 9, -4]
    hashes = hash_prompt_blocks(convert(prompt), 2, extra)
    chain = reference_chain(prompt, 2, extra)
    assert list(zip(hashes.block_keys, hashes.block_hashes)) == chain
    assert hashes.num_blocks == 4 and hashes.block_size == 2
    assert hashes.extra_keys == encode_extra_keys(extra)
    assert hashes.token_bytes == np.asarray(prompt[:8], "<i4").tobytes()


def test_hash_prompt_blocks_of_a_prompt_shorter_than_a_block():
    hashes = hash_prompt_blocks([1, 2, 3], 4)
    assert hashes.num_blocks == 0 and hashes.block_hashes == () and hashes.token_bytes == b""
    assert hash_prompt_blocks([], 4).num_blocks == 0


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 4, 5, 8, 9, 11])
def test_prefix_is_the_hashes_of_the_leading_tokens(num_tokens):
    prompt = list(range(100, 111))  # 11 tokens: 2 full blocks of 4 and a partial one
    hashes = hash_prompt_blocks(prompt, 4, "salt")
    got, want = hashes.prefix(num_tokens), hash_prompt_blocks(prompt[:num_tokens], 4, "salt")
    assert (got.block_keys, got.block_hashes, got.token_bytes, got.extra_keys, got.block_size) == (
        want.block_keys, want.block_hashes, want.token_bytes, want.extra_keys, want.block_size)
    mgr = BlockManager(8, 4)
    assert mgr.allocate("a", prompt[:num_tokens] or [1], "salt", block_hashes=got if num_tokens else None) == 0


@pytest.mark.parametrize("num_tokens", [-1, 12, 100, 2.0])
def test_prefix_refuses_tokens_that_were_not_hashed(num_tokens):
    with pytest.raises(InvalidArgumentError, match="num_tokens must be in"):
        hash_prompt_blocks(list(range(11)), 4).prefix(num_tokens)


def test_hash_prompt_blocks_is_immutable():
    hashes = hash_prompt_blocks([1, 2, 3, 4], 2)
    with pytest.raises(AttributeError):
        hashes.block_size = 4


@pytest.mark.parametrize("tokens, block_size, extra, match", [
    ([1, 2], 0, None, "block_size must be a positive int"),
    ([1, 2], 2.0, None, "block_size must be a positive int"),
    ([1, 2], True, None, "block_size must be a positive int"),
    ([1, 2**31], 2, None, "int32"),
    ([[1, 2]], 2, None, "1-D"),
    ([1, 2], 2, object(), "extra_keys may hold"),
])
def test_hash_prompt_blocks_rejects_bad_input(tokens, block_size, extra, match):
    with pytest.raises(InvalidArgumentError, match=match):
        hash_prompt_blocks(tokens, block_size, extra)


# --------------------------------------------------------------- allocate: same as the plain path
def run_both(ops, num_blocks, block_size, caching=True):
    """Apply ``ops`` to two managers, one hashing in ``allocate``, one given ``block_hashes``;
    compare every return value and the whole state after each op."""
    plain = BlockManager(num_blocks, block_size, enable_prefix_caching=caching, watermark=0.0)
    hashed = BlockManager(num_blocks, block_size, enable_prefix_caching=caching, watermark=0.0)
    for op in ops:
        if op[0] == "alloc":
            _, sid, tokens, extra = op
            prehashed = hash_prompt_blocks(tokens, block_size, extra)
            outcomes = []
            for mgr, kwargs in ((plain, {}), (hashed, {"block_hashes": prehashed})):
                try:
                    outcomes.append(mgr.allocate(sid, tokens, extra, **kwargs))
                except OutOfBlocksError as exc:
                    outcomes.append((type(exc), exc.num_required, exc.num_free))
            assert outcomes[0] == outcomes[1]
        elif op[1] in plain:  # (an allocation refused for lack of blocks left nothing to free)
            plain.free(op[1])
            hashed.free(op[1])
        assert snapshot_state(plain) == snapshot_state(hashed)
        for sid in plain.seq_ids():
            assert plain.get_block_table(sid) == hashed.get_block_table(sid)
    hashed.check_invariants()
    return plain, hashed


def random_ops(rng, num_ops, block_size, vocab, max_len):
    ops, live, prompts, next_id = [], [], [], 0
    for _ in range(num_ops):
        if live and rng.random() < 0.4:
            sid = live.pop(rng.randrange(len(live)))
            ops.append(("free", sid))
            continue
        if prompts and rng.random() < 0.5:  # a seen prefix, maybe under another salt
            tokens, extra = rng.choice(prompts)
            tokens = tokens[: rng.randrange(len(tokens) + 1)] + [rng.randrange(vocab)] * rng.randrange(3)
            extra = rng.choice([extra, None, "other"])
        else:
            tokens = [rng.randrange(vocab) for _ in range(rng.randrange(max_len))]
            extra = rng.choice([None, "tenant-a", ("tenant-b", 7)])
        next_id += 1
        ops.append(("alloc", next_id, tokens, extra))
        live.append(next_id)
        prompts.append((tokens, extra))
    return ops


@pytest.mark.parametrize("seed", range(40))
def test_allocate_with_block_hashes_leaves_the_same_state(seed):
    """Prefix hits (revived free blocks included), evictions, out-of-blocks refusals and
    partly filled tails, in lockstep with the plain path."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 3, 4])
    ops = random_ops(rng, 60, block_size, vocab=3, max_len=5 * block_size)
    plain, hashed = run_both(ops, num_blocks=rng.randint(6, 24), block_size=block_size,
                             caching=seed % 5 != 0)
    assert plain.num_evictions == hashed.num_evictions
    assert plain.prefix_cache_hit_rate == hashed.prefix_cache_hit_rate


def test_allocate_with_block_hashes_hits_evicts_and_registers_like_the_plain_path():
    # Warm pool: round 1 cached, then freed; round 2 (distinct) evicts it; round 3 hits round 2.
    rng = np.random.default_rng(0)
    rounds = [rng.integers(0, 100, (4, 33), dtype=np.int32) for _ in range(2)]
    ops, sid = [], 0
    for prompts in rounds + [rounds[1]]:
        for p in prompts:
            sid += 1
            ops.append(("alloc", sid, p, "salt"))
        ops.extend(("free", s) for s in range(sid - 3, sid + 1))
    plain, hashed = run_both(ops, num_blocks=4 * 9, block_size=4)
    assert hashed.num_evictions == plain.num_evictions > 0
    assert hashed.prefix_cache_hit_rate == plain.prefix_cache_hit_rate > 0


# ------------------------------------------------------------------------- bad block_hashes
@pytest.fixture
def busy_manager():
    mgr = BlockManager(16, 2)
    mgr.allocate("a", [1, 2, 3, 4, 5], "salt")
    mgr.allocate("b", [1, 2, 9], "salt")
    mgr.free("a")
    return mgr


@pytest.mark.parametrize("make_hashes, match", [
    (lambda: hash_prompt_blocks([1, 2, 3, 4, 6], 4, "salt"), "block size 4, the allocator uses 2"),
    (lambda: hash_prompt_blocks([1, 2, 3, 4, 6], 2, "other"), "other extra_keys"),
    (lambda: hash_prompt_blocks([1, 2, 3, 4, 6], 2), "other extra_keys"),
    (lambda: hash_prompt_blocks([1, 2, 3, 5, 6], 2, "salt"), "other token ids"),  # same length
    (lambda: hash_prompt_blocks([1, 2, 3], 2, "salt"), "other token ids"),
    (lambda: hash_prompt_blocks([1, 2, 3, 4, 6, 7], 2, "salt"), "other token ids"),
    (lambda: [b"x" * 72], "must come from hash_prompt_blocks"),
    (lambda: hash_prompt_blocks([1, 2, 3, 4, 6], 2, "salt").block_hashes,
     "must come from hash_prompt_blocks"),
])
def test_allocate_refuses_block_hashes_of_another_prompt(busy_manager, make_hashes, match):
    before = snapshot_state(busy_manager)
    with pytest.raises(InvalidArgumentError, match=match):
        busy_manager.allocate("c", [1, 2, 3, 4, 6], "salt", block_hashes=make_hashes())
    assert snapshot_state(busy_manager) == before
    # The right hashes are taken, and hit "a"'s first two blocks.
    good = hash_prompt_blocks([1, 2, 3, 4, 6], 2, "salt")
    assert busy_manager.allocate("c", [1, 2, 3, 4, 6], "salt", block_hashes=good) == 4


def test_allocate_with_block_hashes_out_of_blocks_changes_nothing():
    mgr = BlockManager(4, 2)
    mgr.allocate("a", [1, 2, 3])
    before = snapshot_state(mgr)
    tokens = [5, 6, 7, 8, 9, 10]
    with pytest.raises(OutOfBlocksError):
        mgr.allocate("b", tokens, block_hashes=hash_prompt_blocks(tokens, 2))
    assert snapshot_state(mgr) == before


def test_block_hashes_are_checked_even_without_prefix_caching():
    mgr = BlockManager(8, 2, enable_prefix_caching=False)
    with pytest.raises(InvalidArgumentError, match="other token ids"):
        mgr.allocate("a", [1, 2, 3], block_hashes=hash_prompt_blocks([1, 3, 3], 2))
    assert mgr.allocate("a", [1, 2, 3], block_hashes=hash_prompt_blocks([1, 2, 3], 2)) == 0
    assert mgr.gpu_pool.num_cached_blocks == 0


# -------------------------------------------------------------------- pool: take_hashed_blocks
def reference_take_then_register(pool, num_blocks, keys, hashes, extra):
    """get_new_blocks, then each key registered in turn unless another block holds it."""
    blocks = pool.get_new_blocks(num_blocks)
    for block, key, block_hash in zip(blocks, keys, hashes):
        if pool.cached_blocks.setdefault(key, block) is block:
            block.block_key, block.block_hash, block.extra_keys = key, block_hash, extra
    return blocks


@pytest.mark.parametrize("seed", range(300))
def test_take_hashed_blocks_equals_take_then_register(seed):
    """Keys held by a free block the same call takes, by a used block, by a free block it
    does not take, and repeated keys: all as registering block by block after the take."""
    rng = random.Random(seed)
    pool = random_cached_pool(rng)
    num_blocks = rng.randint(0, pool.num_free_blocks)
    num_keys = max(0, num_blocks - rng.randint(0, 1))
    start_parent = parent = bytes([rng.randrange(3)]) * 4
    chunks, keys, hashes = [bytes([rng.randrange(3)]) for _ in range(num_keys)], [], []
    for chunk in chunks:
        key = parent + chunk
        parent = TinyHash(key).digest()
        keys.append(key)
        hashes.append(parent)
    extra = rng.choice([b"", b"x"])
    ref, fused = copy.deepcopy(pool), copy.deepcopy(pool)
    got = pool.take_hashed_blocks(num_blocks, keys, hashes, extra)
    want = reference_take_then_register(ref, num_blocks, keys, hashes, extra)
    assert ids(got) == ids(want)
    assert pool_state(pool) == pool_state(ref)
    # Hashing the same chain inside the take (the plain path) gives the same state.
    fused_blocks, _ = fused.get_new_cached_blocks(num_blocks, chunks, start_parent, extra, TinyHash)
    assert ids(fused_blocks) == ids(got) and pool_state(fused) == pool_state(pool)
    assert all(block.block_key == key for key, block in pool.cached_blocks.items())


def test_take_hashed_blocks_out_of_blocks_or_bad_keys_changes_nothing():
    pool = BlockPool(2)
    before = pool_state(pool)
    with pytest.raises(OutOfBlocksError):
        pool.take_hashed_blocks(3, [b"a", b"b", b"c"], [b"1", b"2", b"3"], b"")
    with pytest.raises(ValueError, match="2 keys for 1 blocks"):
        pool.take_hashed_blocks(1, [b"a", b"b"], [b"1", b"2"], b"")
    assert pool_state(pool) == before


def test_prompt_block_hashes_type_is_exported():
    assert isinstance(hash_prompt_blocks([1, 2], 2), PromptBlockHashes)

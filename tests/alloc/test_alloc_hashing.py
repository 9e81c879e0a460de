"""Block hashes: the documented chain, extra keys, token validation, exactness of hits."""

import hashlib
import itertools

import numpy as np
import pytest

import pagedattn.alloc.block_manager as block_manager_module
from pagedattn.alloc import (BlockManager, InvalidArgumentError, as_token_array,
                             encode_extra_keys, hash_block_tokens, hash_token_blocks, root_hash)


def reference_chain(tokens, block_size, extra_keys=None):
    """The chain as the hashing module's docstring states it, written out independently."""
    parent = hashlib.blake2b(b"pagedattn.alloc.root/1\x00" + encode_extra_keys(extra_keys)).digest()
    out = []
    for i in range(len(tokens) // block_size):
        chunk = np.asarray(tokens[i * block_size:(i + 1) * block_size], dtype="<i4").tobytes()
        key = parent + chunk
        parent = hashlib.blake2b(key).digest()
        out.append((key, parent))
    return out


def test_chain_matches_the_documented_formula():
    tokens = as_token_array([5, 6, 7, 8, 9, 10, 11])
    got = hash_token_blocks(root_hash(b""), tokens, 3)
    assert got == reference_chain([5, 6, 7, 8, 9, 10, 11], 3)
    assert len(got) == 2
    key, digest = hash_block_tokens(got[0][1], tokens[3:6].tobytes())
    assert (key, digest) == got[1]


def test_block_hash_commits_to_the_whole_prefix():
    a = hash_token_blocks(root_hash(b""), as_token_array([1, 2, 3, 4]), 2)
    b = hash_token_blocks(root_hash(b""), as_token_array([9, 2, 3, 4]), 2)
    assert a[1][0][-8:] == b[1][0][-8:]  # same tokens in block 1 ...
    assert a[1][1] != b[1][1]  # ... but a different prefix, so a different hash


def test_manager_registers_blocks_under_the_documented_keys():
    mgr = BlockManager(8, 2)
    mgr.allocate("s", [3, 1, 4, 1, 5], extra_keys=("tenant", 1))
    expected = reference_chain([3, 1, 4, 1, 5], 2, ("tenant", 1))
    blocks = [mgr.gpu_pool.blocks[i] for i in mgr.get_block_table("s")]
    assert [(b.block_key, b.block_hash) for b in blocks[:2]] == expected
    assert blocks[2].block_key is None  # the partly filled last block is not cached


def test_no_extra_keys_encode_as_empty():
    assert encode_extra_keys(None) == encode_extra_keys(()) == b""
    assert encode_extra_keys(("",)) != b""


def test_extra_keys_encoding_is_unambiguous():
    values = [None, True, False, 0, 1, -1, 2**70, 1.0, 0.5, "", "a", "1", b"", b"a", (), ("a",),
              ("a", "b"), ("ab",), (("a",), "b"), ("a", ("b",)), [1, 2], (1, (2,)), "tenant-7"]
    encodings = {}
    for v in values:
        enc = encode_extra_keys(v)
        if v is None or v == ():
            continue
        key = repr(v) if not isinstance(v, list) else repr(tuple(v))
        encodings.setdefault(enc, set()).add(key)
    clashes = {enc: vs for enc, vs in encodings.items() if len(vs) > 1}
    assert not clashes
    # 1 and True are different keys, as are 1 and 1.0 and "1".
    assert len({encode_extra_keys(v) for v in (1, True, 1.0, "1", b"1")}) == 5


def test_extra_keys_reject_unhashable_types():
    with pytest.raises(InvalidArgumentError, match="extra_keys may hold .* got dict"):
        encode_extra_keys({"a": 1})
    with pytest.raises(InvalidArgumentError, match="got set"):
        encode_extra_keys(("ok", {1}))


def test_root_hash_differs_per_salt():
    roots = {root_hash(encode_extra_keys(s)) for s in (None, "a", "b", ("a",), ("a", 1))}
    assert len(roots) == 5


def test_as_token_array_accepts_lists_and_arrays_without_copy():
    arr = np.arange(5, dtype=np.int32)
    assert as_token_array(arr) is arr
    assert as_token_array([1, 2, 3]).dtype == np.dtype("<i4")
    assert as_token_array(np.array([1, 2], dtype=np.int64)).tolist() == [1, 2]
    assert as_token_array(np.array([1, 2], dtype=np.uint8)).tolist() == [1, 2]
    assert as_token_array([]).shape == (0,)


@pytest.mark.parametrize("bad, match", [
    ([2**31], "int32"),
    (np.array([2**40], dtype=np.int64), r"outside \[-2147483648, 2147483647\]"),
    (np.array([2**32 - 1], dtype=np.uint32), "outside"),
    ([1.5, 2.0], "integer token ids, got dtype float64"),
    (np.zeros((2, 2), np.int32), "1-D sequence of token ids, got shape"),
    (["a"], "integer token ids"),
])
def test_as_token_array_rejects_bad_ids(bad, match):
    with pytest.raises(InvalidArgumentError, match=match):
        as_token_array(bad, "token_ids")


def test_exactness_last_link_and_salt_do_not_depend_on_the_hash(monkeypatch):
    """With a hash that collides on *everything*, the byte-for-byte key and the extra-key
    comparison still keep different blocks and different salts apart (the documented
    exactness); only the parent link relies on the hash."""

    class Constant:
        def __init__(self, data=b""):
            pass

        def update(self, data):
            pass

        def copy(self):
            return Constant()

        def digest(self):
            return bytes(64)

    monkeypatch.setattr(block_manager_module, "_hash_fn", Constant)
    monkeypatch.setattr("pagedattn.alloc.append._hash_fn", Constant)
    monkeypatch.setattr("pagedattn.alloc.hashing._hash_fn", Constant)
    monkeypatch.setattr("pagedattn.alloc.hashing._root_cache", {})
    mgr = BlockManager(32, 2)
    assert mgr.allocate("a", [1, 2, 3, 4, 0]) == 0
    # Different last-link tokens: no hit although every hash is equal.
    assert mgr.allocate("b", [1, 2, 3, 5, 0]) == 2
    assert mgr.get_block_table("b")[1] != mgr.get_block_table("a")[1]
    # Same tokens under another salt: no hit although every hash is equal.
    assert mgr.allocate("c", [1, 2, 3, 4, 0], extra_keys="tenant-2") == 0
    assert not set(mgr.get_block_table("c")) & set(mgr.get_block_table("a"))
    # Same tokens, same salt: the hit is taken.
    assert mgr.allocate("d", [1, 2, 3, 4, 0]) == 4
    assert mgr.get_block_table("d")[:2] == mgr.get_block_table("a")[:2]


def test_real_hash_keeps_prefixes_apart():
    mgr = BlockManager(32, 2)
    mgr.allocate("a", [1, 2, 3, 4, 0])
    # Block 1 equal, block 0 different: the parent hash differs, so block 1 is not shared.
    assert mgr.allocate("b", [9, 9, 3, 4, 0]) == 0
    assert not set(mgr.get_block_table("b")) & set(mgr.get_block_table("a"))
    mgr.check_invariants()


def test_many_random_prompts_never_share_a_block_with_different_content():
    rng = np.random.default_rng(0)
    mgr = BlockManager(4096, 2)
    contents = {}
    for i in range(300):
        prompt = rng.integers(0, 3, rng.integers(1, 12)).tolist()
        mgr.allocate(i, prompt)
        for pos, bid in enumerate(mgr.get_block_table(i)):
            chunk = tuple(prompt[: (pos + 1) * 2])  # the prefix a block's KV depends on
            if len(chunk) == (pos + 1) * 2:
                assert contents.setdefault(bid, chunk) == chunk
    assert mgr.prefix_cache_hit_rate > 0.3
    mgr.check_invariants()


def test_itertools_sanity_of_reference_chain():
    # The reference chain itself distinguishes every 2-block prompt over a 2-token vocabulary.
    prompts = list(itertools.product([0, 1], repeat=4))
    hashes = {reference_chain(list(p), 2)[-1][1] for p in prompts}
    assert len(hashes) == len(prompts)


def test_split_token_blocks_keeps_every_byte():
    from pagedattn.alloc.hashing import split_token_blocks

    tokens = as_token_array([0, 0, 1, 0, 2**31 - 1, -1, 0, 0, 5])  # zero bytes at block ends
    assert split_token_blocks(tokens, 4, 2) == (tokens[:4].tobytes(), tokens[4:8].tobytes())
    assert split_token_blocks(tokens, 4, 0) == ()
    assert split_token_blocks(tokens[1:], 4, 1) == (tokens[1:5].tobytes(),)  # offset view
    strided = np.arange(40, dtype=np.int32)[::3]
    assert split_token_blocks(strided, 2, 3) == tuple(strided[i:i + 2].tobytes() for i in (0, 2, 4))


@pytest.mark.parametrize("convert", [
    list, lambda p: np.asarray(p, dtype=np.int32), lambda p: np.asarray(p, dtype=np.int64),
    lambda p: np.repeat(np.asarray(p, dtype=np.int32), 2)[::2],  # non-contiguous
])
def test_allocate_hashes_every_token_container_alike(convert):
    prompt = [7, 0, 0, 0, 3, 2**31 - 1, 0, 9, 4]
    mgr = BlockManager(8, 2)
    mgr.allocate("s", convert(prompt), extra_keys="t")
    blocks = [mgr.gpu_pool.blocks[i] for i in mgr.get_block_table("s")]
    assert [(b.block_key, b.block_hash) for b in blocks[:4]] == reference_chain(prompt, 2, "t")
    assert blocks[4].block_key is None
    mgr.check_invariants()

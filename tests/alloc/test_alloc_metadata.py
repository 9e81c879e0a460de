"""Batch metadata: padded block tables and slot mapping, checked against a per-token loop."""

import numpy as np
import pytest

from pagedattn.alloc import PAD_SLOT_ID, BlockManager, InvalidArgumentError


def naive(mgr, seq_ids, num_new, num_computed=None):
    """Per-token reference: (block_tables rows, slot_mapping, seq_lens, positions)."""
    bs = mgr.block_size
    slots, positions, seq_lens, tables = [], [], [], []
    for i, s in enumerate(seq_ids):
        table = mgr.get_block_table(s)
        n = mgr.get_num_tokens(s)
        new = num_new if np.isscalar(num_new) else num_new[i]
        start = n - new if num_computed is None else num_computed[i]
        for p in range(start, start + new):
            slots.append(table[p // bs] * bs + p % bs)
            positions.append(p)
        seq_lens.append(start + new)
        tables.append(table)
    return tables, slots, seq_lens, positions


def check(mgr, seq_ids, num_new=1, num_computed=None, **kw):
    meta = mgr.build_metadata(seq_ids, num_new, num_computed, **kw)
    tables, slots, seq_lens, positions = naive(mgr, seq_ids, num_new, num_computed)
    assert meta.block_tables.dtype == np.int32 and meta.slot_mapping.dtype == np.int64
    assert meta.seq_lens.dtype == np.int32 and meta.query_start_loc.dtype == np.int32
    assert meta.num_tokens == len(slots)
    assert meta.slot_mapping[: len(slots)].tolist() == slots
    assert meta.positions[: len(slots)].tolist() == positions
    assert meta.seq_lens.tolist() == seq_lens
    pad = mgr.arrays.pad_block_id
    width = meta.block_tables.shape[1]
    assert width >= max([-(-n // mgr.block_size) for n in seq_lens] + [1])
    for row, table in zip(meta.block_tables.tolist(), tables):
        assert row == (table + [pad] * width)[:width]  # blocks past seq_len may be cut off
    counts = np.diff(meta.query_start_loc).tolist()
    assert counts == [num_new] * len(seq_ids) if np.isscalar(num_new) else counts == list(num_new)
    return meta


@pytest.fixture
def mgr():
    m = BlockManager(200, 4, watermark=0.0)
    for s, n in enumerate([1, 4, 5, 9, 16, 30]):
        m.allocate(s, list(range(n)))
    return m


def test_decode_metadata_after_appends(mgr):
    seqs = [5, 0, 3, 1, 4, 2]
    for step in range(9):
        mgr.append_slots_batch(seqs, [step] * len(seqs))
        meta = check(mgr, seqs)
        width = max(len(mgr.get_block_table(s)) for s in seqs)
        assert meta.block_tables.shape == (len(seqs), width)


def test_prefill_metadata_for_mixed_batches(mgr):
    # Whole prompts, a decode token and a partial prefill in one batch.
    check(mgr, [0, 1, 2, 3, 4, 5], np.array([1, 4, 5, 9, 16, 30]))
    check(mgr, [5, 3], [1, 7])
    check(mgr, [4, 5], [0, 2])  # a sequence may contribute no token


def test_chunked_prefill_with_explicit_computed_tokens(mgr):
    meta = check(mgr, [5, 4], [8, 4], num_computed=[8, 0])
    assert meta.seq_lens.tolist() == [16, 4]
    assert meta.block_tables.shape[1] == 4  # width follows the context length of the step


def test_padding_and_fixed_width(mgr):
    meta = check(mgr, [2, 3], 1, num_padded_tokens=8, max_num_blocks=10)
    assert meta.slot_mapping[2:].tolist() == [PAD_SLOT_ID] * 6
    assert meta.positions[2:].tolist() == [0] * 6
    assert meta.block_tables.shape == (2, 10)
    wide = check(mgr, [5], 1, max_num_blocks=mgr.arrays.width + 5)
    assert wide.block_tables.shape[1] == mgr.arrays.width + 5


def test_custom_pad_block_id():
    m = BlockManager(10, 2, pad_block_id=-1, watermark=0.0)
    m.allocate("a", [1])
    m.allocate("b", [1, 2, 3, 4, 5])
    meta = check(m, ["a", "b"])
    assert meta.block_tables[0].tolist() == [m.get_block_table("a")[0], -1, -1]


def test_metadata_arrays_are_fresh_copies(mgr):
    meta = mgr.build_metadata([3])
    meta.block_tables[:] = 99
    meta.slot_mapping[:] = 99
    check(mgr, [3])


def test_empty_batch(mgr):
    meta = mgr.build_metadata([])
    assert meta.num_tokens == 0 and meta.slot_mapping.shape == (0,)
    assert meta.block_tables.shape == (0, 1) and meta.query_start_loc.tolist() == [0]


def test_metadata_follows_copy_on_write_and_swaps():
    m = BlockManager(20, 4, num_cpu_blocks=8, watermark=0.0)
    m.allocate("p", list(range(6)))
    m.fork("p", "c")
    before = m.build_metadata(["p", "c"]).block_tables.copy()
    m.append_slots_batch(["p", "c"], [1, 2])
    after = check(m, ["p", "c"])
    assert after.block_tables[0, 1] != before[0, 1]  # p copied-on-write to a new block
    assert after.block_tables[1, 1] == before[1, 1]  # c kept the original
    m.swap_out(["p"])
    m.allocate("x", list(range(50, 70)))
    m.swap_in(["p"])
    check(m, ["p", "c", "x"])


@pytest.mark.parametrize("kwargs, match", [
    ({"num_new_tokens": 2, "num_padded_tokens": 3}, "num_padded_tokens=3 is smaller than the 4"),
    ({"num_new_tokens": 1, "max_num_blocks": 2}, "max_num_blocks=2 is smaller than the 3 blocks"),
    ({"num_new_tokens": [1, 10]}, "batch position 1: num_new_tokens = 10 exceeds the 9 tokens "
                                  "allocated"),
    ({"num_new_tokens": [-1, 1]}, "must be >= 0"),
    ({"num_new_tokens": [1, 1], "num_computed_tokens": [5, 0]},
     r"batch position 0: num_computed_tokens \+ num_new_tokens = 6 exceeds the 5 tokens"),
    ({"num_new_tokens": [1, 1], "num_computed_tokens": [0, -2]}, "must be >= 0"),
    ({"num_new_tokens": [1, 1, 1]}, r"num_new_tokens must be an int or one int per sequence \(2\)"),
])
def test_metadata_argument_errors(mgr, kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        mgr.build_metadata([2, 3], **kwargs)


def test_decode_metadata_refuses_an_empty_sequence():
    m = BlockManager(4, 2)
    m.allocate("e", [])
    with pytest.raises(InvalidArgumentError, match="a sequence of the batch holds no token"):
        m.build_metadata(["e"])


def test_unknown_sequence_in_batch(mgr):
    from pagedattn.alloc import UnknownSequenceError

    with pytest.raises(UnknownSequenceError, match="cannot build metadata for sequence 77"):
        mgr.build_metadata([1, 77])

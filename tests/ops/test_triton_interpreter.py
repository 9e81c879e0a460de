"""A small subset of every Triton kernel, run on the CPU under the Triton interpreter.

On a GPU machine these run the compiled kernels instead; the wide sweeps live in the GPU tests.
"""

import pytest
import torch

from pagedattn.ops import config, copy_blocks, reference, reshape_and_cache
from tests.ops.problems import make_decode_problem, run_decode_and_check

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_backend():
    config.set_backend("triton")
    yield
    config.set_backend("auto")


DECODE_CASES = [
    # dtype, heads, kv heads, head size, block size, seq_lens, features
    (torch.float32, 4, 1, 64, 16, [1, 15, 16, 17, 40], {}),
    (torch.float32, 4, 4, 80, 1, [3, 9], {"num_splits": 2}),
    (torch.bfloat16, 8, 2, 128, 4, [5, 20, 33], {"sliding_window": 7, "softcap": 5.0}),
    (torch.float16, 2, 2, 96, 256, [300, 1], {"layout": "NHD"}),
    (torch.float32, 4, 2, 112, 8, [0, 17, 40], {"num_splits": 3, "sliding_window": 9, "alibi": True}),
    (torch.float16, 16, 1, 64, 2, [31, 7], {"alibi": True, "repeat_ids": True, "return_lse": False}),
    (torch.float32, 2, 1, 192, 32, [70, 33], {"softcap": 2.0, "num_splits": 2}),
    (torch.bfloat16, 2, 2, 256, 64, [65, 1], {"repeat_ids": True}),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-b{c[4]}")
def test_decode_kernel_matches_reference(case):
    dtype, heads, kv_heads, head_size, block_size, lens, feats = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(heads * 1000 + head_size * 10 + block_size)
    problem = make_decode_problem(lens, heads, kv_heads, head_size, block_size, dtype, DEVICE,
                                  layout=feats.pop("layout", "HND"), repeat_ids=feats.pop("repeat_ids", False),
                                  alibi=feats.pop("alibi", False), generator=g)
    run_decode_and_check(problem, dtype, what=str(case), **feats)


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-b{c[4]}")
def test_decode_kernel_load_orders_match_reference(case, prefetch, monkeypatch):
    """The orders of a tile's loads other than the default (``DECODE_TUNING["prefetch"]`` 4: the block table
    read one tile ahead for the compiler's pipeliner): V issued after the scores (the order up to 2026-11-27), V
    issued with K, the next tile's K and V issued before this tile's products, and with the block table read two
    tiles ahead (the reads past the last tile read nothing: every column masked)."""
    from pagedattn.ops import launchers

    monkeypatch.setitem(launchers.DECODE_TUNING, "prefetch", prefetch)
    test_decode_kernel_matches_reference(case)


@pytest.mark.parametrize("prefetch", [0, 3, 4])
@pytest.mark.parametrize("per_seq", [False, True], ids=["one-program", "per-sequence-splits"])
def test_decode_kernel_masks_bad_values(per_seq, prefetch, monkeypatch):
    """Block ids outside the pool are skipped and lengths clamped, exactly as the reference does, with one
    program a sequence and with per-sequence splits (forced: parts of >= 16 tokens, the clamped one split too),
    with a tile's loads in their default order and with the next tile's prefetched."""
    from pagedattn.ops import launchers

    monkeypatch.setitem(launchers.DECODE_TUNING, "prefetch", prefetch)
    if per_seq:
        monkeypatch.setattr(launchers, "plan_decode_splits", lambda *a: launchers.SplitPlan(3, True, 16, 0))
    g = torch.Generator().manual_seed(5)
    p = make_decode_problem([60, 9, 40] if per_seq else [20, 9, 12], 4, 2, 64, 4, torch.float32, DEVICE, generator=g)
    p.key_cache.nan_to_num_(0.5)
    p.value_cache.nan_to_num_(0.25)
    p.block_tables[0, 3 if per_seq else 1] = 10_000
    p.block_tables[1 + per_seq, 0] = -3
    p.seq_lens[2 - per_seq] = 1_000_000  # clamped to the table's capacity
    run_decode_and_check(p, torch.float32, what=f"bad values, per_seq={per_seq}, prefetch={prefetch}")


def test_reshape_and_cache_kernel_matches_reference():
    g = torch.Generator().manual_seed(1)
    for layout in ("HND", "NHD"):
        from pagedattn.ops import allocate_kv_cache
        kc, vc = allocate_kv_cache(6, 4, 2, 64, torch.bfloat16, DEVICE, layout)
        kc.copy_(torch.randn(kc.shape, generator=g))
        vc.copy_(torch.randn(vc.shape, generator=g))
        ref_k, ref_v = kc.clone(), vc.clone()
        key = torch.randn((9, 2, 64), generator=g).to(DEVICE, torch.bfloat16)
        value = torch.randn((9, 2, 64), generator=g).to(DEVICE, torch.bfloat16)
        slots = torch.tensor([0, 5, -1, 23, 7, 10_000, 12, -5, 3], dtype=torch.int64, device=DEVICE)
        reshape_and_cache(key, value, kc, vc, slots)
        reference.reshape_and_cache(key, value, ref_k, ref_v, slots)
        assert torch.equal(kc, ref_k) and torch.equal(vc, ref_v)
        assert torch.equal(kc.flatten(0, 1)[23], key[3]) and torch.equal(vc.flatten(0, 1)[5], value[1])


def test_copy_blocks_kernel_matches_reference():
    g = torch.Generator().manual_seed(2)
    caches = [torch.randn((8, 4, 2, 64), generator=g).to(DEVICE) for _ in range(4)]
    expected = [c.clone() for c in caches]
    mapping = torch.tensor([[0, 3], [5, 1], [2, 99], [6, 7]], dtype=torch.int64, device=DEVICE)
    copy_blocks(caches[:2], caches[2:], mapping)
    reference.copy_blocks(expected[:2], expected[2:], mapping)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)
    assert torch.equal(caches[0][3], caches[0][0]) and torch.equal(caches[3][7], caches[3][6])


PER_SEQ_CASES = [
    # dtype, heads, kv heads, head size, block size, seq_lens, features; parts of >= 16 tokens, <= 4 a sequence
    (torch.float32, 4, 2, 64, 4, [0, 1, 15, 16, 17, 40, 70, 300], {}),
    (torch.float32, 8, 2, 64, 8, [150, 7, 65], {"sliding_window": 40, "alibi": True, "softcap": 3.0}),
    (torch.bfloat16, 4, 1, 128, 16, [129, 33, 2], {"return_lse": False}),
    (torch.float32, 2, 2, 80, 2, [31, 64, 90], {"sliding_window": 5}),
]


@pytest.mark.parametrize("part_vs_mean, prefetch", [(0, 0), (2, 0), (2, 3), (2, 4)])
@pytest.mark.parametrize("case", PER_SEQ_CASES, ids=lambda c: f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-b{c[4]}")
def test_decode_per_sequence_splits_match_reference(case, part_vs_mean, prefetch, monkeypatch):
    """The full-batch rule (each sequence cut by its own length; the CPU never picks it) forced on: short
    sequences write their output directly, long ones are merged, windows start their parts at the window;
    parts of >= 16 tokens (part_vs_mean 0) or of >= twice the batch's mean length (only the long tail cut)."""
    from pagedattn.ops import launchers

    dtype, heads, kv_heads, head_size, block_size, lens, feats = case
    feats = dict(feats)
    monkeypatch.setitem(launchers.DECODE_TUNING, "min_tokens_per_part", 16)
    monkeypatch.setitem(launchers.DECODE_TUNING, "max_parts_per_seq", 4)
    monkeypatch.setitem(launchers.DECODE_TUNING, "prefetch", prefetch)
    monkeypatch.setattr(launchers, "plan_decode_splits", lambda num_seqs, num_kv_heads, max_len, device: (
        launchers.SplitPlan(launchers.parts_per_seq_for(max_len), True, 16, part_vs_mean)))
    g = torch.Generator().manual_seed(7 + head_size + block_size)
    problem = make_decode_problem(lens, heads, kv_heads, head_size, block_size, dtype, DEVICE,
                                  alibi=feats.pop("alibi", False), generator=g)
    run_decode_and_check(problem, dtype, what=str(case), **feats)


KV_GROUPED_CASES = [
    # dtype, heads, kv heads, head size, block size, seq_lens, features; several KV heads a program
    (torch.float32, 6, 3, 64, 4, [0, 17, 40, 5], {}),  # 3 KV heads: the last program's second head masked
    (torch.float32, 8, 4, 64, 8, [33, 70], {"sliding_window": 20, "alibi": True, "softcap": 3.0}),
    (torch.bfloat16, 8, 2, 128, 16, [129, 2], {"num_splits": 3}),
    (torch.float16, 4, 4, 80, 2, [31, 9], {"return_lse": False, "layout": "NHD"}),
    (torch.float32, 4, 2, 64, 4, [60, 9, 200], {"per_seq": True}),
    (torch.float32, 8, 4, 64, 8, [90, 3], {"prefetch": 3, "sliding_window": 50}),
]


@pytest.mark.parametrize("kv_heads_per_program", [2, 4])
@pytest.mark.parametrize("case", KV_GROUPED_CASES, ids=lambda c: f"{str(c[0])[6:]}-h{c[1]}-kv{c[2]}-d{c[3]}-b{c[4]}")
def test_decode_several_kv_heads_per_program(case, kv_heads_per_program, monkeypatch):
    """``kv_heads_per_program`` > 1 (opt-in): each query row scores only its own KV head's columns, KV heads
    past the last are masked, with uniform and per-sequence splits."""
    from pagedattn.ops import launchers

    dtype, heads, kv_heads, head_size, block_size, lens, feats = case
    feats = dict(feats)
    monkeypatch.setitem(launchers.DECODE_TUNING, "kv_heads_per_program", kv_heads_per_program)
    monkeypatch.setitem(launchers.DECODE_TUNING, "prefetch", feats.pop("prefetch", 0))
    if feats.pop("per_seq", False):
        monkeypatch.setattr(launchers, "plan_decode_splits", lambda *a: launchers.SplitPlan(4, True, 16, 0))
    g = torch.Generator().manual_seed(3 + heads + head_size + block_size)
    problem = make_decode_problem(lens, heads, kv_heads, head_size, block_size, dtype, DEVICE,
                                  layout=feats.pop("layout", "HND"), alibi=feats.pop("alibi", False), generator=g)
    run_decode_and_check(problem, dtype, what=f"{case} x{kv_heads_per_program}", **feats)


@pytest.mark.parametrize("max_len, want", [(2048, 4), (600, 3), (256, 1), (1, 1), (10**9, 4)])
def test_parts_per_seq_bounded_by_length_and_setting(max_len, want):
    from pagedattn.ops import launchers

    assert launchers.parts_per_seq_for(max_len) == want


@pytest.mark.parametrize("programs, max_len, want", [
    (1024, 2048, 1),    # a full batch: no split, however long its contexts may be
    (512, 4096, 1),
    (8, 32768, 64),     # few pairs of long contexts: 8 * 132 / 8 = 132 programs wanted, 64 by length
    (4, 1024, 2),       # few pairs, short: no split under 512 tokens
    (4, 100, 1),
    (1, 10**9, 256),    # capped
])
def test_num_splits_fills_the_gpu_only_when_few_pairs_run(programs, max_len, want):
    from pagedattn.ops import launchers

    assert launchers.num_splits_for(programs, max_len, num_sms=132) == want


@pytest.mark.parametrize("small_batch_per_seq", [False, True])
def test_plan_cuts_small_batches_uniformly_unless_asked(small_batch_per_seq, monkeypatch):
    """A small batch's parts are the same for every sequence by default (``small_batch_per_seq`` off); a full
    batch always cuts each sequence by its own length, past ``part_vs_mean`` x the mean."""
    from pagedattn.ops import launchers

    monkeypatch.setattr(launchers, "num_multiprocessors", lambda index: 132)
    monkeypatch.setitem(launchers.DECODE_TUNING, "small_batch_per_seq", small_batch_per_seq)
    cuda = torch.device("cuda", 0)  # a device object only: nothing runs on it
    small = launchers.plan_decode_splits(1, 8, 32768, cuda)
    assert (small.num_splits, small.per_seq) == (64, small_batch_per_seq)
    assert launchers.plan_decode_splits(16, 4, 256, cuda).num_splits == 1  # short: one program, no merge
    full = launchers.plan_decode_splits(256, 4, 2048, cuda)
    assert (full.num_splits, full.per_seq, full.part_vs_mean) == (4, True, launchers.DECODE_TUNING["part_vs_mean"])
    assert launchers.plan_decode_splits(1, 8, 32768, torch.device("cpu")) == launchers.SplitPlan(1, False)

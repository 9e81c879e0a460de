"""GPU sweep of paged decode attention against the reference (over 1,000 configurations), for each
kernel backend (the ``gpu_backend`` fixture: Triton, then CUDA).

Every configuration uses sequence lengths 1, block_size - 1, block_size, block_size + 1 and a
maximum, NaN in every cache slot no sequence owns, poisoned outputs and fresh random data.
"""

import itertools
import zlib

import pytest
import torch

from pagedattn.ops import SUPPORTED_BLOCK_SIZES, SUPPORTED_HEAD_SIZES, paged_decode_attention, reference
from tests.ops.problems import make_decode_problem, run_decode_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_backend")]  # Triton, then CUDA (CuPy)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_LAYOUTS = ((4, 4), (8, 2), (4, 1))  # MHA, GQA, MQA (num_heads, num_kv_heads)
FEATURES = (
    {},
    {"sliding_window": 5},
    {"softcap": 4.0},
    {"alibi": True},
    {"return_lse": False},
    {"num_splits": 3},
    {"layout": "NHD"},
    {"repeat_ids": True},
    {"sliding_window": 19, "softcap": 2.5, "alibi": True, "num_splits": 2},
)


def seq_lens_for(block_size, long=False):
    lens = sorted({1, max(1, block_size - 1), block_size, block_size + 1})
    lens.append(3 * block_size + 7 if not long else 700)
    return lens


def sweep():
    """dtype x head size x block size x head layout, features cycling; then features x dtype x head size."""
    cases = []
    for i, (dtype, head, block, heads) in enumerate(itertools.product(DTYPES, SUPPORTED_HEAD_SIZES,
                                                                       SUPPORTED_BLOCK_SIZES, HEAD_LAYOUTS)):
        cases.append((dtype, head, block, heads, FEATURES[i % len(FEATURES)], False))
    for dtype, head, feats, block in itertools.product(DTYPES, SUPPORTED_HEAD_SIZES, FEATURES, (1, 16, 64)):
        cases.append((dtype, head, block, (8, 2), feats, True))
    return cases


CASES = sweep()


def case_id(case):
    dtype, head, block, (h, kv), feats, long = case
    tag = "-".join(f"{k}{v}" for k, v in feats.items()) or "plain"
    return f"{str(dtype)[6:]}-d{head}-b{block}-h{h}kv{kv}-{tag}{'-long' if long else ''}"


def test_sweep_has_over_a_thousand_configurations():
    assert len(CASES) >= 1000


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_decode_matches_reference(case):
    dtype, head, block, (heads, kv_heads), feats, long = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    problem = make_decode_problem(seq_lens_for(block, long), heads, kv_heads, head, block, dtype, "cuda",
                                  layout=feats.pop("layout", "HND"), repeat_ids=feats.pop("repeat_ids", False),
                                  alibi=feats.pop("alibi", False), generator=g)
    run_decode_and_check(problem, dtype, what=case_id(case), **feats)


@pytest.mark.parametrize("num_seqs,seq_len", [(1, 32768), (2, 5000), (3, 131072)])
def test_decode_long_context_auto_split(num_seqs, seq_len):
    g = torch.Generator().manual_seed(seq_len)
    problem = make_decode_problem([seq_len - i for i in range(num_seqs)], 32, 8, 128, 16, torch.bfloat16, "cuda",
                                  generator=g)
    run_decode_and_check(problem, torch.bfloat16, what=f"long {num_seqs}x{seq_len}")


def test_decode_max_seq_len_hint_too_small_still_computes_everything():
    g = torch.Generator().manual_seed(9)
    p = make_decode_problem([4000, 300], 8, 2, 128, 16, torch.float16, "cuda", generator=g)
    out = torch.full_like(p.query, float("nan"))
    paged_decode_attention(p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, out=out,
                           max_seq_len=512, num_splits=4)
    ref = torch.empty(p.query.shape, device="cuda")
    reference.paged_decode(ref, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, 128 ** -0.5, 0, 0.0,
                           None, None)
    torch.testing.assert_close(out.float(), ref, atol=4e-3, rtol=0)


def capture_graph(call) -> torch.cuda.CUDAGraph:
    """Warm ``call`` up on a side stream (compilation stays outside the capture), then capture it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def check_replay(p, out, lse, scale, what) -> None:
    """Compare a replay's ``out`` and ``lse`` with the reference on the problem's current inputs."""
    ref = torch.empty(p.query.shape, device="cuda")
    ref_lse = torch.empty(p.query.shape[:2], device="cuda")
    reference.paged_decode(ref, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale, 0, 0.0,
                           None, ref_lse)
    torch.testing.assert_close(out.float(), ref, atol=2.5e-2, rtol=0, msg=what)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), f"{what}: -inf lse entries differ"
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_cuda_graph_replay_with_new_tables_and_lengths(num_splits):
    """Capture one decode call, then change seq_lens and block_tables in place and replay."""
    g = torch.Generator().manual_seed(num_splits)
    p = make_decode_problem([40, 200, 129, 7], 8, 2, 128, 16, torch.bfloat16, "cuda", extra_blocks=40, generator=g)
    p.key_cache.nan_to_num_(0.0)
    p.value_cache.nan_to_num_(0.0)
    p.key_cache.normal_()
    p.value_cache.normal_()
    out = torch.empty_like(p.query)
    lse = torch.empty(p.query.shape[:2], device="cuda")

    graph = capture_graph(lambda: paged_decode_attention(
        p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, out=out, lse=lse, num_splits=num_splits))
    for step in range(3):
        num_blocks = p.key_cache.shape[0]
        new_tables = torch.randint(0, num_blocks, tuple(p.block_tables.shape), generator=g, dtype=torch.int32)
        new_lens = torch.randint(1, p.block_tables.shape[1] * 16 + 1, (4,), generator=g, dtype=torch.int32)
        p.block_tables.copy_(new_tables)
        p.seq_lens.copy_(new_lens)
        p.query.normal_()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_replay(p, out, lse, 128 ** -0.5, f"replay {step}")


FULL_BATCH_CASES = [
    # dtype, (heads, kv heads), head size, block size, features: 192 sequences of skewed lengths
    (torch.bfloat16, (32, 4), 64, 16, {}),
    (torch.bfloat16, (32, 4), 64, 16, {"sliding_window": 300, "softcap": 3.0, "alibi": True}),
    (torch.float16, (8, 8), 128, 32, {"return_lse": False}),
    (torch.float32, (16, 2), 96, 8, {"layout": "NHD"}),
]


@pytest.mark.parametrize("case", FULL_BATCH_CASES, ids=lambda c: f"{str(c[0])[6:]}-h{c[1][0]}kv{c[1][1]}-d{c[2]}")
def test_decode_full_batch_per_sequence_splits(case):
    """A full batch of skewed lengths (0 to 1,500 tokens): the launcher picks per-sequence splits (asserted),
    so short sequences write their output directly and the long tail (past twice the mean) is cut into
    parts and merged."""
    from pagedattn.ops import launchers

    dtype, (heads, kv_heads), head, block, feats = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()))
    lens = torch.cat([torch.tensor([0, 1, 255, 256, 257, 1500]),
                      (torch.rand(186, generator=g) ** 3 * 1500).long() + 1]).tolist()
    p = make_decode_problem(lens, heads, kv_heads, head, block, dtype, "cuda", layout=feats.pop("layout", "HND"),
                            alibi=feats.pop("alibi", False), generator=g)
    plan = launchers.plan_decode_splits(len(lens), kv_heads, p.block_tables.shape[1] * block, p.query.device)
    assert plan.per_seq and plan.num_splits > 1 and plan.part_vs_mean > 0
    run_decode_and_check(p, dtype, what=f"full batch {case}", **feats)


def check_tuned_case(case, table, key, value, monkeypatch, edge_lens, num_random, long_lens):
    """A ``FULL_BATCH_CASES``-style case (``{"long": True}`` in its features: ``long_lens``, else ``edge_lens``
    then ``num_random`` skewed lengths up to 1500) checked against the reference with ``table[key] = value``."""
    monkeypatch.setitem(table, key, value)
    dtype, (heads, kv_heads), head, block, feats = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()) + value)
    lens = (long_lens if feats.pop("long", False) else
            torch.cat([torch.tensor(edge_lens), (torch.rand(num_random, generator=g) ** 3 * 1500).long() + 1]
                      ).tolist())
    p = make_decode_problem(lens, heads, kv_heads, head, block, dtype, "cuda", layout=feats.pop("layout", "HND"),
                            alibi=feats.pop("alibi", False), generator=g)
    run_decode_and_check(p, dtype, what=f"{case} {key} {value}", **feats)


@pytest.mark.parametrize("prefetch", [0, 1, 2, 3])
@pytest.mark.parametrize("case", FULL_BATCH_CASES + [(torch.bfloat16, (32, 8), 128, 16, {"long": True})],
                         ids=lambda c: f"{str(c[0])[6:]}-h{c[1][0]}kv{c[1][1]}-d{c[2]}")
def test_decode_load_orders(case, prefetch, monkeypatch):
    """The orders of a tile's K/V loads other than the default 4 (``DECODE_TUNING["prefetch"]``, Triton; the CUDA
    backend ignores it) on skewed full batches (per-sequence parts) and on two long contexts (uniform splits)."""
    from pagedattn.ops import launchers

    check_tuned_case(case, launchers.DECODE_TUNING, "prefetch", prefetch, monkeypatch,
                     edge_lens=[0, 1, 63, 64, 65, 1500], num_random=150, long_lens=[20000, 7777])


@pytest.mark.parametrize("kv_heads_per_program", [2, 4])
@pytest.mark.parametrize("case", FULL_BATCH_CASES[:2] + [(torch.float16, (12, 3), 128, 16, {"num_splits": 3})],
                         ids=lambda c: f"{str(c[0])[6:]}-h{c[1][0]}kv{c[1][1]}-d{c[2]}")
def test_decode_several_kv_heads_per_program(case, kv_heads_per_program, monkeypatch):
    """The opt-in tuning of several KV heads a program (Triton; the CUDA backend ignores it)."""
    from pagedattn.ops import launchers

    monkeypatch.setitem(launchers.DECODE_TUNING, "kv_heads_per_program", kv_heads_per_program)
    dtype, (heads, kv_heads), head, block, feats = case
    feats = dict(feats)
    g = torch.Generator().manual_seed(zlib.crc32(str(case).encode()) + kv_heads_per_program)
    lens = torch.cat([torch.tensor([0, 1, 257, 1500]), (torch.rand(140, generator=g) ** 3 * 1500).long() + 1]).tolist()
    p = make_decode_problem(lens, heads, kv_heads, head, block, dtype, "cuda", alibi=feats.pop("alibi", False),
                            generator=g)
    run_decode_and_check(p, dtype, what=f"{case} x{kv_heads_per_program}", **feats)


def test_decode_cuda_graph_replay_full_batch_new_lengths():
    """Per-sequence splits inside a CUDA graph: each replay's lengths (short and long mixed) set the parts."""
    from pagedattn.ops import launchers

    g = torch.Generator().manual_seed(21)
    n = 160
    p = make_decode_problem([1024] * n, 32, 4, 64, 16, torch.bfloat16, "cuda", generator=g)
    assert launchers.plan_decode_splits(n, 4, p.block_tables.shape[1] * 16, p.query.device).per_seq
    out = torch.empty_like(p.query)
    lse = torch.empty(p.query.shape[:2], device="cuda")

    graph = capture_graph(lambda: paged_decode_attention(
        p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, out=out, lse=lse))
    for step in range(3):
        # mostly short, a few long (parts are cut only past twice the mean)
        lens = (torch.rand(n, generator=g) ** 4 * 1024).to(torch.int32)
        lens[step::40] = 1024 - step
        p.seq_lens.copy_(lens)
        p.query.normal_()
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check_replay(p, out, lse, 64 ** -0.5, f"replay {step}")


@pytest.mark.parametrize("kv_stages", [2, 4, 8])
@pytest.mark.parametrize("case", FULL_BATCH_CASES + [(torch.float32, (16, 2), 256, 16, {"num_splits": 3}),
                                                     (torch.bfloat16, (32, 8), 128, 16, {"long": True})],
                         ids=lambda c: f"{str(c[0])[6:]}-h{c[1][0]}kv{c[1][1]}-d{c[2]}")
def test_cuda_decode_kv_stages(gpu_backend, case, kv_stages, monkeypatch):
    """The CUDA decode kernel's K/V pipelines other than the default 3 stages
    (``cuda_attention.DECODE_TUNING["kv_stages"]``; Triton ignores it): contexts shorter than the pipeline
    (0 and 1 tile), ragged lengths, splits, float32 at head 256, long contexts; 8 stages leave one thread block
    a multiprocessor."""
    from pagedattn.ops import cuda_attention

    check_tuned_case(case, cuda_attention.DECODE_TUNING, "kv_stages", kv_stages, monkeypatch,
                     edge_lens=[0, 1, 31, 32, 33, 95, 1500], num_random=120, long_lens=[20000, 7777, 33])

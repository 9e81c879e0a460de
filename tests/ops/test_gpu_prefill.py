"""GPU sweep of paged prefill/append attention against the reference (over 500 configurations), for each
kernel backend (the ``gpu_backend`` fixture: Triton, then CUDA).

Shapes cover no prefix, a 1-token prefix, prefixes ending mid-block and on a block boundary,
chunks of 1 token and of several blocks, mixed prefill + decode batches and repeated block ids,
with NaN in every cache slot no sequence owns.
"""

import itertools
import zlib

import pytest
import torch

from pagedattn.ops import SUPPORTED_HEAD_SIZES
from tests.ops.problems import make_prefill_problem, run_prefill_and_check

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("gpu_backend")]  # Triton, then CUDA (CuPy)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_LAYOUTS = ((4, 4), (8, 2), (8, 1))
FEATURES = (
    {},
    {"sliding_window": 6},
    {"softcap": 4.0},
    {"alibi": True},
    {"return_lse": False},
    {"layout": "NHD"},
    {"repeat_ids": True},
    {"max_query_len": 0},  # no hint: default tiles
    {"sliding_window": 21, "softcap": 2.0, "alibi": True},
)


def scenarios(block_size):
    """(seq_lens, query_lens) per scenario, in units of the block size."""
    b = block_size
    return {
        "no_prefix": ([3 * b + 5, b, 1], [3 * b + 5, b, 1]),
        "prefix_1": ([b + 2, 2], [b + 1, 1]),
        "prefix_mid_block": ([2 * b + b // 2 + 3, 3 * b + 1], [b + 1, 2 * b]),
        "prefix_on_boundary": ([3 * b, 2 * b + 7], [b, 7]),
        "chunk_of_1": ([4 * b + 3, 9], [1, 1]),
        "mixed": ([5 * b + 1, 40, 3 * b, 17], [2 * b + 1, 1, 3 * b, 1]),
    }


def sweep():
    cases = []
    block_sizes = (1, 2, 4, 8, 16, 32, 64, 128, 256)
    for i, (dtype, head, block, heads, scenario) in enumerate(itertools.product(
            DTYPES, SUPPORTED_HEAD_SIZES, block_sizes, HEAD_LAYOUTS[:1], ("no_prefix", "mixed"))):
        cases.append((dtype, head, block, heads, scenario, FEATURES[i % len(FEATURES)]))
    for i, (dtype, head, heads, scenario, feats) in enumerate(itertools.product(
            DTYPES, (64, 128, 256), HEAD_LAYOUTS, tuple(scenarios(1)), FEATURES)):
        if i % 3 == 0:  # a third of the product, spread over every axis
            cases.append((dtype, head, 16, heads, scenario, feats))
    return cases


CASES = sweep()


def case_id(case):
    dtype, head, block, (h, kv), scenario, feats = case
    tag = "-".join(f"{k}{v}" for k, v in feats.items()) or "plain"
    return f"{str(dtype)[6:]}-d{head}-b{block}-h{h}kv{kv}-{scenario}-{tag}"


def test_sweep_has_over_five_hundred_configurations():
    assert len(CASES) >= 500


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_prefill_matches_reference(case):
    dtype, head, block, (heads, kv_heads), scenario, feats = case
    feats = dict(feats)
    lens, qlens = scenarios(block)[scenario]
    g = torch.Generator().manual_seed(zlib.crc32(case_id(case).encode()))
    p = make_prefill_problem(lens, qlens, heads, kv_heads, head, block, dtype, "cuda",
                             layout=feats.pop("layout", "HND"), repeat_ids=feats.pop("repeat_ids", False),
                             alibi=feats.pop("alibi", False), generator=g)
    run_prefill_and_check(p, dtype, what=case_id(case), **feats)


def test_prefill_long_prompts_bf16():
    g = torch.Generator().manual_seed(1)
    p = make_prefill_problem([2048, 2048, 1000], [2048, 512, 1], 32, 8, 128, 16, torch.bfloat16, "cuda", generator=g)
    run_prefill_and_check(p, torch.bfloat16, what="long")

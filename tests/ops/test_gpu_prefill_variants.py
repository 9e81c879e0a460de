"""GPU check of the prefill kernel's tuning variants (``launchers.PREFILL_TUNING``) against the reference.

A small product: each variant of the benchmark's sweep (the compiled ones differ: stages, tiles,
register caps, warp specialization) on a few shapes that reach its code, with NaN in every cache
slot no sequence owns. The variants' arithmetic is checked more widely in the interpreter
(``test_prefill_variants_interpreter.py``); here the compiled GPU code is.
"""

import zlib

import pytest
import torch

from pagedattn.ops import config, launchers
from tests.ops.problems import make_prefill_problem, run_prefill_and_check
from tests.ops.test_prefill_variants_interpreter import COMBO, VARIANTS

pytestmark = pytest.mark.gpu

GPU_VARIANTS = {
    **VARIANTS,
    "stages5": {"num_stages": 5},
    "combo_stages5": {**COMBO, "num_stages": 5},
    "combo_stages7_diag1": {**COMBO, "num_stages": 7, "diag_stages": 1},
    "combo_fold_q_stages5": {**COMBO, "softmax": "fold_q", "num_stages": 5},
    "combo_tile32_maxnreg128": {**COMBO, "tile_n": 32, "num_stages": 5, "maxnreg": 128},
    "combo_bm64_tile32": {**COMBO, "block_m": 64, "tile_n": 32, "num_stages": 5},
    "combo_bm256": {**COMBO, "block_m": 256, "num_warps": 16, "num_stages": 5},
}

# dtype, heads, kv heads, head, block, seq_lens, query_lens, features
CASES = {
    "bf16-d128-b16-long": (torch.bfloat16, 32, 8, 128, 16, [1100, 700, 33], [900, 700, 1], {}),
    "f16-d64-b64-window-softcap": (torch.float16, 8, 2, 64, 64, [500, 200], [300, 1], {"sliding_window": 70,
                                                                                        "softcap": 4.0}),
    "f32-d128-b128-alibi": (torch.float32, 8, 2, 128, 128, [600, 130], [333, 130], {"alibi": True}),
    "bf16-d256-b16-window": (torch.bfloat16, 4, 1, 256, 16, [400, 90], [250, 90], {"sliding_window": 100}),
    "bf16-d80-b32-repeat": (torch.bfloat16, 8, 8, 80, 32, [300, 200], [150, 200], {"repeat_ids": True}),
}


@pytest.fixture
def tuning():
    config.set_backend("triton")
    saved = dict(launchers.PREFILL_TUNING)
    yield launchers.PREFILL_TUNING
    launchers.PREFILL_TUNING.clear()
    launchers.PREFILL_TUNING.update(saved)
    config.set_backend("auto")


# every variant on the benchmark's shape class and on one other case, the others taken in turn (each compile
# costs seconds: the product would take minutes)
PAIRS = [(v, c) for i, v in enumerate(GPU_VARIANTS) for c in ("bf16-d128-b16-long", list(CASES)[1 + i % 4])]


@pytest.mark.parametrize("variant,case_name", PAIRS, ids=[f"{v}-{c}" for v, c in PAIRS])
def test_gpu_variant_matches_reference(variant, case_name, tuning):
    dtype, heads, kv_heads, head, block, lens, qlens, feats = CASES[case_name]
    feats = dict(feats)
    tuning.update(GPU_VARIANTS[variant])
    g = torch.Generator().manual_seed(zlib.crc32(f"{variant}/{case_name}".encode()))
    p = make_prefill_problem(lens, qlens, heads, kv_heads, head, block, dtype, "cuda",
                             alibi=feats.pop("alibi", False), repeat_ids=feats.pop("repeat_ids", False), generator=g)
    run_prefill_and_check(p, dtype, what=f"{variant} / {case_name}", **feats)


@pytest.mark.parametrize("variant", ["unmasked", "combo_stages5", "combo_block_kt"])
def test_gpu_unmasked_falls_back_on_bad_block_ids(variant, tuning):
    tuning.update(GPU_VARIANTS[variant])
    g = torch.Generator().manual_seed(zlib.crc32(variant.encode()))
    p = make_prefill_problem([700, 520], [200, 300], 8, 2, 128, 16, torch.bfloat16, "cuda", generator=g)
    p.paged.key_cache.nan_to_num_(0.5)
    p.paged.value_cache.nan_to_num_(0.25)
    p.paged.block_tables[0, 3] = 1 << 30
    p.paged.block_tables[1, 0] = -5
    run_prefill_and_check(p, torch.bfloat16, what=f"{variant} with bad ids")

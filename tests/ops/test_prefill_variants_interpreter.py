"""The prefill kernel's tuning variants (``launchers.PREFILL_TUNING``) on small cases, interpreted on the CPU.

Each variant runs against the reference on shapes that reach its code: prefixes ending mid-block,
several query tiles per sequence, GQA, block sizes below, equal to and above the key tile, sliding
windows, soft-cap, ALiBi, a non-power-of-two head, and block tables with ids outside the pool in
the off-diagonal range (the unmasked variant must fall back to the masked loop). Unused cache
slots hold NaN, inputs are fresh random draws per case, outputs and ``lse`` start as NaN.
"""

import zlib

import pytest
import torch

from pagedattn.ops import config, launchers, paged_prefill_attention, reference
from tests.ops.problems import make_prefill_problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: max abs error allowed, relative to max(1, max |reference|). fold_q rounds q * scale * log2(e)
#: to the input dtype once, so 16-bit inputs get a little more room than with the base softmax.
TOL = {torch.float32: 2e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
LSE_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}

COMBO = {"softmax": "exp2", "offdiag": "unmasked", "order": "reverse"}
VARIANTS = {
    "exp2": {"softmax": "exp2"},
    "fold_q": {"softmax": "fold_q"},
    "unmasked": {"offdiag": "unmasked"},
    "reverse": {"order": "reverse"},
    "reverse_heads_inner": {"order": "reverse_heads_inner"},
    "kt": {"k_load": "kt"},
    "block": {"kv_addr": "block"},
    "fold_q_unmasked": {"softmax": "fold_q", "offdiag": "unmasked"},
    "combo_block_kt": {**COMBO, "kv_addr": "block", "k_load": "kt"},
    # CUDA-only knobs: the interpreter ignores them, but the launch path must accept them
    "combo_loop_options": {**COMBO, "offdiag_stages": 5, "diag_stages": 1, "maxnreg": 128},
}

# dtype, heads, kv heads, head, block, seq_lens, query_lens, features, tuning overrides (small tiles: more of them)
CASES = {
    # GQA 2, block 16 < key tile, prefix 30 ends mid-block, 3 query tiles; second sequence: no prefix
    "f32-b16-prefix-mid": (torch.float32, 4, 2, 64, 16, [75, 40], [45, 40], {}, {"block_m": 32}),
    # GQA 4, block 64 == key tile (bf16 tiles are 64 keys), prefix 110 mid-block, soft-cap
    "bf16-b64-softcap": (torch.bfloat16, 8, 2, 64, 64, [150, 70], [40, 70], {"softcap": 3.0}, {}),
    # GQA 4, sliding window shorter than the context, ALiBi, block 16 with 16-key tiles: window-edge tiles
    "f32-b16-window-alibi": (torch.float32, 4, 1, 64, 16, [90, 37], [50, 20], {"sliding_window": 20, "alibi": True},
                             {"block_m": 32, "tile_n": 32}),
    # head 80 (padded to 128: the load mask stays on), block 32 > 16-key tiles, shared and repeated block ids
    "f16-d80-b32-repeat": (torch.float16, 4, 2, 80, 32, [60, 33], [28, 33], {"repeat_ids": True},
                           {"block_m": 32, "tile_n": 16}),
    # block 128 above the key tile: tiles start mid-block; window and soft-cap together, no lse
    "f32-b128-window-softcap": (torch.float32, 2, 1, 64, 128, [200], [70], {"sliding_window": 50, "softcap": 2.5,
                                                                             "return_lse": False}, {"block_m": 32}),
}


#: variants that change no arithmetic (grid order, CUDA-only options) run on two cases only
FEW_CASES = ("f32-b16-prefix-mid", "f16-d80-b32-repeat")
VARIANT_CASES = [(v, c) for v in VARIANTS for c in CASES
                 if c in FEW_CASES or v not in ("reverse", "reverse_heads_inner", "combo_loop_options")]


@pytest.fixture
def triton_backend():
    config.set_backend("triton")
    saved = dict(launchers.PREFILL_TUNING)
    yield
    launchers.PREFILL_TUNING.clear()
    launchers.PREFILL_TUNING.update(saved)
    config.set_backend("auto")


def run_and_compare(p, dtype, what, sliding_window=0, softcap=0.0, return_lse=True):
    c = p.paged
    scale = p.query.shape[-1] ** -0.5
    out = torch.full_like(p.query, float("nan"))
    lse = torch.full(p.query.shape[:2], float("nan"), dtype=torch.float32, device=p.query.device)
    paged_prefill_attention(p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens, p.cu_seqlens_q,
                            max_query_len=p.max_query_len, scale=scale, sliding_window=sliding_window,
                            softcap=softcap, alibi_slopes=c.alibi_slopes, out=out,
                            lse=lse if return_lse else None)
    ref_out = torch.empty(p.query.shape, dtype=torch.float32, device=p.query.device)
    ref_lse = torch.empty(p.query.shape[:2], dtype=torch.float32, device=p.query.device)
    reference.paged_prefill(ref_out, p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens,
                            p.cu_seqlens_q, scale, sliding_window, softcap, c.alibi_slopes, ref_lse)
    out, ref_out = out.double().cpu(), ref_out.double().cpu()
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    err = (out - ref_out).abs().max().item()
    tol = TOL[dtype] * max(1.0, ref_out.abs().max().item())
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e}"
    if not return_lse:
        assert torch.isnan(lse).all(), f"{what}: lse written although not asked for"
        return
    lse, ref_lse = lse.double().cpu(), ref_lse.double().cpu()
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"{what}: -inf entries differ"
    finite = torch.isfinite(ref_lse)
    if finite.any():
        lerr = (lse[finite] - ref_lse[finite]).abs().max().item()
        assert lerr <= LSE_TOL[dtype] * max(1.0, ref_lse[finite].abs().max().item()), f"{what}: lse error {lerr:.3e}"


@pytest.mark.parametrize("variant,case_name", VARIANT_CASES, ids=[f"{v}-{c}" for v, c in VARIANT_CASES])
def test_variant_matches_reference(variant, case_name, triton_backend):
    dtype, heads, kv_heads, head, block, lens, qlens, feats, tuning = CASES[case_name]
    feats = dict(feats)
    launchers.PREFILL_TUNING.update(tuning)
    launchers.PREFILL_TUNING.update(VARIANTS[variant])
    g = torch.Generator().manual_seed(zlib.crc32(f"{variant}/{case_name}".encode()))
    p = make_prefill_problem(lens, qlens, heads, kv_heads, head, block, dtype, DEVICE,
                             alibi=feats.pop("alibi", False), repeat_ids=feats.pop("repeat_ids", False), generator=g)
    run_and_compare(p, dtype, f"{variant} / {case_name}", **feats)


@pytest.mark.parametrize("variant", ["unmasked", "combo_block_kt"])
def test_unmasked_offdiagonal_falls_back_on_bad_block_ids(variant, triton_backend):
    """Ids outside the pool among the off-diagonal tiles: skipped like the reference does, never loaded."""
    launchers.PREFILL_TUNING.update({"block_m": 32, "tile_n": 16, **VARIANTS[variant]})
    g = torch.Generator().manual_seed(zlib.crc32(variant.encode()))
    p = make_prefill_problem([70, 52], [20, 30], 4, 2, 64, 8, torch.float32, DEVICE, generator=g)
    p.paged.key_cache.nan_to_num_(0.5)  # the skipped blocks' slots must not matter
    p.paged.value_cache.nan_to_num_(0.25)
    p.paged.block_tables[0, 2] = 10_000   # positions 16..23: off-diagonal for every query tile of sequence 0
    p.paged.block_tables[1, 0] = -5       # positions 0..7 of sequence 1
    run_and_compare(p, torch.float32, f"{variant} with bad ids")


def test_heads_inner_order_falls_back_when_the_grid_is_too_tall(triton_backend, monkeypatch):
    monkeypatch.setattr(launchers, "MAX_GRID_Y", 2)
    launchers.PREFILL_TUNING.update({"block_m": 32, "order": "reverse_heads_inner"})
    g = torch.Generator().manual_seed(5)
    p = make_prefill_problem([40, 9], [40, 9], 4, 2, 64, 16, torch.float32, DEVICE, generator=g)
    run_and_compare(p, torch.float32, "reverse_heads_inner fallback")


def test_unknown_variant_values_raise(triton_backend):
    launchers.PREFILL_TUNING["offdiag"] = "unmaksed"
    with pytest.raises(ValueError):
        launchers.prefill_variant(False)
    launchers.PREFILL_TUNING["offdiag"] = "masked"
    launchers.PREFILL_TUNING["softmax"] = "exp"
    with pytest.raises(KeyError):
        launchers.prefill_variant(False)

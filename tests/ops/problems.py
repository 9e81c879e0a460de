"""Random paged-attention problems for the tests: caches, block tables and lengths.

Every cache slot a sequence does not own is poisoned with NaN, so a kernel that reads past a
sequence's length, or through a wrong block id, produces NaN and fails the comparison.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from pagedattn.ops import allocate_kv_cache

TOLERANCES = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


@dataclass
class DecodeProblem:
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    alibi_slopes: Optional[torch.Tensor]


def make_decode_problem(seq_lens: list[int], num_heads: int, num_kv_heads: int, head_size: int, block_size: int,
                        dtype: torch.dtype, device: str, *, layout: str = "HND", repeat_ids: bool = False,
                        alibi: bool = False, extra_blocks: int = 3, generator: Optional[torch.Generator] = None
                        ) -> DecodeProblem:
    """Build a problem whose used slots hold random values and every other slot holds NaN.

    With ``repeat_ids``, sequences share some block ids (as after a fork) and a sequence's
    table may name one block twice; shared blocks then hold the same data for all readers.
    """
    g = generator
    blocks_needed = [max(1, math.ceil(n / block_size)) for n in seq_lens]
    max_blocks = max(blocks_needed) + 1
    num_blocks = sum(blocks_needed) + extra_blocks
    key_cache, value_cache = allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device, layout)
    key_cache.fill_(float("nan"))
    value_cache.fill_(float("nan"))
    perm = torch.randperm(num_blocks, generator=g)
    block_tables = torch.full((len(seq_lens), max_blocks), -7, dtype=torch.int32)
    used = 0
    for i, need in enumerate(blocks_needed):
        ids = perm[used:used + need].clone()
        used += need
        if repeat_ids and i > 0 and need > 1:
            ids[0] = block_tables[0, 0]  # shares its first block with sequence 0
        if repeat_ids and need > 2:
            ids[-1] = ids[1]  # names one block twice
        block_tables[i, :need] = ids.to(torch.int32)
        # trailing unused entries stay garbage (-7), or point to random blocks half the time
        if torch.rand((), generator=g) < 0.5:
            block_tables[i, need:] = torch.randint(0, num_blocks, (max_blocks - need,), generator=g, dtype=torch.int32)
    # fill the slots each sequence owns
    k_flat = torch.randn((num_blocks * block_size, num_kv_heads, head_size), generator=g, dtype=torch.float32)
    v_flat = torch.randn((num_blocks * block_size, num_kv_heads, head_size), generator=g, dtype=torch.float32)
    for i, n in enumerate(seq_lens):
        pos = torch.arange(n)
        blocks, offsets = block_tables[i].long()[pos // block_size], pos % block_size
        slots = blocks * block_size + offsets
        # index the 4-d cache (a flattened HND view would be a copy, not the cache)
        key_cache[blocks.to(device), offsets.to(device)] = k_flat[slots].to(device=device, dtype=dtype)
        value_cache[blocks.to(device), offsets.to(device)] = v_flat[slots].to(device=device, dtype=dtype)
    query = torch.randn((len(seq_lens), num_heads, head_size), generator=g).to(device=device, dtype=dtype)
    slopes = None
    if alibi:
        slopes = (torch.rand(num_heads, generator=g) * 0.3 + 0.01).to(device)
    return DecodeProblem(query, key_cache, value_cache, block_tables.to(device),
                         torch.tensor(seq_lens, dtype=torch.int32, device=device), slopes)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Compare with a tolerance scaled by the reference's magnitude; NaN never passes."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN in the output"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 1.0)
    assert err <= TOLERANCES[dtype] * scale, f"{what}: max abs error {err:.3e} > {TOLERANCES[dtype] * scale:.3e}"


def assert_lse_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert not torch.isnan(actual).any(), f"{what}: NaN in lse"
    assert torch.equal(torch.isinf(actual), torch.isinf(expected)), f"{what}: -inf entries differ"
    finite = torch.isfinite(expected)
    err = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= 1e-3 * max(1.0, expected[finite].abs().max().item() if finite.any() else 1.0), \
        f"{what}: lse max abs error {err:.3e}"


def run_decode_and_check(problem: DecodeProblem, dtype: torch.dtype, *, sliding_window: int = 0,
                         softcap: float = 0.0, return_lse: bool = True, num_splits: Optional[int] = None,
                         scale: Optional[float] = None, what: str = "") -> None:
    """Run the op (poisoned outputs) and the reference on the same inputs, and compare."""
    from pagedattn.ops import paged_decode_attention, reference

    p = problem
    head_size = p.query.shape[-1]
    scale = scale if scale is not None else head_size ** -0.5
    out = torch.full_like(p.query, float("nan"))
    lse = torch.full(p.query.shape[:2], float("nan"), dtype=torch.float32, device=p.query.device)
    paged_decode_attention(p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale=scale,
                           sliding_window=sliding_window, softcap=softcap, alibi_slopes=p.alibi_slopes,
                           out=out, lse=lse if return_lse else None, num_splits=num_splits)
    ref_out = torch.empty(p.query.shape, dtype=torch.float32, device=p.query.device)
    ref_lse = torch.empty(p.query.shape[:2], dtype=torch.float32, device=p.query.device)
    reference.paged_decode(ref_out, p.query, p.key_cache, p.value_cache, p.block_tables, p.seq_lens, scale,
                           sliding_window, softcap, p.alibi_slopes, ref_lse)
    assert_close(out, ref_out, dtype, what)
    if return_lse:
        assert_lse_close(lse, ref_lse, what)
    else:
        assert torch.isnan(lse).all(), f"{what}: lse written although not asked for"


@dataclass
class PrefillProblem:
    query: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    paged: DecodeProblem  # caches, block tables, seq_lens, alibi slopes


def make_prefill_problem(seq_lens: list[int], query_lens: list[int], num_heads: int, num_kv_heads: int,
                         head_size: int, block_size: int, dtype: torch.dtype, device: str, **kwargs) -> PrefillProblem:
    """A paged context per sequence (NaN elsewhere) and ``query_lens[i]`` new tokens at its end."""
    paged = make_decode_problem(seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, device, **kwargs)
    g = kwargs.get("generator")
    num_tokens = sum(query_lens)
    query = torch.randn((num_tokens, num_heads, head_size), generator=g).to(device=device, dtype=dtype)
    cu = torch.tensor([0] + list(itertools.accumulate(query_lens)), dtype=torch.int32, device=device)
    return PrefillProblem(query, cu, max(query_lens) if query_lens else 0, paged)


def run_prefill_and_check(problem: PrefillProblem, dtype: torch.dtype, *, sliding_window: int = 0,
                          softcap: float = 0.0, return_lse: bool = True, max_query_len: Optional[int] = -1,
                          what: str = "") -> None:
    """Run the prefill op (poisoned outputs) and the reference on the same inputs, and compare."""
    from pagedattn.ops import paged_prefill_attention, reference

    p, c = problem, problem.paged
    scale = p.query.shape[-1] ** -0.5
    out = torch.full_like(p.query, float("nan"))
    lse = torch.full(p.query.shape[:2], float("nan"), dtype=torch.float32, device=p.query.device)
    hint = p.max_query_len if max_query_len == -1 else max_query_len
    paged_prefill_attention(p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens, p.cu_seqlens_q,
                            max_query_len=hint, scale=scale, sliding_window=sliding_window, softcap=softcap,
                            alibi_slopes=c.alibi_slopes, out=out, lse=lse if return_lse else None)
    ref_out = torch.empty(p.query.shape, dtype=torch.float32, device=p.query.device)
    ref_lse = torch.empty(p.query.shape[:2], dtype=torch.float32, device=p.query.device)
    reference.paged_prefill(ref_out, p.query, c.key_cache, c.value_cache, c.block_tables, c.seq_lens, p.cu_seqlens_q,
                            scale, sliding_window, softcap, c.alibi_slopes, ref_lse)
    assert_close(out, ref_out, dtype, what)
    if return_lse:
        assert_lse_close(lse, ref_lse, what)
    else:
        assert torch.isnan(lse).all(), f"{what}: lse written although not asked for"

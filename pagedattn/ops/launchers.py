"""Launchers for the Triton kernels: choose tile shapes and grids, then launch.

The caller (:mod:`pagedattn.ops.registry`) has already checked every argument; these functions
only translate tensors into pointers, strides and compile-time constants.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from pagedattn.ops.pointer_tables import cache_pointer_table
from pagedattn.ops.triton_cache import copy_blocks_kernel, reshape_and_cache_kernel
from pagedattn.ops.triton_decode import merge_splits_kernel, paged_decode_kernel
from pagedattn.ops.triton_prefill import paged_prefill_kernel

TORCH_TO_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

#: Tuning knobs for the decode kernel; the benchmarks overwrite them to sweep.
DECODE_TUNING = {
    "target_waves": 8,            # when splitting, aim for this many programs per multiprocessor
    "min_tokens_per_split": 512,  # never split a context finer than this
    "num_warps": 4,
    "num_stages": 2,
    "tile_n": None,               # None: chosen from head size and dtype
    "kv_heads_per_program": 1,    # a power of two: one program reads this many KV heads of a sequence
    # when a tile's K/V loads are issued: 0 V after the scores, 1 V with K, 2 the next tile's K and V before
    # this tile's products, 3 as 2 with the block table read one more tile ahead, 4 the block table one tile
    # ahead and K/V left to the compiler's pipeliner (with num_stages 3 it keeps a tile's copies in flight
    # across the previous tile's products; bench/NOTES.md "Decode v11"). 4 by default since run A of
    # 2026-11-27 #8 (H100, 2 stages): engine batch 30.1 against 0's 32.9 us, the main shape 362.8 against 366.2
    "prefetch": 4,
    # full batches: a sequence's context is cut into parts of at least min_tokens_per_part tokens and
    # part_vs_mean x the batch's mean length, at most max_parts_per_seq of them (1: no split)
    "min_tokens_per_part": 256,
    "part_vs_mean": 2,
    "max_parts_per_seq": 4,
    # few pairs (a small batch): True cuts each sequence by its own length (a short one is one program and needs
    # no merge), False cuts every sequence into the same parts of the longest (the default: 1 x 32K 62 against
    # 54 us on an H100, and no gain on 16 engine sequences: bench/NOTES.md "Decode v7b, small batches")
    "small_batch_per_seq": False,
}


@functools.lru_cache(maxsize=None)
def num_multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_tile_n(block_d: int, dtype: torch.dtype) -> int:
    if DECODE_TUNING["tile_n"]:
        return DECODE_TUNING["tile_n"]
    tile = 64 if block_d <= 128 else 32
    return tile // 2 if dtype == torch.float32 else tile


def dot_in_float32(x: torch.Tensor) -> bool:
    """Run a kernel's matrix products in exact float32: for float32 inputs, and for bfloat16 under
    the Triton interpreter on the CPU, whose bfloat16 ``tl.dot`` returns garbage (Triton 3.6)."""
    return x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu")


class SplitPlan(NamedTuple):
    """How a decode launch splits contexts across programs.

    ``num_splits``: the grid's third axis (the most programs a (sequence, KV head) gets). With
    ``per_seq`` each sequence gets its own part count from its length: parts of at least
    ``min_part_tokens`` tokens and of ``part_vs_mean`` x the batch's mean length (0: no mean rule);
    else every context is cut at the same ``num_splits`` boundaries.
    """

    num_splits: int
    per_seq: bool
    min_part_tokens: int = 0
    part_vs_mean: int = 0


def plan_decode_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> SplitPlan:
    """The split plan of a decode launch whose split count is left to the launcher (1 split off CUDA).

    Few (sequence, KV head) pairs: up to :func:`num_splits_for` parts a sequence, of at least
    ``min_tokens_per_split`` tokens each, the same parts for every sequence (with ``small_batch_per_seq``:
    each sequence cut by its own length, so a short context is one program). Enough pairs to fill the GPU:
    up to :func:`parts_per_seq_for` parts, only for sequences longer than ``part_vs_mean`` x the batch's mean
    length (its long tail: bench/NOTES.md "Decode v7").
    """
    if device.type != "cuda":
        return SplitPlan(1, False)
    t = DECODE_TUNING
    programs, num_sms = num_seqs * num_kv_heads, num_multiprocessors(device.index or 0)
    if programs >= num_sms:
        parts = parts_per_seq_for(max_seq_len)
        return SplitPlan(parts, parts > 1, t["min_tokens_per_part"], t["part_vs_mean"])
    n = num_splits_for(programs, max_seq_len, num_sms)
    return SplitPlan(n, n > 1 and bool(t["small_batch_per_seq"]), t["min_tokens_per_split"], 0)


def num_splits_for(programs: int, max_seq_len: int, num_sms: int) -> int:
    """The uniform split count for ``programs`` (sequence, KV head) pairs of contexts up to ``max_seq_len``.

    Enough pairs to fill the GPU: 1 (full batches of skewed short contexts gained nothing from uniform
    splits: bench/NOTES.md "Decode v5"; :func:`plan_decode_splits` cuts their long tail). Fewer: split
    until about ``target_waves`` programs per multiprocessor run, no split shorter than
    ``min_tokens_per_split``.
    """
    t = DECODE_TUNING
    if programs >= num_sms:
        return 1  # one (sequence, KV head) per program already fills the GPU
    by_length = max(1, max_seq_len // t["min_tokens_per_split"])
    return max(1, min(triton.cdiv(t["target_waves"] * num_sms, programs), by_length, 256))


def parts_per_seq_for(max_seq_len: int) -> int:
    """The most programs one (sequence, KV head) of a full batch may get (the grid's third axis): each
    sequence is cut by its own length into parts of at least ``min_tokens_per_part`` tokens, at most
    ``max_parts_per_seq`` (so that a batch's few long contexts do not run alone at its end:
    bench/NOTES.md "Decode v7")."""
    t = DECODE_TUNING
    return max(1, min(t["max_parts_per_seq"], triton.cdiv(max(max_seq_len, 1), max(1, t["min_tokens_per_part"]))))


def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], lse: Optional[torch.Tensor],
                 max_seq_len: int, num_splits: int) -> None:
    num_seqs, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    if num_seqs == 0:
        return
    group_size = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(head_size)
    kv_heads = min(triton.next_power_of_2(max(1, int(DECODE_TUNING["kv_heads_per_program"]))),
                   triton.next_power_of_2(num_kv_heads))
    block_m = max(16, triton.next_power_of_2(group_size * kv_heads))
    tile_n = decode_tile_n(block_d, query.dtype)
    capacity = block_tables.shape[1] * block_size
    max_len = min(max_seq_len, capacity) if max_seq_len > 0 else capacity
    plan = SplitPlan(num_splits, False)
    if num_splits <= 0:
        plan = plan_decode_splits(num_seqs, num_kv_heads, max_len, query.device)
    num_splits, per_seq = plan.num_splits, plan.per_seq
    if per_seq:
        # the kernel sizes each sequence's parts; the launcher passes their minimum length
        tokens_per_split = triton.cdiv(max(1, plan.min_part_tokens), tile_n) * tile_n
    else:
        tokens_per_split = triton.cdiv(triton.cdiv(max(max_len, 1), num_splits), tile_n) * tile_n
        num_splits = max(1, min(num_splits, triton.cdiv(max(max_len, 1), tokens_per_split)))
    part_vs_mean = max(0, int(plan.part_vs_mean))
    # the mean rule reads every length in blocks of at most 1,024 (a block of 1: no mean rule)
    lens_block = max(2, min(1024, triton.next_power_of_2(num_seqs))) if per_seq and part_vs_mean else 1

    if num_splits > 1:
        part_out = torch.empty((num_seqs, num_heads, num_splits, block_d), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    else:
        part_out = part_lse = out  # unused
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    alibi_arg = alibi_slopes if alibi_slopes is not None else out
    extra = {} if query.device.type != "cuda" else {
        "num_warps": DECODE_TUNING["num_warps"], "num_stages": DECODE_TUNING["num_stages"]}

    paged_decode_kernel[(num_seqs, triton.cdiv(num_kv_heads, kv_heads), num_splits)](
        query, *query.stride(),
        key_cache, *key_cache.stride(),
        value_cache, *value_cache.stride(),
        block_tables, *block_tables.stride(),
        seq_lens,
        alibi_arg,
        out, *out.stride(),
        lse_arg, *lse_strides,
        part_out, part_lse,
        scale, softcap,
        num_blocks, block_tables.shape[1], block_size.bit_length() - 1, group_size, num_kv_heads,
        sliding_window, tokens_per_split, part_vs_mean,
        HEAD_SIZE=head_size, BLOCK_M=block_m, BLOCK_D=block_d, TILE_N=tile_n, KV_HEADS=kv_heads,
        SPLIT=num_splits > 1,
        PER_SEQ=per_seq, LENS_BLOCK=lens_block,
        USE_SOFTCAP=softcap > 0, USE_ALIBI=alibi_slopes is not None, USE_WINDOW=sliding_window > 0,
        WRITE_LSE=lse is not None, DOT_F32=dot_in_float32(query), PREFETCH=int(DECODE_TUNING["prefetch"]),
        **extra,
    )
    if num_splits > 1:
        # as many of a KV group's heads a program as keep its [heads, splits, head] tile within 4,096 values
        block_s = triton.next_power_of_2(num_splits)
        heads = max(1, min(triton.next_power_of_2(group_size), 4096 // (block_s * block_d)))
        merge_splits_kernel[(num_seqs, num_kv_heads, triton.cdiv(group_size, heads))](
            part_out, part_lse,
            out, *out.stride(),
            lse_arg, *lse_strides,
            seq_lens,
            head_size, num_splits, group_size,
            block_tables.shape[1], block_size.bit_length() - 1, sliding_window, tokens_per_split, part_vs_mean,
            HEADS=heads, BLOCK_S=block_s, BLOCK_D=block_d, TILE_N=tile_n,
            USE_WINDOW=sliding_window > 0, PER_SEQ=per_seq, LENS_BLOCK=lens_block, WRITE_LSE=lse is not None,
        )


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    num_tokens, num_kv_heads, head_size = key.shape
    if num_tokens == 0:
        return
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    block_h = triton.next_power_of_2(num_kv_heads)
    block_d = triton.next_power_of_2(head_size)
    extra = {} if key.device.type != "cuda" else {"num_warps": 4 if block_h * block_d <= 4096 else 8}
    reshape_and_cache_kernel[(num_tokens,)](
        key, *key.stride(),
        value, *value.stride(),
        key_cache, *key_cache.stride(),
        value_cache, *value_cache.stride(),
        slot_mapping,
        num_blocks * block_size, block_size.bit_length() - 1, num_kv_heads,
        HEAD_SIZE=head_size, BLOCK_H=block_h, BLOCK_D=block_d,
        **extra,
    )


COPY_CHUNK = 2048


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    caches = list(key_caches) + list(value_caches)
    num_pairs = block_mapping.shape[0]
    if num_pairs == 0 or not caches:
        return
    first = caches[0]
    block_numel = first[0].numel()
    cache_ptrs, _ = cache_pointer_table(caches)
    extra = {} if first.device.type != "cuda" else {"num_warps": 4}
    copy_blocks_kernel[(num_pairs, len(caches), triton.cdiv(block_numel, COPY_CHUNK))](
        cache_ptrs, block_mapping, *block_mapping.stride(),
        first.shape[0], block_numel,
        DTYPE=TORCH_TO_TL[first.dtype], CHUNK=COPY_CHUNK,
        **extra,
    )


#: Tuning knobs for the prefill kernel; the benchmarks overwrite them to sweep. ``None`` / ``"auto"``: chosen
#: per launch by :func:`prefill_tiles`. The defaults are v2 of bench/NOTES.md (H100 sweep of 2026-11-27).
PREFILL_TUNING = {
    "block_m": 128,    # rows per program (query tokens x heads of a GQA group), at most
    "tile_n": None,    # keys per tile
    "num_warps": None,
    "num_stages": None,
    # variants of the kernel (see pagedattn.ops.triton_prefill)
    "softmax": "exp2",         # "base" | "exp2" (scale * log2 e in one FMA) | "fold_q" (folded into q once)
    "offdiag": "unmasked",     # "masked" | "unmasked" (no mask on off-diagonal tiles once their ids are checked)
    "order": "reverse",        # "forward" | "reverse" (longest query tiles first) | "reverse_heads_inner"
    "k_load": "trans",         # "trans" (tl.trans of a [TILE_N, HEAD] tile) | "kt" (load a [HEAD, TILE_N] tile)
    "kv_addr": "gather",       # "gather" (run-time block size) | "block" (compile-time block size)
    "offdiag_stages": None,    # tl.range(num_stages=) of the off-diagonal loop (None: num_stages)
    "diag_stages": None,       # tl.range(num_stages=) of the diagonal loop (None: num_stages)
    "maxnreg": "auto",         # register cap per thread (CUDA launch option; 0 or None: no cap)
}

_SOFTMAX = {"base": 0, "exp2": 1, "fold_q": 2}
_ORDER = {"forward": 0, "reverse": 1, "reverse_heads_inner": 2}
MAX_GRID_Y = 65535

#: The compiled kernel of the last prefill launch on CUDA (the benchmark reads its registers and spills).
LAST_PREFILL_KERNEL = [None]


def prefill_variant(on_cuda: bool) -> dict:
    """The kernel's variant switches from PREFILL_TUNING (a typo raises: a sweep must not time the default)."""
    t = PREFILL_TUNING
    if t["k_load"] not in ("trans", "kt") or t["kv_addr"] not in ("gather", "block") \
            or t["offdiag"] not in ("masked", "unmasked"):
        raise ValueError(f"bad PREFILL_TUNING: {t}")
    return {"SOFTMAX": _SOFTMAX[t["softmax"]], "OFFDIAG_FAST": t["offdiag"] == "unmasked",
            "ORDER": _ORDER[t["order"]], "K_T": t["k_load"] == "kt",
            "OFFDIAG_STAGES": t["offdiag_stages"], "DIAG_STAGES": t["diag_stages"]}


def prefill_tiles(head_size: int, group_size: int, max_query_len: int,
                  dtype: torch.dtype) -> tuple[int, int, int, int, int, Optional[int]]:
    """(GROUP_P, BLOCK_Q, TILE_N, num_warps, num_stages, maxnreg) of a launch: rows cover a GQA group
    times as many tokens as fit.

    Full 16-bit tiles with heads up to 128 take 32-key tiles, 5 stages and 128 registers a thread
    (two programs per multiprocessor; 0.94x causal SDPA-flash on an H100 against 1.39x for the
    v1 choice of 64-key tiles and 3 stages); other shapes keep v1's choices.
    """
    t = PREFILL_TUNING
    group_p = triton.next_power_of_2(group_size)
    block_d = triton.next_power_of_2(head_size)
    max_rows = t["block_m"] if block_d <= 128 else t["block_m"] // 2
    if dtype == torch.float32:
        max_rows //= 2
    # two tile classes only (decode-shaped rows, or full prefill tiles), to bound compiled variants
    block_m = max(16, group_p) if group_p * max(1, max_query_len) <= 16 else max(max_rows, group_p)
    block_q = max(1, block_m // group_p)
    full_tile = block_q * group_p >= 128
    v2 = full_tile and block_d <= 128 and dtype != torch.float32
    tile_n = t["tile_n"] or (32 if v2 or block_d > 128 else 64)
    if dtype == torch.float32:
        tile_n = max(16, tile_n // 2)
    num_warps = t["num_warps"] or (8 if full_tile else 4)
    num_stages = t["num_stages"] or (5 if v2 else 3)
    maxnreg = t["maxnreg"]
    if maxnreg == "auto":
        maxnreg = 128 if v2 and num_warps == 8 else None
    return group_p, block_q, tile_n, num_warps, num_stages, maxnreg or None


def paged_prefill(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, max_query_len: int,
                  scale: float, sliding_window: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
                  lse: Optional[torch.Tensor]) -> None:
    num_tokens, num_heads, head_size = query.shape
    num_blocks, block_size, num_kv_heads, _ = key_cache.shape
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return
    group_size = num_heads // num_kv_heads
    hint = max_query_len if max_query_len > 0 else num_tokens
    group_p, block_q, tile_n, num_warps, num_stages, maxnreg = prefill_tiles(
        head_size, group_size, min(hint, num_tokens), query.dtype)
    # sequence s owns programs cu[s] // BLOCK_Q + s ..., so this many cover every sequence
    num_programs = num_tokens // block_q + num_seqs
    lse_arg = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    alibi_arg = alibi_slopes if alibi_slopes is not None else out
    on_cuda = query.device.type == "cuda"
    variant = prefill_variant(on_cuda)
    variant["BLOCK_SIZE"] = block_size if PREFILL_TUNING["kv_addr"] == "block" else 0
    if variant["ORDER"] == 2 and num_programs > MAX_GRID_Y:
        variant["ORDER"] = 1  # the query tiles cannot be the grid's second axis
    grid = (num_kv_heads, num_programs) if variant["ORDER"] == 2 else (num_programs, num_kv_heads)
    extra = {"num_warps": num_warps, "num_stages": num_stages}  # the interpreter drops them
    if on_cuda and maxnreg and triton.next_power_of_2(head_size) <= 128:
        extra["maxnreg"] = maxnreg  # larger heads need more registers than any cap worth setting
    kernel = paged_prefill_kernel[grid](
        query, *query.stride(),
        key_cache, *key_cache.stride(),
        value_cache, *value_cache.stride(),
        block_tables, *block_tables.stride(),
        seq_lens, cu_seqlens_q,
        alibi_arg,
        out, *out.stride(),
        lse_arg, *lse_strides,
        scale, softcap,
        num_tokens, num_seqs, num_blocks, block_tables.shape[1], block_size.bit_length() - 1, group_size,
        sliding_window,
        HEAD_SIZE=head_size, BLOCK_D=triton.next_power_of_2(head_size), GROUP_P=group_p, BLOCK_Q=block_q,
        TILE_N=tile_n,
        USE_SOFTCAP=softcap > 0, USE_ALIBI=alibi_slopes is not None, USE_WINDOW=sliding_window > 0,
        WRITE_LSE=lse is not None, DOT_F32=dot_in_float32(query),
        **variant, **extra,
    )
    if on_cuda:
        LAST_PREFILL_KERNEL[0] = kernel

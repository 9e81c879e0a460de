"""Triton kernels for paged decode attention: one query token per sequence.

One program handles one (sequence, KV head, context split): all the query heads that share the
KV head (a GQA group, padded to at least 16 rows so that the two products run on the tensor
cores) against ``TILE_N`` context tokens at a time. With ``KV_HEADS > 1`` a program takes that many
KV heads of the sequence at once (their groups' rows against a tile of ``TILE_N`` tokens x
``KV_HEADS`` heads, each row scoring only its own head's columns: one block-table read serves all
of them; opt-in, ``DECODE_TUNING["kv_heads_per_program"]``). Each tile gathers its tokens through the
block table, so any power-of-two block size from 1 to 256 is served by the same code.

Contexts are split across programs (flash-decoding) in one of two ways. Uniform splits (few
sequences, long contexts): every context is cut at the same ``tokens_per_split`` boundaries.
Per-sequence splits (``PER_SEQ``; full batches of skewed lengths): a sequence longer than the
batch's typical one gets up to ``num_splits`` equal tile-aligned parts (``_context_parts``), so a
long context no longer runs alone at the end while the short ones are long done; programs past
its part count return at once, and a sequence of one part writes its output directly. Split programs
write normalized partial outputs and their log-sum-exp, and a second kernel merges them.

Masking, not trust: lengths are clamped to the block table's capacity, block ids outside the
pool and tokens past the length are never loaded, and a query that sees no token gets a zero
output and ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedattn.ops.triton_decode_tile import (_accumulate, _load_rows, _online_softmax, _tile_block_ids,
                                              _tile_rows, _tile_scores)


@triton.jit
def _context_parts(seq_lens_ptr, seq, split, num_seqs, capacity, sliding_window, tokens_per_split, part_vs_mean,
                   num_splits, TILE_N: tl.constexpr, USE_WINDOW: tl.constexpr, PER_SEQ: tl.constexpr,
                   LENS_BLOCK: tl.constexpr):
    """``(seq_len, window_start, lo, num_parts)`` of one sequence: its length clamped to the table's
    ``capacity``, the first token its window sees, that token's tile start ``lo`` (the first token read),
    and how many programs cover it. Uniform splits: ``num_splits``. ``PER_SEQ``: parts over ``[lo,
    seq_len)`` of at least ``tokens_per_split`` tokens, at least 1 and at most ``num_splits``; with
    ``LENS_BLOCK > 1`` (the mean rule, read in blocks of that many lengths) also of at least
    ``part_vs_mean`` x the batch's mean length: only the batch's long tail is cut (a batch of equal
    lengths is not, so a bandwidth-bound batch keeps one program a sequence). The decode kernel and the
    merge both call this, so they agree on the count.

    The mean rule can only lower the count below ``tokens_per_split``'s, so the batch's lengths are read
    only where that bound exceeds both 1 and ``split`` (the calling program's part; the merge passes 0):
    the count is exact, except that a program whose part is past the bound gets the bound (it is empty
    either way)."""
    seq_len = tl.load(seq_lens_ptr + seq)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), capacity)
    window_start = seq_len * 0
    if USE_WINDOW:
        window_start = tl.maximum(seq_len - sliding_window, 0)
    lo = (window_start // TILE_N) * TILE_N
    if PER_SEQ:
        num_parts = tl.minimum(tl.maximum(tl.cdiv(seq_len - lo, tokens_per_split), 1), num_splits).to(tl.int32)
        if LENS_BLOCK > 1:  # the mean rule (part_vs_mean > 0)
            if num_parts > tl.maximum(split, 1):
                total = tl.zeros([LENS_BLOCK], dtype=tl.int64)
                for i in range(0, num_seqs, LENS_BLOCK):
                    offs = i + tl.arange(0, LENS_BLOCK)
                    lens = tl.load(seq_lens_ptr + offs, mask=offs < num_seqs, other=0)
                    total += tl.minimum(tl.maximum(lens, 0), capacity).to(tl.int64)
                min_part = tl.maximum(tl.sum(total, 0) * part_vs_mean // num_seqs, tokens_per_split)
                num_parts = tl.minimum(tl.maximum(tl.cdiv(seq_len - lo, min_part), 1), num_splits).to(tl.int32)
    else:
        num_parts = seq_len * 0 + num_splits
    return seq_len, window_start, lo, num_parts


@triton.jit(do_not_specialize=["stride_bts", "num_blocks", "max_blocks_per_seq", "log2_block_size", "group_size",
                                "num_kv_heads", "sliding_window", "tokens_per_split", "part_vs_mean"])
def paged_decode_kernel(
    q_ptr, stride_qs, stride_qh, stride_qd,
    k_cache_ptr, stride_kb, stride_kt, stride_kh, stride_kd,
    v_cache_ptr, stride_vb, stride_vt, stride_vh, stride_vd,
    block_tables_ptr, stride_bts, stride_btb,
    seq_lens_ptr,
    alibi_slopes_ptr,
    out_ptr, stride_os, stride_oh, stride_od,
    lse_ptr, stride_ls, stride_lh,
    part_out_ptr, part_lse_ptr,
    scale, softcap,
    num_blocks, max_blocks_per_seq, log2_block_size, group_size, num_kv_heads,
    sliding_window, tokens_per_split, part_vs_mean,
    HEAD_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
    KV_HEADS: tl.constexpr, SPLIT: tl.constexpr, PER_SEQ: tl.constexpr, LENS_BLOCK: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_F32: tl.constexpr, PREFETCH: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_first = tl.program_id(1) * KV_HEADS  # the program's first KV head
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    seq_len, window_start, lo, num_parts = _context_parts(
        seq_lens_ptr, seq, split, tl.num_programs(0), max_blocks_per_seq << log2_block_size, sliding_window,
        tokens_per_split, part_vs_mean, num_splits, TILE_N, USE_WINDOW, PER_SEQ, LENS_BLOCK)

    if PER_SEQ:
        if split >= num_parts:
            return
        part_len = tl.cdiv(tl.cdiv(seq_len - lo, num_parts), TILE_N) * TILE_N
        start = lo + split * part_len
        end = tl.minimum(seq_len, start + part_len)
        if split == num_parts - 1:
            end = seq_len
        partial = num_parts > 1  # a sequence of one part writes its output directly
    else:
        start = split * tokens_per_split
        end = tl.minimum(seq_len, start + tokens_per_split)
        if split == num_splits - 1:
            end = seq_len  # the last split takes whatever is left: nothing is dropped
        start = tl.maximum(start, lo)
        partial = SPLIT  # uniform splits: every program writes partials when there are several

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # columns of a tile: TILE_N tokens x KV_HEADS heads, token-major (a token's heads side by side)
    offs_n = tl.arange(0, TILE_N * KV_HEADS)
    heads = kv_first * group_size + offs_m
    if KV_HEADS == 1:
        m_mask = offs_m < group_size
        col_tok = offs_n
        col_kv = offs_n * 0 + kv_first  # unused: one KV head
        own_head = m_mask[:, None]      # unused: every row scores every column
        k_head = k_cache_ptr + kv_first * stride_kh
        v_head = v_cache_ptr + kv_first * stride_vh
    else:
        # rows: the query heads of KV_HEADS KV heads; a row scores only its own KV head's columns
        row_kv = offs_m // group_size
        m_mask = (offs_m < KV_HEADS * group_size) & (kv_first + row_kv < num_kv_heads)
        col_tok = offs_n // KV_HEADS
        col_kv = kv_first + offs_n % KV_HEADS
        own_head = row_kv[:, None] == (offs_n % KV_HEADS)[None, :]
        k_head = (k_cache_ptr + col_kv.to(tl.int64) * stride_kh)[:, None]
        v_head = (v_cache_ptr + col_kv.to(tl.int64) * stride_vh)[:, None]
    d_mask = offs_d < HEAD_SIZE  # constant: all true, or true in runs of 16, so loads stay 16 bytes wide

    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
    if USE_ALIBI:
        slopes = tl.load(alibi_slopes_ptr + heads, mask=m_mask, other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts

    if PREFETCH == 2 or PREFETCH == 3:
        # the next tile's K and V are loaded before this tile's products, so their latency hides behind them;
        # PREFETCH 3 also reads the block table one more tile ahead (no wait on it before the next loads)
        block_ids = _tile_block_ids(bt_row, stride_btb, start, end, col_tok, log2_block_size)
        offs_t, valid, block_ids, in_block = _tile_rows(block_ids, start, end, window_start, col_tok, col_kv,
                                                        num_kv_heads, num_blocks, log2_block_size, KV_HEADS,
                                                        USE_WINDOW)
        k = _load_rows(k_head, block_ids, in_block, stride_kb, stride_kt, stride_kd, offs_d, valid, d_mask)
        v = _load_rows(v_head, block_ids, in_block, stride_vb, stride_vt, stride_vd, offs_d, valid, d_mask)
        ahead_ids = _tile_block_ids(bt_row, stride_btb, start + TILE_N, end, col_tok, log2_block_size)
        for tile_start in range(start, end, TILE_N):
            # past the end every column is masked: nothing is read
            if PREFETCH == 3:
                next_ids = ahead_ids
                ahead_ids = _tile_block_ids(bt_row, stride_btb, tile_start + 2 * TILE_N, end, col_tok,
                                            log2_block_size)
            else:
                next_ids = _tile_block_ids(bt_row, stride_btb, tile_start + TILE_N, end, col_tok, log2_block_size)
            next_t, next_valid, block_ids, in_block = _tile_rows(
                next_ids, tile_start + TILE_N, end, window_start, col_tok, col_kv, num_kv_heads, num_blocks,
                log2_block_size, KV_HEADS, USE_WINDOW)
            next_k = _load_rows(k_head, block_ids, in_block, stride_kb, stride_kt, stride_kd, offs_d, next_valid,
                                d_mask)
            next_v = _load_rows(v_head, block_ids, in_block, stride_vb, stride_vt, stride_vd, offs_d, next_valid,
                                d_mask)
            s = _tile_scores(q, k, offs_t, valid, own_head, slopes, scale, softcap, seq_len,
                             KV_HEADS, USE_SOFTCAP, USE_ALIBI, DOT_F32)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = _accumulate(acc, p, alpha, v, DOT_F32)
            offs_t, valid, k, v = next_t, next_valid, next_k, next_v
    elif PREFETCH == 4:
        # the block table read one tile ahead (carried), K/V loaded in the loop: the compiler's pipeliner can
        # then issue a tile's K/V copies a stage early without waiting on its block ids
        ahead_ids = _tile_block_ids(bt_row, stride_btb, start, end, col_tok, log2_block_size)
        for tile_start in range(start, end, TILE_N):
            block_ids = ahead_ids
            ahead_ids = _tile_block_ids(bt_row, stride_btb, tile_start + TILE_N, end, col_tok, log2_block_size)
            offs_t, valid, block_ids, in_block = _tile_rows(block_ids, tile_start, end, window_start, col_tok, col_kv,
                                                            num_kv_heads, num_blocks, log2_block_size, KV_HEADS,
                                                            USE_WINDOW)
            k = _load_rows(k_head, block_ids, in_block, stride_kb, stride_kt, stride_kd, offs_d, valid, d_mask)
            v = _load_rows(v_head, block_ids, in_block, stride_vb, stride_vt, stride_vd, offs_d, valid, d_mask)
            s = _tile_scores(q, k, offs_t, valid, own_head, slopes, scale, softcap, seq_len,
                             KV_HEADS, USE_SOFTCAP, USE_ALIBI, DOT_F32)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            acc = _accumulate(acc, p, alpha, v, DOT_F32)
    else:
        for tile_start in range(start, end, TILE_N):
            block_ids = _tile_block_ids(bt_row, stride_btb, tile_start, end, col_tok, log2_block_size)
            offs_t, valid, block_ids, in_block = _tile_rows(block_ids, tile_start, end, window_start, col_tok, col_kv,
                                                            num_kv_heads, num_blocks, log2_block_size, KV_HEADS,
                                                            USE_WINDOW)
            k = _load_rows(k_head, block_ids, in_block, stride_kb, stride_kt, stride_kd, offs_d, valid, d_mask)
            if PREFETCH == 1:  # V issued with K: one wait for both
                v = _load_rows(v_head, block_ids, in_block, stride_vb, stride_vt, stride_vd, offs_d, valid, d_mask)
            s = _tile_scores(q, k, offs_t, valid, own_head, slopes, scale, softcap, seq_len,
                             KV_HEADS, USE_SOFTCAP, USE_ALIBI, DOT_F32)
            p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i)
            if PREFETCH == 0:  # V issued after the scores (the order measured up to 2026-11-27)
                v = _load_rows(v_head, block_ids, in_block, stride_vb, stride_vt, stride_vd, offs_d, valid, d_mask)
            acc = _accumulate(acc, p, alpha, v, DOT_F32)

    has_any = l_i > 0
    o = acc / tl.where(has_any, l_i, 1.0)[:, None]
    lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
    out_mask = m_mask[:, None] & d_mask[None, :]
    if not partial:
        tl.store(out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
        if WRITE_LSE:
            tl.store(lse_ptr + seq.to(tl.int64) * stride_ls + heads * stride_lh, lse, mask=m_mask)
    else:
        # partial buffers are contiguous [num_seqs, num_heads, num_splits, BLOCK_D] / [.., num_splits]
        row = (seq.to(tl.int64) * (num_kv_heads * group_size) + heads) * num_splits + split
        # a split past the sequence's end stores only its lse (-inf): the merge reads no output of it
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + offs_d[None, :], o, mask=out_mask & has_any[:, None])
        tl.store(part_lse_ptr + row, lse, mask=m_mask)


@triton.jit(do_not_specialize=["head_size", "num_splits", "group_size", "max_blocks_per_seq", "log2_block_size",
                                "sliding_window", "tokens_per_split", "part_vs_mean"])
def merge_splits_kernel(
    part_out_ptr, part_lse_ptr,
    out_ptr, stride_os, stride_oh, stride_od,
    lse_ptr, stride_ls, stride_lh,
    seq_lens_ptr,
    head_size, num_splits, group_size,
    max_blocks_per_seq, log2_block_size, sliding_window, tokens_per_split, part_vs_mean,
    HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, PER_SEQ: tl.constexpr, LENS_BLOCK: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """Merge the splits of ``HEADS`` query heads of one (sequence, KV head) at once (grid: sequences x KV
    heads x head groups): weights exp(lse_s - max) over their sum. With ``PER_SEQ`` only the sequence's
    own parts are read, and a sequence of one part (its output written by the decode kernel) is left
    alone."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len, window_start, lo, num_parts = _context_parts(
        seq_lens_ptr, seq, 0, tl.num_programs(0), max_blocks_per_seq << log2_block_size, sliding_window,
        tokens_per_split, part_vs_mean, num_splits, TILE_N, USE_WINDOW, PER_SEQ, LENS_BLOCK)
    if PER_SEQ:
        if num_parts <= 1:
            return
    offs_h = tl.program_id(2) * HEADS + tl.arange(0, HEADS)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    h_mask = offs_h < group_size
    heads = kv_head * group_size + offs_h
    rows = seq.to(tl.int64) * (tl.num_programs(1) * group_size) + heads                      # [HEADS]
    hs_mask = h_mask[:, None] & (offs_s < num_parts)[None, :]                               # [HEADS, BLOCK_S]
    lse_s = tl.load(part_lse_ptr + rows[:, None] * num_splits + offs_s[None, :], mask=hs_mask,
                    other=float("-inf"))
    lse_max = tl.max(lse_s, 1)
    has_any = lse_max > float("-inf")
    lse_max = tl.where(has_any, lse_max, 0.0)
    w = tl.exp(lse_s - lse_max[:, None])                                                     # [HEADS, BLOCK_S]
    w_sum = tl.sum(w, 1)
    d_mask = offs_d < head_size
    parts = tl.load(part_out_ptr + ((rows[:, None] * num_splits + offs_s[None, :]) * BLOCK_D)[:, :, None]
                    + offs_d[None, None, :],
                    mask=(hs_mask & (w > 0))[:, :, None] & d_mask[None, None, :],
                    other=0.0)                                                               # [HEADS, BLOCK_S, BLOCK_D]
    o = tl.sum(parts * w[:, :, None], 1) / tl.where(has_any, w_sum, 1.0)[:, None]           # [HEADS, BLOCK_D]
    tl.store(out_ptr + seq.to(tl.int64) * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if WRITE_LSE:
        lse = tl.where(has_any, lse_max + tl.log(tl.where(has_any, w_sum, 1.0)), float("-inf"))
        tl.store(lse_ptr + seq.to(tl.int64) * stride_ls + heads * stride_lh, lse, mask=h_mask)

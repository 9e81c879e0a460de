"""Triton kernel for paged prefill / append attention: many query tokens per sequence.

The query tokens of all sequences are packed back to back (``cu_seqlens_q``). A program takes
``BLOCK_Q`` consecutive query tokens of one sequence and all the query heads that share one KV
head, so its tile has ``BLOCK_M = BLOCK_Q * GROUP_P`` rows (row r: token ``r // GROUP_P``,
head ``r % GROUP_P`` of the group). Programs are numbered so that sequence ``s`` owns programs
``cu_seqlens_q[s] // BLOCK_Q + s`` onwards; a program finds its sequence by binary search, so the
grid is known on the host from the token and sequence counts alone, and no query is ever left
out whatever the lengths. Keys are gathered through the block table ``TILE_N`` at a time: first
the tiles that every row sees in full (no causal mask), then the tiles on the diagonal.

Masking, not trust: query ranges are clamped to the packed tensor, context lengths to the block
table's capacity, block ids outside the pool are never loaded, and a row that sees no key gets
a zero output and ``lse = -inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedattn.ops.triton_decode import _tanh


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, lo, hi, seq_len,
                  bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                  v_head, stride_vb, stride_vt, stride_vd,
                  scale, softcap, num_blocks, log2_block_size, sliding_window,
                  HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
                  CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
                  USE_WINDOW: tl.constexpr, DOT_F32: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with the key tiles in [lo, hi)."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    block_mask = (1 << log2_block_size) - 1
    for tile_start in range(lo, hi, TILE_N):
        k_pos = tile_start + offs_n
        in_seq = k_pos < seq_len
        block_ids = tl.load(bt_row + (k_pos >> log2_block_size) * stride_btb, mask=in_seq, other=-1)
        valid = in_seq & (block_ids >= 0) & (block_ids < num_blocks)
        block_ids = tl.where(valid, block_ids, 0).to(tl.int64)
        in_block = k_pos & block_mask
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_head + block_ids[:, None] * stride_kb + in_block[:, None] * stride_kt
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if USE_ALIBI:
            s = s + slopes[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        visible = valid[None, :]
        if CAUSAL:
            visible = visible & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
        p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + block_ids[:, None] * stride_vb + in_block[:, None] * stride_vt
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["stride_bts", "num_tokens", "num_seqs", "num_blocks", "max_blocks_per_seq",
                                "log2_block_size", "group_size", "sliding_window"])
def paged_prefill_kernel(
    q_ptr, stride_qt, stride_qh, stride_qd,
    k_cache_ptr, stride_kb, stride_kt, stride_kh, stride_kd,
    v_cache_ptr, stride_vb, stride_vt, stride_vh, stride_vd,
    block_tables_ptr, stride_bts, stride_btb,
    seq_lens_ptr, cu_seqlens_q_ptr,
    alibi_slopes_ptr,
    out_ptr, stride_ot, stride_oh, stride_od,
    lse_ptr, stride_lt, stride_lh,
    scale, softcap,
    num_tokens, num_seqs, num_blocks, max_blocks_per_seq, log2_block_size, group_size, sliding_window,
    HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, USE_WINDOW: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_F32: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)

    # the last sequence whose first program is <= pid
    lo = num_seqs * 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid - 1)
    seq = lo
    cu_start = tl.load(cu_seqlens_q_ptr + seq)
    cu_end = tl.load(cu_seqlens_q_ptr + seq + 1)
    q_start = tl.minimum(tl.maximum(cu_start, 0), num_tokens)
    q_len = tl.minimum(tl.maximum(cu_end, q_start), num_tokens) - q_start
    q_lo = (pid - (cu_start // BLOCK_Q + seq)) * BLOCK_Q

    if (q_lo >= 0) & (q_lo < q_len):
        block_size = 1 << log2_block_size
        seq_len = tl.load(seq_lens_ptr + seq)
        seq_len = tl.minimum(tl.maximum(seq_len, 0), max_blocks_per_seq * block_size)
        first_pos = seq_len - q_len  # position of the sequence's first new token

        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        tok = q_lo + offs_m // GROUP_P
        head_in_group = offs_m % GROUP_P
        row_ok = (tok < q_len) & (head_in_group < group_size)
        heads = kv_head * group_size + head_in_group
        q_pos = first_pos + tok
        d_mask = offs_d < HEAD_SIZE
        rows = (q_start + tok).to(tl.int64)
        q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=row_ok[:, None] & d_mask[None, :], other=0.0)
        slopes = tl.zeros([BLOCK_M], dtype=tl.float32)
        if USE_ALIBI:
            slopes = tl.load(alibi_slopes_ptr + heads, mask=row_ok, other=0.0)

        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        min_pos = first_pos + q_lo                                     # first query position of the tile
        max_pos = first_pos + tl.minimum(q_lo + BLOCK_Q, q_len) - 1    # last query position of the tile
        end = tl.minimum(max_pos + 1, seq_len)
        diag = tl.maximum(tl.minimum((min_pos // TILE_N) * TILE_N, end), 0)  # tiles before: seen by every row
        start = 0
        if USE_WINDOW:
            start = tl.maximum(min_pos - sliding_window + 1, 0)
            start = tl.minimum((start // TILE_N) * TILE_N, diag)

        bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bts
        k_head = k_cache_ptr + kv_head * stride_kh
        v_head = v_cache_ptr + kv_head * stride_vh
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, start, diag, seq_len,
                                      bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                                      v_head, stride_vb, stride_vt, stride_vd,
                                      scale, softcap, num_blocks, log2_block_size, sliding_window,
                                      HEAD_SIZE, BLOCK_D, TILE_N, False, USE_SOFTCAP, USE_ALIBI, USE_WINDOW,
                                      DOT_F32)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, diag, end, seq_len,
                                      bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                                      v_head, stride_vb, stride_vt, stride_vd,
                                      scale, softcap, num_blocks, log2_block_size, sliding_window,
                                      HEAD_SIZE, BLOCK_D, TILE_N, True, USE_SOFTCAP, USE_ALIBI, USE_WINDOW,
                                      DOT_F32)

        has_any = l_i > 0
        o = acc / tl.where(has_any, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
        if WRITE_LSE:
            lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
            tl.store(lse_ptr + rows * stride_lt + heads * stride_lh, lse, mask=row_ok)

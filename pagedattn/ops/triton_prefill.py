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

Tuning variants (compile-time switches, chosen by ``launchers.PREFILL_TUNING``; every default
reproduces the first version's code):

- ``SOFTMAX``: 0 scales every score tile and exponentiates through ``exp2(x * log2 e)``; 1 keeps
  scores in the log2 domain and applies ``scale * log2 e`` in one multiply-add with the running
  maximum (off-diagonal tiles); 2 folds ``scale * log2 e`` into ``q`` once (rounded to the input
  dtype). Soft-cap and ALiBi are applied in the log2 domain (cap and slopes times ``log2 e``).
- ``OFFDIAG_FAST``: the off-diagonal tiles run without any mask when a scan of their block-table
  entries finds every id inside the pool (else they take the masked loop); with a sliding window,
  the tiles that cross some row's window edge stay masked.
- ``ORDER``: 0 programs in query order; 1 reversed (the longest programs of each sequence first,
  the short ones fill the tail); 2 reversed with the KV head as the fastest grid axis.
- ``K_T``: load K as a ``[HEAD, TILE_N]`` tile instead of transposing a ``[TILE_N, HEAD]`` one.
- ``BLOCK_SIZE``: 0 reads the block size at run time; otherwise it is a compile-time constant and,
  when it is at least ``TILE_N``, each key tile lies in one block: one block-table read per tile
  and contiguous rows.
- ``OFFDIAG_STAGES`` / ``DIAG_STAGES``: ``tl.range`` pipeline depths of the two loops (``warp_specialize``
  was tried and dropped: no change on sm_90, and Triton 3.6 fails to compile it for some shapes).
"""

from __future__ import annotations

import triton
import triton.language as tl

from pagedattn.ops.triton_decode_tile import _tanh

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
CHECK_IDS = tl.constexpr(128)  # block-table entries scanned at a time by the OFFDIAG_FAST check


@triton.jit
def _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, lo, hi, seq_len,
                  bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                  v_head, stride_vb, stride_vt, stride_vd,
                  scale, softcap, num_blocks, log2_block_size, sliding_window,
                  HEAD_SIZE: tl.constexpr, BLOCK_D: tl.constexpr, TILE_N: tl.constexpr,
                  CAUSAL: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr,
                  USE_WINDOW: tl.constexpr, DOT_F32: tl.constexpr,
                  MASKED: tl.constexpr, SOFTMAX: tl.constexpr, K_T: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  LOOP_STAGES: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with the key tiles in [lo, hi).

    ``MASKED=False`` only for tiles that every row sees in full and whose block ids are all
    inside the pool. With ``SOFTMAX`` 1 or 2, ``m_i`` is in the log2 domain and ``scale`` is the
    factor from a raw product to log2-domain scores (unused with 2: it is folded into ``q``);
    ``softcap`` and ``slopes`` arrive multiplied by ``log2 e``.
    """
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_SIZE
    block_mask = (1 << log2_block_size) - 1
    for tile_start in tl.range(lo, hi, TILE_N, num_stages=LOOP_STAGES):
        k_pos = tile_start + offs_n
        in_seq = k_pos < seq_len
        # ---- where the tile's keys live: k_rows / v_rows, [TILE_N] offsets of each key's row
        if BLOCK_SIZE >= TILE_N:  # the whole tile in one block: one block-table read
            tile_start = tl.multiple_of(tile_start, TILE_N)
            bid = tl.load(bt_row + (tile_start.to(tl.uint32) // BLOCK_SIZE).to(tl.int32) * stride_btb)
            if MASKED:
                bid_ok = (bid >= 0) & (bid < num_blocks)
                valid = in_seq & bid_ok
                bid = tl.where(bid_ok, bid, 0)
            first = tile_start & (BLOCK_SIZE - 1)
            k_rows = bid.to(tl.int64) * stride_kb + (first + offs_n) * stride_kt
            v_rows = bid.to(tl.int64) * stride_vb + (first + offs_n) * stride_vt
        else:
            if BLOCK_SIZE > 0:
                tile_start = tl.multiple_of(tile_start, TILE_N)
                k_pos = tile_start + offs_n
                blk = (k_pos.to(tl.uint32) // BLOCK_SIZE).to(tl.int32)  # k_pos >= 0: a shift
            else:
                blk = k_pos >> log2_block_size
            if MASKED:
                block_ids = tl.load(bt_row + blk * stride_btb, mask=in_seq, other=-1)
                valid = in_seq & (block_ids >= 0) & (block_ids < num_blocks)
                block_ids = tl.where(valid, block_ids, 0).to(tl.int64)
            else:
                block_ids = tl.load(bt_row + blk * stride_btb).to(tl.int64)
            if BLOCK_SIZE > 0:
                in_block = k_pos & (BLOCK_SIZE - 1)
            else:
                in_block = k_pos & block_mask
            k_rows = block_ids * stride_kb + in_block * stride_kt
            v_rows = block_ids * stride_vb + in_block * stride_vt
        # ---- load mask: none at all for unmasked tiles of a power-of-two head
        if MASKED:
            kv_mask = valid[:, None] & d_mask[None, :]
            kt_mask = d_mask[:, None] & valid[None, :]
        else:
            kv_mask = (offs_n < TILE_N)[:, None] & d_mask[None, :]
            kt_mask = d_mask[:, None] & (offs_n < TILE_N)[None, :]
        NEED_LOAD_MASK: tl.constexpr = MASKED or (HEAD_SIZE != BLOCK_D)
        # ---- scores
        if K_T:
            kt_ptrs = k_head + k_rows[None, :] + offs_d[:, None] * stride_kd
            if NEED_LOAD_MASK:
                kt = tl.load(kt_ptrs, mask=kt_mask, other=0.0)
            else:
                kt = tl.load(kt_ptrs)
        else:
            if (BLOCK_SIZE == 0) or (BLOCK_SIZE < TILE_N):  # the first version's address arithmetic
                k_ptrs = (k_head + block_ids[:, None] * stride_kb + in_block[:, None] * stride_kt
                          + offs_d[None, :] * stride_kd)
            else:
                k_ptrs = k_head + k_rows[:, None] + offs_d[None, :] * stride_kd
            if NEED_LOAD_MASK:
                k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            else:
                k = tl.load(k_ptrs)
            kt = tl.trans(k)
        if DOT_F32:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        # SCALE_LATE: the tutorial's off-diagonal form, scale applied inside the exp2 argument
        SCALE_LATE: tl.constexpr = (SOFTMAX == 1) and (not MASKED) and (not USE_SOFTCAP) and (not USE_ALIBI)
        if SOFTMAX == 0:
            s = s * scale
        elif SOFTMAX == 1:
            if not SCALE_LATE:
                s = s * scale
        if USE_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        if USE_ALIBI:
            s = s + slopes[:, None] * (k_pos[None, :] - q_pos[:, None]).to(tl.float32)
        if MASKED:
            visible = valid[None, :]
            if CAUSAL:
                visible = visible & (k_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - sliding_window)
            s = tl.where(visible, s, float("-inf"))
        # ---- online softmax
        if SOFTMAX == 0:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
            p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
        elif MASKED:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
        else:  # every row sees a finite score in this tile: m_new is finite
            if SCALE_LATE:
                m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
                p = tl.exp2(s * scale - m_new[:, None])
            else:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if (BLOCK_SIZE == 0) or (BLOCK_SIZE < TILE_N):
            v_ptrs = (v_head + block_ids[:, None] * stride_vb + in_block[:, None] * stride_vt
                      + offs_d[None, :] * stride_vd)
        else:
            v_ptrs = v_head + v_rows[:, None] + offs_d[None, :] * stride_vd
        if NEED_LOAD_MASK:
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        else:
            v = tl.load(v_ptrs)
        if SOFTMAX == 0:
            if DOT_F32:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        else:
            acc = acc * alpha[:, None]
            if DOT_F32:
                acc = tl.dot(p, v.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _ids_in_pool(bt_row, stride_btb, lo, hi, num_blocks, log2_block_size):
    """Whether every block-table entry covering positions [lo, hi) names a block of the pool."""
    offs = tl.arange(0, CHECK_IDS)
    first = lo >> log2_block_size
    last = (hi - 1) >> log2_block_size  # below first when the range is empty
    n_bad = lo * 0
    for b0 in range(first, last + 1, CHECK_IDS):
        idx = b0 + offs
        ids = tl.load(bt_row + idx * stride_btb, mask=idx <= last, other=0)
        n_bad += tl.sum(((ids < 0) | (ids >= num_blocks)).to(tl.int32), 0)
    return n_bad == 0


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
    SOFTMAX: tl.constexpr = 0, OFFDIAG_FAST: tl.constexpr = False, ORDER: tl.constexpr = 0,
    K_T: tl.constexpr = False, BLOCK_SIZE: tl.constexpr = 0,
    OFFDIAG_STAGES: tl.constexpr = None, DIAG_STAGES: tl.constexpr = None,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P
    if ORDER == 0:
        pid = tl.program_id(0)
        kv_head = tl.program_id(1)
    elif ORDER == 1:  # reversed: a sequence's last (longest) query tiles first
        pid = tl.num_programs(0) - 1 - tl.program_id(0)
        kv_head = tl.program_id(1)
    else:  # reversed, KV head fastest
        pid = tl.num_programs(1) - 1 - tl.program_id(1)
        kv_head = tl.program_id(0)

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
        qk_scale = scale
        if SOFTMAX != 0:  # scores in the log2 domain
            qk_scale = scale * LOG2E
            softcap = softcap * LOG2E
            slopes = slopes * LOG2E
            if SOFTMAX == 2:
                q = (q * qk_scale).to(q.dtype)

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
        masked_end = diag  # tiles [start, masked_end) masked, [masked_end, diag) not
        if OFFDIAG_FAST:
            masked_end = start
            if USE_WINDOW:  # tiles from here on lie inside every row's window
                inside = tl.maximum(max_pos - sliding_window + 1, 0)
                masked_end = tl.minimum(tl.maximum(((inside + TILE_N - 1) // TILE_N) * TILE_N, start), diag)
            if not _ids_in_pool(bt_row, stride_btb, masked_end, diag, num_blocks, log2_block_size):
                masked_end = diag
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, start, masked_end, seq_len,
                                      bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                                      v_head, stride_vb, stride_vt, stride_vd,
                                      qk_scale, softcap, num_blocks, log2_block_size, sliding_window,
                                      HEAD_SIZE, BLOCK_D, TILE_N, False, USE_SOFTCAP, USE_ALIBI, USE_WINDOW,
                                      DOT_F32, True, SOFTMAX, K_T, BLOCK_SIZE, OFFDIAG_STAGES)
        if OFFDIAG_FAST:
            acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, masked_end, diag, seq_len,
                                          bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                                          v_head, stride_vb, stride_vt, stride_vd,
                                          qk_scale, softcap, num_blocks, log2_block_size, sliding_window,
                                          HEAD_SIZE, BLOCK_D, TILE_N, False, USE_SOFTCAP, USE_ALIBI, False,
                                          DOT_F32, False, SOFTMAX, K_T, BLOCK_SIZE, OFFDIAG_STAGES)
        acc, m_i, l_i = _attend_tiles(acc, m_i, l_i, q, q_pos, slopes, diag, end, seq_len,
                                      bt_row, stride_btb, k_head, stride_kb, stride_kt, stride_kd,
                                      v_head, stride_vb, stride_vt, stride_vd,
                                      qk_scale, softcap, num_blocks, log2_block_size, sliding_window,
                                      HEAD_SIZE, BLOCK_D, TILE_N, True, USE_SOFTCAP, USE_ALIBI, USE_WINDOW,
                                      DOT_F32, True, SOFTMAX, K_T, BLOCK_SIZE, DIAG_STAGES)

        has_any = l_i > 0
        o = acc / tl.where(has_any, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_mask[None, :])
        if WRITE_LSE:
            if SOFTMAX == 0:
                lse = tl.where(has_any, m_i + tl.log(tl.where(has_any, l_i, 1.0)), float("-inf"))
            else:
                lse = tl.where(has_any, (m_i + tl.log2(tl.where(has_any, l_i, 1.0))) * LN2, float("-inf"))
            tl.store(lse_ptr + rows * stride_lt + heads * stride_lh, lse, mask=row_ok)

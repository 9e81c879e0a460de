"""A decode tile's building blocks (Triton): its block ids, which of its columns are read, the K/V row loads,
the scores of the query rows against it and one step of the online softmax.

Shared by the decode kernel (``triton_decode.py``); ``_tanh`` (soft-cap) also by the prefill kernel. A tile is
``TILE_N`` context tokens (times ``KV_HEADS`` heads with several KV heads a program); every load is masked:
tokens past the end or outside the window, and block ids outside the pool, read nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _tanh(x):
    # tanh through exp, safe at both ends: exp overflowing to inf gives 1, underflowing gives -1.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _tile_block_ids(bt_row, stride_btb, tile_start, end, col_tok, log2_block_size):
    """The block id of each column of the tile from ``tile_start`` (-1 past ``end``: nothing is read there)."""
    offs_t = tile_start + col_tok
    return tl.load(bt_row + (offs_t >> log2_block_size) * stride_btb, mask=offs_t < end, other=-1)


@triton.jit
def _tile_rows(block_ids, tile_start, end, window_start, col_tok, col_kv, num_kv_heads, num_blocks,
               log2_block_size, KV_HEADS: tl.constexpr, USE_WINDOW: tl.constexpr):
    """``(offs_t, valid, block_ids, in_block)`` of the tile from ``tile_start`` given its columns' block ids:
    each column's token, whether it is read (before ``end``, in its window, a block id inside the pool, a real
    KV head), its block (0 where not valid) and its slot in the block."""
    offs_t = tile_start + col_tok
    valid = (offs_t < end) & (block_ids >= 0) & (block_ids < num_blocks)
    if USE_WINDOW:
        valid = valid & (offs_t >= window_start)
    if KV_HEADS > 1:
        valid = valid & (col_kv < num_kv_heads)
    block_ids = tl.where(valid, block_ids, 0).to(tl.int64)
    return offs_t, valid, block_ids, offs_t & ((1 << log2_block_size) - 1)


@triton.jit
def _load_rows(head_ptr, block_ids, in_block, stride_b, stride_t, stride_d, offs_d, valid, d_mask):
    """The K or V rows of a tile's valid columns (zeros elsewhere)."""
    return tl.load(head_ptr + block_ids[:, None] * stride_b + in_block[:, None] * stride_t + offs_d[None, :] * stride_d,
                   mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _tile_scores(q, k, offs_t, valid, own_head, slopes, scale, softcap, seq_len, KV_HEADS: tl.constexpr,
                 USE_SOFTCAP: tl.constexpr, USE_ALIBI: tl.constexpr, DOT_F32: tl.constexpr):
    """Scaled scores ``[BLOCK_M, columns]`` of the query rows against a tile (soft-cap, ALiBi); ``-inf`` where
    a column is not read (or, with several KV heads, belongs to another head than the row's)."""
    if DOT_F32:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if USE_SOFTCAP:
        s = softcap * _tanh(s / softcap)
    if USE_ALIBI:
        s = s + slopes[:, None] * (offs_t - seq_len + 1).to(tl.float32)[None, :]
    if KV_HEADS == 1:
        return tl.where(valid[None, :], s, float("-inf"))
    return tl.where(valid[None, :] & own_head, s, float("-inf"))


@triton.jit
def _online_softmax(s, m_i, l_i):
    """``(p, alpha, m_new, l_new)``: a tile's unnormalized probabilities, the factor that rescales what was
    accumulated, and the running max and sum after the tile (a row that saw nothing keeps max -inf)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2((m_i - m_safe) * LOG2E)
    p = tl.exp2((s - m_safe[:, None]) * LOG2E)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _accumulate(acc, p, alpha, v, DOT_F32: tl.constexpr):
    if DOT_F32:
        return acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

"""Plain-PyTorch reference implementations of every op.

They are written to be read, not to be fast: the CPU backend and the ground truth for the
tests. They follow the same masking rules as the kernels, so they agree on any input:

- A sequence length is clamped to ``[0, max_blocks_per_seq * block_size]``.
- A context token whose block id lies outside ``[0, num_blocks)`` is skipped (not attended).
- A slot outside ``[0, num_blocks * block_size)`` (negative slots mean padding) is not written.
- A copied block pair with either id out of range is skipped.

Attention is computed in float32 (or float64 when the inputs are float64) and the result is
cast to the output's dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def context_positions(seq_len: int, block_table: torch.Tensor, block_size: int,
                      num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (positions, physical slots) of a sequence's context that can be read.

    Args:
        seq_len: the sequence's length after clamping.
        block_table: [max_blocks_per_seq] int32, the sequence's block ids.
        block_size: tokens per block.
        num_blocks: blocks in the pool; ids outside ``[0, num_blocks)`` are skipped.

    Returns:
        positions: [n] int64 logical positions; slots: [n] int64 ``block_id * block_size + offset``.
    """
    positions = torch.arange(seq_len, dtype=torch.int64)
    blocks = block_table.to(torch.int64).cpu()[positions // block_size]
    keep = (blocks >= 0) & (blocks < num_blocks)
    positions, blocks = positions[keep], blocks[keep]
    return positions, blocks * block_size + positions % block_size


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
           query_positions: torch.Tensor, scale: float, softcap: float,
           alibi_slopes: Optional[torch.Tensor], sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of some query tokens of one sequence over its context.

    Args:
        query: [q_len, num_heads, head_size]; keys, values: [n, num_kv_heads, head_size].
        positions: [n] int64 logical positions of the keys.
        query_positions: [q_len] int64 logical positions of the queries.
        scale: softmax scale; softcap: logits soft-cap (0: off); alibi_slopes: [num_heads] or None;
        sliding_window: a query at position p sees keys in ``(p - sliding_window, p]`` (0: all).

    Returns:
        out: [q_len, num_heads, head_size] in the compute dtype;
        lse: [q_len, num_heads] natural-log sum of exp of the (scaled, capped, biased) scores,
        ``-inf`` (and a zero output) for a query that sees no key.
    """
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    num_heads, num_kv_heads = query.shape[1], keys.shape[1]
    group = num_heads // num_kv_heads
    q = query.to(compute)
    k = keys.to(compute).repeat_interleave(group, dim=1)
    v = values.to(compute).repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    rel = positions[None, :].to(device=query.device) - query_positions[:, None].to(device=query.device)
    if alibi_slopes is not None:
        scores = scores + alibi_slopes.to(compute)[:, None, None] * rel[None].to(compute)
    visible = rel <= 0
    if sliding_window > 0:
        visible &= rel > -sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [h, q]
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(compute).min))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("hqk,khd->qhd", probs, v)
    return out, lse.transpose(0, 1)


def paged_decode(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float, sliding_window: int,
                 softcap: float, alibi_slopes: Optional[torch.Tensor], lse: Optional[torch.Tensor]) -> None:
    """Reference paged decode attention; the arguments are those of ``torch.ops.pagedattn.paged_decode``.

    Decode is prefill with one new token per sequence, so this is :func:`paged_prefill` with
    ``cu_seqlens_q = [0, 1, ..., num_seqs]``.
    """
    cu_seqlens_q = torch.arange(query.shape[0] + 1, dtype=torch.int32)
    paged_prefill(out, query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, scale, sliding_window,
                  softcap, alibi_slopes, lse)


def paged_prefill(out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor, cu_seqlens_q: torch.Tensor, scale: float,
                  sliding_window: int, softcap: float, alibi_slopes: Optional[torch.Tensor],
                  lse: Optional[torch.Tensor]) -> None:
    """Reference paged prefill; the arguments are those of ``torch.ops.pagedattn.paged_prefill``.

    Query ranges are clamped like the kernel does: ``start = clamp(cu[s], 0, num_tokens)``,
    ``end = clamp(cu[s + 1], start, num_tokens)``.
    """
    num_tokens = query.shape[0]
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    capacity = block_tables.shape[1] * block_size
    cu = cu_seqlens_q.to(torch.int64).tolist()
    lens = seq_lens.to(torch.int64).clamp(0, capacity).tolist()
    for i, seq_len in enumerate(lens):
        start = min(max(cu[i], 0), num_tokens)
        end = min(max(cu[i + 1], start), num_tokens)
        if end == start:
            continue
        positions, slots = context_positions(seq_len, block_tables[i], block_size, num_blocks)
        blocks, offsets = (slots // block_size).to(key_cache.device), (slots % block_size).to(key_cache.device)
        query_positions = torch.arange(seq_len - (end - start), seq_len, dtype=torch.int64)
        o, l = attend(query[start:end], key_cache[blocks, offsets], value_cache[blocks, offsets], positions,
                      query_positions, scale, softcap, alibi_slopes, sliding_window)
        out[start:end].copy_(o)
        if lse is not None:
            lse[start:end].copy_(l)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Reference cache write: ``cache[slot // block_size, slot % block_size] = new[token]``."""
    num_blocks, block_size = key_cache.shape[0], key_cache.shape[1]
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0) & (slots < num_blocks * block_size)
    tokens = keep.nonzero().flatten()
    blocks, offsets = slots[tokens] // block_size, slots[tokens] % block_size
    key_cache[blocks, offsets] = key[tokens].to(key_cache.dtype)
    value_cache[blocks, offsets] = value[tokens].to(value_cache.dtype)


def copy_blocks(key_caches: list[torch.Tensor], value_caches: list[torch.Tensor],
                block_mapping: torch.Tensor) -> None:
    """Reference block copy: for every cache, ``cache[dst] = cache[src]`` for each (src, dst) pair."""
    for cache in list(key_caches) + list(value_caches):
        num_blocks = cache.shape[0]
        for src, dst in block_mapping.to(torch.int64).tolist():
            if 0 <= src < num_blocks and 0 <= dst < num_blocks:
                cache[dst].copy_(cache[src])


def default_scale(head_size: int) -> float:
    return 1.0 / math.sqrt(head_size)

"""Shared pieces of the op benchmarks: the full and dry-run shapes, cases, the SDPA reference, timing helpers.

Used by ``bench/bench_ops.py``, its sweeps (``bench/ops_sweeps.py``), ``bench/prefill_common.py`` and
``bench/bench_backends.py``. Tensors are made on ``harness.DEV`` read at call time (``--dry-run`` rebinds it).
"""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench import harness as hx
from bench.harness import rec, sync, timeit, tuned
from pagedattn.ops import allocate_kv_cache, launchers, paged_decode_attention

TOL = 2e-2
FULL = SimpleNamespace(
    heads=32, kv_heads=8, head_size=128, dtype=torch.bfloat16, seqs=64, seq_len=4096, block=16,
    long=[(1, 32768), (4, 32768), (1, 131072), (4, 131072)], rc_tokens=16384,
    cb_layers=8, cb_blocks=8192, cb_pairs=2048, copy_bytes=2 << 30, mm=8192,
    block_sizes=[8, 16, 32, 64, 128, 256], flex_pages=[16, 128], sweep_batches=[1, 8, 32, 128],
    sweep_ctx=[512, 2048, 8192], sweep_max_kv_bytes=8 << 30, warmup=25, rep=100, cpu_reps=0)
DRY = SimpleNamespace(
    heads=8, kv_heads=2, head_size=64, dtype=torch.bfloat16, seqs=2, seq_len=128, block=16,
    long=[(1, 256), (2, 256), (1, 512), (2, 512)], rc_tokens=64,
    cb_layers=2, cb_blocks=64, cb_pairs=16, copy_bytes=1 << 20, mm=128,
    block_sizes=[8, 16, 32], flex_pages=[16, 32], sweep_batches=[1, 2], sweep_ctx=[64, 128],
    sweep_max_kv_bytes=100_000, warmup=0, rep=0, cpu_reps=2)


def copy_blocks_case(sh):
    """``sh.cb_layers`` random key and value caches of ``sh.cb_blocks`` blocks, a random block permutation and
    the ``[sh.cb_pairs, 2]`` (src, dst) mapping taken from it: ``(key_caches, value_caches, perm, mapping)``."""
    kcs, vcs = [], []
    for _ in range(sh.cb_layers):
        kc, vc = allocate_kv_cache(sh.cb_blocks, sh.block, sh.kv_heads, sh.head_size, sh.dtype, hx.DEV)
        kcs.append(kc.normal_())
        vcs.append(vc.normal_())
    perm = torch.randperm(sh.cb_blocks, device=hx.DEV)
    P = sh.cb_pairs
    return kcs, vcs, perm, torch.stack([perm[:P], perm[P:2 * P]], dim=1).contiguous()


def reshape_case(sh):
    """``sh.rc_tokens`` random keys and values [T, kv_heads, head_size], a pool of 4x as many slots, T distinct
    random slots and the bytes the op moves: ``(key, value, num_blocks, slot_mapping, nbytes)``."""
    T = sh.rc_tokens
    key, value = (torch.randn(T, sh.kv_heads, sh.head_size, dtype=sh.dtype, device=hx.DEV) for _ in range(2))
    num_blocks = triton.cdiv(4 * T, sh.block)
    slots = torch.randperm(num_blocks * sh.block, device=hx.DEV)[:T]
    nbytes = 4 * key.numel() * key.element_size() + slots.numel() * slots.element_size()
    return key, value, num_blocks, slots, nbytes


def fill_caches(k, v, block_size, layout):
    """Paged caches holding contiguous ``k, v`` [S, kvh, L, D] in randomly permuted (scattered) blocks."""
    S, kvh, L, D = k.shape
    nb = L // block_size
    bt = torch.randperm(S * nb, device=hx.DEV).view(S, nb)
    kc, vc = allocate_kv_cache(S * nb, block_size, kvh, D, k.dtype, hx.DEV, layout=layout)
    for cache, src in ((kc, k), (vc, v)):
        cache[bt] = src.view(S, kvh, nb, block_size, D).permute(0, 2, 3, 1, 4)
    return kc, vc, bt.to(torch.int32)


def make_case(S, L, block_size, layout, sh):
    assert L % block_size == 0
    q = torch.randn(S, sh.heads, sh.head_size, dtype=sh.dtype, device=hx.DEV)
    k = torch.randn(S, sh.kv_heads, L, sh.head_size, dtype=sh.dtype, device=hx.DEV)
    v = torch.randn_like(k)
    kc, vc, bt = fill_caches(k, v, block_size, layout)
    lens = torch.full((S,), L, dtype=torch.int32, device=hx.DEV)
    kv_bytes = 2 * S * L * sh.kv_heads * sh.head_size * k.element_size()
    return SimpleNamespace(q=q, k=k, v=v, kc=kc, vc=vc, bt=bt, lens=lens, S=S, L=L, kv_bytes=kv_bytes)


def ours_fn(c, kc=None, vc=None, bt=None, num_splits=None):
    out = torch.empty_like(c.q)
    kc, vc, bt = (kc if kc is not None else c.kc), (vc if vc is not None else c.vc), (bt if bt is not None else c.bt)
    return lambda: paged_decode_attention(c.q, kc, vc, bt, c.lens, out=out, num_splits=num_splits, max_seq_len=c.L)


def sdpa_ctx(backend):
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION) if backend == "flash" else contextlib.nullcontext()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.unsqueeze(2), k, v, enable_gqa=True).squeeze(2)


def sdpa_backend(c):
    """Run SDPA once with flash, else the default backend: (backend name, output [S, H, D])."""
    try:
        with sdpa_ctx("flash"):
            out = sdpa(c.q, c.k, c.v)
        sync()
        return "flash", out
    except Exception as e:  # noqa: BLE001
        return f"default (flash refused: {type(e).__name__}: {str(e)[:200]})", sdpa(c.q, c.k, c.v)


def time_sdpa(c, sh):
    backend, ref = sdpa_backend(c)
    with sdpa_ctx(backend):
        ms = timeit(lambda: sdpa(c.q, c.k, c.v), sh)
    return rec(ms, c.kv_bytes, backend=backend), ref


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def gather_naive(cache, bt, L):
    """The usual idiom: index the blocks, then permute/reshape to [S, kvh, L, D] (two passes)."""
    g = cache[bt.long()]  # [S, nb, bs, kvh, D]
    return g.permute(0, 3, 1, 2, 4).reshape(bt.shape[0], cache.shape[2], L, cache.shape[3])


def gather_onepass(cache, bt, L):
    """One pass: an index_select of D-element rows; the row indices are computed in the call."""
    S, (_, bs, kvh, D) = bt.shape[0], cache.shape
    st = cache.stride()
    t = torch.arange(L, device=cache.device)
    base = bt.long()[:, t // bs] * st[0] + (t % bs) * st[1]  # [S, L]
    rows = (base[:, None, :] + torch.arange(kvh, device=cache.device)[None, :, None] * st[2]) // D
    flat = torch.as_strided(cache, (cache.numel() // D, D), (D, 1))
    return flat.index_select(0, rows.view(-1)).view(S, kvh, L, D)


def effective_splits(S, L, sh, num_splits=None) -> int:
    """The split count the launcher uses (mirrors launchers.paged_decode; with per-sequence splits the
    grid's split axis: the most parts a sequence may get)."""
    n = num_splits
    if not n:
        n, per_seq = launchers.plan_decode_splits(S, sh.kv_heads, L, hx.DEV)[:2]
        if per_seq:
            return n
    tile = launchers.decode_tile_n(triton.next_power_of_2(sh.head_size), sh.dtype)
    per = triton.cdiv(triton.cdiv(L, n), tile) * tile
    return max(1, min(n, triton.cdiv(L, per)))


def decode_variant(r, name, c, ref, sdpa_ms, sh, kc=None, vc=None, bt=None, num_splits=None, tuning=None):
    """Time one decode variant (optionally with DECODE_TUNING overrides) and check it against SDPA."""
    try:
        with tuned(launchers.DECODE_TUNING, tuning):
            fn = ours_fn(c, kc, vc, bt, num_splits)
            diff = max_diff(fn(), ref)
            ms = timeit(fn, sh)
            r[name] = rec(ms, c.kv_bytes, vs_sdpa=ms / sdpa_ms if sdpa_ms else None, max_abs_diff=diff,
                          ok=diff <= TOL, num_splits=effective_splits(c.S, c.L, sh, num_splits), tuning=tuning or {})
    except Exception as e:  # noqa: BLE001
        r[name] = {"error": f"{type(e).__name__}: {e}"}
    return r[name]

"""Shared pieces of the prefill benchmarks: shapes, the float32 reference, checks, timing and the op's call.

Used by ``bench/bench_prefill.py``, its variant sweep (``bench/prefill_sweep.py``) and
``bench/bench_backends.py``. Every tensor is made on ``harness.DEV`` read at call time (``--dry-run``
rebinds it to the CPU).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from bench import harness as hx
from bench.ops_common import DRY, FULL, TOL, fill_caches, max_diff
from bench.harness import TIMING, sync, timeit
from pagedattn.ops import DEFAULT_LAYOUT, paged_prefill_attention

PFULL = SimpleNamespace(**{**vars(FULL), "prefill": (8, 2048, 0), "prefix": (8, 512, 1536),
                           "mixed": (4, 512, 1024, 60, 2048), "decode_main": (FULL.seqs, FULL.seq_len)})
PDRY = SimpleNamespace(**{**vars(DRY), "prefill": (2, 64, 0), "prefix": (2, 16, 48),
                          "mixed": (2, 16, 16, 3, 64), "decode_main": (2, 64)})


def ref_attention(q, k, v):
    """float32 attention of one sequence, bottom-right causal: q [H, n, D], k/v [kvh, L, D] -> [H, n, D]."""
    H, n, D = q.shape
    kvh, L, _ = k.shape
    qg = q.float().reshape(kvh, H // kvh * n, D)
    s = (qg @ k.float().transpose(-1, -2) * D ** -0.5).view(kvh, H // kvh, n, L)
    s.masked_fill_(~torch.ones(n, L, dtype=torch.bool, device=q.device).tril(L - n), float("-inf"))
    return (s.softmax(-1).view(kvh, -1, L) @ v.float()).reshape(H, n, D)


def tol_of(ref) -> float:
    """bf16 tolerance relative to the output's magnitude."""
    return TOL * max(1.0, ref.float().abs().max().item())


def check(out, ref) -> dict:
    d, t = max_diff(out, ref), tol_of(ref)
    return {"max_abs_diff": d, "tol": t, "ok": bool(d <= t)}  # NaN compares False


def timed(fn, sh):
    """bench_ops.timeit; when a CUDA graph cannot be captured, eager timing (recorded as such)."""
    try:
        return timeit(fn, sh), TIMING["mode"] if hx.DEV.type == "cuda" else "cpu wall clock"
    except Exception as e:  # noqa: BLE001
        if hx.DEV.type != "cuda" or TIMING["mode"] != "graph":
            raise
        saved, TIMING["mode"] = TIMING["mode"], "eager"
        try:
            return timeit(fn, sh), f"eager (graph capture failed: {type(e).__name__}: {str(e)[:150]})"
        finally:
            TIMING["mode"] = saved


def visible_pairs(q_lens, seq_lens) -> int:
    """(query, key) pairs under bottom-right causal masking, summed over sequences."""
    return sum(n * (L - n) + n * (n + 1) // 2 for n, L in zip(q_lens, seq_lens))


def tflops(pairs, ms, sh) -> float:
    return 4 * sh.heads * sh.head_size * pairs / (ms * 1e-3) / 1e12


def prefill_fn(q, kc, vc, bt, lens, cu, max_q):
    out = torch.empty_like(q)
    return lambda: paged_prefill_attention(q, kc, vc, bt, lens, cu, max_query_len=max_q, out=out)


def cu_of(q_lens):
    return torch.tensor([0] + q_lens, dtype=torch.int32, device=hx.DEV).cumsum(0, dtype=torch.int32)


def pick_sdpa(q, k, v, candidates):
    """First SDPA candidate that runs and matches the float32 reference on sequence 0: (name, fn, ctx, out)."""
    ref0 = ref_attention(q[0], k[0], v[0])
    tried = {}
    for name, ctx, fn in candidates:
        try:
            with ctx():
                out = fn()
            sync()
            c = check(out[0], ref0)
            if c["ok"]:
                return name, fn, ctx, out, tried
            tried[name] = f"wrong result: {c}"
        except Exception as e:  # noqa: BLE001
            tried[name] = f"refused: {type(e).__name__}: {str(e)[:200]}"
    raise RuntimeError(f"no SDPA backend gave a correct result: {tried}")


def prefill_case(sh, S, new, prefix):
    """S sequences of ``new`` query tokens over ``prefix`` cached ones: dense ``q`` [S, H, new, D] and ``k, v``
    [S, kvh, prefix + new, D], their paged caches and block tables, ``seq_lens`` and the packed (varlen)
    queries [S * new, H, D]: ``(q, k, v, key_cache, value_cache, block_tables, seq_lens, packed_q)``."""
    L, H, D = prefix + new, sh.heads, sh.head_size
    q = torch.randn(S, H, new, D, dtype=sh.dtype, device=hx.DEV)
    k = torch.randn(S, sh.kv_heads, L, D, dtype=sh.dtype, device=hx.DEV)
    v = torch.randn_like(k)
    kc, vc, bt = fill_caches(k, v, sh.block, DEFAULT_LAYOUT)
    lens = torch.full((S,), L, dtype=torch.int32, device=hx.DEV)
    return q, k, v, kc, vc, bt, lens, q.transpose(1, 2).reshape(S * new, H, D)

#!/usr/bin/env python
"""Microbenchmarks of the pagedattn ops on one GPU, against the card's measured limits.

    python bench/bench_ops.py            # full run (< 4 min on an H100), writes bench/results/<card>/ops.json,
                                         # ops_block_size.png, ops_batch_ctx.png and the headline figures of
                                         # bench/results/summary.json
    python bench/bench_ops.py --quick    # shorter timings, no tuning sweep
    python bench/bench_ops.py --dry-run  # CPU plumbing check: tiny shapes, Triton interpreter, results in a temp dir
    pytest bench/bench_ops.py --benchmark-only   # pytest-benchmark entries (skipped without CUDA)

Sections (each one fails on its own, its error kept in the JSON): physical limits (copy bandwidth,
bf16 matmul), decode at the main shape against SDPA on contiguous K/V and gather-then-SDPA with a
small layout / split / tuning sweep, long contexts, reshape_and_cache, copy_blocks, block sizes,
FlexAttention over a paged cache and a batch x context sweep (both in bench/ops_sweeps.py).
Every decode result carries its max abs difference from SDPA; a wrong kernel fails loudly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton decorates the kernels

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from bench import harness as hx  # noqa: E402
from bench.harness import TIMING, card_slug, fmt, free, print_failures_and_figures, rec, run_sections, timeit  # noqa: E402
from bench.ops_common import (DRY, FULL, TOL, copy_blocks_case, decode_variant, reshape_case, sdpa_ctx,  # noqa: E402
                              fill_caches, gather_naive, gather_onepass, make_case, max_diff, ours_fn, sdpa,
                              time_sdpa)
from bench.ops_sweeps import sec_batch_ctx_sweep, sec_flex_paged  # noqa: E402
from pagedattn.ops import (DEFAULT_LAYOUT, allocate_kv_cache, copy_blocks, launchers,  # noqa: E402
                           reshape_and_cache, set_backend)

# --------------------------------------------------------------------------------------------- sections

def sec_physical(r, sh):
    """Copy bandwidth and matmul rate, timed eagerly: launch overhead is nil next to a 2 GiB copy,
    and CUDA-graph replays of this copy were seen to read 20% low (2.44 against 3.02 TB/s, H100)."""
    saved_mode, TIMING["mode"] = TIMING["mode"], "eager"
    try:
        _physical(r, sh)
    finally:
        TIMING["mode"] = saved_mode


def _physical(r, sh):
    n = sh.copy_bytes // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=hx.DEV)
    dst = torch.empty_like(src)
    r["copy"] = rec(timeit(lambda: dst.copy_(src), sh), 2 * 2 * n)
    hx.COPY_BW[0] = r["copy"]["GBps"] * 1e9
    r["copy"]["copy_bw_fraction"] = 1.0
    del src, dst
    m = sh.mm
    a, b = (torch.randn(m, m, dtype=torch.bfloat16, device=hx.DEV) for _ in range(2))
    c = torch.empty_like(a)
    ms = timeit(lambda: torch.matmul(a, b, out=c), sh)
    r["matmul_bf16"] = {"n": m, "ms": ms, "TFLOPs": 2 * m ** 3 / (ms * 1e-3) / 1e12}


def sec_decode(r, sh, quick):
    c = make_case(sh.seqs, sh.seq_len, sh.block, DEFAULT_LAYOUT, sh)
    r["shape"] = {"seqs": c.S, "seq_len": c.L, "heads": sh.heads, "kv_heads": sh.kv_heads,
                  "head_size": sh.head_size, "block_size": sh.block, "dtype": str(sh.dtype),
                  "default_layout": DEFAULT_LAYOUT, "tuning_defaults": dict(launchers.DECODE_TUNING)}
    r["cache_matches_contiguous"] = bool(torch.equal(gather_naive(c.kc, c.bt, c.L), c.k))
    r["sdpa"], ref = time_sdpa(c, sh)
    sd = r["sdpa"]["ms"]
    v = r["variants"] = {}
    main = decode_variant(v, "default", c, ref, sd, sh)
    r["validation"] = {"max_abs_diff_vs_sdpa": main.get("max_abs_diff"), "tol": TOL, "ok": bool(main.get("ok"))}
    if not r["validation"]["ok"] or not r["cache_matches_contiguous"]:
        r["validation"]["FAILED"] = "ours differs from SDPA (or the cache was built wrong): timings are worthless"
        print("!!! VALIDATION FAILED:", r["validation"], flush=True)
    backend = r["sdpa"]["backend"]
    with sdpa_ctx(backend):
        r["gather_sdpa"] = rec(timeit(lambda: sdpa(c.q, gather_naive(c.kc, c.bt, c.L),
                                                   gather_naive(c.vc, c.bt, c.L)), sh),
                               c.kv_bytes, backend=backend, method="cache[block_tables] + permute/reshape")
        g = gather_onepass(c.kc, c.bt, c.L)
        r["gather_onepass_ok"] = bool(torch.equal(g, c.k))
        del g
        r["gather_onepass_sdpa"] = rec(timeit(lambda: sdpa(c.q, gather_onepass(c.kc, c.bt, c.L),
                                                           gather_onepass(c.vc, c.bt, c.L)), sh),
                                       c.kv_bytes, backend=backend, method="index_select of rows (one pass)")
    for layout in ("HND", "NHD"):
        kc, vc, bt = (c.kc, c.vc, c.bt) if layout == DEFAULT_LAYOUT else fill_caches(c.k, c.v, sh.block, layout)
        decode_variant(v, f"layout_{layout}", c, ref, sd, sh, kc, vc, bt)
        del kc, vc, bt
        free()
    for n in (1, 2, 4, 8):
        decode_variant(v, f"splits_{n}", c, ref, sd, sh, num_splits=n)
    if not quick:
        for key, vals in (("num_stages", (2, 4)), ("tile_n", (32, 64, 128)), ("num_warps", (8,))):
            for val in vals:
                decode_variant(v, f"{key}_{val}", c, ref, sd, sh, tuning={key: val})
        for tile, stages, warps in ((128, 2, 4), (128, 2, 8), (128, 3, 8), (64, 4, 4)):
            decode_variant(v, f"tile{tile}_stages{stages}_warps{warps}", c, ref, sd, sh,
                           tuning={"tile_n": tile, "num_stages": stages, "num_warps": warps})
    if hx.DEV.type == "cuda":
        saved_mode, TIMING["mode"] = TIMING["mode"], "eager"
        r["default_eager_ms"] = timeit(ours_fn(c), sh)  # with host overhead: Python, op dispatch, launch
        TIMING["mode"] = saved_mode
    if "ms" in main:
        r["ours_vs_sdpa"] = main["ms"] / sd
        r["gather_sdpa_vs_ours"] = r["gather_sdpa"]["ms"] / main["ms"]
        r["gather_onepass_sdpa_vs_ours"] = r["gather_onepass_sdpa"]["ms"] / main["ms"]


def sec_long(r, sh):
    rows = r["rows"] = []
    for S, L in sh.long:
        row = {"seqs": S, "seq_len": L}
        rows.append(row)
        try:
            c = make_case(S, L, sh.block, DEFAULT_LAYOUT, sh)
            sd, ref = time_sdpa(c, sh)
            row["sdpa"] = sd
            row.update(decode_variant({}, "x", c, ref, sd["ms"], sh))
            if hx.DEV.type == "cuda":
                sweep = row["variants"] = {}
                for waves in (8, 16):
                    decode_variant(sweep, f"target_waves_{waves}", c, ref, sd["ms"], sh,
                                   tuning={"target_waves": waves})
                    print(f"  long {S}x{L} target_waves {waves}: {sweep[f'target_waves_{waves}']}", flush=True)
            del c, ref
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        free()


def sec_reshape(r, sh):
    T, kvh, D = sh.rc_tokens, sh.kv_heads, sh.head_size
    key, value, num_blocks, slots, nbytes = reshape_case(sh)
    for layout in ("HND", "NHD"):
        kc, vc = allocate_kv_cache(num_blocks, sh.block, kvh, D, sh.dtype, hx.DEV, layout=layout)
        fn = lambda: reshape_and_cache(key, value, kc, vc, slots)  # noqa: E731
        fn()
        ok = torch.equal(kc.flatten(0, 1)[slots], key) and torch.equal(vc.flatten(0, 1)[slots], value)
        r[layout] = rec(timeit(fn, sh), nbytes, ok=bool(ok), tokens=T)
        del kc, vc, fn
        free()
    r["default"] = r[DEFAULT_LAYOUT]


def sec_copy_blocks(r, sh):
    kcs, vcs, perm, mapping = copy_blocks_case(sh)
    P = sh.cb_pairs
    before = vcs[-1][perm[:P]].clone()
    fn = lambda: copy_blocks(kcs, vcs, mapping)  # noqa: E731
    fn()
    ok = bool(torch.equal(vcs[-1][perm[P:2 * P]], before))
    nbytes = 2 * P * 2 * sh.cb_layers * kcs[0][0].numel() * kcs[0].element_size()
    r["default"] = rec(timeit(fn, sh), nbytes, ok=ok, pairs=P, layers=sh.cb_layers, blocks=sh.cb_blocks)


def sec_block_sizes(r, sh):
    c = make_case(sh.seqs, sh.seq_len, sh.block, DEFAULT_LAYOUT, sh)
    r["sdpa"], ref = time_sdpa(c, sh)
    rows = r["rows"] = []
    for bs in sh.block_sizes:
        row = {"block_size": bs}
        try:
            kc, vc, bt = (c.kc, c.vc, c.bt) if bs == sh.block else fill_caches(c.k, c.v, bs, DEFAULT_LAYOUT)
            row.update(decode_variant({}, "x", c, ref, r["sdpa"]["ms"], sh, kc, vc, bt))
            del kc, vc, bt
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
        free()


# --------------------------------------------------------------------------------------------- main

def figures(res) -> dict:
    """The five headline figures that were measured (decode ones only from a validated kernel)."""
    out = {}
    d = res.get("decode", {})
    if d.get("validation", {}).get("ok") and d.get("cache_matches_contiguous") and "ours_vs_sdpa" in d:
        out["decode_time_vs_sdpa_contiguous"] = (d["ours_vs_sdpa"], "<= 1.05")
        out["decode_speedup_vs_gather_sdpa"] = (d["gather_sdpa_vs_ours"], ">= 2.8")
    rows = res.get("long_ctx", {}).get("rows", [])
    if rows and all(x.get("ok") and x.get("copy_bw_fraction") for x in rows):
        out["decode_long_ctx_bw_fraction"] = (min(x["copy_bw_fraction"] for x in rows), ">= 0.75")
    for sec, name in (("reshape_and_cache", "reshape_and_cache_bw_fraction"), ("copy_blocks", "copy_blocks_bw_fraction")):
        x = res.get(sec, {}).get("default", {})
        if x.get("ok") and x.get("copy_bw_fraction"):
            out[name] = (x["copy_bw_fraction"], ">= 0.7")
    fx = res.get("flex_paged", {})
    if fx.get("validated") and "ours_vs_flex" in fx:
        out["decode_vs_flex_paged"] = (fx["ours_vs_flex"], "<= 1.0")
    return out


def print_table(res, figs):
    p = res.get("physical", {})
    print(f"\n== {res['card']}  torch {res['torch']}  triton {res['triton']}  ({res['total_seconds']:.0f} s)")
    print(f"copy {fmt(p.get('copy', {}).get('GBps'), '.0f')} GB/s   bf16 matmul "
          f"{fmt(p.get('matmul_bf16', {}).get('TFLOPs'), '.0f')} TFLOP/s")
    d = res.get("decode", {})
    print(f"decode main: sdpa {fmt(d.get('sdpa', {}).get('ms'))} ms ({d.get('sdpa', {}).get('backend', '?')[:40]}), "
          f"gather+sdpa {fmt(d.get('gather_sdpa', {}).get('ms'))} ms, one-pass gather+sdpa "
          f"{fmt(d.get('gather_onepass_sdpa', {}).get('ms'))} ms, validation {d.get('validation')}")
    print(f"{'variant':<16}{'ms':>9}{'vs sdpa':>9}{'bw frac':>9}{'splits':>7}{'maxdiff':>10}")
    rows = [(k, x) for k, x in d.get("variants", {}).items()]
    rows += [(f"long {x['seqs']}x{x['seq_len'] // 1024 or x['seq_len']}{'K' * (x['seq_len'] >= 1024)}", x) for x in res.get("long_ctx", {}).get("rows", [])]
    rows += [(f"block {x['block_size']}", x) for x in res.get("block_size", {}).get("rows", [])]
    for k, x in rows:
        if "error" in x:
            print(f"{k:<16} ERROR {x['error'][:100]}")
        else:
            print(f"{k:<16}{fmt(x['ms']):>9}{fmt(x.get('vs_sdpa')):>9}{fmt(x['copy_bw_fraction']):>9}"
                  f"{x.get('num_splits', '-'):>7}{fmt(x.get('max_abs_diff'), '.1e'):>10}"
                  f"{'' if x.get('ok', True) else '  WRONG RESULT'}")
    for sec in ("reshape_and_cache", "copy_blocks"):
        for k, x in res.get(sec, {}).items():
            if isinstance(x, dict) and k != "default":
                print(f"{sec} {k}: {fmt(x.get('ms'), '.4f')} ms, bw frac {fmt(x.get('copy_bw_fraction'))}, "
                      f"ok {x.get('ok')} {x.get('error', '')}")
    print_sweeps(res)
    print_failures_and_figures(res, figs)


def print_sweeps(res):
    """FlexAttention paged and the batch x context sweep, one line each."""
    fx = res.get("flex_paged", {})
    for k, x in fx.get("flex", {}).items():
        print(f"flex {k}: " + (f"{fmt(x['ms'])} ms, ours/flex {fmt(x.get('ours_vs_flex'))}, bw frac "
                               f"{fmt(x['copy_bw_fraction'])}, maxdiff vs ours {fmt(x['max_abs_diff_vs_ours'], '.1e')}"
                               f" ({x['timing']}{', compiled' if x['compiled'] else ', eager'})"
                               if "ms" in x else f"unavailable: {x.get('unavailable', '?')[:120]}"))
    for x in res.get("batch_ctx_sweep", {}).get("rows", []):
        o, s = x.get("ours", {}), x.get("sdpa", {})
        print(f"sweep {x['seqs']:>4}x{x['seq_len']:<6} " + (
            x.get("skipped") or x.get("error") or o.get("error") or
            f"ours {fmt(o.get('ms'))} ms (bw {fmt(o.get('copy_bw_fraction'))})  sdpa {fmt(s.get('ms'))} ms "
            f"(bw {fmt(s.get('copy_bw_fraction'))})  ours/sdpa {fmt(x.get('ours_vs_sdpa'))}"
            f"{'' if o.get('ok', True) else '  WRONG RESULT'}"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, temp dir")
    ap.add_argument("--quick", action="store_true", help="shorter timings, no tuning sweep")
    ap.add_argument("--backend", default=None, help="pagedattn backend (default: auto; triton in --dry-run)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results/<card>)")
    ap.add_argument("--timing", choices=["graph", "eager"], default="graph",
                    help="time CUDA-graph replays (device time, the default) or eager calls")
    args = ap.parse_args(argv)
    TIMING["mode"] = args.timing
    sh = DRY if args.dry_run else FULL
    if args.dry_run:
        hx.DEV = torch.device("cpu")
    elif hx.DEV.type != "cuda":
        sys.exit("no CUDA device: use --dry-run for a CPU plumbing check")
    if args.quick and not args.dry_run:
        sh.warmup, sh.rep = 10, 40
    set_backend(args.backend or ("triton" if args.dry_run else "auto"))
    torch.manual_seed(0)
    from bench.summary import card_name, update_figures
    from bench.plot_ops import plot_batch_ctx, plot_block_size

    card = card_name()
    res = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "device": str(hx.DEV), "dry_run": args.dry_run, "timing": args.timing}
    sections = [("physical", sec_physical, ()), ("decode", sec_decode, (args.quick,)), ("long_ctx", sec_long, ()),
                ("reshape_and_cache", sec_reshape, ()), ("copy_blocks", sec_copy_blocks, ()),
                ("block_size", sec_block_sizes, ()), ("batch_ctx_sweep", sec_batch_ctx_sweep, (args.quick,)),
                ("flex_paged", sec_flex_paged, (args.quick,))]  # flex last: a compiler fault can't spoil the rest
    run_sections(res, sections, sh)

    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="bench_ops_")) if args.dry_run else ROOT / "bench" / "results") / card_slug(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(res)
    res["figures"] = {k: {"value": v, "goal": g} for k, (v, g) in figs.items()}
    for plot, png in ((plot_block_size, "ops_block_size.png"), (plot_batch_ctx, "ops_batch_ctx.png")):
        try:
            plot(res, out_dir / png)
        except Exception as e:  # noqa: BLE001
            res.setdefault("plot_errors", {})[png] = f"{type(e).__name__}: {e}"
    (out_dir / "ops.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    command = "python bench/bench_ops.py" + (" --quick" if args.quick else "")
    if args.dry_run:
        update_figures(figs, card=card, command=command + " --dry-run", path=out_dir / "summary.json")
    elif figs:
        update_figures(figs, card=card, command=command)
    print_table(res, figs)
    print(f"wrote {out_dir / 'ops.json'}")
    return res


# --------------------------------------------------------------------------------------------- pytest-benchmark

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _synced(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


@needs_cuda
def test_decode_main(benchmark):
    c = make_case(FULL.seqs, FULL.seq_len, FULL.block, DEFAULT_LAYOUT, FULL)
    fn = ours_fn(c)
    assert max_diff(fn(), sdpa(c.q, c.k, c.v)) <= TOL
    benchmark(_synced(fn))


@needs_cuda
def test_reshape_and_cache(benchmark):
    T = FULL.rc_tokens
    key, value = (torch.randn(T, FULL.kv_heads, FULL.head_size, dtype=FULL.dtype, device="cuda") for _ in range(2))
    kc, vc = allocate_kv_cache(triton.cdiv(4 * T, FULL.block), FULL.block, FULL.kv_heads, FULL.head_size,
                               FULL.dtype, "cuda")
    slots = torch.randperm(kc.shape[0] * FULL.block, device="cuda")[:T]
    benchmark(_synced(lambda: reshape_and_cache(key, value, kc, vc, slots)))


@needs_cuda
def test_copy_blocks(benchmark):
    caches = [allocate_kv_cache(FULL.cb_blocks, FULL.block, FULL.kv_heads, FULL.head_size, FULL.dtype, "cuda")
              for _ in range(FULL.cb_layers)]
    kcs, vcs = [k.normal_() for k, _ in caches], [v.normal_() for _, v in caches]
    perm = torch.randperm(FULL.cb_blocks, device="cuda")
    mapping = torch.stack([perm[:FULL.cb_pairs], perm[FULL.cb_pairs:2 * FULL.cb_pairs]], dim=1).contiguous()
    benchmark(_synced(lambda: copy_blocks(kcs, vcs, mapping)))


if __name__ == "__main__":
    main()

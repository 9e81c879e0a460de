#!/usr/bin/env python
"""Benchmark of paged prefill attention on one GPU, against SDPA on the same data laid out contiguously.

    python bench/bench_prefill.py            # full run (< 90 s on an H100): bench/results/<card>/prefill.json
                                             # and the prefill figures of bench/results/summary.json
    python bench/bench_prefill.py --sweep-only   # the kernel variants (PREFILL_VARIANTS) on the two SDPA
                                             # shapes only, each validated then timed: prefill_sweep.json
    python bench/bench_prefill.py --compile-report   # no GPU needed: each variant compiled for sm_90a,
                                             # registers / spills / shared memory / pipelining depth
    python bench/bench_prefill.py --dry-run  # CPU plumbing check: tiny shapes, Triton interpreter, temp dir
    pytest bench/bench_prefill.py --benchmark-only   # pytest-benchmark entries (skipped without CUDA)

Shapes: bf16, 32 query / 8 KV heads, head 128, block 16, blocks randomly permuted. Sections (each fails on
its own, its error kept in the JSON): physical limits (bench_ops), 8 x 2048 new tokens against causal SDPA,
8 x (1536 cached + 512 new) against bottom-right causal SDPA, a mixed prefill + decode batch, and q_len-1
rows through the prefill op against the decode op. Every SDPA backend tried is first checked against a
float32 reference (sequence 0), and every result of ours against SDPA; a figure is written only from a
validated result. Timings are bench_ops.timeit (CUDA-graph replays by default).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton decorates the kernels

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from bench import harness as hx  # noqa: E402  (hx.DEV is rebound by --dry-run)
from bench.bench_ops import _synced, needs_cuda, sec_physical  # noqa: E402
from bench.ops_common import FULL, fill_caches, make_case, ours_fn, sdpa  # noqa: E402
from bench.harness import TIMING, card_slug, fmt, rec  # noqa: E402
from bench.prefill_common import (PDRY, PFULL, check, cu_of, pick_sdpa, prefill_case, prefill_fn,  # noqa: E402
                                  ref_attention, tflops, timed, visible_pairs)
from bench.prefill_sweep import PREFILL_VARIANTS, SWEEP, parse_variants, tuning_sweep  # noqa: E402
from pagedattn.ops import DEFAULT_LAYOUT, get_backend, set_backend  # noqa: E402


# --------------------------------------------------------------------------------------------- sections

def sec_vs_sdpa(r, sh, shape):
    """Ours on S sequences of `new` tokens over `prefix` cached ones, against SDPA on contiguous K/V."""
    S, new, prefix = shape
    L, H, D = prefix + new, sh.heads, sh.head_size
    q, k, v, kc, vc, bt, lens, qp = prefill_case(sh, S, new, prefix)
    pairs = visible_pairs([new] * S, [L] * S)
    r["shape"] = {"seqs": S, "new_tokens": new, "prefix": prefix, "seq_len": L, "heads": H, "kv_heads": sh.kv_heads,
                  "head_size": D, "block_size": sh.block, "dtype": str(sh.dtype), "layout": DEFAULT_LAYOUT,
                  "visible_pairs": pairs}
    flash, eff = (lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)), (lambda: sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION))
    if prefix == 0:
        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
        cands = [("flash, is_causal", flash, f), ("default, is_causal", contextlib.nullcontext, f)]
    else:
        bias = causal_lower_right(new, L)
        mask = torch.ones(new, L, dtype=torch.bool, device=hx.DEV).tril(L - new)
        fb = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)  # noqa: E731
        fm = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
        cands = [("flash, causal_lower_right", flash, fb), ("efficient, causal_lower_right", eff, fb),
                 ("default, boolean mask", contextlib.nullcontext, fm)]
    name, fn, ctx, ref, tried = pick_sdpa(q, k, v, cands)
    with ctx():
        ms, mode = timed(fn, sh)
    r["sdpa"] = {"ms": ms, "backend": name, "not_used": tried, "timing": mode, "TFLOPs": tflops(pairs, ms, sh)}
    ours = prefill_fn(qp, kc, vc, bt, lens, cu_of([new] * S), new)
    r["validation"] = check(ours().view(S, new, H, D).transpose(1, 2), ref)
    if not r["validation"]["ok"]:
        r["validation"]["FAILED"] = "ours differs from SDPA: timings are worthless"
        print("!!! VALIDATION FAILED:", r["validation"], flush=True)
    ms, mode = timed(ours, sh)
    r["ours"] = {"ms": ms, "timing": mode, "TFLOPs": tflops(pairs, ms, sh)}
    r["ours_vs_sdpa"] = ms / r["sdpa"]["ms"]
    if SWEEP["variants"] and (hx.DEV.type == "cuda" or SWEEP["on_cpu"]):
        r["tuning"] = tuning_sweep(qp, kc, vc, bt, lens, cu_of([new] * S), new, ref, S, H, D, pairs, sh,
                                   r["sdpa"]["ms"])


# The prefill kernel's variants (launchers.PREFILL_TUNING overrides of the current defaults, v2), each validated
# against SDPA and timed against the defaults re-timed in the same sweep. Predictions: bench/NOTES.md, "Prefill v2".
def sec_mixed(r, sh):
    """P sequences prefilling `new` tokens over `prefix` + Dn decoding one token over `ctx`, in one call;
    then the decode rows alone through the decode op and through the prefill op with q_len 1."""
    P, new, prefix, Dn, ctx = sh.mixed
    assert prefix + new <= ctx
    S, H, D = P + Dn, sh.heads, sh.head_size
    k = torch.randn(S, sh.kv_heads, ctx, D, dtype=sh.dtype, device=hx.DEV)
    v = torch.randn_like(k)
    kc, vc, bt = fill_caches(k, v, sh.block, DEFAULT_LAYOUT)
    q_lens, seq_lens = [new] * P + [1] * Dn, [prefix + new] * P + [ctx] * Dn
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=hx.DEV)
    q = torch.randn(sum(q_lens), H, D, dtype=sh.dtype, device=hx.DEV)
    cu, starts = cu_of(q_lens), [sum(q_lens[:i]) for i in range(S + 1)]
    ref = torch.cat([ref_attention(q[starts[i]:starts[i + 1]].transpose(0, 1), k[i, :, :seq_lens[i]],
                                   v[i, :, :seq_lens[i]]).transpose(0, 1) for i in range(S)])
    pairs = visible_pairs(q_lens, seq_lens)
    r["shape"] = {"prefill_seqs": P, "new_tokens": new, "prefix": prefix, "decode_seqs": Dn, "decode_ctx": ctx,
                  "num_tokens": q.shape[0], "visible_pairs": pairs}
    mixed = prefill_fn(q, kc, vc, bt, lens, cu, new)
    r["validation"] = check(mixed(), ref)
    ms, mode = timed(mixed, sh)
    r["mixed"] = {"ms": ms, "timing": mode, "TFLOPs": tflops(pairs, ms, sh)}
    npf = P * new
    part = prefill_fn(q[:npf], kc, vc, bt[:P], lens[:P], cu[:P + 1], new)
    r["prefill_part_validation"] = check(part(), ref[:npf])
    r["prefill_part"] = dict(zip(("ms", "timing"), timed(part, sh)))
    kv_bytes = 2 * Dn * ctx * sh.kv_heads * D * k.element_size()
    dec = SimpleNamespace(q=q[npf:], kc=kc, vc=vc, bt=bt[P:], lens=lens[P:], L=ctx, S=Dn, kv_bytes=kv_bytes)
    r["decode_rows"] = q1_vs_decode(dec, ref[npf:], sh)
    r["mixed_vs_separate"] = ms / (r["prefill_part"]["ms"] + r["decode_rows"]["decode_op"]["ms"])
    r["ok"] = all(x["ok"] for x in (r["validation"], r["prefill_part_validation"], r["decode_rows"]["decode_op"],
                                    r["decode_rows"]["prefill_q1"]))


def q1_vs_decode(c, ref, sh) -> dict:
    """The same q_len-1 rows through paged_decode_attention and paged_prefill_attention(max_query_len=1)."""
    out = {}
    for name, fn in (("decode_op", ours_fn(c)),
                     ("prefill_q1", prefill_fn(c.q, c.kc, c.vc, c.bt, c.lens, cu_of([1] * c.S), 1))):
        chk = check(fn(), ref)
        ms, mode = timed(fn, sh)
        out[name] = rec(ms, c.kv_bytes, timing=mode, **chk)
    out["prefill_q1_vs_decode"] = out["prefill_q1"]["ms"] / out["decode_op"]["ms"]
    return out


def sec_decode_main(r, sh):
    """q_len-1 rows at bench_ops' main decode shape."""
    S, L = sh.decode_main
    c = make_case(S, L, sh.block, DEFAULT_LAYOUT, sh)
    r["shape"] = {"seqs": S, "seq_len": L}
    r.update(q1_vs_decode(c, sdpa(c.q, c.k, c.v), sh))


# --------------------------------------------------------------------------------------------- main

def figures(res) -> dict:
    """The three headline figures, each only from validated results."""
    out = {}
    for sec, name in (("prefill", "prefill_vs_sdpa"), ("prefill_prefix", "prefill_prefix_vs_sdpa")):
        x = res.get(sec, {})
        if x.get("validation", {}).get("ok") and "ours_vs_sdpa" in x:
            out[name] = (x["ours_vs_sdpa"], "<= 1.2")
    rows = [res.get("mixed", {}).get("decode_rows", {}), res.get("decode_main", {})]
    rows = [x for x in rows if "prefill_q1_vs_decode" in x]
    if rows and all(x["decode_op"]["ok"] and x["prefill_q1"]["ok"] for x in rows):
        out["prefill_q1_vs_decode"] = (max(x["prefill_q1_vs_decode"] for x in rows), "<= 1.1")  # the worst shape
    return out


def print_table(res, figs):
    p = res.get("physical", {})
    mm = p.get("matmul_bf16", {}).get("TFLOPs")
    print(f"\n== {res['card']}  torch {res['torch']}  triton {res['triton']}  backend {res['backend']}  "
          f"({res['total_seconds']:.0f} s)   bf16 matmul {fmt(mm, '.0f')} TFLOP/s")
    print(f"{'case':<22}{'ours ms':>9}{'sdpa ms':>9}{'ratio':>7}{'ours TF':>9}{'sdpa TF':>9}{'/mm':>6}  sdpa backend")
    for sec in ("prefill", "prefill_prefix"):
        x = res.get(sec, {})
        if "ours" in x:
            o, s = x["ours"], x["sdpa"]
            bad = "" if x["validation"]["ok"] else f"  VALIDATION FAILED {x['validation']}"
            print(f"{sec:<22}{fmt(o['ms']):>9}{fmt(s['ms']):>9}{fmt(x['ours_vs_sdpa'], '.2f'):>7}"
                  f"{fmt(o['TFLOPs'], '.0f'):>9}{fmt(s['TFLOPs'], '.0f'):>9}{fmt(o['TFLOPs'] / mm if mm else None, '.2f'):>6}"
                  f"  {s['backend']}{bad}")
    m = res.get("mixed", {})
    if "mixed" in m:
        print(f"mixed {m['shape']['prefill_seqs']}x{m['shape']['new_tokens']}+{m['shape']['decode_seqs']}x1: "
              f"{fmt(m['mixed']['ms'])} ms ({fmt(m['mixed']['TFLOPs'], '.0f')} TFLOP/s), separate calls "
              f"{fmt(m['prefill_part']['ms'])} + {fmt(m.get('decode_rows', {}).get('decode_op', {}).get('ms'))} ms, "
              f"mixed/separate {fmt(m.get('mixed_vs_separate'), '.2f')}{'' if m.get('ok') else '  VALIDATION FAILED'}")
    for name, x in (("mixed decode rows", m.get("decode_rows", {})), ("decode main shape", res.get("decode_main", {}))):
        if "prefill_q1_vs_decode" in x:
            d, p1 = x["decode_op"], x["prefill_q1"]
            ok = "" if d["ok"] and p1["ok"] else "  WRONG RESULT"
            print(f"{name:<18}: decode op {fmt(d['ms'])} ms ({fmt(d['copy_bw_fraction'], '.2f')} bw), prefill q1 "
                  f"{fmt(p1['ms'])} ms, ratio {fmt(x['prefill_q1_vs_decode'], '.2f')}{ok}")
    hx.print_failures_and_figures(res, figs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter, temp dir")
    ap.add_argument("--backend", default=None, help="pagedattn backend (default: auto; triton in --dry-run)")
    ap.add_argument("--out", default=None, help="results directory (default bench/results/<card>)")
    ap.add_argument("--timing", choices=["graph", "eager"], default="graph",
                    help="time CUDA-graph replays (device time, the default) or eager calls")
    ap.add_argument("--sweep", action="store_true",
                    help="also run the kernel-variant sweep in the two SDPA sections (about 2 min more on an H100)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the two SDPA sections with the variant sweep; writes prefill_sweep.json, no figures")
    ap.add_argument("--sweep-budget", type=float, default=150.0,
                    help="seconds from the start after which variants not compiled yet are skipped (default 150)")
    ap.add_argument("--variants", default="all",
                    help=f"comma-separated subset of the sweep (default all; 'default' is always added): "
                         f"{', '.join(PREFILL_VARIANTS)}")
    ap.add_argument("--compile-report", action="store_true",
                    help="no GPU: compile each variant for sm_90a and report registers, spills, shared memory and "
                         "pipelining depth (must not run under TRITON_INTERPRET)")
    args = ap.parse_args(argv)
    variants = parse_variants(args.variants)
    if args.compile_report:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("--compile-report compiles for a GPU: unset TRITON_INTERPRET")
        from bench.compile_report import prefill_compile_report

        rows = prefill_compile_report({name: PREFILL_VARIANTS[name] for name in variants}, PFULL)
        path = Path(args.out or tempfile.mkdtemp(prefix="bench_prefill_")) / "prefill_compile_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"triton": triton.__version__, "target": "sm_90a", "variants": rows}
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
        return rows
    TIMING["mode"] = args.timing
    sh = PDRY if args.dry_run else PFULL
    if args.dry_run:
        hx.DEV = torch.device("cpu")
    elif hx.DEV.type != "cuda":
        sys.exit("no CUDA device: use --dry-run for a CPU plumbing check (or --compile-report)")
    if args.sweep or args.sweep_only:
        SWEEP.update(variants=variants, on_cpu=args.dry_run, deadline=time.perf_counter() + args.sweep_budget)
    set_backend(args.backend or ("triton" if args.dry_run else "auto"))
    torch.manual_seed(0)
    from bench.summary import card_name, update_figures

    card = card_name()
    res = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
           "device": str(hx.DEV), "dry_run": args.dry_run, "timing": args.timing, "backend": get_backend()}
    sections = [("physical", sec_physical, ()), ("prefill", sec_vs_sdpa, (sh.prefill,)),
                ("prefill_prefix", sec_vs_sdpa, (sh.prefix,)), ("mixed", sec_mixed, ()),
                ("decode_main", sec_decode_main, ())]
    if args.sweep_only:
        sections = [x for x in sections if x[0] in ("physical", "prefill", "prefill_prefix")]
    hx.run_sections(res, sections, sh)
    mm = res["physical"].get("matmul_bf16", {}).get("TFLOPs")
    for x in (res["prefill"].get("ours"), res["prefill"].get("sdpa"), res["prefill_prefix"].get("ours"),
              res["prefill_prefix"].get("sdpa"), res.get("mixed", {}).get("mixed")):
        if x and mm:
            x["matmul_fraction"] = x["TFLOPs"] / mm

    out_dir = Path(args.out) if args.out else (
        Path(tempfile.mkdtemp(prefix="bench_prefill_")) if args.dry_run else ROOT / "bench" / "results") / card_slug(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(res)
    res["figures"] = {k: {"value": v, "goal": g} for k, (v, g) in figs.items()}
    name = "prefill_sweep.json" if args.sweep_only else "prefill.json"
    (out_dir / name).write_text(json.dumps(res, indent=2, default=str) + "\n")
    command = "python bench/bench_prefill.py"
    if args.sweep_only:
        pass  # a sweep's figures are the defaults' again: the full run records them
    elif args.dry_run:
        update_figures(figs, card=card, command=command + " --dry-run", path=out_dir / "summary.json")
    elif figs:
        update_figures(figs, card=card, command=command)
    print_table(res, figs)
    print(f"wrote {out_dir / name}")
    if not args.sweep_only:
        from bench.plot_ops import plot_prefill

        try:
            plot_prefill(res, out_dir / "prefill.png")
            print(f"wrote {out_dir / 'prefill.png'}")
        except ValueError as e:  # nothing measured (every case failed): the JSON says why
            print(f"no prefill.png: {e}")
    return res


# --------------------------------------------------------------------------------------------- pytest-benchmark

def _prefill_case(S, new, prefix, sh=PFULL):
    L = prefix + new
    k = torch.randn(S, sh.kv_heads, L, sh.head_size, dtype=sh.dtype, device="cuda")
    kc, vc, bt = fill_caches(k, torch.randn_like(k), sh.block, DEFAULT_LAYOUT)
    q = torch.randn(S * new, sh.heads, sh.head_size, dtype=sh.dtype, device="cuda")
    lens = torch.full((S,), L, dtype=torch.int32, device="cuda")
    cu = torch.arange(S + 1, dtype=torch.int32, device="cuda") * new
    return prefill_fn(q, kc, vc, bt, lens, cu, new)


@needs_cuda
def test_prefill_main(benchmark):
    benchmark(_synced(_prefill_case(*PFULL.prefill)))


@needs_cuda
def test_prefill_prefix(benchmark):
    benchmark(_synced(_prefill_case(*PFULL.prefix)))


@needs_cuda
def test_prefill_q1(benchmark):
    benchmark(_synced(_prefill_case(FULL.seqs, 1, FULL.seq_len - 1)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The CUDA backend (CuPy RawKernels) against the Triton kernels on one GPU, side by side in one run.

    python bench/bench_backends.py           # < 90 s on an H100: bench/results/<card>/backends.json and the figure
                                             # cuda_backend_decode_vs_triton of bench/results/summary.json
    python bench/bench_backends.py --quick   # shorter timings, no long-context rows
    python bench/bench_backends.py --decode-sweep  # also the CUDA decode's tunings (K/V stages, split rule)

Sections (each fails on its own, its error kept in the JSON): decode at bench_ops' main shape (64 x 4096,
32 / 8 heads, head 128, bf16, block 16) and long contexts (split), prefill at bench_prefill's main shape
(8 x 2048 new tokens), reshape_and_cache and copy_blocks at bench_ops' shapes. Every op runs on both backends
(``pagedattn.ops.set_backend``) on the same inputs; the results are checked against each other (attention
also against SDPA) before either is timed, and the figure is written only from checked results. Timings are
``bench.harness.timeit``: CUDA-graph replays, median after warm-up (``--timing eager``: plain calls). Needs a
GPU and CuPy: there is no CPU dry run (the CUDA backend runs on CUDA tensors only).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from bench import harness as hx  # noqa: E402
from bench.bench_ops import sec_physical  # noqa: E402
from bench.ops_common import FULL, TOL, copy_blocks_case, make_case, max_diff, ours_fn, reshape_case, sdpa  # noqa: E402
from bench.prefill_common import PFULL, cu_of, prefill_case, prefill_fn  # noqa: E402
from bench.harness import TIMING, card_slug, fmt, rec, timeit, tuned  # noqa: E402
from pagedattn.ops import (DEFAULT_LAYOUT, allocate_kv_cache, copy_blocks, get_backend, reshape_and_cache,  # noqa: E402
                           set_backend)

BACKENDS = ("triton", "cuda")
LONG = [(1, 32768), (4, 32768)]


def run_on(backend: str, fn):
    """``fn()`` with ``backend`` set (the previous setting restored)."""
    saved = get_backend()
    set_backend(backend)
    try:
        return fn()
    finally:
        set_backend(saved)


def time_on(backend: str, fn, sh) -> float:
    """Median ms of ``fn`` on ``backend`` (a CUDA graph binds the backend chosen while it is captured)."""
    return run_on(backend, lambda: timeit(fn, sh))


def attention_rows(r: dict, fns: dict, ref: torch.Tensor, sh, nbytes: int, view=lambda x: x) -> None:
    """Run each backend's ``fns[b]`` (returning its output), check them against ``ref`` and each other, time them."""
    outs = {b: view(run_on(b, fns[b])).float().clone() for b in BACKENDS}
    tol = TOL * max(1.0, ref.float().abs().max().item())
    diffs = {f"{b}_vs_ref": max_diff(outs[b], ref) for b in BACKENDS}
    diffs["cuda_vs_triton"] = max_diff(outs["cuda"], outs["triton"])
    r["check"] = {**diffs, "tol": tol, "ok": all(d <= tol for d in diffs.values())}  # NaN compares False
    if not r["check"]["ok"]:
        print("!!! CHECK FAILED:", r["check"], flush=True)
        return
    for b in BACKENDS:
        r[b] = rec(time_on(b, fns[b], sh), nbytes)
    r["cuda_vs_triton"] = r["cuda"]["ms"] / r["triton"]["ms"]


def sec_decode(r, sh, quick):
    c = make_case(sh.seqs, sh.seq_len, sh.block, DEFAULT_LAYOUT, sh)
    r["shape"] = {"seqs": c.S, "seq_len": c.L, "heads": sh.heads, "kv_heads": sh.kv_heads, "head_size": sh.head_size,
                  "block_size": sh.block, "dtype": str(sh.dtype), "layout": DEFAULT_LAYOUT}
    attention_rows(r, {b: ours_fn(c) for b in BACKENDS}, sdpa(c.q, c.k, c.v), sh, c.kv_bytes)
    del c
    hx.free()
    if quick:
        return
    rows = r["long"] = []
    for S, L in LONG:
        row = {"seqs": S, "seq_len": L}
        rows.append(row)
        try:
            c = make_case(S, L, sh.block, DEFAULT_LAYOUT, sh)
            attention_rows(row, {b: ours_fn(c) for b in BACKENDS}, sdpa(c.q, c.k, c.v), sh, c.kv_bytes)
            del c
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {e}"
        hx.free()


#: CUDA decode tunings timed by ``--decode-sweep`` (each beside Triton again, same inputs): K/V pipeline stages,
#: and splitting the context below 4 waves of thread blocks instead of 1
DECODE_SWEEP = [dict(kv_stages=s, split_below_waves=w) for w in (1, 4) for s in (2, 3, 4)]


def sec_decode_tuned(tuning: dict):
    """``sec_decode`` with ``tuning`` applied to the CUDA backend's ``DECODE_TUNING`` (restored after)."""
    from pagedattn.ops import cuda_attention

    def sec(r, sh, quick):
        with tuned(cuda_attention.DECODE_TUNING, tuning) as table:
            r["cuda_tuning"] = dict(table)
            sec_decode(r, sh, quick)
    return sec


def sweep_name(tuning: dict) -> str:
    return "decode_sweep_" + "_".join(f"{k}{v}" for k, v in tuning.items())


def sec_prefill(r, sh):
    S, new, prefix = PFULL.prefill
    L, H, D = prefix + new, sh.heads, sh.head_size
    q, k, v, kc, vc, bt, lens, qp = prefill_case(sh, S, new, prefix)
    r["shape"] = {"seqs": S, "new_tokens": new, "prefix": prefix, "heads": H, "kv_heads": sh.kv_heads,
                  "head_size": D, "block_size": sh.block, "dtype": str(sh.dtype), "layout": DEFAULT_LAYOUT}
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    fns = {b: prefill_fn(qp, kc, vc, bt, lens, cu_of([new] * S), new) for b in BACKENDS}
    kv_bytes = 2 * S * L * sh.kv_heads * D * k.element_size()
    attention_rows(r, fns, ref, sh, kv_bytes, view=lambda o: o.view(S, new, H, D).transpose(1, 2))


def sec_reshape(r, sh):
    T, kvh, D = sh.rc_tokens, sh.kv_heads, sh.head_size
    key, value, num_blocks, slots, nbytes = reshape_case(sh)
    caches = {b: allocate_kv_cache(num_blocks, sh.block, kvh, D, sh.dtype, hx.DEV) for b in BACKENDS}
    fns = {b: (lambda kc=caches[b][0], vc=caches[b][1]: reshape_and_cache(key, value, kc, vc, slots)) for b in BACKENDS}
    for b in BACKENDS:
        caches[b][0].zero_()
        caches[b][1].zero_()
        run_on(b, fns[b])
    kc, vc = caches["cuda"]
    same = torch.equal(kc, caches["triton"][0]) and torch.equal(vc, caches["triton"][1])
    written = torch.equal(kc.flatten(0, 1)[slots], key) and torch.equal(vc.flatten(0, 1)[slots], value)
    r["check"] = {"same": bool(same), "written": bool(written), "ok": bool(same and written)}
    if r["check"]["ok"]:
        for b in BACKENDS:
            r[b] = rec(time_on(b, fns[b], sh), nbytes, tokens=T)
        r["cuda_vs_triton"] = r["cuda"]["ms"] / r["triton"]["ms"]


def sec_copy_blocks(r, sh):
    kcs, vcs, perm, mapping = copy_blocks_case(sh)
    P = sh.cb_pairs
    fn = lambda: copy_blocks(kcs, vcs, mapping)  # noqa: E731
    ok = {}
    for b in BACKENDS:  # each backend copies fresh data: destinations must then equal their sources
        for c in kcs[-1:] + vcs[-1:]:
            c[perm[P:2 * P]] = float("nan")
        run_on(b, fn)
        ok[b] = all(bool(torch.equal(c[perm[P:2 * P]], c[perm[:P]])) for c in kcs + vcs)
    r["check"] = {**ok, "ok": all(ok.values())}
    nbytes = 2 * P * 2 * sh.cb_layers * kcs[0][0].numel() * kcs[0].element_size()
    if r["check"]["ok"]:
        for b in BACKENDS:
            r[b] = rec(time_on(b, fn, sh), nbytes, pairs=P, layers=sh.cb_layers)
        r["cuda_vs_triton"] = r["cuda"]["ms"] / r["triton"]["ms"]


def figures(res) -> dict:
    d = res.get("decode", {})
    if d.get("check", {}).get("ok") and "cuda_vs_triton" in d:
        return {"cuda_backend_decode_vs_triton": (d["cuda_vs_triton"], "<= 1.3")}
    return {}


def print_table(res, figs):
    print(f"\n== {res['card']}  torch {res['torch']}  triton {res['triton']}  cupy {res['cupy']}  "
          f"({res['total_seconds']:.0f} s, timing {res['timing']})")
    print(f"{'op':<22}{'triton ms':>11}{'cuda ms':>11}{'cuda/triton':>13}{'cuda bw frac':>14}  check")
    rows = [(k, res.get(k, {})) for k in ("decode", "prefill", "reshape_and_cache", "copy_blocks")]
    rows[1:1] = [(f"decode {x['seqs']}x{x['seq_len']}", x) for x in res.get("decode", {}).get("long", [])]
    for t in DECODE_SWEEP if any(k.startswith("decode_sweep_") for k in res) else ():
        key = sweep_name(t)
        sweep = res.get(key, {})
        tag = key[len("decode_sweep_"):].replace("split_below_waves", "w").replace("kv_stages", "s")
        rows.append((f"  {tag}", sweep))
        rows += [(f"  {tag} {x['seqs']}x{x['seq_len']}", x) for x in sweep.get("long", [])]
    for name, x in rows:
        if "error" in x:
            print(f"{name:<22} ERROR {x['error'][:150]}")
            continue
        t, c = x.get("triton", {}), x.get("cuda", {})
        print(f"{name:<22}{fmt(t.get('ms')):>11}{fmt(c.get('ms')):>11}{fmt(x.get('cuda_vs_triton')):>13}"
              f"{fmt(c.get('copy_bw_fraction')):>14}  {x.get('check')}")
    hx.print_failures_and_figures(res, figs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter timings, no long-context decode rows")
    ap.add_argument("--out", default=None, help="results directory (default bench/results/<card>)")
    ap.add_argument("--decode-sweep", action="store_true",
                    help="also time the CUDA decode over DECODE_SWEEP's tunings (each beside Triton)")
    ap.add_argument("--timing", choices=["graph", "eager"], default="graph",
                    help="time CUDA-graph replays (device time, the default) or eager calls")
    args = ap.parse_args(argv)
    if hx.DEV.type != "cuda":
        sys.exit("bench_backends: no CUDA device. It times the CUDA backend against Triton on a GPU; "
                 "there is no CPU dry run (bench_ops.py --dry-run checks the plumbing of the ops)")
    try:
        run_on("cuda", lambda: None)  # raises when CuPy or the device is missing
    except RuntimeError as e:
        sys.exit(f"bench_backends: the CUDA backend cannot run here: {e}")
    TIMING["mode"] = args.timing
    sh = FULL
    if args.quick:
        sh.warmup, sh.rep = 10, 40
    torch.manual_seed(0)
    from bench.summary import card_name, update_figures

    import cupy

    card = card_name()
    res = {"card": card, "torch": torch.__version__, "triton": triton.__version__, "cupy": cupy.__version__,
           "cuda": torch.version.cuda, "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "argv": sys.argv[1:], "timing": args.timing}
    sections = [("physical", sec_physical, ()), ("decode", sec_decode, (args.quick,)), ("prefill", sec_prefill, ()),
                ("reshape_and_cache", sec_reshape, ()), ("copy_blocks", sec_copy_blocks, ())]
    if args.decode_sweep:
        sections += [(sweep_name(t), sec_decode_tuned(t), (args.quick,)) for t in DECODE_SWEEP]
    hx.run_sections(res, sections, sh)
    out_dir = Path(args.out) if args.out else ROOT / "bench" / "results" / card_slug(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    figs = figures(res)
    res["figures"] = {k: {"value": v, "goal": g} for k, (v, g) in figs.items()}
    (out_dir / "backends.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    if figs:
        update_figures(figs, card=card, command="python bench/bench_backends.py" + (" --quick" if args.quick else "")
                       + (" --decode-sweep" if args.decode_sweep else ""))
    print_table(res, figs)
    print(f"wrote {out_dir / 'backends.json'}")
    return res


if __name__ == "__main__":
    main()

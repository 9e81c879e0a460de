#!/usr/bin/env python
"""Decode over an engine-like batch (many contexts of skewed lengths) against the split count.

The engine's decode steps run the decode kernel over ShareGPT-like contexts (log-normal lengths, mean 161
prompt tokens plus what was generated, capped at 1,024) through a block table as wide as ``max_model_len``.
One program of the kernel reads one (sequence, KV head, split)'s tokens in order, so without splits the
longest context of the batch bounds the kernel's time while the short ones are long done. This benchmark
times ``num_splits`` = auto (the launcher's choice: per-sequence splits here, bench/NOTES.md "Decode v7") and
fixed (uniform) 1, 2, 4, 8, 16 on the attention geometry of the 1.1B Llama (32 heads, 4 KV heads, head 64,
bf16, block 16, 2,048-token tables, 256 sequences), the launcher's tuning knobs (warps, pipeline stages, tile
length), per-sequence split settings (most parts a sequence, fewest tokens a part) and several KV heads a
program on the same batch, and
auto, 8 uniform splits and no per-sequence splits on the ops benchmark's main shape (64 x 4096, 32 / 8 heads,
head 128), with the engine batch's three fastest settings, and auto, 1 and 4 uniform splits on 16 sequences of
the engine's distribution (the end of a throughput run), 512 sequences of it (the engine's default batch in #7), the
mean rule's threshold computed on the host instead of in every program (``auto_host_mean``: what a plan made
once a step would save), the engine batch with its rows sorted by length
(longest / shortest first), and the ops benchmark's long contexts (1 and 4 x 32K) with a small batch's
sequences cut alike or each by its own length (``small_batch_per_seq``); each
variant is checked against the PyTorch reference (float32) first. The engine-like batch runs over 22 layers'
caches in turn, as the model does (one layer's ~50 MB of K/V would stay in an H100's L2 if replayed alone);
times are per layer.

    python bench/bench_decode_skew.py            # bench/results/<card>/decode_skew.json
    python bench/bench_decode_skew.py --dry-run  # CPU (Triton interpreter), tiny shapes, temp output
    python bench/bench_decode_skew.py --sections small,long  # some sections (decode_skew_small_long.json)
    python bench/bench_decode_skew.py --compile-report --out DIR  # no GPU: registers, pipelining of each tuning
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

from bench import harness as hx  # noqa: E402
from bench.bench_ops import sec_physical  # noqa: E402
from bench.harness import card_slug, rec, timeit, tuned  # noqa: E402
from bench.ops_common import FULL, make_case, max_diff  # noqa: E402
from bench.workloads import _lognormal  # noqa: E402
from pagedattn.ops import allocate_kv_cache, config, launchers, paged_decode_attention  # noqa: E402

TOL = 2e-2
ENGINE = SimpleNamespace(seqs=256, heads=32, kv_heads=4, head_size=64, block=16, width_tokens=2048,
                         mean_prompt=161, generated=30, cap=1024, dtype=torch.bfloat16, layers=22)
DRY = SimpleNamespace(seqs=6, heads=4, kv_heads=2, head_size=64, block=16, width_tokens=256,
                      mean_prompt=20, generated=3, cap=200, dtype=torch.float32, layers=2)
SPLITS = (1, 2, 4, 8, 16)
SECTIONS = ("engine", "order", "engine512", "small", "long", "main")
#: the long-context cases' head geometry in a dry run (CPU)
DRY_LONG = SimpleNamespace(heads=4, kv_heads=2, head_size=64, dtype=torch.float32)
#: DECODE_TUNING overrides timed on the engine-like batch (its default: 4 warps, 2 stages, 64-token tiles)
TUNINGS = [dict(num_warps=w, num_stages=st, tile_n=t) for w in (2, 4) for st in (1, 2, 3) for t in (16, 32, 64)]
TUNINGS += [dict(num_warps=w, num_stages=st, tile_n=128) for w in (4, 8) for st in (2, 3)]
#: per-sequence split settings timed on the engine-like batch (max_parts_per_seq 1: none; part_vs_mean 0: every
#: context past min_tokens_per_part is cut, 2: only those past twice the batch's mean), default tiles and the
#: 128-token tiles
PARTS = [dict(max_parts_per_seq=p, min_tokens_per_part=m, part_vs_mean=r) for p, m, r in
         ((1, 256, 2), (4, 256, 0), (2, 256, 2), (4, 256, 1), (4, 256, 2), (4, 256, 3), (4, 128, 2), (8, 128, 2))]
PARTS += [dict(p, num_warps=4, num_stages=3, tile_n=128) for p in PARTS[1:2] + PARTS[4:5]]
#: several KV heads a program (opt-in): the two best of the 12 tunings run A of 2026-11-27 #7 swept (NOTES "Decode v8")
KV_GROUPS = [dict(kv_heads_per_program=2, num_warps=4, num_stages=st, tile_n=64) for st in (2, 3)]
#: when a tile's K/V loads are issued (Decode v11): V with K (1), the next tile's K/V before this tile's products
#: (2), and with the block table read two tiles ahead (3); the block table one tile ahead with the compiler
#: pipelining K/V (4: its copies stay in flight across a tile with 3 stages), with warps / stages / tiles
PREFETCHES = ([dict(prefetch=0), dict(prefetch=1), dict(prefetch=2)]
              + [dict(prefetch=3, num_warps=w, num_stages=st, tile_n=t)
                 for w, st, t in ((4, 2, 64), (4, 1, 64), (8, 2, 64), (4, 2, 32), (4, 2, 128), (8, 2, 128))]
              + [dict(prefetch=4, num_warps=4, num_stages=st, tile_n=t)
                 for st, t in ((2, 64), (3, 64), (4, 64), (3, 32), (4, 32), (3, 128))])
#: every tuning the engine section sweeps (its three fastest are timed on the main shape too)
SWEPT = TUNINGS + PARTS + KV_GROUPS + PREFETCHES


def tuning_name(t: dict) -> str:
    """``w4_s3_t128``-style name of a tuning, with ``_p4_m256_r2`` for per-sequence split settings."""
    keys = (("kv", "kv_heads_per_program"), ("pf", "prefetch"), ("w", "num_warps"), ("s", "num_stages"),
            ("t", "tile_n"))
    name = "_".join(f"{k}{t[key]}" for k, key in keys if key in t)
    if "max_parts_per_seq" in t:
        name = ((name + "_" if name else "") + f"p{t['max_parts_per_seq']}_m{t['min_tokens_per_part']}"
                f"_r{t['part_vs_mean']}")
    return name


def skewed_case(e, seed: int = 0):
    """Query, caches, scattered block tables and lengths of ``e.seqs`` ShareGPT-like contexts."""
    rng = np.random.default_rng(seed)
    lens = [min(n + e.generated, e.width_tokens) for n in _lognormal(rng, e.mean_prompt, 0.9, e.seqs, e.cap)]
    width = e.width_tokens // e.block
    need = [-(-n // e.block) for n in lens]
    num_blocks = sum(need) + 1
    perm = torch.randperm(num_blocks).tolist()
    tables = torch.zeros((e.seqs, width), dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = torch.tensor(perm[at:at + n], dtype=torch.int32)
        at += n
    caches = [allocate_kv_cache(num_blocks, e.block, e.kv_heads, e.head_size, e.dtype, hx.DEV)
              for _ in range(e.layers)]
    for kc, vc in caches:
        kc.normal_()
        vc.normal_()
    q = torch.randn(e.seqs, e.heads, e.head_size, dtype=e.dtype, device=hx.DEV)
    kv_bytes = 2 * sum(lens) * e.kv_heads * e.head_size * caches[0][0].element_size()
    return SimpleNamespace(q=q, kc=caches[0][0], vc=caches[0][1], caches=caches, bt=tables.to(hx.DEV),
                           lens=torch.tensor(lens, dtype=torch.int32, device=hx.DEV), kv_bytes=kv_bytes,
                           lens_list=lens, max_len=0)


def reordered(c, order: list[int]):
    """``c`` with its sequences (queries, table rows, lengths) in ``order``; the same caches."""
    idx = torch.tensor(order, device=c.q.device)
    return SimpleNamespace(**{**vars(c), "q": c.q[idx].contiguous(), "bt": c.bt[idx].contiguous(),
                              "lens": c.lens[idx].contiguous(), "lens_list": [c.lens_list[i] for i in order]})


def reference(c) -> torch.Tensor:
    previous = config.get_backend()
    config.set_backend("reference")
    try:
        return paged_decode_attention(c.q.float(), c.kc.float(), c.vc.float(), c.bt, c.lens)
    finally:
        config.set_backend(previous)


def host_mean_plan(c) -> launchers.SplitPlan:
    """The launcher's full-batch plan for ``c`` with the mean rule's threshold computed here, on the host (what a
    plan made once a step could hand every layer), so that no program reads the batch's lengths."""
    t = launchers.DECODE_TUNING
    width = c.max_len or c.bt.shape[1] * c.kc.shape[1]
    threshold = max(t["min_tokens_per_part"], sum(min(n, width) for n in c.lens_list) * t["part_vs_mean"]
                    // len(c.lens_list))
    return launchers.SplitPlan(launchers.parts_per_seq_for(width), True, threshold, 0)


def variant(c, ref, sh, num_splits=None, tuning=None, plan=None) -> dict:
    """Check (layer 0) then time the decode op over every layer's caches (``c.caches``, else ``c.kc, c.vc``)
    with ``num_splits`` (None: the launcher's choice), ``tuning`` (DECODE_TUNING overrides) and ``plan`` (a
    :class:`SplitPlan` the launcher uses instead of its own); per layer."""
    saved_plan = launchers.plan_decode_splits
    caches = getattr(c, "caches", None) or [(c.kc, c.vc)]
    try:
        with tuned(launchers.DECODE_TUNING, tuning):
            if plan is not None:
                launchers.plan_decode_splits = lambda *args: plan
            outs = [torch.full_like(c.q, float("nan")) for _ in caches]

            def fn():
                for (kc, vc), out in zip(caches, outs):
                    paged_decode_attention(c.q, kc, vc, c.bt, c.lens, out=out, num_splits=num_splits,
                                           max_seq_len=c.max_len)
                return outs[0]

            diff = max_diff(fn(), ref)
            chosen, per_seq = (num_splits, False) if num_splits else launchers.plan_decode_splits(
                c.q.shape[0], c.kc.shape[2], c.max_len or c.bt.shape[1] * c.kc.shape[1], hx.DEV)[:2]
            return rec(timeit(fn, sh) / len(caches), c.kv_bytes, max_abs_diff=diff, ok=diff <= TOL,
                       num_splits=chosen, per_seq=per_seq, tuning=tuning or {})
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        launchers.plan_decode_splits = saved_plan


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma list of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--compile-report", action="store_true",
                    help="no GPU: compile the default and every swept tuning for sm_90a and report registers, "
                         "shared memory, pipelining depth and programs a multiprocessor (not under TRITON_INTERPRET)")
    ap.add_argument("--out", default=None, help="directory of the --compile-report JSON (default: a temp dir)")
    args = ap.parse_args(argv)
    if args.compile_report:
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            sys.exit("--compile-report compiles for a GPU: unset TRITON_INTERPRET")
        from bench.compile_report import decode_compile_report

        variants = {"default": {}, **{tuning_name(t): t for t in SWEPT}}
        rows = decode_compile_report(variants, ENGINE)
        path = Path(args.out or tempfile.mkdtemp(prefix="bench_decode_skew_")) / "decode_compile_report.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report = {"triton": triton.__version__, "target": "sm_90a (compiled on a CPU, not run)",
                  "date": datetime.date.today().isoformat(), "shape": {k: str(v) for k, v in vars(ENGINE).items()},
                  "variants": rows}
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
        return
    sections = set(args.sections.split(","))
    if not sections <= set(SECTIONS):
        ap.error(f"--sections: unknown {sorted(sections - set(SECTIONS))}; expected some of {SECTIONS}")
    if args.dry_run:
        hx.DEV = torch.device("cpu")
    e, sh = (DRY, SimpleNamespace(warmup=0, rep=0, cpu_reps=1)) if args.dry_run else (ENGINE, FULL)
    card = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    res = {"card": card, "date": datetime.date.today().isoformat(), "command": "python bench/bench_decode_skew.py",
           "engine_shape": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in vars(e).items()},
           "tuning": dict(launchers.DECODE_TUNING)}
    if not args.dry_run:
        sec_physical(res.setdefault("physical", {}), sh)  # the copy bandwidth the fractions refer to
    rows = {}
    if sections & {"engine", "order", "main"}:  # the engine-like batch (main times its fastest tunings)
        torch.manual_seed(0)
        c = skewed_case(e)
        res["engine_shape"].update(max_len=max(c.lens_list), mean_len=float(np.mean(c.lens_list)),
                                   kv_bytes=c.kv_bytes)
        ref = reference(c)
        rows["auto"] = variant(c, ref, sh)
    if "engine" in sections:
        rows["auto_host_mean"] = variant(c, ref, sh, plan=host_mean_plan(c))
        for n in SPLITS:
            rows[f"splits_{n}"] = variant(c, ref, sh, num_splits=n)
        for t in SWEPT:
            rows[tuning_name(t)] = variant(c, ref, sh, tuning=t)
        res["engine"] = rows
    # the same batch with its sequences sorted by length: longest first puts the long programs in the first
    # wave (the grid's x axis is the sequence), shortest first in the last
    if "order" in sections:
        res["order"] = {}
        by_len = sorted(range(len(c.lens_list)), key=lambda i: -c.lens_list[i])
        for name, order in (("longest_first", by_len), ("shortest_first", by_len[::-1])):
            co = reordered(c, order)
            ref_o = ref[torch.tensor(order, device=ref.device)]
            res["order"][f"auto_{name}"] = variant(co, ref_o, sh)
            res["order"][f"splits_1_{name}"] = variant(co, ref_o, sh, num_splits=1)
    if "small" in sections:  # the end of a throughput run: 16 sequences (few pairs: uniform parts of >= 512 tokens)
        torch.manual_seed(1)
        cs = skewed_case(SimpleNamespace(**{**vars(e), "seqs": 16 if not args.dry_run else 3}))
        ref_s = reference(cs)
        res["small"] = {"auto": variant(cs, ref_s, sh), "splits_1": variant(cs, ref_s, sh, num_splits=1),
                        "splits_4": variant(cs, ref_s, sh, num_splits=4),
                        "auto_per_seq": variant(cs, ref_s, sh, tuning=dict(small_batch_per_seq=True)),
                        "pf0": variant(cs, ref_s, sh, tuning=dict(prefetch=0)),
                        "pf3": variant(cs, ref_s, sh, tuning=dict(prefetch=3)),
                        "pf4_s3": variant(cs, ref_s, sh, tuning=dict(prefetch=4, num_stages=3))}
    if "engine512" in sections:  # 512 sequences (the default batch of 2026-11-27 #7; 1024 since #8)
        torch.manual_seed(2)
        c5 = skewed_case(SimpleNamespace(**{**vars(e), "seqs": 512 if not args.dry_run else 12}))
        ref_5 = reference(c5)
        res["engine512"] = {"auto": variant(c5, ref_5, sh), "auto_host_mean": variant(c5, ref_5, sh,
                                                                                       plan=host_mean_plan(c5)),
                            "splits_1": variant(c5, ref_5, sh, num_splits=1),
                            "pf0": variant(c5, ref_5, sh, tuning=dict(prefetch=0)),
                            "pf3": variant(c5, ref_5, sh, tuning=dict(prefetch=3)),
                            "pf4_s3": variant(c5, ref_5, sh, tuning=dict(prefetch=4, num_stages=3))}
    if "long" in sections:  # the ops benchmark's long contexts of one and four sequences (few pairs)
        res["long"] = {}
        for seqs, seq_len in ((1, 32768), (4, 32768)) if not args.dry_run else ((1, 256),):
            lc = make_case(seqs, seq_len, FULL.block, "HND", FULL if not args.dry_run else DRY_LONG)
            lc.max_len = seq_len
            ref_l = reference(lc)
            for per_seq in (False, True):
                res["long"][f"{seqs}x{seq_len}_per_seq_{int(per_seq)}"] = variant(
                    lc, ref_l, sh, tuning=dict(small_batch_per_seq=per_seq))
            res["long"][f"{seqs}x{seq_len}_pf0"] = variant(lc, ref_l, sh, tuning=dict(prefetch=0))
    if "main" in sections and not args.dry_run:  # the main shape (1 GiB of K/V) only on the GPU
        m = make_case(FULL.seqs, FULL.seq_len, FULL.block, "HND", FULL)
        m.max_len = FULL.seq_len
        ref_m = reference(m)
        res["main"] = {"auto": variant(m, ref_m, sh), "splits_8": variant(m, ref_m, sh, num_splits=8),
                       "p1_m256": variant(m, ref_m, sh, tuning=PARTS[0]),  # per-sequence splits off
                       "pf0": variant(m, ref_m, sh, tuning=dict(prefetch=0))}  # the load order up to v11
        # the engine batch's three fastest tunings, on the main shape too (a default must not lose there)
        timed = sorted((r["ms"], name) for name, r in rows.items() if name[0] in "wpk" and "ms" in r)
        for _, name in timed[:3]:
            res["main"][name] = variant(m, ref_m, sh, tuning=next(
                t for t in SWEPT if tuning_name(t) == name))
    out_dir = Path(tempfile.mkdtemp()) if args.dry_run else ROOT / "bench" / "results" / card_slug(card)
    out_dir.mkdir(parents=True, exist_ok=True)
    # a run of some sections only does not overwrite the full run's file
    stem = "decode_skew" + ("" if sections == set(SECTIONS) else "_" + "_".join(x for x in SECTIONS if x in sections))
    res["sections"] = sorted(sections, key=SECTIONS.index)
    (out_dir / f"{stem}.json").write_text(json.dumps(res, indent=1))
    for section in SECTIONS:
        for name, r in res.get(section, {}).items():
            print(f"{section:9s} {name:24s} " + (f"{r['ms'] * 1e3:8.1f} us  splits {r['num_splits']:3d}"
                                                 f"{' per seq' if r.get('per_seq') else '        '}  "
                                                 f"diff {r['max_abs_diff']:.1e} {'ok' if r['ok'] else 'FAIL'}"
                                                 if "ms" in r else r.get("error", "")), flush=True)
    print(f"results: {out_dir / (stem + '.json')}")


if __name__ == "__main__":
    main()

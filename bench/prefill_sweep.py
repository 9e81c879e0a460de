"""The prefill kernel's tuning variants, each validated against SDPA and timed (``bench_prefill.py --sweep-only``)."""

from __future__ import annotations

import sys
import time
from types import SimpleNamespace

from bench.harness import fmt, free, tuned
from bench.prefill_common import check, prefill_fn, tflops, timed

V1 = {"softmax": "base", "offdiag": "masked", "order": "forward", "tile_n": 64, "num_stages": 3, "maxnreg": 0}
PREFILL_VARIANTS = {
    "default": {},
    "v1": V1,                                                  # the first version's choices
    "tile64_stages5": {"tile_n": 64, "num_stages": 5, "maxnreg": 0},
    "stages7": {"num_stages": 7},
    "no_maxnreg": {"maxnreg": 0},
    "fold_q": {"softmax": "fold_q"},
    "masked": {"offdiag": "masked"},
    "forward": {"order": "forward"},
    "heads_inner": {"order": "reverse_heads_inner"},
    "block": {"kv_addr": "block"},
    "diag1": {"diag_stages": 1},
    "bm64": {"block_m": 64},                                   # 4 warps, 3 programs / SM
    "bm256_stages5": {"block_m": 256, "num_warps": 16, "tile_n": 64, "maxnreg": 0},  # 16 warps, 1 / SM
}

#: set by main(): which variants the SDPA sections sweep (none: no sweep), whether a CPU run sweeps too, and
#: the time after which variants not yet compiled are skipped (the sweep must fit one device call)
SWEEP = {"variants": [], "on_cpu": False, "deadline": float("inf"), "done": set()}


def kernel_stats() -> dict:
    """Registers, spills and shared memory of the last prefill kernel launched on CUDA."""
    from pagedattn.ops import launchers

    k = launchers.LAST_PREFILL_KERNEL[0]
    if k is None:
        return {}
    try:
        return {"regs": k.n_regs, "spills": k.n_spills, "smem": k.metadata.shared}
    except Exception as e:  # noqa: BLE001
        return {"stats_error": f"{type(e).__name__}: {e}"}


def tuning_sweep(qp, kc, vc, bt, lens, cu, new, ref, S, H, D, pairs, sh, sdpa_ms) -> dict:
    """PREFILL_VARIANTS (those chosen in SWEEP), each validated against SDPA (max abs diff) before it is timed."""
    from pagedattn.ops import launchers

    rows = {}
    sweep_sh = SimpleNamespace(**{**vars(sh), "rep": max(1, sh.rep // 4)})  # 25 ms graphs: the sweep stays short
    for name in SWEEP["variants"]:
        variant = PREFILL_VARIANTS[name]
        if name not in SWEEP["done"] and time.perf_counter() > SWEEP["deadline"]:
            rows[name] = {"tuning": variant, "error": "skipped: --sweep-budget spent"}
            continue
        SWEEP["done"].add(name)
        launchers.LAST_PREFILL_KERNEL[0] = None
        t0 = time.perf_counter()
        try:
            with tuned(launchers.PREFILL_TUNING, variant):
                fn = prefill_fn(qp, kc, vc, bt, lens, cu, new)
                valid = check(fn().view(S, new, H, D).transpose(1, 2), ref)
                row = {"tuning": variant, "ok": valid["ok"], "max_abs_diff": valid["max_abs_diff"],
                       **kernel_stats()}
                if valid["ok"]:
                    ms, _ = timed(fn, sweep_sh)
                    row.update(ms=ms, vs_sdpa=ms / sdpa_ms, TFLOPs=tflops(pairs, ms, sh))
                else:
                    row["FAILED"] = (f"differs from SDPA by {valid['max_abs_diff']:.3g} > {valid['tol']:.3g}: "
                                     "not timed")
        except Exception as e:  # noqa: BLE001
            row = {"tuning": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            free()
        row["seconds"] = time.perf_counter() - t0
        rows[name] = row
    base = rows.get("default", {}).get("ms")
    for row in rows.values():
        if base and "ms" in row:
            row["vs_default"] = row["ms"] / base
    print_sweep(rows)
    return rows


def print_sweep(rows):
    print(f"  {'variant':<30}{'ms':>8}{'/sdpa':>7}{'/dflt':>7}{'TF':>6}{'regs':>6}{'spill':>6}{'smem':>8}"
          f"{'maxdiff':>9}{'s':>6}")
    for name, x in sorted(rows.items(), key=lambda kv: kv[1].get("ms", float("inf"))):
        if "error" in x or "ms" not in x:
            why = x.get("error") or x.get("FAILED")
            print(f"  {name:<30}  {why[:150]}")
            continue
        print(f"  {name:<30}{x['ms']:>8.3f}{x['vs_sdpa']:>7.2f}{fmt(x.get('vs_default'), '.3f'):>7}"
              f"{x['TFLOPs']:>6.0f}{fmt(x.get('regs'), 'd'):>6}{fmt(x.get('spills'), 'd'):>6}"
              f"{fmt(x.get('smem'), 'd'):>8}{x['max_abs_diff']:>9.2e}{x['seconds']:>6.1f}", flush=True)


def parse_variants(text):
    if text in (None, "", "all"):
        return list(PREFILL_VARIANTS)
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in PREFILL_VARIANTS]
    if unknown:
        sys.exit(f"unknown variants {unknown}; known: {', '.join(PREFILL_VARIANTS)}")
    return (["default"] if "default" not in names else []) + names  # the baseline is always re-timed

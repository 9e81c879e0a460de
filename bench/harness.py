"""The benchmark harness shared by the kernel benchmarks: device, timing, records, sections.

``DEV`` is the device every benchmark runs on; ``--dry-run`` rebinds it to the CPU (read it as
``harness.DEV``, never copy it at import).
"""
from __future__ import annotations

import contextlib
import gc
import re
import statistics
import time
import traceback

import torch
import triton

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
COPY_BW = [None]  # bytes/s measured by the physical-limits section


def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def free():
    sync()
    gc.collect()
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def tuned(table: dict, overrides: dict | None):
    """Apply ``overrides`` to a tuning table (``launchers.DECODE_TUNING``, ``PREFILL_TUNING``,
    ``cuda_attention.DECODE_TUNING``) for the ``with`` block; the table is restored whole after it, also on an
    error."""
    saved = dict(table)
    try:
        table.update(overrides or {})
        yield table
    finally:
        table.clear()
        table.update(saved)


TIMING = {"mode": "graph"}


def timeit(fn, sh) -> float:
    """Median milliseconds of ``fn`` on the GPU.

    By default ``fn`` is captured in a CUDA graph and its replays are timed
    (``triton.testing.do_bench_cudagraph``), so host launch overhead (Python, op dispatch) is
    excluded for every system alike and the figure is device time; ``--timing eager`` times plain
    calls with ``do_bench`` instead. On the CPU: a wall clock.
    """
    if DEV.type == "cuda":
        if TIMING["mode"] == "graph":
            fn()  # compile / warm up outside capture
            torch.cuda.synchronize()
            return triton.testing.do_bench_cudagraph(fn, rep=sh.rep, return_mode="median")
        return triton.testing.do_bench(fn, warmup=sh.warmup, rep=sh.rep, return_mode="median")
    fn()
    times = []
    for _ in range(sh.cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def rec(ms: float, nbytes: int, **extra) -> dict:
    """A timing with its bytes per second and its fraction of the measured copy bandwidth."""
    bps = nbytes / (ms * 1e-3)
    frac = bps / COPY_BW[0] if COPY_BW[0] else None
    return {"ms": ms, "bytes": nbytes, "GBps": bps / 1e9, "copy_bw_fraction": frac, **extra}


def card_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def run_sections(res: dict, sections, sh) -> None:
    """Run each (name, fn, extra args) section into ``res[name]``; a failing section records its
    error and traceback and the others still run."""
    t_start = time.perf_counter()
    for name, fn, extra in sections:
        t0 = time.perf_counter()
        r = res[name] = {}
        try:
            fn(r, sh, *extra)
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {e}"
            r["traceback"] = traceback.format_exc(limit=6)
        free()
        r["seconds"] = time.perf_counter() - t0
        print(f"[{name}] {r['seconds']:.1f} s{'  ERROR ' + r['error'] if 'error' in r else ''}", flush=True)
    res["total_seconds"] = time.perf_counter() - t_start


def print_failures_and_figures(res: dict, figs: dict) -> None:
    for sec, x in res.items():
        if isinstance(x, dict) and "error" in x:
            print(f"SECTION {sec} FAILED: {x['error'][:200]}")
    print("figures:", {k: round(v, 3) for k, (v, _) in figs.items()})

"""Plots of the block-size and batch x context sweeps of ``bench/bench_ops.py`` and of ``bench/bench_prefill.py``.

    python bench/plot_ops.py bench/results/<card>/ops.json       # redraws ops_block_size.png and ops_batch_ctx.png
    python bench/plot_ops.py bench/results/<card>/prefill.json   # redraws prefill.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_block_size(res: dict, path) -> None:
    """Decode time vs block size (ours and SDPA on contiguous K/V) and the fraction of copy bandwidth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = res.get("block_size", {})
    rows = [r for r in sec.get("rows", []) if "ms" in r]
    if not rows:
        raise ValueError(f"no block-size measurements to plot ({sec.get('error', 'all failed')})")
    sizes = [r["block_size"] for r in rows]
    sdpa = sec.get("sdpa", {})
    shape = res.get("decode", {}).get("shape", {})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(sizes, [r["ms"] for r in rows], "o-", label="pagedattn (paged, scattered blocks)")
    frac = [r["copy_bw_fraction"] for r in rows]
    if "ms" in sdpa:
        ax1.axhline(sdpa["ms"], color="tab:red", ls="--", label=f"SDPA {sdpa.get('backend', '')[:20]} (contiguous)")
    ax1.set(xscale="log", xlabel="block size (tokens)", ylabel="time (ms, median)", title="decode time")
    ax1.set_ylim(bottom=0)
    if all(f is not None for f in frac):
        ax2.plot(sizes, frac, "o-", label="pagedattn")
        if sdpa.get("copy_bw_fraction") is not None:
            ax2.axhline(sdpa["copy_bw_fraction"], color="tab:red", ls="--", label="SDPA (contiguous)")
        ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xscale="log", xlabel="block size (tokens)", ylabel="K/V bytes read / s  ÷  copy bandwidth",
            title="fraction of measured copy bandwidth")
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    desc = ", ".join(f"{k}={shape[k]}" for k in ("seqs", "seq_len", "heads", "kv_heads", "head_size", "dtype")
                     if k in shape)
    fig.suptitle(f"{res.get('card', '?')}: {desc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_batch_ctx(res: dict, path) -> None:
    """Decode time and fraction of copy bandwidth vs context length, one colour per batch size:
    pagedattn solid, SDPA on contiguous K/V dashed (the ``batch_ctx_sweep`` section)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sec = res.get("batch_ctx_sweep", {})
    rows = [r for r in sec.get("rows", []) if "ms" in r.get("ours", {}) and "ms" in r.get("sdpa", {})]
    if not rows:
        raise ValueError(f"no batch x context measurements to plot ({sec.get('error', 'all failed or skipped')})")
    batches = sorted({r["seqs"] for r in rows})
    ctxs = sorted({r["seq_len"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, b in enumerate(batches):
        pts = sorted((r for r in rows if r["seqs"] == b), key=lambda r: r["seq_len"])
        x = [r["seq_len"] for r in pts]
        color = f"C{i % 10}"
        for sysname, ls, label in (("ours", "o-", f"pagedattn, batch {b}"), ("sdpa", "s--", f"SDPA, batch {b}")):
            ax1.plot(x, [r[sysname]["ms"] for r in pts], ls, color=color, label=label)
            frac = [r[sysname].get("copy_bw_fraction") for r in pts]
            if all(f is not None for f in frac):
                ax2.plot(x, frac, ls, color=color, label=label)
    ax1.set(xlabel="context length (tokens)", ylabel="time (ms, median)", title="decode time", yscale="log")
    ax2.set(xlabel="context length (tokens)", ylabel="K/V bytes read / s  ÷  copy bandwidth",
            title="fraction of measured copy bandwidth")
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set_ylim(bottom=0)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ctxs, [str(c) for c in ctxs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7, loc="best", ncol=2)
    g = sec.get("grid", {})
    keys = ("heads", "kv_heads", "head_size", "dtype", "block_size", "layout")
    desc = ", ".join(f"{k}={g[k]}" for k in keys if k in g)
    fig.suptitle(f"{res.get('card', '?')}: pagedattn (solid) vs SDPA on contiguous K/V (dashed); {desc}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_prefill(res: dict, path) -> None:
    """Prefill (causal, and over a paged prefix) and a mixed batch: time against SDPA on contiguous
    K/V, and the fraction of the card's bf16 matrix-product rate (``bench/bench_prefill.py``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [(key, res.get(key) or {}) for key in ("prefill", "prefill_prefix")]
    cases = [(key, sec) for key, sec in cases if "ms" in (sec.get("ours") or {})]
    if not cases:
        raise ValueError("no prefill measurements to plot")
    labels = []
    for key, sec in cases:
        sh = sec.get("shape", {})
        labels.append(f"{key}\n{sh.get('seqs')} x {sh.get('new_tokens')} new"
                      + (f" + {sh.get('prefix')} cached" if sh.get("prefix") else ""))
    x = range(len(cases))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for off, who, color in ((-0.2, "ours", "tab:blue"), (0.2, "sdpa", "tab:red")):
        ax1.bar([i + off for i in x], [(sec.get(who) or {}).get("ms", 0.0) for _, sec in cases], 0.4,
                color=color, label="pagedattn (paged)" if who == "ours" else "SDPA (contiguous)")
        ax2.bar([i + off for i in x], [(sec.get(who) or {}).get("matmul_fraction", 0.0) for _, sec in cases], 0.4,
                color=color)
    mixed = (res.get("mixed") or {}).get("mixed") or {}
    if "matmul_fraction" in mixed:
        ax2.bar([len(cases)], [mixed["matmul_fraction"]], 0.4, color="tab:green", label="mixed batch (ours)")
        labels.append("mixed\nprefill + decode rows")
    ax1.set_xticks(list(x), labels[:len(cases)], fontsize=8)
    ax2.set_xticks(list(range(len(labels))), labels, fontsize=8)
    ax1.set_ylabel("ms (device time)")
    ax2.set_ylabel("fraction of the bf16 matrix-product rate")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    card = res.get("card", "")
    ax1.set_title(f"prefill time ({card})", fontsize=10)
    ax2.set_title("achieved TFLOP/s over the measured matmul rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    src = Path(sys.argv[1])
    res = json.loads(src.read_text())
    plots = ((plot_prefill, "prefill.png"),) if src.name.startswith("prefill") else (
        (plot_block_size, "ops_block_size.png"), (plot_batch_ctx, "ops_batch_ctx.png"))
    for plot, name in plots:
        try:
            plot(res, src.with_name(name))
            print("wrote", src.with_name(name))
        except ValueError as e:
            print(f"skipped {name}: {e}")

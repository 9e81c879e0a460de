"""Plot of the block-size sweep of ``bench/bench_ops.py``.

    python bench/plot_ops.py bench/results/<card>/ops.json   # redraws ops_block_size.png next to it
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


if __name__ == "__main__":
    src = Path(sys.argv[1])
    plot_block_size(json.loads(src.read_text()), src.with_name("ops_block_size.png"))
    print("wrote", src.with_name("ops_block_size.png"))

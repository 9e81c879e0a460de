"""Sections of ``bench/bench_ops.py`` that compare decode with FlexAttention's paged attention and sweep
batch x context length.

``sec_flex_paged``: our decode against ``torch.nn.attention.flex_attention`` over a paged K/V cache at
the main decode shape. Flex reads K/V through a ``BlockMask`` whose KV blocks are the cache pages, the
scheme of torch's own ``torch.nn.attention.experimental._paged_attention.PagedAttention`` helper:

- the flex cache is ``[1, kv_heads, num_pages * page_size, head_size]`` (one row of pages per head,
  the helper's layout), filled through the same block table as ours, so the pages are scattered alike;
- every page of a sequence is a "full" KV block of its BlockMask row (``full_kv_indices`` = the
  sequence's block-table row, BLOCK_SIZE = (128, page_size)), so the kernel reads exactly the
  sequence's pages and never evaluates the mask;
- the ``mask_mod`` (page owner == batch index) is still the true mask: the eager (CPU) path, which
  ignores the block structure, needs it to be right.

``sec_batch_ctx_sweep``: our decode and SDPA on contiguous K/V over batch x context length.

The helpers (``make_case``, ``time_sdpa``, ...) live in ``bench/ops_common.py``.
"""
from __future__ import annotations

import inspect
import time
import traceback
import warnings

import torch

from bench import harness as hx
from bench import ops_common as ops
from bench.harness import TIMING, free, rec, sync, timeit
from pagedattn.ops import DEFAULT_LAYOUT


# --------------------------------------------------------------------------------------------- flex paged

def flex_paged_cache(x, block_table, page_size):
    """Flex's paged cache ``[1, kv_heads, num_pages * page_size, D]`` holding contiguous ``x`` [S, kvh, L, D],
    page ``block_table[s, j]`` holding tokens ``j * page_size ...`` of sequence ``s``."""
    S, kvh, L, D = x.shape
    nb = L // page_size
    num_pages = block_table.numel()
    cache = torch.empty(1, kvh, num_pages * page_size, D, dtype=x.dtype, device=x.device)
    cache.view(kvh, num_pages, page_size, D)[:, block_table.long()] = (
        x.view(S, kvh, nb, page_size, D).permute(1, 0, 2, 3, 4))
    return cache


def _from_kv_blocks(BlockMask, **kw):
    """``BlockMask.from_kv_blocks`` with only the keyword arguments this torch version knows."""
    known = inspect.signature(BlockMask.from_kv_blocks).parameters
    return BlockMask.from_kv_blocks(**{k: v for k, v in kw.items() if k in known})


def flex_paged_block_mask(block_table, page_size):
    """A decode BlockMask (query length 1) whose KV blocks are the physical pages of each sequence.

    Every page is a full block (``full_kv_*``), as torch's PagedAttention helper makes of a logical
    no-op mask; the indices are padded to ``num_pages`` columns as the helper does.
    """
    from torch.nn.attention.flex_attention import BlockMask

    S, nb = block_table.shape
    num_pages = block_table.numel()
    dev = block_table.device
    owner = torch.empty(num_pages, dtype=torch.int32, device=dev)  # sequence that owns each page
    owner[block_table.long().view(-1)] = torch.arange(S, dtype=torch.int32, device=dev).repeat_interleave(nb)

    def page_owner_mask(b, h, q_idx, kv_idx):
        return owner[kv_idx // page_size] == b

    full_idx = torch.zeros(S, 1, 1, num_pages, dtype=torch.int32, device=dev)
    full_idx[:, 0, 0, :nb] = block_table.to(torch.int32)
    return _from_kv_blocks(
        BlockMask, kv_num_blocks=torch.zeros(S, 1, 1, dtype=torch.int32, device=dev),
        kv_indices=torch.zeros_like(full_idx),
        full_kv_num_blocks=torch.full((S, 1, 1), nb, dtype=torch.int32, device=dev),
        full_kv_indices=full_idx, BLOCK_SIZE=(128, page_size), mask_mod=page_owner_mask,
        seq_lengths=(1, num_pages * page_size))


def _time_graph_or_eager(fn, sh):
    """``timeit`` in the current mode; if CUDA-graph capture fails, eager timing. Returns (ms, mode, note)."""
    if hx.DEV.type != "cuda":
        return timeit(fn, sh), "cpu wall clock", None
    try:
        return timeit(fn, sh), TIMING["mode"], None
    except Exception as e:  # noqa: BLE001
        if TIMING["mode"] != "graph":
            raise
        note = f"graph capture failed ({type(e).__name__}: {str(e)[:200]}); timed eagerly"
        sync()
        saved, TIMING["mode"] = TIMING["mode"], "eager"
        try:
            return timeit(fn, sh), "eager", note
        finally:
            TIMING["mode"] = saved


def sec_flex_paged(r, sh, quick=False):
    """Decode at the main shape: ours vs FlexAttention over a paged cache (page = our block size, and
    flex's preferred 128 unless ``quick``), both vs SDPA on contiguous K/V. Flex is compiled with
    ``torch.compile`` on CUDA (its fused kernel; the eager path materializes every score) and run eagerly
    on the CPU (``--dry-run``). A page size flex cannot run records ``{"unavailable": reason}``."""
    S, L = sh.seqs, sh.seq_len
    r["shape"] = {"seqs": S, "seq_len": L, "heads": sh.heads, "kv_heads": sh.kv_heads, "head_size": sh.head_size,
                  "dtype": str(sh.dtype), "block_size": sh.block}
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except Exception as e:  # noqa: BLE001
        r["unavailable"] = f"torch {torch.__version__} has no flex_attention ({type(e).__name__}: {e})"
        return
    c = ops.make_case(S, L, sh.block, DEFAULT_LAYOUT, sh)
    r["sdpa"], ref = ops.time_sdpa(c, sh)
    ours = ops.decode_variant(r, "ours", c, ref, r["sdpa"]["ms"], sh)
    ours_out = ops.ours_fn(c)().clone()
    compiled = hx.DEV.type == "cuda"
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    r["method"] = ("flex_attention(q [S, H, 1, D], cache [1, kvh, pages*page, D], BlockMask of full page blocks "
                   "from the block table, enable_gqa)" + (", torch.compile(dynamic=False)" if compiled else
                                                          ", eager (CPU dry run: unfused reference path)"))
    pages = [sh.block] + [p for p in sh.flex_pages if p != sh.block and not (quick and compiled)]
    res = r["flex"] = {}
    for page in pages:
        key = f"page_{page}"
        try:
            bt = c.bt if page == sh.block else (
                torch.randperm(S * (L // page), device=hx.DEV).view(S, -1).to(torch.int32))
            kf, vf = flex_paged_cache(c.k, bt, page), flex_paged_cache(c.v, bt, page)
            mask = flex_paged_block_mask(bt, page)
            q4 = c.q.unsqueeze(2)

            def fn(kf=kf, vf=vf, mask=mask, q4=q4):
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
                    return flex(q4, kf, vf, block_mask=mask, enable_gqa=True)

            t0 = time.perf_counter()
            out = fn().squeeze(2)
            sync()
            first_call_s = time.perf_counter() - t0
            d_ours, d_sdpa = ops.max_diff(out, ours_out), ops.max_diff(out, ref)
            ms, mode, note = _time_graph_or_eager(fn, sh)
            res[key] = rec(ms, c.kv_bytes, page_size=page, compiled=compiled, first_call_seconds=first_call_s,
                           timing=mode, max_abs_diff_vs_ours=d_ours, max_abs_diff_vs_sdpa=d_sdpa,
                           ok=d_sdpa <= ops.TOL, vs_sdpa=ms / r["sdpa"]["ms"],
                           ours_vs_flex=ours["ms"] / ms if "ms" in ours else None,
                           **({"timing_note": note} if note else {}))
            del kf, vf, mask, out
        except Exception as e:  # noqa: BLE001
            res[key] = {"unavailable": f"{type(e).__name__}: {str(e)[:400]}",
                        "traceback": traceback.format_exc(limit=4)[-1500:]}
        free()
        print(f"  flex_paged {key}: {res[key].get('ms', res[key].get('unavailable'))}", flush=True)
    main = res.get(f"page_{sh.block}", {})
    if "ms" in main and "ms" in ours:
        r["ours_vs_flex"] = ours["ms"] / main["ms"]
        r["validated"] = bool(ours.get("ok") and main.get("ok"))
    elif "unavailable" in main:
        r["unavailable"] = main["unavailable"]


# --------------------------------------------------------------------------------------------- batch x context

def sweep_grid(sh, quick=False):
    """(batches, context lengths) of the sweep; ``quick`` keeps every other batch and the two ends of context."""
    batches, ctxs = list(sh.sweep_batches), list(sh.sweep_ctx)
    if quick and hx.DEV.type == "cuda":
        batches, ctxs = batches[::2], [ctxs[0], ctxs[-1]]
    return batches, ctxs


def sec_batch_ctx_sweep(r, sh, quick=False):
    """Our decode vs SDPA on contiguous K/V for every batch x context length (the main shape's heads,
    head size, dtype and block size); combinations over ``sh.sweep_max_kv_bytes`` of K/V are skipped."""
    batches, ctxs = sweep_grid(sh, quick)
    r["grid"] = {"batches": batches, "seq_lens": ctxs, "max_kv_bytes": sh.sweep_max_kv_bytes,
                 "heads": sh.heads, "kv_heads": sh.kv_heads, "head_size": sh.head_size, "dtype": str(sh.dtype),
                 "block_size": sh.block, "layout": DEFAULT_LAYOUT}
    rows = r["rows"] = []
    for S in batches:
        for L in ctxs:
            kv_bytes = 2 * S * L * sh.kv_heads * sh.head_size * torch.finfo(sh.dtype).bits // 8
            row = {"seqs": S, "seq_len": L, "kv_bytes": kv_bytes}
            rows.append(row)
            if kv_bytes > sh.sweep_max_kv_bytes:
                row["skipped"] = f"K/V {kv_bytes / 1e9:.3g} GB > {sh.sweep_max_kv_bytes / 1e9:.3g} GB"
                continue
            try:
                c = ops.make_case(S, L, sh.block, DEFAULT_LAYOUT, sh)
                row["sdpa"], ref = ops.time_sdpa(c, sh)
                row["ours"] = ops.decode_variant({}, "x", c, ref, row["sdpa"]["ms"], sh)
                if "ms" in row["ours"]:
                    row["ours_vs_sdpa"] = row["ours"]["ms"] / row["sdpa"]["ms"]
                del c, ref
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            free()

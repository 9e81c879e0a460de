"""Compile our Triton kernels for a Hopper GPU without one: what a tuning changes before any of it is timed.

``bench_prefill.py --compile-report`` and ``bench_decode_skew.py --compile-report`` call this. For each variant:
registers and spills from ptxas, shared memory, the pipelining Triton chose (K/V buffers, the deepest
``async_wait`` in its loops: 0 means each iteration waits for every copy in flight, including the next tile's
K/V issued at the end of the previous iteration, so their latency is hidden behind almost nothing), and the
programs an H100 multiprocessor holds at once by registers, shared memory and warps.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton

from bench.harness import tuned
from pagedattn.ops import DEFAULT_LAYOUT, allocate_kv_cache

#: an H100 multiprocessor: registers, shared memory (bytes), warps, resident programs
SM_REGS, SM_SMEM, SM_WARPS, SM_PROGRAMS = 65536, 228 * 1024, 64, 32


def programs_per_sm(regs: int | None, smem: int, num_warps: int) -> int | None:
    """Resident programs a multiprocessor holds by registers (allocated in units of 8 a thread), shared memory
    (each program also reserves 1 KB) and warps."""
    if not regs:
        return None
    by_regs = SM_REGS // (-(-regs // 8) * 8 * 32 * num_warps)
    return min(by_regs, SM_SMEM // (smem + 1024), SM_WARPS // num_warps, SM_PROGRAMS)


class OfflineKernel:
    """Stands in for a kernel in ``launchers``: ``kernel[grid](*args, **kwargs)`` compiles for ``target_arch``
    instead of launching and keeps the report in ``last``. Uses Triton internals (the JITFunction binder and
    ``_pack_args``, Triton 3.6), so the constants and alignment hints are those a launch with these arguments
    would get.

    Args:
        jit: the Triton JIT function.
        target_arch: the sm_ number to compile for.
        fix_kwargs: edits the launch's keyword arguments first (CPU tensors make the launchers pick CPU
            settings: float32 dots, no warps or stages).
    """

    def __init__(self, jit, target_arch: int = 90, fix_kwargs=None):
        self.jit, self.target_arch, self.fix_kwargs, self.last = jit, target_arch, fix_kwargs, None

    def __getitem__(self, grid):
        return self.compile_only

    def compile_only(self, *args, **kwargs) -> dict:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import create_function_from_signature

        if self.fix_kwargs:
            self.fix_kwargs(kwargs)
        target = GPUTarget("cuda", self.target_arch, 32)
        ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
        backend = make_backend(target)
        binder = create_function_from_signature(self.jit.signature, self.jit.params, backend)
        bound, spec, opts = binder(*args, **kwargs)
        opts, sig, consts, attrs = self.jit._pack_args(backend, kwargs, bound, spec, opts)
        k = triton.compile(ASTSource(self.jit, sig, consts, attrs), target=target, options=opts.__dict__)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "k.ptx").write_text(k.asm["ptx"])
            res = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{self.target_arch}a", str(Path(tmp) / "k.ptx"),
                                  "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
        regs = re.search(r"Used (\d+) registers", res.stderr)
        spill = re.search(r"(\d+) bytes spill stores", res.stderr)
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        kv_buf = r"memdesc<(\d+)x\d+x\d+x(?:bf16|f16|f32), #shared\d*, #smem, mutable>"
        buffers = [int(b) for b in re.findall(kv_buf, ttgir)]
        waits = [int(w) for w in re.findall(r"async_wait[^{]*\{num = (\d+)", ttgir)]
        regs = int(regs.group(1)) if regs else None
        self.last = {"regs": regs, "spill_bytes": int(spill.group(1)) if spill else None,
                     "smem": k.metadata.shared, "kv_buffers": max(buffers) if buffers else None,
                     "max_async_wait": max(waits) if waits else None, "wgmma": ptx.count("wgmma.mma_async"),
                     "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                     "programs_per_sm": programs_per_sm(regs, k.metadata.shared, opts.num_warps),
                     "ptxas": res.stderr.strip()[-300:] if res.returncode else ""}
        return self.last


def compile_variants(variants: dict, tuning_table: dict, compile_one, line) -> dict:
    """Each variant's report: ``compile_one()`` (an :class:`OfflineKernel` launch's report) run with the
    variant's overrides applied to ``tuning_table``; a failure becomes ``{"error": ...}``. Each row also gets
    the seconds it took and is printed as ``line(name, row)``.

    Returns:
        name -> row.
    """
    out = {}
    for name, variant in variants.items():
        t0 = time.perf_counter()
        try:
            with tuned(tuning_table, variant):
                row = compile_one()
        except Exception as exc:  # noqa: BLE001
            row = {"error": f"{type(exc).__name__}: {str(exc)[-300:]}"}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out[name] = row
        print(line(name, row), flush=True)
    return out


def prefill_compile_report(variants: dict, sh, target_arch: int = 90) -> dict:
    """Compile each variant's kernel for sm_<arch>a without launching it (no GPU needed; not under the
    interpreter): registers and spills from ptxas, shared memory, and the TTGIR's pipelining: K/V buffers and
    the largest async_wait count in the loops (0: each iteration waits for every copy in flight, including the
    next tile's K/V issued at the end of the previous iteration, so only one tile is prefetched and its
    latency is hidden behind little more than the P @ V product).

    Uses Triton internals (JITFunction binder and _pack_args, Triton 3.6); the main shape's compile-time
    constants come from a one-sequence stand-in with the same hint (max_query_len) and strides' alignment.

    Args:
        variants: name -> PREFILL_TUNING overrides (bench_prefill's PREFILL_VARIANTS, or some of them).
        sh: the benchmark's shape namespace (``bench_prefill.PFULL``): heads, head size, block, dtype, prefill.
        target_arch: the sm_ number to compile for.
    """
    from pagedattn.ops import launchers

    def fix(kwargs):
        kwargs["DOT_F32"] = False  # CPU tensors here; bf16 dots on the GPU
        if kwargs.get("num_warps") == 8 and launchers.PREFILL_TUNING["maxnreg"]:
            cap = launchers.PREFILL_TUNING["maxnreg"]
            kwargs["maxnreg"] = 128 if cap == "auto" else cap

    new = sh.prefill[1]
    L = 256
    dt = sh.dtype
    q = torch.zeros(L, sh.heads, sh.head_size, dtype=dt)
    kc, vc = allocate_kv_cache(L // sh.block, sh.block, sh.kv_heads, sh.head_size, dt, "cpu", DEFAULT_LAYOUT)
    bt = torch.arange(L // sh.block, dtype=torch.int32).view(1, -1)
    lens = torch.tensor([L], dtype=torch.int32)
    cu = torch.tensor([0, L], dtype=torch.int32)
    o = torch.empty_like(q)
    real = launchers.paged_prefill_kernel
    launchers.paged_prefill_kernel = offline = OfflineKernel(real, target_arch, fix)

    def compile_one() -> dict:
        launchers.paged_prefill(o, q, kc, vc, bt, lens, cu, new, sh.head_size ** -0.5, 0, 0.0, None, None)
        return dict(offline.last)

    try:
        return compile_variants(variants, launchers.PREFILL_TUNING, compile_one,
                                lambda name, row: f"  {name:<30}{row}")
    finally:
        launchers.paged_prefill_kernel = real


def decode_compile_report(variants: dict, e, target_arch: int = 90) -> dict:
    """:func:`prefill_compile_report` for the decode kernel: each variant (``DECODE_TUNING`` overrides) compiled
    as a full batch of the shape ``e`` launches it on a GPU (per-sequence parts with the mean rule), and the
    split merge that follows it.

    Args:
        variants: name -> DECODE_TUNING overrides (bench_decode_skew's tunings, or some of them).
        e: the benchmark's engine shape (``bench_decode_skew.ENGINE``): sequences, heads, KV heads, head size,
            block, table width, dtype.
        target_arch: the sm_ number to compile for.

    Returns:
        name -> ``{"decode": report, "merge": report}`` (see :class:`OfflineKernel`), or ``{"error": ...}``.
    """
    from pagedattn.ops import launchers

    def fix(kwargs):
        # CPU tensors here: bf16 dots and the tuning's warps and stages, as on the GPU
        kwargs["DOT_F32"] = False
        kwargs.setdefault("num_warps", launchers.DECODE_TUNING["num_warps"])
        kwargs.setdefault("num_stages", launchers.DECODE_TUNING["num_stages"])

    width = e.width_tokens // e.block
    q = torch.zeros(e.seqs, e.heads, e.head_size, dtype=e.dtype)
    kc, vc = allocate_kv_cache(64, e.block, e.kv_heads, e.head_size, e.dtype, "cpu", DEFAULT_LAYOUT)
    bt = torch.zeros(e.seqs, width, dtype=torch.int32)
    lens = torch.ones(e.seqs, dtype=torch.int32)
    o = torch.empty_like(q)
    real = launchers.paged_decode_kernel, launchers.merge_splits_kernel, launchers.plan_decode_splits
    launchers.paged_decode_kernel = decode = OfflineKernel(real[0], target_arch, fix)
    launchers.merge_splits_kernel = merge = OfflineKernel(real[1], target_arch)  # launched as on the GPU

    def compile_one() -> dict:
        decode.last = merge.last = None
        t = launchers.DECODE_TUNING
        # the plan a full batch gets on a GPU (plan_decode_splits returns one split off CUDA)
        plan = launchers.SplitPlan(launchers.parts_per_seq_for(e.width_tokens), True,
                                   t["min_tokens_per_part"], t["part_vs_mean"])
        launchers.plan_decode_splits = lambda *args: plan
        try:
            launchers.paged_decode(o, q, kc, vc, bt, lens, e.head_size ** -0.5, 0, 0.0, None, None,
                                   e.width_tokens, 0)
        finally:
            launchers.plan_decode_splits = real[2]
        return {"decode": dict(decode.last), "merge": dict(merge.last) if merge.last else None}

    def line(name: str, row: dict) -> str:
        d = row.get("decode") or row
        return f"  {name:<24} " + (", ".join(f"{k} {d[k]}" for k in ("regs", "spill_bytes", "smem", "kv_buffers",
                                                                      "max_async_wait", "programs_per_sm"))
                                   if "regs" in d else str(d))

    try:
        return compile_variants(variants, launchers.DECODE_TUNING, compile_one, line)
    finally:
        launchers.paged_decode_kernel, launchers.merge_splits_kernel, launchers.plan_decode_splits = real

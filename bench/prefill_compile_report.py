"""Compile the prefill kernel's variants for a Hopper GPU without one (``bench_prefill.py --compile-report``).

Registers and spills from ptxas, shared memory, and the pipelining Triton chose (K/V buffers, the deepest
``async_wait``): what the variants of ``bench/bench_prefill.py`` change before any of them is timed.
"""
from __future__ import annotations

import re
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import triton

from pagedattn.ops import DEFAULT_LAYOUT, allocate_kv_cache


def compile_report(variants: dict, sh, target_arch: int = 90) -> dict:
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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from pagedattn.ops import launchers

    target = GPUTarget("cuda", target_arch, 32)
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    out = {}

    class Offline:
        """Stands in for the kernel in launchers: compiles for `target` instead of launching."""

        def __init__(self, jit):
            self.jit = jit

        def __getitem__(self, grid):
            def compile_only(*args, **kwargs):
                kwargs["DOT_F32"] = False  # CPU tensors here; bf16 dots on the GPU
                if kwargs.get("num_warps") == 8 and launchers.PREFILL_TUNING["maxnreg"]:
                    cap = launchers.PREFILL_TUNING["maxnreg"]
                    kwargs["maxnreg"] = 128 if cap == "auto" else cap
                backend = make_backend(target)
                binder = create_function_from_signature(self.jit.signature, self.jit.params, backend)
                bound, spec, opts = binder(*args, **kwargs)
                opts, sig, consts, attrs = self.jit._pack_args(backend, kwargs, bound, spec, opts)
                k = triton.compile(ASTSource(self.jit, sig, consts, attrs), target=target, options=opts.__dict__)
                with tempfile.TemporaryDirectory() as tmp:
                    (Path(tmp) / "k.ptx").write_text(k.asm["ptx"])
                    res = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{target_arch}a", str(Path(tmp) / "k.ptx"),
                                          "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
                regs = re.search(r"Used (\d+) registers", res.stderr)
                spill = re.search(r"(\d+) bytes spill stores", res.stderr)
                ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
                kv_buf = r"memdesc<(\d+)x\d+x\d+x(?:bf16|f16|f32), #shared\d*, #smem, mutable>"
                buffers = [int(b) for b in re.findall(kv_buf, ttgir)]
                waits = [int(w) for w in re.findall(r"async_wait[^{]*\{num = (\d+)", ttgir)]
                self.last = {"regs": int(regs.group(1)) if regs else None,
                             "spill_bytes": int(spill.group(1)) if spill else None,
                             "smem": k.metadata.shared, "kv_buffers": max(buffers) if buffers else None,
                             "max_async_wait": max(waits) if waits else None, "wgmma": ptx.count("wgmma.mma_async"),
                             "cp_async": ptx.count("cp.async.cg") + ptx.count("cp.async.ca"),
                             "ptxas": res.stderr.strip()[-300:] if res.returncode else ""}
                return self.last
            return compile_only

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
    launchers.paged_prefill_kernel = Offline(real)
    try:
        for name, variant in variants.items():
            saved = dict(launchers.PREFILL_TUNING)
            t0 = time.perf_counter()
            try:
                launchers.PREFILL_TUNING.update(variant)
                launchers.paged_prefill(o, q, kc, vc, bt, lens, cu, new, sh.head_size ** -0.5, 0, 0.0, None, None)
                row = dict(launchers.paged_prefill_kernel.last)
            except Exception as e:  # noqa: BLE001
                row = {"error": f"{type(e).__name__}: {str(e)[-300:]}"}
            finally:
                launchers.PREFILL_TUNING.clear()
                launchers.PREFILL_TUNING.update(saved)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            out[name] = row
            print(f"  {name:<30}{row}", flush=True)
    finally:
        launchers.paged_prefill_kernel = real
    return out

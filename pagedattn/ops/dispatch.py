"""Runs an op's kernel backend (Triton or CUDA) for a device, as :func:`config.resolve_backend` chooses.

The registry (:mod:`pagedattn.ops.registry`) has checked the arguments; here the implementation is
picked and called, with the one run-time fallback of ``auto``: a Triton kernel that fails to compile
for the device marks Triton unusable there (one warning for the process) and the call runs again on
the CUDA backend.
"""

from __future__ import annotations

import importlib

import torch

from pagedattn.ops import config

#: The module holding each kernel backend's implementation of an op (imported on first use). The
#: functions share the launchers' signatures (``pagedattn.ops.launchers``).
KERNEL_MODULES = {
    "triton": {"paged_decode": "launchers", "paged_prefill": "launchers", "reshape_and_cache": "launchers",
               "copy_blocks": "launchers"},
    "cuda": {"paged_decode": "cuda_attention", "paged_prefill": "cuda_attention",
             "reshape_and_cache": "cuda_cache", "copy_blocks": "cuda_cache"},
}
_MODULES: dict[str, object] = {}


def kernel_impl(backend: str, op: str):
    """The function running ``op`` on a kernel backend (``triton`` or ``cuda``)."""
    name = KERNEL_MODULES[backend][op]
    module = _MODULES.get(name)
    if module is None:
        module = _MODULES[name] = importlib.import_module(f"pagedattn.ops.{name}")
    return getattr(module, op)  # looked up per call, so a patched function is seen


def run_kernels(device: torch.device, op: str, *args) -> bool:
    """Run ``op`` on the kernel backend chosen for ``device``; ``False`` when the reference must run."""
    backend = config.resolve_backend(device)
    if backend == "reference":
        return False
    if backend == "triton" and device.type == "cuda" and config.get_backend() == "auto":
        try:
            kernel_impl(backend, op)(*args)
        except Exception as exc:
            if not config.is_triton_compile_error(exc):
                raise
            config.mark_triton_failed(device, exc)
            return run_kernels(device, op, *args)  # resolves to the CUDA backend now (or raises)
        return True
    kernel_impl(backend, op)(*args)
    return True

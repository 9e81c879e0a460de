"""Process-wide op settings: which backend runs the ops, and validation mode.

Both are read once from the environment at import and can be changed at run time:

- ``PAGEDATTN_BACKEND`` (or :func:`set_backend`):

  - ``auto`` (default): Triton on CUDA tensors, the PyTorch reference on CPU tensors. When Triton
    cannot run on a device (not importable, no CUDA driver for it, or a kernel fails to compile
    for the device), the CUDA backend runs there instead, said once in a ``logging`` warning.
  - ``triton``: Triton everywhere (CPU tensors need ``TRITON_INTERPRET=1``); no fallback.
  - ``cuda``: the CUDA C++ kernels compiled at run time with CuPy (``pagedattn.ops.cuda_*``) on
    CUDA tensors, the reference on CPU tensors. Needs CuPy (``pip install 'pagedattn[cuda]'``);
    without it ``set_backend('cuda')`` and the first op on a CUDA tensor raise ``RuntimeError``.
  - ``reference``: the plain-PyTorch reference on every device.

- ``PAGEDATTN_VALIDATE``: ``1`` turns on validation mode, in which every op checks the *values*
  of its index tensors (block ids, sequence lengths, slots) and raises ``ValueError`` on the first
  bad one. This synchronizes with the device, so it is meant for debugging. Without it, bad
  values are masked: no op reads or writes outside its tensors, whatever it is given.
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "reference")
#: What :func:`resolve_backend` returns: the implementation that runs.
IMPLEMENTATIONS = ("triton", "cuda", "reference")

logger = logging.getLogger("pagedattn")


def _env_backend() -> str:
    value = os.environ.get("PAGEDATTN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PAGEDATTN_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_state = {"backend": _env_backend(), "validate": _env_flag("PAGEDATTN_VALIDATE")}
#: device index -> why Triton cannot run there ("" when it can); filled lazily, once per device.
_triton_status: dict[int, str] = {}
_fallback_warned = [False]


def _cuda_available() -> tuple[bool, str]:
    from pagedattn.ops import cuda_runtime  # light: CuPy itself is imported only on first use

    return cuda_runtime.available()


def _cuda_unavailable_error(reason: str) -> RuntimeError:
    return RuntimeError(f"the CUDA backend was chosen (PAGEDATTN_BACKEND=cuda or pagedattn.ops.set_backend('cuda')) "
                        f"but cannot run: {reason}. Install CuPy (pip install 'pagedattn[cuda]') or choose another "
                        f"backend with PAGEDATTN_BACKEND or set_backend ({', '.join(BACKENDS)})")


def set_backend(backend: str) -> None:
    """Choose the backend for all ops: ``auto``, ``triton``, ``cuda`` or ``reference`` (see the module
    docstring). ``cuda`` raises ``RuntimeError`` at once when CuPy or a CUDA device is missing."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cuda":
        ok, reason = _cuda_available()
        if not ok:
            raise _cuda_unavailable_error(reason)
    _state["backend"] = backend


def get_backend() -> str:
    """The backend setting (``auto``, ``triton``, ``cuda`` or ``reference``); :func:`resolve_backend`
    tells which implementation runs on a given device."""
    return _state["backend"]


def set_validation(enabled: bool) -> None:
    """Turn validation mode on or off for every op (see the module docstring)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state["validate"] = enabled


def validation_enabled() -> bool:
    return _state["validate"]


def probe_triton(device_index: int) -> str:
    """Why Triton cannot run on ``cuda:device_index``, or ``""`` when it can (imports, and has a CUDA target)."""
    try:
        import triton

        from pagedattn.ops import launchers  # noqa: F401  (defines every kernel)
    except Exception as exc:
        return f"Triton is not importable ({type(exc).__name__}: {exc})"
    try:
        target = triton.runtime.driver.active.get_current_target()
    except Exception as exc:
        return f"Triton has no driver for cuda:{device_index} ({type(exc).__name__}: {exc})"
    if getattr(target, "backend", "cuda") != "cuda":
        return f"Triton targets {target.backend}, not CUDA"
    return ""


def _triton_reason(device_index: int) -> str:
    reason = _triton_status.get(device_index)
    if reason is None:
        reason = _triton_status[device_index] = probe_triton(device_index)
    return reason


def is_triton_compile_error(exc: BaseException) -> bool:
    """Whether ``exc`` says Triton could not compile a kernel for the device (not a bug in the call):
    a ``triton.errors.TritonError`` (compilation, out of resources, ptxas), or any error raised from
    Triton's compiler (its MLIR passes raise plain ``RuntimeError``)."""
    try:
        from triton.errors import TritonError
    except Exception:
        TritonError = ()  # noqa: N806
    if TritonError and isinstance(exc, TritonError):
        return True
    tb = exc.__traceback__
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename.replace("\\", "/")
        if "/triton/compiler/" in path or ("/triton/backends/" in path and path.endswith("compiler.py")):
            return True
        tb = tb.tb_next
    return False


def mark_triton_failed(device: torch.device, exc: BaseException) -> None:
    """Record that Triton cannot compile for ``device`` (``auto`` then runs the CUDA backend there)."""
    _triton_status[device.index or 0] = f"a Triton kernel failed to compile ({type(exc).__name__}: {exc})"


def resolve_backend(device: torch.device) -> str:
    """The implementation that runs an op on ``device``: ``triton``, ``cuda`` or ``reference``.

    Raises ``RuntimeError`` when the chosen backend cannot run there (``cuda`` without CuPy; ``auto``
    on a GPU where neither Triton nor the CUDA backend can run).
    """
    backend = _state["backend"]
    if backend == "reference":
        return "reference"
    if backend == "triton":
        return "triton"
    if device.type != "cuda":
        return "reference"
    if backend == "cuda":
        ok, reason = _cuda_available()
        if not ok:
            raise _cuda_unavailable_error(reason)
        return "cuda"
    triton_reason = _triton_reason(device.index or 0)
    if not triton_reason:
        return "triton"
    ok, cuda_reason = _cuda_available()
    if not ok:
        raise RuntimeError(f"pagedattn: no backend can run on {device}: {triton_reason}; and the CUDA backend: "
                           f"{cuda_reason}. Install CuPy (pip install 'pagedattn[cuda]') or set "
                           f"PAGEDATTN_BACKEND=reference (slow)")
    if not _fallback_warned[0]:
        _fallback_warned[0] = True
        logger.warning("pagedattn: %s on %s; the ops run on the CUDA backend (CuPy kernels) there instead",
                       triton_reason, device)
    return "cuda"

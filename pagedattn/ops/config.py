"""Process-wide op settings: which backend runs on CUDA tensors, and validation mode.

Both are read once from the environment at import and can be changed at run time:

- ``PAGEDATTN_BACKEND``: ``auto`` (default: Triton on CUDA tensors, the PyTorch reference on
  CPU tensors), ``triton`` (Triton everywhere; CPU tensors need ``TRITON_INTERPRET=1``) or
  ``reference`` (the plain-PyTorch reference on every device).
- ``PAGEDATTN_VALIDATE``: ``1`` turns on validation mode, in which every op checks the *values*
  of its index tensors (block ids, sequence lengths, slots) and raises ``ValueError`` on the first
  bad one. This synchronizes with the device, so it is meant for debugging. Without it, bad
  values are masked: no op reads or writes outside its tensors, whatever it is given.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "triton", "reference")


def _env_backend() -> str:
    value = os.environ.get("PAGEDATTN_BACKEND", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"PAGEDATTN_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_state = {"backend": _env_backend(), "validate": _env_flag("PAGEDATTN_VALIDATE")}


def set_backend(backend: str) -> None:
    """Choose the backend for all ops (``auto``, ``triton`` or ``reference``)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _state["backend"] = backend


def get_backend() -> str:
    return _state["backend"]


def set_validation(enabled: bool) -> None:
    """Turn validation mode on or off for every op (see the module docstring)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _state["validate"] = enabled


def validation_enabled() -> bool:
    return _state["validate"]


def use_triton(device) -> bool:
    """Whether an op on ``device`` runs its Triton kernel (else the PyTorch reference)."""
    backend = _state["backend"]
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    return device.type == "cuda"

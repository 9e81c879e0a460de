"""Paged KV-cache ops, registered as ``torch.ops.pagedattn.*``.

See :mod:`pagedattn.ops.api` for the cache layout and each op's arguments.
"""

from pagedattn.ops.api import (
    DEFAULT_LAYOUT,
    LAYOUTS,
    allocate_kv_cache,
    copy_blocks,
    paged_decode_attention,
    paged_prefill_attention,
    reshape_and_cache,
    swap_blocks,
)
from pagedattn.ops.checks import SUPPORTED_BLOCK_SIZES, SUPPORTED_DTYPES, SUPPORTED_HEAD_SIZES
from pagedattn.ops.config import BACKENDS, get_backend, resolve_backend, set_backend, set_validation, validation_enabled

__all__ = [
    "BACKENDS",
    "DEFAULT_LAYOUT",
    "LAYOUTS",
    "SUPPORTED_BLOCK_SIZES",
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_SIZES",
    "allocate_kv_cache",
    "copy_blocks",
    "get_backend",
    "paged_decode_attention",
    "paged_prefill_attention",
    "reshape_and_cache",
    "resolve_backend",
    "set_backend",
    "set_validation",
    "swap_blocks",
    "validation_enabled",
]

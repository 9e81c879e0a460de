"""Host-side argument checks shared by every op.

Everything here reads only tensor metadata (shape, dtype, device, strides), so it never
synchronizes with the device and runs unchanged on fake tensors under ``torch.compile``.
A failed check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong shape,
size, device, layout or value), naming the argument and what was expected.

Value checks that need the tensors' contents (block ids, lengths, slots) live in
:mod:`pagedattn.ops.validation` and run only in validation mode.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

#: Head sizes the attention kernels are built and tested for.
SUPPORTED_HEAD_SIZES = (64, 80, 96, 112, 128, 192, 256)
#: Cache block sizes (tokens per block): every power of two from 1 to 256.
SUPPORTED_BLOCK_SIZES = tuple(2**i for i in range(9))
#: Element types of queries, keys, values and caches.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, value, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> torch.Tensor:
    """Check that ``value`` is a tensor of the given rank and one of the given dtypes."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {expected}, got {str(value.dtype).replace('torch.', '')}")
    return value


def check_shape(name: str, tensor: torch.Tensor, expected: Sequence[int], what: str) -> None:
    """Check an exact shape; ``what`` spells the expected dims, e.g. ``[num_seqs, num_heads]``."""
    if tuple(tensor.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {what} = {tuple(expected)}, got {tuple(tensor.shape)}")


def check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {tensor.device}")


def check_same_dtype(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.dtype != ref.dtype:
        raise TypeError(f"{name} must have the same dtype as {ref_name} "
                        f"({str(ref.dtype).replace('torch.', '')}), got {str(tensor.dtype).replace('torch.', '')}")


def check_last_dim_contiguous(name: str, tensor: torch.Tensor) -> None:
    if tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {tensor.stride()}")


def check_contiguous(name: str, tensor: torch.Tensor) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()} for shape {tuple(tensor.shape)}")


def check_float(name: str, value, *, minimum: Optional[float] = None, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_int(name: str, value, *, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_kv_cache(key_cache, value_cache) -> tuple[int, int, int, int]:
    """Check a pair of paged caches and return ``(num_blocks, block_size, num_kv_heads, head_size)``.

    Both caches have the logical shape ``[num_blocks, block_size, num_kv_heads, head_size]`` with
    any strides as long as ``head_size`` is the innermost (stride 1) dimension; the same shape,
    dtype and device for keys and values.
    """
    check_tensor("key_cache", key_cache, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_tensor("value_cache", value_cache, ndim=4, dtypes=SUPPORTED_DTYPES)
    check_same_dtype("value_cache", value_cache, "key_cache", key_cache)
    check_same_device("value_cache", value_cache, "key_cache", key_cache)
    if value_cache.shape != key_cache.shape:
        raise ValueError(f"value_cache must have the same shape as key_cache {tuple(key_cache.shape)} "
                         f"[num_blocks, block_size, num_kv_heads, head_size], got {tuple(value_cache.shape)}")
    num_blocks, block_size, num_kv_heads, head_size = key_cache.shape
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"key_cache block_size (dim 1) must be a power of two from 1 to 256, got {block_size}")
    if num_blocks < 1 or num_kv_heads < 1:
        raise ValueError(f"key_cache must have at least one block and one KV head, got shape {tuple(key_cache.shape)}")
    check_last_dim_contiguous("key_cache", key_cache)
    check_last_dim_contiguous("value_cache", value_cache)
    return num_blocks, block_size, num_kv_heads, head_size


def check_attention_head_size(head_size: int) -> None:
    if head_size not in SUPPORTED_HEAD_SIZES:
        raise ValueError(f"head_size must be one of {SUPPORTED_HEAD_SIZES}, got {head_size}")


def check_heads(num_heads: int, num_kv_heads: int) -> None:
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"query num_heads ({num_heads}) must be a multiple of the cache's "
                         f"num_kv_heads ({num_kv_heads})")


def check_block_dense(name: str, cache: torch.Tensor) -> None:
    """Check that every block of ``cache`` is one dense run of memory (any order inside a block)."""
    inner = sorted((cache.stride(i), cache.shape[i]) for i in (1, 2, 3) if cache.shape[i] > 1)
    expected = 1
    for stride, size in inner:
        if stride != expected:
            raise ValueError(f"{name} must store each block densely (its inner dims a permutation of a "
                             f"contiguous block), got strides {cache.stride()} for shape {tuple(cache.shape)}")
        expected *= size
    if cache.shape[0] > 1 and cache.stride(0) != expected:
        raise ValueError(f"{name} must store blocks densely (stride of dim 0 = block numel {expected}), "
                         f"got strides {cache.stride()}")

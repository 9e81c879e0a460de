"""A model's paged KV caches: one key and one value cache per layer on the device, and optional
CPU caches of the same block shape to swap blocks out to."""

from __future__ import annotations

from typing import Sequence, Union

import torch

from pagedattn.ops import DEFAULT_LAYOUT, allocate_kv_cache, copy_blocks, swap_blocks

from .models import KVCacheSpec


def kv_cache_bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, keys and values."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * element_size


def _pairs_tensor(pairs: Sequence[tuple[int, int]], device) -> torch.Tensor:
    """[num_pairs, 2] int64 (src, dst) on ``device``."""
    on_gpu = torch.device(device).type != "cpu"
    # (pinned: a copy from pageable memory would wait for the device's queue to drain)
    mapping = torch.tensor([list(p) for p in pairs], dtype=torch.int64, pin_memory=on_gpu).reshape(-1, 2)
    return mapping.to(device, non_blocking=True) if on_gpu else mapping


class PagedKVCache:
    """Device caches (``num_blocks`` blocks per layer) and CPU swap caches (``num_cpu_blocks``).

    Attributes:
        device_caches: per layer ``(key_cache, value_cache)``, each of logical shape
            ``[num_blocks, block_size, num_kv_heads, head_dim]`` in ``dtype`` on ``device``.
        cpu_caches: the same for the CPU pool (pinned when ``device`` is CUDA); empty when
            ``num_cpu_blocks`` is 0.
    """

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: Union[str, torch.device], num_cpu_blocks: int = 0, layout: str = DEFAULT_LAYOUT):
        self.spec = spec
        self.num_blocks = num_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.device_caches = [allocate_kv_cache(num_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                                                dtype, self.device, layout) for _ in range(spec.num_layers)]
        pin = self.device.type == "cuda"
        self.cpu_caches = [allocate_kv_cache(num_cpu_blocks, block_size, spec.num_kv_heads, spec.head_dim,
                                             dtype, "cpu", layout, pin_memory=pin)
                           for _ in range(spec.num_layers)] if num_cpu_blocks > 0 else []

    @property
    def bytes_per_block(self) -> int:
        return kv_cache_bytes_per_block(self.spec, self.block_size, self.dtype)

    def copy_blocks(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy device blocks ``src -> dst`` in every layer's key and value caches, in one launch.

        Destinations must be distinct and not also sources (pairs run in no order).
        """
        if not pairs:
            return
        mapping = _pairs_tensor(pairs, self.device)
        copy_blocks([k for k, _ in self.device_caches], [v for _, v in self.device_caches], mapping)

    def swap_out(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy ``(device_block, cpu_block)`` pairs device -> CPU in every layer.

        Asynchronous on the current stream (pinned CPU caches): device work queued later on the
        stream (e.g. the next step overwriting the freed device blocks) is ordered after it;
        synchronize before the host reads the CPU blocks.
        """
        self._swap(pairs, out=True)

    def swap_in(self, pairs: Sequence[tuple[int, int]]) -> None:
        """Copy ``(cpu_block, device_block)`` pairs CPU -> device in every layer (asynchronous, as
        :meth:`swap_out`)."""
        self._swap(pairs, out=False)

    def _swap(self, pairs: Sequence[tuple[int, int]], out: bool) -> None:
        if not pairs:
            return
        if not self.cpu_caches:
            raise RuntimeError("no CPU swap space: create the runner with num_cpu_blocks > 0")
        mapping = _pairs_tensor(pairs, "cpu")
        for (dk, dv), (ck, cv) in zip(self.device_caches, self.cpu_caches):
            if out:
                swap_blocks(dk, ck, mapping)
                swap_blocks(dv, cv, mapping)
            else:
                swap_blocks(ck, dk, mapping)
                swap_blocks(cv, dv, mapping)

"""Device tables of cache data pointers, for the copy_blocks kernels of every backend."""

from __future__ import annotations

import torch

_POINTER_TABLES: dict[tuple, torch.Tensor] = {}


def cache_pointer_table(caches: list[torch.Tensor]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """A device tensor of the caches' data pointers (uint64 stored as int64) and the pointers.

    Built once per set of caches and reused, so ``copy_blocks`` uploads nothing after the first call
    and can then be captured in a CUDA graph.

    Raises:
        RuntimeError: the table does not exist yet and the current stream is capturing a graph.
    """
    key = (caches[0].device, tuple(c.data_ptr() for c in caches))
    table = _POINTER_TABLES.get(key)
    if table is None:
        if caches[0].device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("copy_blocks: call it once with these caches before capturing it in a CUDA graph "
                               "(its table of cache pointers must be uploaded outside capture)")
        if len(_POINTER_TABLES) >= 64:
            _POINTER_TABLES.pop(next(iter(_POINTER_TABLES)))
        table = torch.tensor(key[1], dtype=torch.int64, device=caches[0].device)
        _POINTER_TABLES[key] = table
    return table, key[1]

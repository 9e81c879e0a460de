"""The per-step forward context read by every attention layer (plan once, run in every layer).

The runner builds one :class:`PagedForwardContext` per model step (slot mapping, block tables,
lengths, the caches) and enters :func:`forward_context` around the model's forward; each
attention layer reads it with :func:`get_forward_context` instead of receiving it through the
model's arguments, which transformers' modeling code would not pass along.

The context is a plain module-level variable (not a ``contextvars.ContextVar``) so that
``torch.compile`` can trace the attention function without a graph break; one forward runs at a
time per process, as with vLLM's forward context.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch


@dataclass
class PagedForwardContext:
    """Metadata of one packed batch (``S`` sequences, ``T`` new tokens in all), shared by every layer.

    Attributes:
        slot_mapping: [T] int64, cache slot ``block_id * block_size + offset`` of each new token
            (negative: padding, not written).
        block_tables: [S, max_blocks_per_seq] int32 block ids of each sequence.
        seq_lens: [S] int32 context length of each sequence after this step (new tokens included).
        cu_seqlens_q: [S + 1] int32 cumulative new-token counts (0 first, ``T`` last).
        max_query_len: the most new tokens of any sequence in this step (a tiling hint).
        kv_caches: one ``(key_cache, value_cache)`` per layer, indexed by the attention module's
            ``layer_idx``; each ``[num_blocks, block_size, num_kv_heads, head_dim]`` (logical shape).
            None: each attention module reads the caches bound to it
            (:func:`~pagedattn.integrations.hf.attention.bound_kv_caches`; compiled blocks need that).
        calls: when not None, each attention call appends
            ``(layer_idx, num_heads, num_kv_heads, head_dim)`` here (used to probe a model).
    """

    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_query_len: int
    kv_caches: Optional[list[tuple[torch.Tensor, torch.Tensor]]]
    calls: Optional[list[tuple[int, int, int, int]]] = field(default=None)

    @property
    def num_tokens(self) -> int:
        """``T``, the packed new tokens of this step."""
        return self.slot_mapping.shape[0]


_CURRENT: Optional[PagedForwardContext] = None


def get_forward_context() -> PagedForwardContext:
    """The context of the step being run; raises ``RuntimeError`` outside :func:`forward_context`."""
    if _CURRENT is None:
        raise RuntimeError(
            "pagedattn attention was called outside a forward context: run the model through "
            "pagedattn.integrations.hf.ModelRunner, or wrap the forward in "
            "`with forward_context(PagedForwardContext(...)):`")
    return _CURRENT


def has_forward_context() -> bool:
    """Whether a step's context is set."""
    return _CURRENT is not None


@contextlib.contextmanager
def forward_context(ctx: PagedForwardContext) -> Iterator[PagedForwardContext]:
    """Make ``ctx`` the current step's context for the duration of the block (nesting restores)."""
    global _CURRENT
    previous = _CURRENT
    _CURRENT = ctx
    try:
        yield ctx
    finally:
        _CURRENT = previous

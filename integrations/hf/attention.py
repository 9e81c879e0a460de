"""The ``"pagedattn"`` attention implementation for transformers' ``AttentionInterface``.

A model loaded with ``attn_implementation="pagedattn"`` calls :func:`paged_attention_forward` in
every attention layer with that layer's new queries, keys and values. The function writes the new
keys and values into the layer's paged caches (``reshape_and_cache``) and attends each new token
over its sequence's whole paged context (``paged_prefill_attention``, which serves prefill,
chunked prefill and decode rows in one call). The step's metadata comes from the forward context
(:mod:`.context`), set once per step by the runner.

Batch convention: the model runs on ONE packed row, ``input_ids`` ``[1, T]`` holding every
sequence's new tokens back to back and ``position_ids`` ``[1, T]`` their positions within their
own sequences. Since ``"pagedattn"`` has no entry in ``AttentionMaskInterface``, transformers'
``create_causal_mask`` / ``create_sliding_window_causal_mask`` return ``None`` at once (the
"custom attention without a mask" early exit) and no dense ``[T, T]`` mask is ever built; the
causal structure, sequence boundaries and sliding windows come from the paged metadata.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator, Optional

import torch

from pagedattn.ops import paged_prefill_attention, reshape_and_cache

from .context import get_forward_context

#: The name to pass as ``attn_implementation``.
ATTN_IMPLEMENTATION = "pagedattn"

#: The attributes that hold an attention module's caches while they are bound (:func:`bound_kv_caches`).
KEY_CACHE_ATTR, VALUE_CACHE_ATTR = "pagedattn_key_cache", "pagedattn_value_cache"

_UNSET = object()


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    sliding_window=_UNSET,
    softcap: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Paged attention with the ``AttentionInterface`` signature.

    Args:
        module: the calling attention module; its ``layer_idx`` picks the layer's caches (or the
            caches bound to it, when the context's ``kv_caches`` is None: :func:`bound_kv_caches`).
        query: [1, num_heads, T, head_dim], the model's dtype (after rotary embedding, if any).
        key, value: [1, num_kv_heads, T, head_dim], the new tokens' keys and values (the
            model's own cache is unused: call the model with ``use_cache=False``).
        attention_mask: must be None (the paged metadata carries the mask).
        dropout: must be 0 (inference only).
        scaling: softmax scale (None: ``head_dim ** -0.5``). OPT passes 1.0 with pre-scaled queries.
        sliding_window: attend to keys in ``(p - sliding_window, p]`` for a query at position ``p``,
            as transformers' ``sliding_window_overlay``; when not passed, ``module.sliding_window``
            is used if the module has one. None or 0: no window.
        softcap: logits soft-cap (``score = c * tanh(score / c)``), None: off.
        is_causal: must not be False (no bidirectional or cross attention).

    Returns:
        ``(out, None)``: ``out`` [1, T, num_heads, head_dim] in the query's dtype (the layout that
        transformers' SDPA and flash implementations return); no attention weights.
    """
    ctx = get_forward_context()
    if query.dim() != 4 or query.shape[0] != 1:
        raise ValueError(f"pagedattn expects one packed batch row, query [1, num_heads, T, head_dim]; "
                         f"got shape {tuple(query.shape)}")
    if attention_mask is not None:
        raise ValueError(f"{type(module).__name__} passed a dense attention_mask of shape "
                         f"{tuple(attention_mask.shape)}; pagedattn takes causality and sequence "
                         "boundaries from the paged metadata and cannot apply a custom mask")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        raise ValueError(f"{type(module).__name__} is not causal self-attention; pagedattn serves "
                         "decoder-only causal models")
    if dropout and module.training:
        raise ValueError("pagedattn attention is inference-only: dropout must be 0 (call model.eval())")
    key_cache, value_cache = _layer_caches(module, ctx)

    # [1, H, T, D] -> [T, H, D] views (strided; the ops need only the last dim contiguous).
    q = query[0].transpose(0, 1)
    k = key[0].transpose(0, 1)
    v = value[0].transpose(0, 1)
    if ctx.calls is not None:
        ctx.calls.append((module.layer_idx, q.shape[1], k.shape[1], q.shape[2]))
    if v.shape[-1] != q.shape[-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"pagedattn needs one head_dim for queries, keys and values; got "
                         f"{q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()

    if sliding_window is _UNSET:
        sliding_window = getattr(module, "sliding_window", None)
    reshape_and_cache(k, v, key_cache, value_cache, ctx.slot_mapping)
    out = torch.empty((q.shape[0], q.shape[1], q.shape[2]), dtype=q.dtype, device=q.device)
    paged_prefill_attention(
        q, key_cache, value_cache, ctx.block_tables, ctx.seq_lens, ctx.cu_seqlens_q,
        max_query_len=ctx.max_query_len, scale=scaling, sliding_window=sliding_window or None,
        softcap=softcap or None, out=out)
    return out.unsqueeze(0), None


def _layer_caches(module: torch.nn.Module, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """The calling layer's ``(key_cache, value_cache)``: bound to the module when ``ctx.kv_caches``
    is None, else ``ctx.kv_caches[module.layer_idx]``."""
    if ctx.kv_caches is None:
        key_cache = getattr(module, KEY_CACHE_ATTR, None)
        value_cache = getattr(module, VALUE_CACHE_ATTR, None)
        if key_cache is None or value_cache is None:
            raise RuntimeError(f"the forward context has kv_caches=None but no caches are bound to "
                               f"{type(module).__name__}: run the forward inside bound_kv_caches(model, caches)")
        return key_cache, value_cache
    layer_idx = getattr(module, "layer_idx", None)
    if not isinstance(layer_idx, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx (got {layer_idx!r}); "
                           "pagedattn needs it to pick the layer's KV cache")
    if layer_idx < 0 or layer_idx >= len(ctx.kv_caches):
        raise IndexError(f"layer_idx {layer_idx} of {type(module).__name__} is outside the "
                         f"{len(ctx.kv_caches)} layers' KV caches")
    return ctx.kv_caches[layer_idx]


def is_attention_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers attention layer (its class name ends in ``Attention``)."""
    return re.search(r"Attention$", type(module).__name__) is not None


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's attention modules with an integer ``layer_idx``, in module order."""
    return [m for m in model.modules()
            if is_attention_module(m) and isinstance(getattr(m, "layer_idx", None), int)]


@contextlib.contextmanager
def bound_kv_caches(model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Attach each layer's caches to its attention module for the duration of the block.

    A forward whose context has ``kv_caches=None`` reads its caches from the modules. Compiled
    decoder blocks need this: a cache picked from a list by ``module.layer_idx`` makes
    ``torch.compile`` specialise on that integer and trace every block again (22 traces for a
    22-block model), while tensors held by the module are graph inputs, so one trace serves every
    block of the same class and attributes.

    Args:
        model: the transformers model; its attention modules' ``layer_idx`` must be exactly
            ``0 .. len(kv_caches) - 1``, one module each.
        kv_caches: per layer ``(key_cache, value_cache)``.

    Raises:
        ValueError: the modules' ``layer_idx`` do not match the caches one to one.
    """
    modules = attention_modules(model)
    indices = sorted(m.layer_idx for m in modules)
    if indices != list(range(len(kv_caches))):
        raise ValueError(f"cannot bind {len(kv_caches)} layers' caches to attention modules with "
                         f"layer_idx {indices}")
    for module in modules:
        key_cache, value_cache = kv_caches[module.layer_idx]
        setattr(module, KEY_CACHE_ATTR, key_cache)
        setattr(module, VALUE_CACHE_ATTR, value_cache)
    try:
        yield
    finally:
        for module in modules:
            for name in (KEY_CACHE_ATTR, VALUE_CACHE_ATTR):
                if name in module.__dict__:
                    delattr(module, name)


def register() -> str:
    """Register :func:`paged_attention_forward` as ``attn_implementation="pagedattn"``.

    Idempotent. No ``AttentionMaskInterface`` entry is registered on purpose: an implementation
    absent from it makes transformers' mask builders return None without building anything
    (see the module docstring). Returns the implementation's name.
    """
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    return ATTN_IMPLEMENTATION

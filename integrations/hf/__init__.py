"""Hugging Face transformers integration: ``attn_implementation="pagedattn"`` and a model runner.

Importing this package registers the ``"pagedattn"`` attention implementation with transformers
(:func:`register` does it again, idempotently)::

    from pagedattn.integrations.hf import ModelRunner, make_step_input

    runner = ModelRunner("path/to/checkpoint", num_gpu_blocks=1024, block_size=16)
    step = make_step_input([[1, 2, 3], [4, 5]], num_computed=[0, 0], block_tables=[[0], [1]],
                           block_size=16, device=runner.device)
    logits = runner.execute(step)          # [2, vocab_size] float32

Modules: :mod:`.attention` (the attention function), :mod:`.context` (the per-step forward
context), :mod:`.models` (what can be served, cache geometry), :mod:`.kv_cache` (the cache pools),
:mod:`.step` (a step's input), :mod:`.runner` (loading and running).
"""

from .attention import ATTN_IMPLEMENTATION, bound_kv_caches, paged_attention_forward, register
from .context import PagedForwardContext, forward_context, get_forward_context, has_forward_context
from .kv_cache import PagedKVCache, kv_cache_bytes_per_block
from .models import (
    KVCacheSpec,
    UnsupportedModelError,
    check_config_supported,
    check_model_supported,
    kv_cache_spec,
)
from .runner import ModelRunner, load_model
from .step import StepInput, make_step_input

register()

__all__ = [
    "ATTN_IMPLEMENTATION",
    "KVCacheSpec",
    "ModelRunner",
    "PagedForwardContext",
    "PagedKVCache",
    "StepInput",
    "UnsupportedModelError",
    "bound_kv_caches",
    "check_config_supported",
    "check_model_supported",
    "forward_context",
    "get_forward_context",
    "has_forward_context",
    "kv_cache_bytes_per_block",
    "kv_cache_spec",
    "load_model",
    "make_step_input",
    "paged_attention_forward",
    "register",
]

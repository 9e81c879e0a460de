"""Which transformers models pagedattn can serve, and the KV-cache geometry of those it can.

:func:`check_config_supported` rejects what the config alone rules out (before any weights are
loaded); :func:`check_model_supported` adds checks on the instantiated model and a probe: one
2-token forward through the ``"pagedattn"`` implementation on a scratch cache, which proves that
every layer's attention goes through transformers' ``AttentionInterface`` exactly once, with
the ``layer_idx`` and head geometry that the config announces. Both raise
:class:`UnsupportedModelError`, naming the architecture and the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagedattn.ops import SUPPORTED_HEAD_SIZES, allocate_kv_cache

from .attention import ATTN_IMPLEMENTATION, is_attention_module
from .context import PagedForwardContext, forward_context

#: Layer types (``config.layer_types``) that the paged attention serves.
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")
#: Model types whose position information is an ALiBi bias, which transformers does not pass to
#: attention implementations.
ALIBI_MODEL_TYPES = ("bloom", "mpt")


class UnsupportedModelError(ValueError):
    """A model pagedattn cannot serve; ``architecture`` names it and ``reason`` says why."""

    def __init__(self, architecture: str, reason: str):
        self.architecture = architecture
        self.reason = reason
        super().__init__(f"pagedattn cannot serve {architecture}: {reason}")


@dataclass(frozen=True)
class KVCacheSpec:
    """The KV-cache geometry of a model: one ``[num_blocks, block_size, num_kv_heads, head_dim]``
    key cache and value cache per layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int


def architecture_name(config_or_model) -> str:
    """``"LlamaForCausalLM"`` for a model; for a config, its first architecture (or the class
    transformers maps its ``model_type`` to) and its ``model_type``."""
    if isinstance(config_or_model, torch.nn.Module):
        return type(config_or_model).__name__
    config = config_or_model
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None)
    if archs:
        name = archs[0]
    else:  # a bare config: name the class transformers would build for it
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        )
        name = (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
                or MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES.get(model_type) or type(config).__name__)
    return f"{name} (model_type {model_type!r})"


def kv_cache_spec(config, architecture: str | None = None) -> KVCacheSpec:
    """Read the layer count and head geometry from a config.

    ``head_dim`` is ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``;
    ``num_kv_heads`` is ``config.num_key_value_heads`` when set, else ``num_attention_heads``
    (GPT-2's ``n_layer`` / ``n_head`` / ``n_embd`` reach these names through its attribute map).
    """
    arch = architecture or architecture_name(config)
    try:
        num_layers = int(config.num_hidden_layers)
        num_heads = int(config.num_attention_heads)
    except AttributeError as e:
        raise UnsupportedModelError(arch, f"its config has no layer count or head count ({e})") from None
    head_dim = getattr(config, "head_dim", None)
    if not head_dim:
        head_dim = int(config.hidden_size) // num_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    return KVCacheSpec(num_layers, num_heads, int(num_kv_heads), int(head_dim))


def check_config_supported(config, architecture: str | None = None) -> KVCacheSpec:
    """Raise :class:`UnsupportedModelError` for what the config rules out; return the cache geometry."""
    arch = architecture or architecture_name(config)
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(arch, "encoder-decoder models are not supported (pagedattn serves "
                                          "decoder-only causal language models)")
    if getattr(config, "add_cross_attention", False):
        raise UnsupportedModelError(arch, "cross-attention layers are not supported")
    if getattr(config, "is_causal", True) is False:
        raise UnsupportedModelError(arch, "bidirectional (non-causal) attention is not supported")
    if getattr(config, "model_type", None) in ALIBI_MODEL_TYPES or getattr(config, "alibi", False):
        raise UnsupportedModelError(arch, "ALiBi position biases are not passed to attention implementations "
                                          "by transformers")
    layer_types = getattr(config, "layer_types", None) or []
    unsupported = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if unsupported:
        raise UnsupportedModelError(arch, f"layer types {unsupported} are not supported (only "
                                          f"{list(SUPPORTED_LAYER_TYPES)})")
    spec = kv_cache_spec(config, arch)
    if spec.head_dim not in SUPPORTED_HEAD_SIZES:
        raise UnsupportedModelError(arch, f"head_dim {spec.head_dim} is not supported (supported: "
                                          f"{list(SUPPORTED_HEAD_SIZES)})")
    if spec.num_kv_heads < 1 or spec.num_heads % spec.num_kv_heads:
        raise UnsupportedModelError(arch, f"{spec.num_heads} query heads are not a multiple of "
                                          f"{spec.num_kv_heads} key/value heads")
    return spec


def check_model_supported(model: torch.nn.Module, probe: bool = True) -> KVCacheSpec:
    """Raise :class:`UnsupportedModelError` if ``model`` cannot be served; return its cache geometry.

    Checks the config (:func:`check_config_supported`), that the model's attention dispatches
    through ``AttentionInterface``, that its attention modules carry an integer ``layer_idx`` and,
    when ``probe``, runs one 2-token forward (see the module docstring). The probe needs the model
    set to ``attn_implementation="pagedattn"`` (a ``ValueError`` says so otherwise).
    """
    arch = architecture_name(model)
    config = getattr(model, "config", None)
    if config is None:
        raise UnsupportedModelError(arch, "it is not a transformers PreTrainedModel (no config)")
    spec = check_config_supported(config, arch)
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is None or not can_set():
        raise UnsupportedModelError(arch, "its attention layers do not dispatch through transformers' "
                                          "AttentionInterface")
    for name, module in model.named_modules():
        if is_attention_module(module) and not isinstance(getattr(module, "layer_idx", None), int):
            raise UnsupportedModelError(arch, f"attention module {name} ({type(module).__name__}) has no "
                                              "integer layer_idx to pick its KV cache")
    if probe:
        _probe(model, spec, arch)
    return spec


def _probe(model: torch.nn.Module, spec: KVCacheSpec, arch: str) -> None:
    """Run 2 tokens through the model on a 1-block scratch cache and check the attention calls."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != ATTN_IMPLEMENTATION:
        raise ValueError(f"{arch} uses attn_implementation={impl!r}; call "
                         f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) first")
    param = next(model.parameters())
    device, dtype = param.device, model.dtype
    n = 2
    caches = [allocate_kv_cache(1, 16, spec.num_kv_heads, spec.head_dim, dtype, device)
              for _ in range(spec.num_layers)]
    ctx = PagedForwardContext(
        slot_mapping=torch.arange(n, dtype=torch.int64, device=device),
        block_tables=torch.zeros((1, 1), dtype=torch.int32, device=device),
        seq_lens=torch.tensor([n], dtype=torch.int32, device=device),
        cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=device),
        max_query_len=n, kv_caches=caches, calls=[])
    try:
        with torch.inference_mode(), forward_context(ctx):
            model(input_ids=torch.zeros((1, n), dtype=torch.int64, device=device),
                  position_ids=torch.arange(n, device=device)[None], use_cache=False)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, RuntimeError, IndexError, TypeError) as e:
        _check_calls(ctx.calls, spec, arch)
        raise UnsupportedModelError(arch, f"a test forward through pagedattn attention failed: {e}") from e
    _check_calls(ctx.calls, spec, arch)
    layers = [c[0] for c in ctx.calls]
    if sorted(layers) != list(range(spec.num_layers)):
        raise UnsupportedModelError(arch, f"expected one pagedattn attention call per layer 0..{spec.num_layers - 1}, "
                                          f"saw layer_idx {layers}")


def _check_calls(calls, spec: KVCacheSpec, arch: str) -> None:
    if not calls:
        raise UnsupportedModelError(arch, "its attention does not go through transformers' AttentionInterface "
                                          "(a test forward made no pagedattn attention call)")
    for layer_idx, num_heads, num_kv_heads, head_dim in calls:
        if (num_heads, num_kv_heads, head_dim) != (spec.num_heads, spec.num_kv_heads, spec.head_dim):
            raise UnsupportedModelError(
                arch, f"layer {layer_idx} attends with {num_heads} heads, {num_kv_heads} KV heads, head_dim "
                      f"{head_dim}; its config announces {spec.num_heads}, {spec.num_kv_heads}, {spec.head_dim}")

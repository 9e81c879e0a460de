"""Registration and the checks that reject models pagedattn cannot serve."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from pagedattn.integrations.hf import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    ModelRunner,
    UnsupportedModelError,
    check_config_supported,
    check_model_supported,
    kv_cache_spec,
    register,
)

from .hf_models import CONFIGS  # noqa: E402


def test_import_registers_attention_and_no_mask_function():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

    assert register() == ATTN_IMPLEMENTATION == "pagedattn"
    assert ATTN_IMPLEMENTATION in AttentionInterface()
    # Absent from the mask interface, so transformers' mask builders return None without work.
    assert ATTN_IMPLEMENTATION not in ALL_MASK_ATTENTION_FUNCTIONS
    config = CONFIGS["llama"]()
    config._attn_implementation = ATTN_IMPLEMENTATION
    embeds = torch.zeros(1, 5, config.hidden_size)
    positions = torch.tensor([[0, 1, 2, 0, 1]])  # two packed sequences
    assert create_causal_mask(config, embeds, None, None, position_ids=positions) is None


@pytest.mark.parametrize("name,expected", [
    ("llama", (2, 4, 2, 64)), ("mistral", (2, 4, 1, 64)), ("qwen2", (2, 2, 1, 64)),
    ("qwen3", (2, 4, 2, 64)), ("gpt2", (2, 2, 2, 64)), ("opt", (2, 2, 2, 64)),
])
def test_kv_cache_spec_from_config(name, expected):
    spec = kv_cache_spec(CONFIGS[name]())
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == expected


def test_unsupported_head_dim_fails_at_load_naming_the_architecture(tmp_path):
    config = CONFIGS["llama"]()
    config.head_dim = 72
    config.save_pretrained(tmp_path)  # the config alone: rejected before any weights are read
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*head_dim 72") as info:
        ModelRunner(str(tmp_path), num_gpu_blocks=4, device="cpu")
    assert info.value.architecture.startswith("LlamaForCausalLM")


def test_encoder_decoder_fails_at_load_naming_the_architecture(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=128, d_model=128, d_kv=64, num_heads=2, d_ff=256, num_layers=1,
                      num_decoder_layers=1)
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"T5ForConditionalGeneration.*encoder-decoder"):
        ModelRunner(str(tmp_path), num_gpu_blocks=4, device="cpu")
    with pytest.raises(UnsupportedModelError, match=r"T5ForConditionalGeneration.*encoder-decoder"):
        check_model_supported(T5ForConditionalGeneration(config))


def test_other_config_rejections():
    config = CONFIGS["llama"]()
    config.num_key_value_heads = 3
    with pytest.raises(UnsupportedModelError, match="multiple"):
        check_config_supported(config)
    config = CONFIGS["qwen2"]()
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="linear_attention"):
        check_config_supported(config)


def _tiny_llama():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS["llama"](), dtype=torch.float32)


def test_attention_bypassing_the_interface_fails_the_probe():
    model = _tiny_llama()
    for layer in model.model.layers:  # attention that never calls AttentionInterface
        layer.self_attn.forward = lambda hidden_states, **kwargs: (torch.zeros_like(hidden_states), None)
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*AttentionInterface"):
        ModelRunner(model, num_gpu_blocks=4, device="cpu")


def test_attention_without_layer_idx_fails():
    model = _tiny_llama()
    model.model.layers[1].self_attn.layer_idx = None
    with pytest.raises(UnsupportedModelError, match=r"LlamaForCausalLM.*layer_idx"):
        ModelRunner(model, num_gpu_blocks=4, device="cpu")


def test_attention_outside_a_step_raises():
    model = _tiny_llama()
    ModelRunner(model, num_gpu_blocks=4, device="cpu")  # switches the model to pagedattn
    with pytest.raises(RuntimeError, match="forward context"):
        model(torch.tensor([[1, 2]]), use_cache=False)

"""Tiny real transformers architectures with random weights, saved and loaded back from disk.

Each config is the real architecture at toy size (2 layers, head_dim 64, vocab 512, GQA where the
architecture has it). Weights come from the model's own initializer under a fixed seed, with a
wide ``initializer_range`` so that logits are spread out and greedy argmaxes are not near-ties.
No special tokens are set, so generation always runs to its length.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

VOCAB = 512
MAX_POSITIONS = 256
SEED = 1234
INIT_RANGE = 0.2
SLIDING_WINDOW = 8
NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _llama():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
                       tie_word_embeddings=False, **NO_SPECIAL_TOKENS)


def _mistral():
    from transformers import MistralConfig
    return MistralConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                         sliding_window=SLIDING_WINDOW, max_position_embeddings=MAX_POSITIONS,
                         initializer_range=INIT_RANGE, tie_word_embeddings=False, **NO_SPECIAL_TOKENS)


def _qwen2():
    # Layer 0 full attention, layer 1 sliding window (max_window_layers=1): per-layer windows.
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, use_sliding_window=True,
                       sliding_window=SLIDING_WINDOW, max_window_layers=1,
                       max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
                       tie_word_embeddings=False, **NO_SPECIAL_TOKENS)


def _qwen3():
    from transformers import Qwen3Config
    return Qwen3Config(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       max_position_embeddings=MAX_POSITIONS, initializer_range=INIT_RANGE,
                       tie_word_embeddings=True, **NO_SPECIAL_TOKENS)


def _gpt2():
    from transformers import GPT2Config
    return GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=2, n_head=2, n_positions=MAX_POSITIONS,
                      initializer_range=INIT_RANGE, **NO_SPECIAL_TOKENS)


def _opt():
    from transformers import OPTConfig
    return OPTConfig(vocab_size=VOCAB, hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=2,
                     word_embed_proj_dim=128, max_position_embeddings=MAX_POSITIONS,
                     init_std=INIT_RANGE, **NO_SPECIAL_TOKENS)


#: name -> config factory, one per architecture under test.
CONFIGS: dict[str, Callable] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gpt2": _gpt2,
    "opt": _opt,
}
ARCHITECTURES = list(CONFIGS)


def save_checkpoint(config, directory: str) -> str:
    """Instantiate ``config``'s causal LM with seeded random weights and ``save_pretrained`` it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    return directory


def build_checkpoint(name: str, root: str) -> str:
    """Save the tiny ``name`` architecture under ``root`` (once) and return its directory."""
    directory = os.path.join(root, name)
    if not os.path.exists(os.path.join(directory, "config.json")):
        save_checkpoint(CONFIGS[name](), directory)
    return directory


def load_eager(path: str):
    """Load a checkpoint back as transformers' own eager float32 model on CPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def random_prompts(lengths, seed: int = 0) -> list[list[int]]:
    """Token-id prompts of the given lengths, from a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths]

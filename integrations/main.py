"""The main job: generation with the pagedattn engine, printing throughput and KV-memory figures.

By default it serves an embedded model: a small Llama built from a config with random weights
(no download), saved with ``save_pretrained`` and loaded back through ``from_pretrained``, on the
GPU when there is one and on the CPU otherwise. ``--model PATH`` serves a local checkpoint.

Run: ``python -m pagedattn.integrations.main`` (``--help`` for options).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

DEFAULT_SHAPES = {
    # A 1.1B-parameter Llama (TinyLlama's shape) on a GPU; a toy one on the CPU.
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "cpu": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1024),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local checkpoint (default: the embedded random Llama)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    parser.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 128 GPU, 24 CPU)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-gpu-blocks", type=int, default=None, help="default: profiled on GPU, 512 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build_default_model(device: str) -> str:
    """Save the embedded random Llama under a temp folder and return its path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = DEFAULT_SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    path = os.path.join(tempfile.gettempdir(), f"pagedattn-default-llama-{shape['hidden_size']}")
    if not os.path.exists(os.path.join(path, "config.json")):
        config = LlamaConfig(**shape, head_dim=shape["hidden_size"] // shape["num_attention_heads"],
                             max_position_embeddings=2048, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        model = LlamaForCausalLM(config).to(dtype)
        model.save_pretrained(path)
    return path


def make_prompts(num_prompts: int, vocab_size: int, device: str, generator: torch.Generator) -> list[list[int]]:
    """Token-id prompts with log-normal lengths (ShareGPT-like on GPU; short on the CPU)."""
    mean, cap = (161, 1024) if device.startswith("cuda") else (24, 64)
    sigma = 0.8
    lengths = torch.exp(math.log(mean) - sigma**2 / 2 + sigma * torch.randn(num_prompts, generator=generator))
    lengths = lengths.clamp(4, cap).round().long().tolist()
    return [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def main(argv=None) -> None:
    from pagedattn.integrations.engine import LLM, SamplingParams

    args = parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    path = args.model or build_default_model(args.device)
    num_prompts = args.num_prompts or (256 if on_gpu else 16)
    max_tokens = args.max_tokens or (128 if on_gpu else 24)
    num_gpu_blocks = args.num_gpu_blocks or (None if on_gpu else 512)
    llm = LLM(path, device=args.device, block_size=args.block_size, num_gpu_blocks=num_gpu_blocks,
              dtype=torch.bfloat16 if on_gpu else torch.float32)
    vocab = llm.engine.runner.model.config.vocab_size
    prompts = make_prompts(num_prompts, vocab, args.device, torch.Generator().manual_seed(args.seed))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - start

    name = torch.cuda.get_device_name() if on_gpu else "CPU"
    print(f"\npagedattn engine on {name}: {path if args.model else 'embedded random Llama'}")
    for out in outputs[:3]:
        ids = out.outputs[0].token_ids
        print(f"  request {out.request_id}: prompt {len(out.prompt_token_ids)} tokens -> "
              f"{len(ids)} new: {ids[:12]}{' ...' if len(ids) > 12 else ''}")
    num_out = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"  {len(outputs)} requests, {num_out:,} output tokens in {seconds:.2f} s "
          f"= {num_out / seconds:,.0f} output tokens/s (wall clock, progress bar included)")
    runner = llm.engine.runner
    pool_blocks = runner.kv_caches[0][0].shape[0] if runner.kv_caches else 0
    print(f"  KV pool: {pool_blocks:,} blocks x {args.block_size} tokens, "
          f"{pool_blocks * runner.kv_cache_bytes_per_block / 2**20:,.1f} MiB")
    llm.metrics.print_table()
    errors = [o for o in outputs if o.error]
    if errors:
        raise SystemExit(f"{len(errors)} requests failed, first: {errors[0].error}")


if __name__ == "__main__":
    main()

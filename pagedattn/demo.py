"""The main job (for now): a decode step of one attention layer over a paged KV cache.

It builds a batch of sequences with ShareGPT-like lengths, writes their keys and values into a
paged cache with ``reshape_and_cache``, runs ``paged_decode_attention``, checks the result
against the PyTorch reference, and prints throughput and KV-memory figures: the memory a paged
cache holds against reserving each sequence's maximum length contiguously.

Run: ``python -m pagedattn.demo`` (GPU when there is one, else CPU), ``--help`` for options.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import pagedattn.ops as ops
from pagedattn.ops import reference


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-seqs", type=int, default=None, help="default: 256 on GPU, 16 on CPU")
    parser.add_argument("--max-len", type=int, default=2048, help="the per-request maximum length")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-size", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sharegpt_like_lengths(num_seqs: int, max_len: int, generator: torch.Generator) -> list[int]:
    """Log-normal total lengths with the ShareGPT means of the vLLM paper (161 + 338 tokens)."""
    mean = 161 + 338
    sigma = 0.8
    mu = math.log(mean) - sigma**2 / 2
    lengths = torch.exp(mu + sigma * torch.randn(num_seqs, generator=generator))
    return [int(x) for x in lengths.clamp(1, max_len).round().tolist()]


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    num_seqs = args.num_seqs or (256 if device.type == "cuda" else 16)
    g = torch.Generator().manual_seed(args.seed)
    lens = sharegpt_like_lengths(num_seqs, args.max_len, g)
    bs = args.block_size
    blocks_per_seq = [math.ceil(n / bs) for n in lens]
    num_blocks = sum(blocks_per_seq)
    max_blocks = math.ceil(args.max_len / bs)

    key_cache, value_cache = ops.allocate_kv_cache(num_blocks, bs, args.num_kv_heads, args.head_size, dtype, device)
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_tables = torch.zeros((num_seqs, max_blocks), dtype=torch.int32)
    slot_chunks, start = [], 0
    for i, (n, nb) in enumerate(zip(lens, blocks_per_seq)):
        block_tables[i, :nb] = perm[start:start + nb]
        start += nb
        pos = torch.arange(n)
        slot_chunks.append(block_tables[i, pos // bs].long() * bs + pos % bs)
    slot_mapping = torch.cat(slot_chunks).to(device)
    block_tables = block_tables.to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    num_tokens = slot_mapping.numel()
    new_k = torch.randn((num_tokens, args.num_kv_heads, args.head_size), generator=g).to(device, dtype)
    new_v = torch.randn((num_tokens, args.num_kv_heads, args.head_size), generator=g).to(device, dtype)
    query = torch.randn((num_seqs, args.num_heads, args.head_size), generator=g).to(device, dtype)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    ops.reshape_and_cache(new_k, new_v, key_cache, value_cache, slot_mapping)
    out = ops.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens)  # warm-up
    sync()
    reps = 20 if device.type == "cuda" else 3
    t0 = time.perf_counter()
    for _ in range(reps):
        ops.paged_decode_attention(query, key_cache, value_cache, block_tables, seq_lens, out=out)
    sync()
    step_s = (time.perf_counter() - t0) / reps

    ref = torch.empty(query.shape, dtype=torch.float32, device=device)
    check = min(num_seqs, 8)
    reference.paged_decode(ref[:check], query[:check], key_cache, value_cache, block_tables[:check], seq_lens[:check],
                           args.head_size ** -0.5, 0, 0.0, None, None)
    err = (out[:check].float() - ref[:check]).abs().max().item()

    elem = torch.finfo(dtype).bits // 8
    token_bytes = 2 * args.num_kv_heads * args.head_size * elem
    kv_read = sum(lens) * token_bytes
    paged_bytes = num_blocks * bs * token_bytes
    contiguous_bytes = num_seqs * args.max_len * token_bytes
    backend = {"triton": "Triton", "cuda": "CUDA (CuPy)", "reference": "PyTorch reference"}[ops.resolve_backend(device)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"pagedattn demo on {name} ({backend}), {args.dtype}, {args.num_heads}/{args.num_kv_heads} heads, "
          f"head {args.head_size}, block {bs}")
    print(f"  sequences {num_seqs}, context tokens {sum(lens):,} (mean {sum(lens) / num_seqs:.0f}, max {max(lens)})")
    rows = [
        ("decode step", f"{step_s * 1e3:.3f} ms"),
        ("decode throughput", f"{num_seqs / step_s:,.0f} tokens/s (one layer)"),
        ("K/V read bandwidth", f"{kv_read / step_s / 1e9:,.1f} GB/s"),
        ("max |out - reference|", f"{err:.2e}"),
        ("KV memory, paged", f"{paged_bytes / 2**20:,.1f} MiB in {num_blocks:,} blocks"),
        ("KV memory, contiguous max-length", f"{contiguous_bytes / 2**20:,.1f} MiB"),
        ("KV utilization, paged", f"{sum(lens) / (num_blocks * bs):.1%} of allocated slots hold tokens"),
        ("KV utilization, contiguous", f"{sum(lens) / (num_seqs * args.max_len):.1%}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    tolerance = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    if not err <= tolerance:
        raise SystemExit(f"decode result differs from the reference by {err:.3e} (> {tolerance})")


if __name__ == "__main__":
    main()

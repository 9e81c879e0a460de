"""Every op with hostile index values, on every kernel backend, for compute-sanitizer.

A representative run of each op on Triton and on the CUDA backend (where CuPy is installed).

Run: ``compute-sanitizer --tool memcheck python tests/ops/sanitize_ops.py`` (or ``--tool racecheck``
with ``--quick``: one configuration a backend). ``--backends triton,cuda`` picks the backends.
Block ids beyond the pool and negative, lengths beyond the table and negative, slots beyond the
cache: the kernels must mask them all, so memcheck reports no access outside the tensors.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script from anywhere

import pagedattn.ops as ops  # noqa: E402
from pagedattn.ops import config, cuda_attention, cuda_runtime, launchers  # noqa: E402

CONFIGS = ((torch.bfloat16, 128, 16, "HND"), (torch.float16, 80, 1, "NHD"), (torch.float32, 256, 256, "HND"))


def run_ops(dtype, head, block_size, layout) -> None:
    num_blocks = 6
    kc, vc = ops.allocate_kv_cache(num_blocks, block_size, 2, head, dtype, "cuda", layout)
    kc.normal_()
    vc.normal_()
    query = torch.randn(4, 8, head, device="cuda", dtype=dtype)
    tables = torch.tensor([[0, 1, 2], [5, 10**6, -4], [2**31 - 1, 3, 4], [1, 1, 1]], dtype=torch.int32,
                          device="cuda")
    lens = torch.tensor([3 * block_size, 2**30, -5, 2 * block_size + 1], dtype=torch.int32, device="cuda")
    slopes = torch.rand(8, device="cuda")
    for num_splits in (1, 3):
        out, lse = ops.paged_decode_attention(query, kc, vc, tables, lens, num_splits=num_splits, return_lse=True,
                                              alibi_slopes=slopes, sliding_window=block_size + 3, softcap=3.0)
        assert torch.isfinite(out).all()
    # a full batch with wide tables (Triton: per-sequence splits; 160 sequences x 2 KV heads fill the GPU):
    # the hostile rows repeated, lengths up to 2**30 clamped to 40 blocks
    wide = tables.repeat(40, 14)[:, :40].contiguous()
    out, lse = ops.paged_decode_attention(query.repeat(40, 1, 1), kc, vc, wide, lens.repeat(40), return_lse=True,
                                          alibi_slopes=slopes, sliding_window=7 * block_size + 3, softcap=3.0)
    assert torch.isfinite(out).all()
    def decode_wide_under(tuning_table: dict, tunings) -> None:
        """The wide batch (auto and 3 splits) under each of ``tunings`` applied to ``tuning_table``."""
        saved = dict(tuning_table)
        try:
            for tuning in tunings:
                tuning_table.update(saved)
                tuning_table.update(tuning)
                for num_splits in (0, 3):
                    out = ops.paged_decode_attention(query.repeat(40, 1, 1), kc, vc, wide, lens.repeat(40),
                                                     num_splits=num_splits, alibi_slopes=slopes,
                                                     sliding_window=7 * block_size + 3, softcap=3.0)
                    assert torch.isfinite(out).all()
        finally:
            tuning_table.clear()
            tuning_table.update(saved)

    # other Triton tunings: both KV heads in one program; the loads in the order up to 2026-11-27 (prefetch 0);
    # the next tiles' loads issued early (reads past the last tile must be masked)
    decode_wide_under(launchers.DECODE_TUNING, (
        dict(kv_heads_per_program=2), dict(prefetch=0), dict(prefetch=3), dict(prefetch=4, num_stages=3),
        dict(prefetch=2, kv_heads_per_program=2)))
    # the CUDA decode's K/V pipelines other than the default 3 stages (Triton ignores the setting): tiles in
    # flight past the last one
    decode_wide_under(cuda_attention.DECODE_TUNING, (dict(kv_stages=2), dict(kv_stages=4)))
    cu = torch.tensor([0, 3, 2, 10**6, 7], dtype=torch.int32, device="cuda")  # garbage, clamped
    for hint in (0, 1):
        q7 = query.repeat(2, 1, 1)[:7]
        out = ops.paged_prefill_attention(q7, kc, vc, tables, lens, cu, max_query_len=hint, alibi_slopes=slopes,
                                          sliding_window=5, softcap=2.0, out=torch.zeros_like(q7))
        assert not torch.isnan(out).any()
    slots = torch.tensor([0, -1, num_blocks * block_size, 2**40, block_size + 1], device="cuda")
    new = torch.randn(5, 2, head, device="cuda", dtype=dtype)
    ops.reshape_and_cache(new, new, kc, vc, slots)
    ops.reshape_and_cache(new, new, kc, vc, slots.clamp(-(2**31), 2**31 - 1).to(torch.int32))
    mapping = torch.tensor([[0, 5], [7, 1], [-1, 2], [3, 2**40]], device="cuda")
    ops.copy_blocks([kc], [vc], mapping)
    ops.copy_blocks([kc], [vc], mapping.clamp(-9, 9).to(torch.int32))
    cpu = torch.empty_strided(kc.shape, kc.stride(), dtype=dtype, pin_memory=True)
    ops.swap_blocks(kc, cpu, torch.tensor([[0, 1], [1, 2], [5, 0]]))
    ops.swap_blocks(cpu, vc, torch.tensor([[2, 3]]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton,cuda", help="comma-separated kernel backends")
    parser.add_argument("--quick", action="store_true", help="one configuration a backend (racecheck is slow)")
    args = parser.parse_args(argv)
    for backend in args.backends.split(","):
        if backend == "cuda" and not cuda_runtime.available()[0]:
            print(f"sanitize_ops: skipping the cuda backend: {cuda_runtime.available()[1]}")
            continue
        config.set_backend(backend)
        torch.manual_seed(0)
        for cfg in CONFIGS[:1] if args.quick else CONFIGS:
            run_ops(*cfg)
        torch.cuda.synchronize()
        print(f"sanitize_ops: {backend} done")
    config.set_backend("auto")
    print("sanitize_ops: done")


if __name__ == "__main__":
    main()

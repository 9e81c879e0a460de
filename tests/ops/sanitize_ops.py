"""A representative run of every op for compute-sanitizer, with hostile index values.

Run: ``compute-sanitizer --tool memcheck python tests/ops/sanitize_ops.py`` (or racecheck).
Block ids beyond the pool and negative, lengths beyond the table and negative, slots beyond the
cache: the kernels must mask them all, so memcheck reports no access outside the tensors.
"""

import torch

import pagedattn.ops as ops


def main() -> None:
    torch.manual_seed(0)
    for dtype, head, block_size, layout in ((torch.bfloat16, 128, 16, "HND"), (torch.float16, 80, 1, "NHD"),
                                            (torch.float32, 256, 256, "HND")):
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
        cu = torch.tensor([0, 3, 2, 10**6, 7], dtype=torch.int32, device="cuda")  # garbage, clamped
        for hint in (0, 1):
            q7 = query.repeat(2, 1, 1)[:7]
            out = ops.paged_prefill_attention(q7, kc, vc, tables, lens, cu, max_query_len=hint, alibi_slopes=slopes,
                                              sliding_window=5, softcap=2.0, out=torch.zeros_like(q7))
            assert not torch.isnan(out).any()
        slots = torch.tensor([0, -1, num_blocks * block_size, 2**40, block_size + 1], device="cuda")
        new = torch.randn(5, 2, head, device="cuda", dtype=dtype)
        ops.reshape_and_cache(new, new, kc, vc, slots)
        mapping = torch.tensor([[0, 5], [7, 1], [-1, 2], [3, 2**40]], device="cuda")
        ops.copy_blocks([kc], [vc], mapping)
        cpu = torch.empty_strided(kc.shape, kc.stride(), dtype=dtype, pin_memory=True)
        ops.swap_blocks(kc, cpu, torch.tensor([[0, 1], [1, 2], [5, 0]]))
        ops.swap_blocks(cpu, vc, torch.tensor([[2, 3]]))
    torch.cuda.synchronize()
    print("sanitize_ops: done")


if __name__ == "__main__":
    main()

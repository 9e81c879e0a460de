"""Triton kernels that move KV-cache data: writing new tokens by slot, and copying blocks."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_slots", "log2_block_size", "num_kv_heads"])
def reshape_and_cache_kernel(
    key_ptr, stride_kn, stride_kh, stride_kd,
    value_ptr, stride_vn, stride_vh, stride_vd,
    k_cache_ptr, stride_kcb, stride_kct, stride_kch, stride_kcd,
    v_cache_ptr, stride_vcb, stride_vct, stride_vch, stride_vcd,
    slot_mapping_ptr,
    num_slots, log2_block_size, num_kv_heads,
    HEAD_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program writes one token's keys and values (all KV heads) into its slot."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if (slot >= 0) & (slot < num_slots):
        block = slot >> log2_block_size
        in_block = slot & ((1 << log2_block_size) - 1)
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < HEAD_SIZE)
        k = tl.load(key_ptr + token * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                    mask=mask)
        v = tl.load(value_ptr + token * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask)
        tl.store(k_cache_ptr + block * stride_kcb + in_block * stride_kct + offs_h[:, None] * stride_kch
                 + offs_d[None, :] * stride_kcd, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + block * stride_vcb + in_block * stride_vct + offs_h[:, None] * stride_vch
                 + offs_d[None, :] * stride_vcd, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_blocks", "block_numel"])
def copy_blocks_kernel(
    cache_ptrs_ptr, block_mapping_ptr, stride_mp, stride_mc,
    num_blocks, block_numel,
    DTYPE: tl.constexpr, CHUNK: tl.constexpr,
):
    """Program (pair, cache, chunk) copies CHUNK elements of block ``src`` to block ``dst``.

    ``cache_ptrs_ptr`` holds the data pointers (int64) of every cache, all with the same dense
    block layout of ``block_numel`` elements per block.
    """
    pair = tl.program_id(0)
    cache = tl.program_id(1)
    chunk = tl.program_id(2)
    src = tl.load(block_mapping_ptr + pair * stride_mp).to(tl.int64)
    dst = tl.load(block_mapping_ptr + pair * stride_mp + stride_mc).to(tl.int64)
    ok = (src >= 0) & (src < num_blocks) & (dst >= 0) & (dst < num_blocks)
    if ok:
        base = tl.load(cache_ptrs_ptr + cache).to(tl.pointer_type(DTYPE))
        offs = chunk.to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < block_numel
        x = tl.load(base + src * block_numel + offs, mask=mask)
        tl.store(base + dst * block_numel + offs, x, mask=mask)

// KV-cache data movement for the CUDA backend: writing new tokens by slot, and copying blocks.
// Compiled at run time with NVRTC by pagedattn/ops/cuda_runtime.py; launched by pagedattn/ops/cuda_cache.py.
//
// Both kernels move raw bytes (the caller checked that sources and destinations share one dtype), in
// vectors of VEC bytes (16, 8, 4 or 2) that the launcher chose so every access is VEC-aligned.
// Compile-time defines:
//   VEC     bytes per access: 16, 8, 4 or 2
//   INDEX_BYTES  bytes of an element of the index tensor (slot_mapping or block_mapping): 4 (int32) or 8 (int64)
//   UNROLL       copy_blocks only: vectors each thread moves per chunk of a block (default 4)
// No standard headers: NVRTC has none without a CUDA toolkit.

#ifndef VEC
#error "VEC must be defined (16, 8, 4 or 2)"
#endif
#if INDEX_BYTES == 4
typedef int index_t;
#elif INDEX_BYTES == 8
typedef long long index_t;
#else
#error "INDEX_BYTES must be 4 or 8"
#endif

#ifndef UNROLL
#define UNROLL 4  // copy_blocks: vectors a thread moves per chunk
#endif

#if VEC == 16
typedef uint4 vec_t;
#elif VEC == 8
typedef uint2 vec_t;
#elif VEC == 4
typedef unsigned int vec_t;
#elif VEC == 2
typedef unsigned short vec_t;
#else
#error "VEC must be 16, 8, 4 or 2"
#endif

typedef long long i64;

// One thread block per token: writes the token's keys and values (all KV heads) into its slot.
// Slots outside [0, num_slots) (negative ones are padding) are skipped: nothing is read or written.
// Byte strides: key/value [token, head] (head_size contiguous), caches [block, offset in block, head].
extern "C" __global__ void reshape_and_cache_kernel(
    const char* __restrict__ key, i64 key_stride_n, i64 key_stride_h,
    const char* __restrict__ value, i64 value_stride_n, i64 value_stride_h,
    char* __restrict__ key_cache, i64 kc_stride_b, i64 kc_stride_t, i64 kc_stride_h,
    char* __restrict__ value_cache, i64 vc_stride_b, i64 vc_stride_t, i64 vc_stride_h,
    const index_t* __restrict__ slot_mapping, i64 num_tokens, i64 num_slots,
    int log2_block_size, int num_kv_heads, int vecs_per_head) {
  for (i64 token = blockIdx.x; token < num_tokens; token += gridDim.x) {
    const i64 slot = (i64)slot_mapping[token];
    if (slot < 0 || slot >= num_slots) continue;  // uniform over the thread block
    const i64 block = slot >> log2_block_size;
    const i64 in_block = slot & ((1LL << log2_block_size) - 1);
    const int total = num_kv_heads * vecs_per_head;
    for (int i = threadIdx.x; i < total; i += blockDim.x) {
      const int h = i / vecs_per_head;
      const i64 v = (i64)(i - h * vecs_per_head) * VEC;
      const vec_t k = *reinterpret_cast<const vec_t*>(key + token * key_stride_n + h * key_stride_h + v);
      const vec_t x = *reinterpret_cast<const vec_t*>(value + token * value_stride_n + h * value_stride_h + v);
      *reinterpret_cast<vec_t*>(key_cache + block * kc_stride_b + in_block * kc_stride_t + h * kc_stride_h + v) = k;
      *reinterpret_cast<vec_t*>(value_cache + block * vc_stride_b + in_block * vc_stride_t + h * vc_stride_h + v) = x;
    }
  }
}

// Copies block src to block dst in every cache for each (src, dst) row of block_mapping.
// cache_ptrs: num_caches device pointers (as unsigned 64-bit ints) of caches that share one dense block layout
// of block_bytes bytes per block; pairs with either id outside [0, num_blocks) are skipped.
// Grid: x over pairs, y over caches, z over chunks of blockDim.x * VEC * UNROLL bytes of a block (each loops
// when the grid is smaller). A thread loads its UNROLL vectors of a chunk before it stores any.
extern "C" __global__ void copy_blocks_kernel(
    const unsigned long long* __restrict__ cache_ptrs, int num_caches,
    const index_t* __restrict__ block_mapping, i64 map_stride_p, i64 map_stride_c, i64 num_pairs,
    i64 num_blocks, i64 block_bytes) {
  const i64 chunk_bytes = (i64)blockDim.x * VEC * UNROLL;
  for (i64 pair = blockIdx.x; pair < num_pairs; pair += gridDim.x) {
    const i64 src = (i64)block_mapping[pair * map_stride_p];
    const i64 dst = (i64)block_mapping[pair * map_stride_p + map_stride_c];
    if (src < 0 || src >= num_blocks || dst < 0 || dst >= num_blocks) continue;
    for (int cache = blockIdx.y; cache < num_caches; cache += gridDim.y) {
      char* base = reinterpret_cast<char*>(cache_ptrs[cache]);
      const char* from = base + src * block_bytes;
      char* to = base + dst * block_bytes;
      for (i64 start = (i64)blockIdx.z * chunk_bytes; start < block_bytes; start += (i64)gridDim.z * chunk_bytes) {
        vec_t parts[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const i64 off = start + ((i64)u * blockDim.x + threadIdx.x) * VEC;
          if (off < block_bytes) parts[u] = *reinterpret_cast<const vec_t*>(from + off);
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const i64 off = start + ((i64)u * blockDim.x + threadIdx.x) * VEC;
          if (off < block_bytes) *reinterpret_cast<vec_t*>(to + off) = parts[u];
        }
      }
    }
  }
}

// Shared part of the CUDA backend's attention kernels (attention.cu: decode and merge; attention_prefill.cu:
// prefill), compiled at run time by NVRTC through CuPy.
//
// Same semantics as the Triton kernels (pagedattn/ops/triton_decode.py, triton_prefill.py) and the
// reference (pagedattn/ops/reference.py): lengths are clamped to [0, block table capacity], keys whose
// block id lies outside [0, num_blocks) are absent, a query that sees no key gets a zero output and
// lse = -inf. Masked cache rows are zero-filled in shared memory and masked scores are selected away,
// never multiplied by 0, so NaN in unused cache slots cannot leak. Scores and sums are float32.
//
// Compile-time parameters (-D options from pagedattn/ops/cuda_attention.py):
//   KERNEL_DECODE / KERNEL_MERGE / KERNEL_PREFILL: which kernel this compilation holds
//   DTYPE: 0 float16, 1 bfloat16, 2 float32      HEAD_SIZE: elements per head
//   ROWS: query heads of one GQA group handled by a thread block (the rest of a group: other blocks)
//   TILE_N: keys per tile                          BLOCK_M: prefill rows (tokens x ROWS) per block
//   ALIGNED: 1 when every K/V row is 16-byte aligned (cp.async copies), else element copies
//   SOURCE_HASH: a hash of this header, so that CuPy's disk cache (keyed by the .cu text and the options)
//                never serves a binary built from an older version of it
// Run-time options (uniform branches): scale, softcap (0: off), sliding window (0: off), ALiBi, lse.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#ifndef DTYPE
#define DTYPE 1
#endif
#ifndef HEAD_SIZE
#define HEAD_SIZE 128
#endif
#ifndef ROWS
#define ROWS 4
#endif
#ifndef TILE_N
#define TILE_N 32
#endif
#ifndef BLOCK_M
#define BLOCK_M 64
#endif
#ifndef ALIGNED
#define ALIGNED 1
#endif
#define NTHREADS 128

typedef long long i64;

#if DTYPE == 0
typedef __half T;
__device__ __forceinline__ float to_f(T x) { return __half2float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2half_rn(x); }
#elif DTYPE == 1
typedef __nv_bfloat16 T;
__device__ __forceinline__ float to_f(T x) { return __bfloat162float(x); }
__device__ __forceinline__ T from_f(float x) { return __float2bfloat16_rn(x); }
#else
typedef float T;
__device__ __forceinline__ float to_f(T x) { return x; }
__device__ __forceinline__ T from_f(float x) { return x; }
#endif

constexpr int VEC = 16 / sizeof(T);       // elements in 16 bytes
constexpr int CH = HEAD_SIZE / VEC;       // 16-byte chunks of a head row
constexpr int RS = (CH | 1) * VEC;        // shared row stride: an odd number of 16-byte units (no bank conflicts)
#define NEG_INF (-__int_as_float(0x7f800000))
static_assert(HEAD_SIZE % 16 == 0, "head sizes are multiples of 16");

// Eight (16-bit) or four (float32) elements from a 16-byte aligned shared address, as floats.
__device__ __forceinline__ void load_vec(const T* p, float* f) {
  uint4 u = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < VEC; ++i) f[i] = to_f(e[i]);
}

// Four or two elements at an 8- / 4-byte (16-bit) or 16- / 8-byte (float32) aligned shared address.
template <int N>
__device__ __forceinline__ void load_n(const T* p, float* f) {
#if DTYPE == 2
  if (N == 4) { const float4 u = *reinterpret_cast<const float4*>(p); f[0] = u.x, f[1] = u.y, f[2] = u.z, f[3] = u.w; }
  else { const float2 u = *reinterpret_cast<const float2*>(p); f[0] = u.x, f[1] = u.y; }
#else
  if (N == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
    f[0] = to_f(e[0]), f[1] = to_f(e[1]), f[2] = to_f(e[2]), f[3] = to_f(e[3]);
  } else {
    const unsigned u = *reinterpret_cast<const unsigned*>(p);
    const T* e = reinterpret_cast<const T*>(&u);
    f[0] = to_f(e[0]), f[1] = to_f(e[1]);
  }
#endif
}

// tanh through exp like the Triton kernels: exp overflowing to inf gives 1, underflowing gives -1.
__device__ __forceinline__ float tanh_safe(float x) { return 1.f - 2.f / (expf(2.f * x) + 1.f); }

// A raw q.k product -> score: scale, soft-cap, ALiBi bias (slope 0 when off) at rel = k_pos - q_pos.
__device__ __forceinline__ float score(float raw, float scale, float softcap, float slope, int rel) {
  float s = raw * scale;
  if (softcap > 0.f) s = softcap * tanh_safe(s / softcap);
  return s + slope * (float)rel;
}

__device__ __forceinline__ int clamp_len(int len, int max_blocks_per_seq, int log2_block_size) {
  const i64 capacity = (i64)max_blocks_per_seq << log2_block_size;
  return (int)min((i64)max(len, 0), capacity);
}

// One 16-byte global -> shared copy, zero-filled when !ok (then src is a valid dummy address).
__device__ __forceinline__ void copy16(T* dst, const T* src, bool ok) {
#if __CUDA_ARCH__ >= 800
  unsigned s = (unsigned)__cvta_generic_to_shared(dst);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(ok ? 16 : 0));
#else
  *reinterpret_cast<uint4*>(dst) = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Where a sequence's context lives, for the tile loaders.
struct Paged {
  const T* k; i64 sk_b, sk_t;      // key_cache + kv_head * stride_kh
  const T* v; i64 sv_b, sv_t;      // value_cache + kv_head * stride_vh
  const int* bt; i64 sbt_b;        // the sequence's block table row
  int num_blocks, log2_bs;
};

// Copies the K and V rows of keys [tile_start, tile_start + TILE_N) into k_s / v_s ([TILE_N][RS]) and
// their validity into ok_s: a key is present when pos in [lo, hi) and its block id is in the pool.
// Absent keys' rows are zeros. NTHREADS / TILE_N consecutive threads share a key (one block-table read each).
// Asynchronous (cp.async) when ALIGNED: commit and wait before reading.
__device__ __forceinline__ void load_kv_tile(const Paged& c, int tile_start, int lo, int hi,
                                             T* k_s, T* v_s, int* ok_s) {
  constexpr int TPL = NTHREADS / TILE_N;
  static_assert(NTHREADS % TILE_N == 0, "threads per key");
  const int t = threadIdx.x / TPL, sub = threadIdx.x % TPL, pos = tile_start + t;
  bool ok = pos >= lo && pos < hi;
  const int bid = ok ? __ldg(c.bt + (i64)(pos >> c.log2_bs) * c.sbt_b) : -1;
  ok = ok && bid >= 0 && bid < c.num_blocks;
  const i64 in_block = pos & ((1 << c.log2_bs) - 1);
  const T* k = c.k + (ok ? (i64)bid * c.sk_b + in_block * c.sk_t : 0);
  const T* v = c.v + (ok ? (i64)bid * c.sv_b + in_block * c.sv_t : 0);
  if (sub == 0) ok_s[t] = ok;
#if ALIGNED
  for (int x = sub; x < CH; x += TPL) {
    copy16(k_s + t * RS + x * VEC, k + x * VEC, ok);
    copy16(v_s + t * RS + x * VEC, v + x * VEC, ok);
  }
#else
  for (int x = sub; x < HEAD_SIZE; x += TPL) {
    k_s[t * RS + x] = ok ? k[x] : from_f(0.f);
    v_s[t * RS + x] = ok ? v[x] : from_f(0.f);
  }
#endif
}

__device__ __forceinline__ float warp_max(float x, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x, int width = 32) {
  for (int o = width / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

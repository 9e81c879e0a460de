// Paged decode attention and the merge of its context splits (CUDA backend, see attention_common.cuh).
#include "attention_common.cuh"

#if defined(KERNEL_DECODE)
// Paged decode: one query token per sequence.
//   query [num_seqs, num_heads, HEAD_SIZE]; key_cache / value_cache [num_blocks, block_size, num_kv_heads,
//   HEAD_SIZE] (strides per dim, last one 1); block_tables int32 [num_seqs, max_blocks_per_seq];
//   seq_lens int32 [num_seqs]; alibi float32 [num_heads]; out [num_seqs, num_heads, HEAD_SIZE];
//   lse float32 [num_seqs, num_heads]; part_out float32 [num_seqs, num_heads, num_splits, HEAD_SIZE] and
//   part_lse float32 [num_seqs, num_heads, num_splits] when gridDim.z (num_splits) > 1.
// Grid (num_seqs, num_kv_heads * num_subgroups, num_splits); 128 threads; dynamic shared memory: the K/V
// stages, KV_STAGES * 2 * TILE_N * RS elements. A block takes ROWS query heads of one KV head's group (K/V
// read once for all of them) over its split of the context, TILE_N keys at a time in a KV_STAGES-stage
// cp.async pipeline (KV_STAGES - 1 tiles in flight while one is computed). Per tile: thread (t, sub) sums the q.k products of key t over chunks
// sub, sub + TPT, ...; one warp per row does the online softmax; thread (chunk, slice) accumulates
// p * V for four columns over the keys of its slice (the slices are summed at the end).
constexpr int TPT = NTHREADS / TILE_N;        // threads per key in the q.k products
constexpr int PV_CH = HEAD_SIZE / 4;          // four-column chunks of the p.V products
constexpr int NS = NTHREADS / PV_CH;          // key slices of the p.V products
constexpr int RPW = (ROWS + 3) / 4;           // softmax rows per warp
constexpr int ROWS4 = RPW * 4;                // p_s row stride: the rows' probabilities of a key as float4s
#ifndef KV_STAGES
#define KV_STAGES 2
#endif
constexpr int STAGE = 2 * TILE_N * RS;        // elements of one stage: K then V, [TILE_N][RS] each
static_assert(TILE_N <= 32 && NTHREADS % TILE_N == 0 && NS >= 1, "decode tile shape");
static_assert(KV_STAGES >= 2 && KV_STAGES <= 8, "K/V pipeline stages");
static_assert(NS * ROWS * HEAD_SIZE * 4 <= KV_STAGES * STAGE * (int)sizeof(T), "final sums fit the stages");

extern "C" __global__ void __launch_bounds__(NTHREADS) paged_decode_kernel(
    const T* __restrict__ q, i64 sq_s, i64 sq_h,
    const T* __restrict__ k_cache, i64 sk_b, i64 sk_t, i64 sk_h,
    const T* __restrict__ v_cache, i64 sv_b, i64 sv_t, i64 sv_h,
    const int* __restrict__ block_tables, i64 sbt_s, i64 sbt_b, const int* __restrict__ seq_lens,
    const float* __restrict__ alibi, T* __restrict__ out, i64 so_s, i64 so_h,
    float* __restrict__ lse, i64 sl_s, i64 sl_h, float* __restrict__ part_out, float* __restrict__ part_lse,
    float scale, float softcap, int num_blocks, int max_blocks_per_seq, int log2_block_size, int group_size,
    int num_subgroups, int num_heads, int sliding_window, int tokens_per_split, int use_alibi, int write_lse) {
  extern __shared__ uint4 kv_raw[];  // dynamic: [KV_STAGES][K|V][TILE_N][RS]; then the final sums
  __shared__ __align__(16) float q_s[ROWS * HEAD_SIZE];
  __shared__ float s_part[TPT * ROWS * TILE_N];
  __shared__ __align__(16) float p_s[TILE_N * ROWS4];
  __shared__ float alpha_s[ROWS], m_s[ROWS], l_s[ROWS], slope_s[ROWS];
  __shared__ int ok_s[KV_STAGES][TILE_N];
  T* kv_s = reinterpret_cast<T*>(kv_raw);

  const int seq = blockIdx.x, kv_head = blockIdx.y / num_subgroups, sub = blockIdx.y % num_subgroups;
  const int split = blockIdx.z, num_splits = gridDim.z, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int seq_len = clamp_len(seq_lens[seq], max_blocks_per_seq, log2_block_size);
  int start = (int)min((i64)split * tokens_per_split, (i64)seq_len);
  const int end = split == num_splits - 1 ? seq_len : (int)min((i64)start + tokens_per_split, (i64)seq_len);
  if (sliding_window > 0) start = max(start, max(seq_len - sliding_window, 0));

  for (int i = tid; i < ROWS * HEAD_SIZE; i += NTHREADS) {
    const int r = i / HEAD_SIZE, hg = sub * ROWS + r;
    const i64 head = (i64)kv_head * group_size + hg;
    q_s[i] = hg < group_size ? to_f(q[seq * sq_s + head * sq_h + i % HEAD_SIZE]) : 0.f;
  }
  if (tid < ROWS) {
    const int hg = sub * ROWS + tid;
    slope_s[tid] = use_alibi && hg < group_size ? alibi[kv_head * group_size + hg] : 0.f;
  }
  float m_run[RPW], l_run[RPW];
#pragma unroll
  for (int i = 0; i < RPW; ++i) m_run[i] = NEG_INF, l_run[i] = 0.f;
  float acc[ROWS][4] = {};
  const int c = tid % PV_CH, slice = tid / PV_CH;

  const Paged ctx = {k_cache + kv_head * sk_h, sk_b, sk_t, v_cache + kv_head * sv_h, sv_b, sv_t,
                     block_tables + seq * sbt_s, sbt_b, num_blocks, log2_block_size};
  const int num_tiles = end > start ? (end - start + TILE_N - 1) / TILE_N : 0;
  // prologue: tiles 0 .. KV_STAGES - 2 in flight, one commit group each (empty groups past the last tile
  // keep the count, so cp_wait<KV_STAGES - 1> below always means "this iteration's tile has landed")
#pragma unroll
  for (int s = 0; s < KV_STAGES - 1; ++s) {
    if (s < num_tiles) {
      T* dst = kv_s + s * STAGE;
      load_kv_tile(ctx, start + s * TILE_N, start, end, dst, dst + TILE_N * RS, ok_s[s]);
    }
    cp_commit();
  }
  for (int it = 0; it < num_tiles; ++it) {
    const int tile_start = start + it * TILE_N, stage = it % KV_STAGES;
    const int ahead = it + KV_STAGES - 1;  // the tile loaded now, into the stage computed last iteration
    if (ahead < num_tiles) {
      const int ahead_stage = ahead % KV_STAGES;
      T* next = kv_s + ahead_stage * STAGE;
      load_kv_tile(ctx, start + ahead * TILE_N, start, end, next, next + TILE_N * RS, ok_s[ahead_stage]);
    }
    cp_commit();
    cp_wait<KV_STAGES - 1>();
    __syncthreads();
    const T* k_s = kv_s + stage * STAGE;
    const T* v_s = k_s + TILE_N * RS;
    {  // partial q.k products: key t, chunks sub_t, sub_t + TPT, ...
      const int t = tid % TILE_N, sub_t = tid / TILE_N;
      float part[ROWS] = {};
      for (int x = sub_t; x < CH; x += TPT) {
        float kf[VEC];
        load_vec(k_s + t * RS + x * VEC, kf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const float4* qv = reinterpret_cast<const float4*>(q_s + r * HEAD_SIZE + x * VEC);
#pragma unroll
          for (int e = 0; e < VEC / 4; ++e) {
            const float4 qq = qv[e];
            part[r] += qq.x * kf[4 * e] + qq.y * kf[4 * e + 1] + qq.z * kf[4 * e + 2] + qq.w * kf[4 * e + 3];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < ROWS; ++r) s_part[(sub_t * ROWS + r) * TILE_N + t] = part[r];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RPW; ++i) {  // online softmax, one warp per row, one key per lane
      const int r = warp + 4 * i;
      if (r < ROWS) {
        const bool ok = lane < TILE_N && ok_s[stage][lane];
        float s = NEG_INF;
        if (ok) {
          float raw = 0.f;
          for (int j = 0; j < TPT; ++j) raw += s_part[(j * ROWS + r) * TILE_N + lane];
          s = score(raw, scale, softcap, slope_s[r], tile_start + lane - (seq_len - 1));
        }
        const float m_new = fmaxf(m_run[i], warp_max(s));
        const float m_safe = m_new == NEG_INF ? 0.f : m_new;
        const float alpha = expf(m_run[i] - m_safe);
        const float p = ok ? expf(s - m_safe) : 0.f;
        l_run[i] = l_run[i] * alpha + warp_sum(p);
        m_run[i] = m_new;
        if (lane < TILE_N) p_s[lane * ROWS4 + r] = p;
        if (lane == 0) alpha_s[r] = alpha;
      }
    }
    __syncthreads();
    if (slice < NS) {  // acc = acc * alpha + p . V over this slice's keys
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const float a = alpha_s[r];
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[r][e] *= a;
      }
      for (int t = slice; t < TILE_N; t += NS) {
        float vf[4];
        load_n<4>(v_s + t * RS + c * 4, vf);
        float p[ROWS4];
#pragma unroll
        for (int r4 = 0; r4 < RPW; ++r4) {
          const float4 p4 = reinterpret_cast<const float4*>(p_s + t * ROWS4)[r4];
          p[4 * r4] = p4.x, p[4 * r4 + 1] = p4.y, p[4 * r4 + 2] = p4.z, p[4 * r4 + 3] = p4.w;
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[r][e] += p[r] * vf[e];
      }
    }
    __syncthreads();  // the next prefetch overwrites this stage
  }
  cp_wait<0>();
  __syncthreads();
  float* red = reinterpret_cast<float*>(kv_raw);  // [NS][ROWS][HEAD_SIZE]
  if (slice < NS) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[(slice * ROWS + r) * HEAD_SIZE + c * 4 + e] = acc[r][e];
  }
#pragma unroll
  for (int i = 0; i < RPW; ++i) {
    const int r = warp + 4 * i;
    if (r < ROWS && lane == 0) m_s[r] = m_run[i], l_s[r] = l_run[i];
  }
  __syncthreads();
  for (int i = tid; i < ROWS * HEAD_SIZE; i += NTHREADS) {
    const int r = i / HEAD_SIZE, d = i % HEAD_SIZE, hg = sub * ROWS + r;
    if (hg >= group_size) continue;
    float o = 0.f;
    for (int j = 0; j < NS; ++j) o += red[(j * ROWS + r) * HEAD_SIZE + d];
    const float l = l_s[r];
    o = o / (l > 0.f ? l : 1.f);
    const float row_lse = l > 0.f ? m_s[r] + logf(l) : NEG_INF;
    const i64 head = (i64)kv_head * group_size + hg;
    if (num_splits == 1) {
      out[seq * so_s + head * so_h + d] = from_f(o);
      if (write_lse && d == 0) lse[seq * sl_s + head * sl_h] = row_lse;
    } else {
      const i64 row = ((i64)seq * num_heads + head) * num_splits + split;
      part_out[row * HEAD_SIZE + d] = o;
      if (d == 0) part_lse[row] = row_lse;
    }
  }
}
#endif  // KERNEL_DECODE

#if defined(KERNEL_MERGE)
// Merges the splits of paged decode: out[s, h] = sum_k w_k part_out[s, h, k] / sum_k w_k with
// w_k = exp(part_lse[s, h, k] - max_k part_lse); lse = max + log(sum w) (-inf when no split saw a key).
//   part_out float32 [num_seqs, num_heads, num_splits, head_size]; part_lse float32 [.., num_splits];
//   out [num_seqs, num_heads, head_size]; lse float32 [num_seqs, num_heads].
// Grid (num_seqs, num_heads); 128 threads over the head's columns.
extern "C" __global__ void __launch_bounds__(NTHREADS) merge_splits_kernel(
    const float* __restrict__ part_out, const float* __restrict__ part_lse, T* __restrict__ out, i64 so_s,
    i64 so_h, float* __restrict__ lse, i64 sl_s, i64 sl_h, int num_splits, int head_size, int write_lse) {
  const i64 seq = blockIdx.x, head = blockIdx.y, row = seq * gridDim.y + head;
  const float* lses = part_lse + row * num_splits;
  float lse_max = NEG_INF;
  for (int k = 0; k < num_splits; ++k) lse_max = fmaxf(lse_max, lses[k]);
  const bool has_any = lse_max > NEG_INF;
  const float m = has_any ? lse_max : 0.f;
  float w_sum = 0.f;
  for (int k = 0; k < num_splits; ++k) w_sum += expf(lses[k] - m);
  for (int d = threadIdx.x; d < head_size; d += blockDim.x) {
    float o = 0.f;
    for (int k = 0; k < num_splits; ++k) {
      const float w = expf(lses[k] - m);
      if (w > 0.f) o += w * part_out[(row * num_splits + k) * head_size + d];
    }
    out[seq * so_s + head * so_h + d] = from_f(o / (has_any ? w_sum : 1.f));
  }
  if (write_lse && threadIdx.x == 0) lse[seq * sl_s + head * sl_h] = has_any ? m + logf(w_sum) : NEG_INF;
}
#endif  // KERNEL_MERGE

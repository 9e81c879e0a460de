// Paged prefill / append attention (CUDA backend, see attention_common.cuh).
#include "attention_common.cuh"

#if defined(KERNEL_PREFILL)
// Paged prefill / append: the new tokens of each sequence are the last q_len positions of its context
// (causal). query [num_tokens, num_heads, HEAD_SIZE] packed by cu_seqlens_q int32 [num_seqs + 1]; the
// caches, block_tables, seq_lens (context incl. the new tokens), alibi as for decode; out like query;
// lse float32 [num_tokens, num_heads].
// Grid (num_tokens / BLOCK_Q + num_seqs, num_kv_heads * num_subgroups); 128 threads. Block rows are
// BLOCK_Q = BLOCK_M / ROWS consecutive query tokens x ROWS heads of one KV head's group (row r: token
// r / ROWS, head r % ROWS), so every K/V tile is read once for the group. Sequence s owns programs
// cu[s] / BLOCK_Q + s, ... (found by binary search, as the Triton kernel does). Thread (ty, tx) owns rows
// ty + 16 i: it computes their scores for keys tx + 8 j and accumulates their output columns
// 2 (tx + 8 j) and + 1; the 8 threads sharing rows reduce row max / sum by shuffles.
constexpr int RM = BLOCK_M / 16;     // rows per thread
constexpr int TJ = TILE_N / 8;       // keys per thread (q.k products)
constexpr int DJ = HEAD_SIZE / 16;   // column pairs per thread (p.V products)
constexpr int BLOCK_Q = BLOCK_M / ROWS;
constexpr int PS = TILE_N + 1;       // p_s row stride
static_assert(BLOCK_M % 16 == 0 && TILE_N % 8 == 0 && BLOCK_Q >= 1, "prefill tile shape");

extern "C" __global__ void __launch_bounds__(NTHREADS) paged_prefill_kernel(
    const T* __restrict__ q, i64 sq_t, i64 sq_h,
    const T* __restrict__ k_cache, i64 sk_b, i64 sk_t, i64 sk_h,
    const T* __restrict__ v_cache, i64 sv_b, i64 sv_t, i64 sv_h,
    const int* __restrict__ block_tables, i64 sbt_s, i64 sbt_b, const int* __restrict__ seq_lens,
    const int* __restrict__ cu_seqlens_q, const float* __restrict__ alibi, T* __restrict__ out, i64 so_t,
    i64 so_h, float* __restrict__ lse, i64 sl_t, i64 sl_h, float scale, float softcap, int num_tokens,
    int num_seqs, int num_blocks, int max_blocks_per_seq, int log2_block_size, int group_size,
    int num_subgroups, int sliding_window, int use_alibi, int write_lse) {
  __shared__ uint4 q_raw[BLOCK_M * HEAD_SIZE * sizeof(T) / 16];
  __shared__ uint4 kv_raw[2 * TILE_N * RS * sizeof(T) / 16];
  __shared__ float p_s[BLOCK_M * PS];
  __shared__ int ok_s[TILE_N];
  T* q_s = reinterpret_cast<T*>(q_raw);
  T* k_s = reinterpret_cast<T*>(kv_raw);
  T* v_s = k_s + TILE_N * RS;

  const int pid = gridDim.x - 1 - blockIdx.x;  // a sequence's last (longest) query tiles first
  const int kv_head = blockIdx.y / num_subgroups, sub = blockIdx.y % num_subgroups;
  int lo = 0, hi = num_seqs - 1;  // the last sequence whose first program is <= pid
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if ((i64)(cu_seqlens_q[mid] / BLOCK_Q) + mid <= pid) lo = mid; else hi = mid - 1;
  }
  const int seq = lo, cu_start = cu_seqlens_q[seq];
  const int q_start = min(max(cu_start, 0), num_tokens);
  const int q_len = min(max(cu_seqlens_q[seq + 1], q_start), num_tokens) - q_start;
  const i64 q_lo64 = ((i64)pid - (cu_start / BLOCK_Q + (i64)seq)) * BLOCK_Q;
  if (q_lo64 < 0 || q_lo64 >= q_len) return;  // uniform over the block
  const int q_lo = (int)q_lo64, tid = threadIdx.x, tx = tid % 8, ty = tid / 8;
  const int seq_len = clamp_len(seq_lens[seq], max_blocks_per_seq, log2_block_size);
  const int first_pos = seq_len - q_len;  // position of the sequence's first new token

  for (int i = tid; i < BLOCK_M * HEAD_SIZE; i += NTHREADS) {
    const int r = i / HEAD_SIZE, tk = r / ROWS, hg = sub * ROWS + r % ROWS;
    const bool ok = tk < BLOCK_Q && q_lo + tk < q_len && hg < group_size;
    const i64 head = (i64)kv_head * group_size + hg;
    q_s[i] = ok ? q[(i64)(q_start + q_lo + tk) * sq_t + head * sq_h + i % HEAD_SIZE] : from_f(0.f);
  }
  int q_pos[RM];
  float slope[RM], m_run[RM], l_run[RM], acc[RM][DJ][2] = {};
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = ty + 16 * i, tk = r / ROWS, hg = sub * ROWS + r % ROWS;
    const bool ok = tk < BLOCK_Q && q_lo + tk < q_len && hg < group_size;
    q_pos[i] = first_pos + q_lo + tk;
    slope[i] = use_alibi && ok ? alibi[kv_head * group_size + hg] : 0.f;
    m_run[i] = NEG_INF, l_run[i] = 0.f;
  }
  const int min_pos = first_pos + q_lo, max_pos = first_pos + min(q_lo + BLOCK_Q, q_len) - 1;
  const int end = min(max_pos + 1, seq_len);
  const int start = sliding_window > 0 ? (int)max((i64)min_pos - sliding_window + 1, (i64)0) : 0;
  const Paged ctx = {k_cache + kv_head * sk_h, sk_b, sk_t, v_cache + kv_head * sv_h, sv_b, sv_t,
                     block_tables + seq * sbt_s, sbt_b, num_blocks, log2_block_size};

  for (int tile_start = start; tile_start < end; tile_start += TILE_N) {
    __syncthreads();  // the previous tile's readers are done (and q_s is written)
    load_kv_tile(ctx, tile_start, 0, end, k_s, v_s, ok_s);
    cp_commit();
    cp_wait<0>();
    __syncthreads();
    float s[RM][TJ] = {};
    for (int x = 0; x < CH; ++x) {  // q.k products
      float kf[TJ][VEC];
#pragma unroll
      for (int j = 0; j < TJ; ++j) load_vec(k_s + (tx + 8 * j) * RS + x * VEC, kf[j]);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        float qf[VEC];
        load_vec(q_s + (ty + 16 * i) * HEAD_SIZE + x * VEC, qf);
#pragma unroll
        for (int j = 0; j < TJ; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) s[i][j] += qf[e] * kf[j][e];
      }
    }
#pragma unroll
    for (int i = 0; i < RM; ++i) {  // mask, online softmax (row shared by 8 lanes)
      float mx = NEG_INF;
#pragma unroll
      for (int j = 0; j < TJ; ++j) {
        const int t = tx + 8 * j, kp = tile_start + t;
        const bool ok = ok_s[t] && kp <= q_pos[i] && (sliding_window <= 0 || (i64)kp > (i64)q_pos[i] - sliding_window);
        s[i][j] = ok ? score(s[i][j], scale, softcap, slope[i], kp - q_pos[i]) : NEG_INF;
        mx = fmaxf(mx, s[i][j]);
      }
      const float m_new = fmaxf(m_run[i], warp_max(mx, 8));
      const float m_safe = m_new == NEG_INF ? 0.f : m_new;
      const float alpha = expf(m_run[i] - m_safe);
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < TJ; ++j) {
        const float p = s[i][j] > NEG_INF ? expf(s[i][j] - m_safe) : 0.f;
        p_s[(ty + 16 * i) * PS + tx + 8 * j] = p;
        sum += p;
      }
      l_run[i] = l_run[i] * alpha + warp_sum(sum, 8);
      m_run[i] = m_new;
#pragma unroll
      for (int jj = 0; jj < DJ; ++jj) acc[i][jj][0] *= alpha, acc[i][jj][1] *= alpha;
    }
    __syncthreads();
    for (int t = 0; t < TILE_N; ++t) {  // acc += p . V
      float vf[DJ][2];
#pragma unroll
      for (int jj = 0; jj < DJ; ++jj) load_n<2>(v_s + t * RS + 2 * (tx + 8 * jj), vf[jj]);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const float p = p_s[(ty + 16 * i) * PS + t];
#pragma unroll
        for (int jj = 0; jj < DJ; ++jj) acc[i][jj][0] += p * vf[jj][0], acc[i][jj][1] += p * vf[jj][1];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int r = ty + 16 * i, tk = r / ROWS, hg = sub * ROWS + r % ROWS;
    if (!(tk < BLOCK_Q && q_lo + tk < q_len && hg < group_size)) continue;
    const float l = l_run[i], inv = 1.f / (l > 0.f ? l : 1.f);
    const i64 row = q_start + q_lo + tk, head = (i64)kv_head * group_size + hg;
    T* o = out + row * so_t + head * so_h;
#pragma unroll
    for (int jj = 0; jj < DJ; ++jj) {
      o[2 * (tx + 8 * jj)] = from_f(acc[i][jj][0] * inv);
      o[2 * (tx + 8 * jj) + 1] = from_f(acc[i][jj][1] * inv);
    }
    if (write_lse && tx == 0) lse[row * sl_t + head * sl_h] = l > 0.f ? m_run[i] + logf(l) : NEG_INF;
  }
}
#endif  // KERNEL_PREFILL

// CUDA C++ (compiled by NVRTC, no system headers) of the model's kernels. The mock
// backend registers CPU twins under the same names with the same argument lists
// (native/backends/mock/model_kernels.cc), and src/model/kernels/reference.ts holds
// plain TypeScript references; keep all three in step.
//
// Conventions:
// - activations f32, row-major; weights bf16 stored as unsigned short (to f32: bits
//   << 16; from f32: round to nearest even on the bits, NaN kept quiet);
// - element-wise kernels are grid-stride loops over u64 indices, row kernels
//   stride over rows by blockIdx.x, so any grid (capped by the wrapper) is correct;
// - where a kernel's float math has a fixed order (element-wise kernels, the
//   router's sums), it is written with __fadd_rn/__fmul_rn/__fdiv_rn so NVCC cannot
//   contract it into FMAs, and the transcendental functions are evaluated in double
//   and rounded once to float: the results then equal the CPU twins' bit for bit
//   except, very rarely, where the two libraries' double results straddle a float
//   rounding boundary. Reductions (matmul, grouped matmul, rmsnorm, attention) run in
//   parallel and differ from the sequential twins by rounding only.
// - launch shapes the kernels rely on (ModelKernels picks them): every block size a
//   multiple of 32; emoe_matmul_bf16 with M > 64 needs 256 threads, emoe_attention(_f32)
//   256 threads, emoe_router_topk 32 threads and E * 4 bytes of dynamic shared
//   memory, emoe_grouped_matmul_bf16 a one-dimensional block (and the dynamic shared memory
//   ModelKernels.groupedMatmul sizes for its staged x rows), emoe_grouped_matmul_bf16_mma
//   256 threads (sm_80 and later; it traps below), emoe_route_rows one
//   block (a one-dimensional multiple of 32 threads; other blocks exit) with
//   (2 * T*K + E + 1) * 4 bytes of dynamic shared memory. A kernel given a shape it
//   cannot use traps (launch failure) rather than compute something wrong.
// - fused kernels (21-23: emoe_qk_norm_rope, emoe_matmul_qkv_bf16, emoe_add_rmsnorm) share
//   their per-element math with the unfused kernels they replace (emoe_rms_inv,
//   emoe_rope_cs, emoe_matmul_small_col), so with the launchers' block sizes they give the
//   same bits as the unfused sequence; their twins are the unfused twins' compositions.
// - device-side routing (no host round trip): emoe_route_rows turns a rank's top-k ids
//   into one device's row lists; the *_count kernels take their row count from device
//   memory (the routing kernel's total) and run over an upper bound M of rows, doing
//   nothing for rows at or past the count. Their pointers may be another device's
//   memory (peer access), which is how a device computes experts for another rank.
//   emoe_route_rows also writes the device's active list (the experts that got rows,
//   ascending, behind their count), which emoe_grouped_matmul_bf16 takes to visit only
//   those groups: at decode a few of E, so the grid's group dimension is sized for the
//   few (min(E, T*K)) instead of E.
export const MODEL_KERNELS_SOURCE = String.raw`
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

#define EMOE_FULL_MASK 0xffffffffu
#define EMOE_GRID_STRIDE(i, n) \
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (u64)(n); i += (u64)gridDim.x * blockDim.x)

__device__ __forceinline__ float emoe_bf16_to_f32(u16 b) { return __uint_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 emoe_f32_to_bf16(float f) {
  u32 b = __float_as_uint(f);
  if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);  // NaN stays a (quiet) NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return (u16)(b >> 16);
}

__device__ __forceinline__ float emoe_neg_inf() { return __int_as_float(0xff800000); }

// exp, rounded once from double: the same value as the twins' (float)std::exp(double).
__device__ __forceinline__ float emoe_exp_d(float x) { return (float)exp((double)x); }

__device__ __forceinline__ float emoe_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(EMOE_FULL_MASK, v, o);
  return v;
}

__device__ __forceinline__ float emoe_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(EMOE_FULL_MASK, v, o));
  return v;
}

// Sum over the block; every thread gets the same value. shm: 32 floats.
__device__ float emoe_block_sum(float v, float* shm) {
  v = emoe_warp_sum(v);
  const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // earlier readers of shm are done
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  const u32 nw = (blockDim.x + 31) >> 5;
  float r = 0.0f;
  for (u32 i = 0; i < nw; ++i) r += shm[i];
  return r;
}

// 1. out[t, :] = table[tokens[t], :] (bf16 -> f32)
extern "C" __global__ void emoe_embed(float* out, const u16* table, const int* tokens, u32 T, u32 H) {
  const u64 n = (u64)T * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 t = i / H, h = i - t * H;
    out[i] = emoe_bf16_to_f32(table[(u64)tokens[t] * H + h]);
  }
}

// RMSNorm's scale 1 / sqrt(mean(x^2) + eps) of a row of N from each thread's partial sum of
// squares (thread j: elements j, j + blockDim.x, ..., added with __fadd_rn(ss, __fmul_rn(v, v))).
// Shared by emoe_rmsnorm, emoe_add_rmsnorm and emoe_qk_norm_rope, so a row's scale is the same
// bits in all three for the same block size. Every thread gets it; it ends with every earlier
// read of the row done (barrier inside emoe_block_sum).
__device__ __forceinline__ float emoe_rms_inv(float ss, u32 N, float eps, float* shm) {
  ss = emoe_block_sum(ss, shm);
  const float mean = __fdiv_rn(ss, (float)N);
  return __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
}

// 2. out = x * (1 / sqrt(mean(x^2) + eps)) * w, one block per row; out may alias x.
extern "C" __global__ void emoe_rmsnorm(float* out, const float* x, const u16* w, u32 R, u32 N, float eps) {
  __shared__ float shm[32];
  for (u64 r = blockIdx.x; r < R; r += gridDim.x) {
    const float* xr = x + r * N;
    float* orow = out + r * N;
    float ss = 0.0f;
    for (u32 j = threadIdx.x; j < N; j += blockDim.x) {
      const float v = xr[j];
      ss = __fadd_rn(ss, __fmul_rn(v, v));
    }
    const float inv = emoe_rms_inv(ss, N, eps, shm);
    for (u32 j = threadIdx.x; j < N; j += blockDim.x)
      orow[j] = __fmul_rn(__fmul_rn(xr[j], inv), emoe_bf16_to_f32(w[j]));
  }
}

// acc[i] += x[row i, k .. k+7] . (8 bf16 weights in wv), fmaf in ascending k, for rows
// i < rows (x rows ldx floats apart, 16-byte aligned at k).
__device__ __forceinline__ void emoe_dot8_rows(float* acc, uint4 wv, const float* xb, u64 ldx, u32 k, int rows) {
  float wf[8];
  wf[0] = __uint_as_float(wv.x << 16); wf[1] = __uint_as_float(wv.x & 0xffff0000u);
  wf[2] = __uint_as_float(wv.y << 16); wf[3] = __uint_as_float(wv.y & 0xffff0000u);
  wf[4] = __uint_as_float(wv.z << 16); wf[5] = __uint_as_float(wv.z & 0xffff0000u);
  wf[6] = __uint_as_float(wv.w << 16); wf[7] = __uint_as_float(wv.w & 0xffff0000u);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    if (i < rows) {
      const float4* xr = (const float4*)(xb + (u64)i * ldx + k);
      const float4 a = xr[0], b = xr[1];
      float s = acc[i];
      s = fmaf(a.x, wf[0], s); s = fmaf(a.y, wf[1], s); s = fmaf(a.z, wf[2], s); s = fmaf(a.w, wf[3], s);
      s = fmaf(b.x, wf[4], s); s = fmaf(b.y, wf[5], s); s = fmaf(b.z, wf[6], s); s = fmaf(b.w, wf[7], s);
      acc[i] = s;
    }
  }
}

// One lane's share of up to 8 dot products of length K (K % 8 == 0, 16-byte aligned
// rows): k = 256 j + 8 lane + (0..7) for j = 0, 1, ..., in that order. (Issuing four
// weight loads ahead made decode 20-27 % slower on H200: kept one at a time.)
__device__ __forceinline__ void emoe_dot_rows_vec(float* acc, const u16* wr, const float* xb, u32 K, u32 lane,
                                                  int rows) {
  for (u32 k = lane * 8; k < K; k += 256) emoe_dot8_rows(acc, *(const uint4*)(wr + k), xb, K, k, rows);
}

// 3. out[M, N] = x[M, K] . w[N, K]^T, f32 accumulation.
#define EMOE_MATMUL_SMALL_ROWS 64u  // QKV_FUSED_MAX_ROWS and ModelKernels.matmul mirror it
// Small M (decode): one warp per output column n, all rows in groups of 8, a shuffle
// reduction per row; 16-byte loads when K % 8 == 0 and both pointers are 16-byte aligned.
// emoe_matmul_small_col is one warp's column (wr = w + n * K; vec: the 16-byte path), shared
// with emoe_matmul_qkv_bf16, so an output element's summation order is the same in both.
__device__ __forceinline__ void emoe_matmul_small_col(float* out, const float* x, const u16* wr, u32 M, u32 N, u32 K,
                                                      u64 n, u32 lane, bool vec) {
  for (u32 m0 = 0; m0 < M; m0 += 8) {
    float acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
    if (vec) {
      emoe_dot_rows_vec(acc, wr, x + (u64)m0 * K, K, lane, M - m0 < 8 ? (int)(M - m0) : 8);
    } else {
      for (u32 k = lane; k < K; k += 32) {
        const float wf = emoe_bf16_to_f32(wr[k]);
#pragma unroll
        for (int i = 0; i < 8; ++i)
          if (m0 + i < M) acc[i] = fmaf(x[(u64)(m0 + i) * K + k], wf, acc[i]);
      }
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = emoe_warp_sum(acc[i]);
      if (lane == 0 && m0 + i < M) out[(u64)(m0 + i) * N + n] = v;
    }
  }
}

__device__ void emoe_matmul_small(float* out, const float* x, const u16* w, u32 M, u32 N, u32 K) {
  const u32 lane = threadIdx.x & 31;
  const u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
  const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
  const bool vec = (K % 8 == 0) && ((((u64)x) & 15) == 0) && ((((u64)w) & 15) == 0);
  for (u64 n = warp; n < N; n += nwarps) emoe_matmul_small_col(out, x, w + n * K, M, N, K, n, lane, vec);
}

// Larger M: TS x TS output tiles (TS = 64, or 32 when 64-tiles would leave most SMs
// idle), K in steps of 32 through shared memory, 256 threads each computing
// (TS/16) x (TS/16) outputs (rows ty + 16i, columns tx + 16j). The next K step's
// global loads are issued into registers before the current step is computed.
#define EMOE_MM_BK 32
template <int TS>
__device__ __forceinline__ void emoe_mm_load(float* xr, float* wr, const float* x, const u16* w, u32 M, u32 N,
                                             u32 K, u32 m0, u32 n0, u32 k0, u32 tid) {
#pragma unroll
  for (int l = 0; l < TS / 8; ++l) {
    const u32 idx = tid + 256 * l;  // over a TS x 32 tile; a warp reads 32 consecutive k of one row
    const u32 r = idx >> 5, kk = idx & 31;
    const u32 gk = k0 + kk, gm = m0 + r, gn = n0 + r;
    xr[l] = (gm < M && gk < K) ? x[(u64)gm * K + gk] : 0.0f;
    wr[l] = (gn < N && gk < K) ? emoe_bf16_to_f32(w[(u64)gn * K + gk]) : 0.0f;
  }
}

template <int TS>
__device__ void emoe_matmul_tiled(float* out, const float* x, const u16* w, u32 M, u32 N, u32 K) {
  constexpr int R = TS / 16;
  __shared__ float As[EMOE_MM_BK][TS + 1];
  __shared__ float Bs[EMOE_MM_BK][TS + 1];
  if (blockDim.x != 256 || blockDim.y != 1 || blockDim.z != 1) __trap();
  const u32 tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
  const u32 tilesN = (N + TS - 1) / TS, tilesM = (M + TS - 1) / TS;
  const u64 tiles = (u64)tilesM * tilesN;
  for (u64 tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const u32 m0 = (u32)(tile / tilesN) * TS, n0 = (u32)(tile % tilesN) * TS;
    float acc[R][R];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < R; ++j) acc[i][j] = 0.0f;
    float xr[TS / 8], wr[TS / 8];
    emoe_mm_load<TS>(xr, wr, x, w, M, N, K, m0, n0, 0, tid);
    for (u32 k0 = 0; k0 < K; k0 += EMOE_MM_BK) {
#pragma unroll
      for (int l = 0; l < TS / 8; ++l) {
        const u32 idx = tid + 256 * l;
        As[idx & 31][idx >> 5] = xr[l];
        Bs[idx & 31][idx >> 5] = wr[l];
      }
      __syncthreads();
      if (k0 + EMOE_MM_BK < K) emoe_mm_load<TS>(xr, wr, x, w, M, N, K, m0, n0, k0 + EMOE_MM_BK, tid);
#pragma unroll
      for (int kk = 0; kk < EMOE_MM_BK; ++kk) {
        float a[R], b[R];
#pragma unroll
        for (int i = 0; i < R; ++i) { a[i] = As[kk][ty + 16 * i]; b[i] = Bs[kk][tx + 16 * i]; }
#pragma unroll
        for (int i = 0; i < R; ++i)
#pragma unroll
          for (int j = 0; j < R; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < R; ++i) {
      const u32 gm = m0 + ty + 16 * i;
      if (gm >= M) continue;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const u32 gn = n0 + tx + 16 * j;
        if (gn < N) out[(u64)gm * N + gn] = acc[i][j];
      }
    }
  }
}

// The path is a pure function of (M, N), mirrored by ModelKernels.matmul for the grid:
// 0 = warp per column (M <= 64), 1 = 32-tiles, 2 = 64-tiles (when there are at least
// 256 of them, about two per SM of an H100). (H200, batch 32: the tiled path took 23 of a
// 58 ms step for the o_proj and LM head matmuls, which read their weights once as columns.)
__device__ __forceinline__ int emoe_matmul_path(u32 M, u32 N) {
  if (M <= EMOE_MATMUL_SMALL_ROWS) return 0;
  return (u64)((M + 63) / 64) * ((N + 63) / 64) >= 256 ? 2 : 1;
}

extern "C" __global__ void emoe_matmul_bf16(float* out, const float* x, const u16* w, u32 M, u32 N, u32 K) {
  const int path = emoe_matmul_path(M, N);
  if (path == 0) emoe_matmul_small(out, x, w, M, N, K);
  else if (path == 1) emoe_matmul_tiled<32>(out, x, w, M, N, K);
  else emoe_matmul_tiled<64>(out, x, w, M, N, K);
}

// 4. x[M, N] += b[N]
extern "C" __global__ void emoe_add_bias_bf16(float* x, const u16* b, u32 M, u32 N) {
  const u64 n = (u64)M * N;
  EMOE_GRID_STRIDE(i, n) x[i] = __fadd_rn(x[i], emoe_bf16_to_f32(b[i % N]));
}

// 5. Rotary embedding, rotate_half (neox) style, in place over x[T, heads, D]. One
// thread per (token, i < D/2) computes the angle once and rotates every head.
// The rotation of pair j (0 <= j < D/2) at position p: cos and sin of p / theta^(2j/D).
// Shared by emoe_rope and emoe_qk_norm_rope (the same bits in both).
__device__ __forceinline__ void emoe_rope_cs(int p, u32 j, u32 D, float theta, float* c, float* s) {
  const float e = __fdiv_rn((float)(2 * j), (float)D);
  const float pw = (float)pow((double)theta, (double)e);
  const float inv = __fdiv_rn(1.0f, pw);
  const float a = __fmul_rn((float)p, inv);
  *c = (float)cos((double)a);
  *s = (float)sin((double)a);
}

extern "C" __global__ void emoe_rope(float* x, const int* pos, u32 T, u32 heads, u32 D, float theta) {
  const u32 half = D / 2;
  const u64 n = (u64)T * half;
  EMOE_GRID_STRIDE(i, n) {
    const u64 t = i / half;
    const u32 j = (u32)(i - t * half);
    float c, s;
    emoe_rope_cs(pos[t], j, D, theta, &c, &s);
    for (u32 h = 0; h < heads; ++h) {
      float* xh = x + (t * heads + h) * D;
      const float x1 = xh[j], x2 = xh[j + half];
      xh[j] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
      xh[j + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
  }
}

// KV cache elements: bf16 (u16 bits, the default: half the memory) or f32 (K and V exactly as
// computed: with it a model runs in f32 throughout, for comparisons with an f32/f64 reference).
// Sections 6 and 7 are each one body templated on the element type, so the two kernels of a pair
// differ only in how an element is written and read (these overloads): same indexing, same
// products and reductions in the same order.
__device__ __forceinline__ float emoe_kv_load(u16 b) { return emoe_bf16_to_f32(b); }
__device__ __forceinline__ float emoe_kv_load(float f) { return f; }
__device__ __forceinline__ u16 emoe_kv_elem(u16*, float f) { return emoe_f32_to_bf16(f); }
__device__ __forceinline__ float emoe_kv_elem(float*, float f) { return f; }

// 6. Paged KV cache store: emoe_kv_store (bf16 pool), emoe_kv_store_f32 (f32 pool). Block b
// starts at b * L*2*BS*KVH*D elements; inside: [layer][0 = k, 1 = v][slot in block][KVH][D].
// A negative slot is skipped (padding).
template <typename KV>
__device__ __forceinline__ void emoe_kv_store_body(KV* pool, const float* k, const float* v, const int* slots, u32 T,
                                                   u32 KVH, u32 D, u32 layer, u32 L, u32 BS) {
  const u64 row = (u64)KVH * D;
  const u64 n = (u64)T * row;
  const u64 blockElems = (u64)L * 2 * BS * row;
  const u64 layerOff = (u64)layer * 2 * BS * row;
  EMOE_GRID_STRIDE(i, n) {
    const u64 t = i / row, r = i - t * row;
    const int slot = slots[t];
    if (slot < 0) continue;
    const u64 b = (u64)slot / BS, off = (u64)slot % BS;
    const u64 at = b * blockElems + layerOff + off * row + r;
    pool[at] = emoe_kv_elem(pool, k[i]);
    pool[at + (u64)BS * row] = emoe_kv_elem(pool, v[i]);
  }
}
extern "C" __global__ void emoe_kv_store(u16* pool, const float* k, const float* v, const int* slots, u32 T, u32 KVH,
                                         u32 D, u32 layer, u32 L, u32 BS) {
  emoe_kv_store_body(pool, k, v, slots, T, KVH, D, layer, L, BS);
}
extern "C" __global__ void emoe_kv_store_f32(float* pool, const float* k, const float* v, const int* slots, u32 T,
                                             u32 KVH, u32 D, u32 layer, u32 L, u32 BS) {
  emoe_kv_store_body(pool, k, v, slots, T, KVH, D, layer, L, BS);
}

// 7. Causal attention over the paged cache, prefill and decode alike: emoe_attention (bf16
// pool), emoe_attention_f32 (f32 pool). One block of 8 warps per (token, head); warp w takes
// keys w, w+8, ... with an online softmax (lane owns dims lane + 32i, D <= 256), then the 8
// partial states are merged.
// (On an H100, 8 warps halved decode time against 4 and matched it for prefill.)
// A token with a negative position gets a zero output row (padding).
#define EMOE_ATT_WARPS 8
#define EMOE_ATT_MAXD 256
template <typename KV>
__device__ __forceinline__ void emoe_attention_body(float* out, const float* q, const KV* pool, const int* block_table,
                                                    const int* tok_seq, const int* tok_pos, u32 T, u32 NH, u32 KVH,
                                                    u32 D, u32 layer, u32 L, u32 BS, u32 MB, float scale) {
  __shared__ float s_acc[EMOE_ATT_WARPS][EMOE_ATT_MAXD];
  __shared__ float s_m[EMOE_ATT_WARPS];
  __shared__ float s_l[EMOE_ATT_WARPS];
  if (blockDim.x != 32 * EMOE_ATT_WARPS || blockDim.y != 1 || blockDim.z != 1 || D > EMOE_ATT_MAXD) __trap();
  const u32 lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
  const u32 group = NH / KVH;
  const u64 row = (u64)KVH * D;
  const u64 blockElems = (u64)L * 2 * BS * row;
  const u64 layerOff = (u64)layer * 2 * BS * row;
  const u64 pairs = (u64)T * NH;
  const float ninf = emoe_neg_inf();
  for (u64 pr = blockIdx.x; pr < pairs; pr += gridDim.x) {
    const u64 t = pr / NH;
    const u32 h = (u32)(pr - t * NH);
    const u32 g = h / group;
    const int s = tok_seq[t];
    const int p = tok_pos[t];
    float* orow = out + pr * D;
    if (p < 0) {
      for (u32 d = threadIdx.x; d < D; d += blockDim.x) orow[d] = 0.0f;
      continue;  // uniform over the block
    }
    const float* qh = q + pr * D;
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const u32 d = lane + 32 * i;
      qv[i] = d < D ? qh[d] : 0.0f;
      acc[i] = 0.0f;
    }
    float m = ninf, l = 0.0f;
    const int* bt = block_table + (u64)s * MB;
    for (int j = (int)wid; j <= p; j += EMOE_ATT_WARPS) {
      const int blk = bt[(u32)j / BS];
      const KV* kp = pool + (u64)blk * blockElems + layerOff + (u64)((u32)j % BS) * row + (u64)g * D;
      const KV* vp = kp + (u64)BS * row;
      float dot = 0.0f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const u32 d = lane + 32 * i;
        if (d < D) dot = fmaf(qv[i], emoe_kv_load(kp[d]), dot);
      }
      dot = emoe_warp_sum(dot);
      const float sc = dot * scale;
      const float mn = fmaxf(m, sc);
      const float corr = expf(m - mn);  // 0 for the first key (m = -inf)
      const float pj = expf(sc - mn);
      l = l * corr + pj;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const u32 d = lane + 32 * i;
        if (d < D) acc[i] = acc[i] * corr + pj * emoe_kv_load(vp[d]);
      }
      m = mn;
    }
    if (lane == 0) { s_m[wid] = m; s_l[wid] = l; }
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const u32 d = lane + 32 * i;
      if (d < D) s_acc[wid][d] = acc[i];
    }
    __syncthreads();
    float gm = ninf;
    for (int w = 0; w < EMOE_ATT_WARPS; ++w) gm = fmaxf(gm, s_m[w]);  // finite: warp 0 has key 0
    float f[EMOE_ATT_WARPS];
    float denom = 0.0f;
    for (int w = 0; w < EMOE_ATT_WARPS; ++w) {
      f[w] = expf(s_m[w] - gm);  // 0 for a warp that saw no key
      denom += s_l[w] * f[w];
    }
    for (u32 d = threadIdx.x; d < D; d += blockDim.x) {
      float o = 0.0f;
      for (int w = 0; w < EMOE_ATT_WARPS; ++w) o += s_acc[w][d] * f[w];
      orow[d] = o / denom;
    }
    __syncthreads();  // shared state is reused by the next pair
  }
}
extern "C" __global__ void emoe_attention(float* out, const float* q, const u16* pool, const int* block_table,
                                          const int* tok_seq, const int* tok_pos, u32 T, u32 NH, u32 KVH, u32 D,
                                          u32 layer, u32 L, u32 BS, u32 MB, float scale) {
  emoe_attention_body(out, q, pool, block_table, tok_seq, tok_pos, T, NH, KVH, D, layer, L, BS, MB, scale);
}
extern "C" __global__ void emoe_attention_f32(float* out, const float* q, const float* pool, const int* block_table,
                                              const int* tok_seq, const int* tok_pos, u32 T, u32 NH, u32 KVH, u32 D,
                                              u32 layer, u32 L, u32 BS, u32 MB, float scale) {
  emoe_attention_body(out, q, pool, block_table, tok_seq, tok_pos, T, NH, KVH, D, layer, L, BS, MB, scale);
}

// 8. Router: softmax over E (f32, max-subtracted), top K in descending order (ties ->
// lower index), optionally renormalised. One warp per token; the sums run on lane 0
// in index order (as the twin does), so ids and weights match it exactly.
extern "C" __global__ void emoe_router_topk(int* ids, float* weights, const float* logits, u32 T, u32 E, u32 K,
                                            u32 renorm) {
  extern __shared__ float probs[];  // E floats
  if (blockDim.x != 32 || blockDim.y != 1 || blockDim.z != 1) __trap();
  const u32 lane = threadIdx.x;
  for (u64 t = blockIdx.x; t < T; t += gridDim.x) {
    const float* lr = logits + t * E;
    float m = emoe_neg_inf();
    for (u32 e = lane; e < E; e += 32) m = fmaxf(m, lr[e]);
    m = emoe_warp_max(m);
    for (u32 e = lane; e < E; e += 32) probs[e] = emoe_exp_d(__fsub_rn(lr[e], m));
    __syncwarp();
    if (lane == 0) {
      float sum = 0.0f;
      for (u32 e = 0; e < E; ++e) sum = __fadd_rn(sum, probs[e]);
      for (u32 e = 0; e < E; ++e) probs[e] = __fdiv_rn(probs[e], sum);
    }
    __syncwarp();
    int* idr = ids + t * K;
    float* wr = weights + t * K;
    for (u32 k = 0; k < K; ++k) {
      float bv = -1.0f;  // probabilities are >= 0; chosen ones are marked -2
      int bi = 0x7fffffff;
      for (u32 e = lane; e < E; e += 32) {
        const float v = probs[e];
        if (v > bv) { bv = v; bi = (int)e; }
      }
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(EMOE_FULL_MASK, bv, o);
        const int oi = __shfl_xor_sync(EMOE_FULL_MASK, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
      }
      if (lane == 0) {
        idr[k] = bi;
        wr[k] = bv;
        probs[bi] = -2.0f;
      }
      __syncwarp();
    }
    if (lane == 0 && renorm != 0) {
      float s = 0.0f;
      for (u32 k = 0; k < K; ++k) s = __fadd_rn(s, wr[k]);
      for (u32 k = 0; k < K; ++k) wr[k] = __fdiv_rn(wr[k], s);
    }
    __syncwarp();  // probs is reused by the next token
  }
}

// 9. out = gate / (1 + exp(-gate)) * up
extern "C" __global__ void emoe_silu_mul(float* out, const float* gate, const float* up, u64 n) {
  EMOE_GRID_STRIDE(i, n) {
    const float g = gate[i];
    const float d = __fadd_rn(1.0f, emoe_exp_d(-g));
    out[i] = __fmul_rn(__fdiv_rn(g, d), up[i]);
  }
}

// 10. out[i, :] = x[rows[i], :]
extern "C" __global__ void emoe_gather_rows(float* out, const float* x, const int* rows, u32 M, u32 H) {
  const u64 n = (u64)M * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 r = i / H, h = i - r * H;
    out[i] = x[(u64)rows[r] * H + h];
  }
}

// 11. out[rows[i], :] = x[i, :] (rows distinct)
extern "C" __global__ void emoe_scatter_rows(float* out, const float* x, const int* rows, u32 M, u32 H) {
  const u64 n = (u64)M * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 r = i / H, h = i - r * H;
    out[(u64)rows[r] * H + h] = x[i];
  }
}

// 12. out[t, h] += sum over k = 0..K-1, in order, of weights[t, k] * slots[t*K + k, h]
extern "C" __global__ void emoe_combine_topk(float* out, const float* slots, const float* weights, u32 T, u32 K,
                                             u32 H) {
  const u64 n = (u64)T * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 t = i / H, h = i - t * H;
    float acc = 0.0f;
    for (u32 k = 0; k < K; ++k) {
      const u64 sk = t * K + k;
      acc = __fadd_rn(acc, __fmul_rn(weights[sk], slots[sk * H + h]));
    }
    out[i] = __fadd_rn(out[i], acc);
  }
}

// 13. y[t, :] *= 1 / (1 + exp(-g[t])), one block per row
extern "C" __global__ void emoe_sigmoid_scale_rows(float* y, const float* g, u32 T, u32 H) {
  for (u64 t = blockIdx.x; t < T; t += gridDim.x) {
    const float sg = __fdiv_rn(1.0f, __fadd_rn(1.0f, emoe_exp_d(-g[t])));
    float* yr = y + t * H;
    for (u32 j = threadIdx.x; j < H; j += blockDim.x) yr[j] = __fmul_rn(yr[j], sg);
  }
}

// 14. out[r] = index of the first maximum of x[r, :], one block per row
extern "C" __global__ void emoe_argmax(int* out, const float* x, u32 R, u32 N) {
  __shared__ float sv[32];
  __shared__ int si[32];
  const int none = 0x7fffffff;
  const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
  for (u64 r = blockIdx.x; r < R; r += gridDim.x) {
    const float* xr = x + r * N;
    float bv = 0.0f;
    int bi = none;
    for (u32 j = threadIdx.x; j < N; j += blockDim.x) {
      const float v = xr[j];
      if (bi == none || v > bv) { bv = v; bi = (int)j; }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(EMOE_FULL_MASK, bv, o);
      const int oi = __shfl_xor_sync(EMOE_FULL_MASK, bi, o);
      if (oi != none && (bi == none || ov > bv || (ov == bv && oi < bi))) { bv = ov; bi = oi; }
    }
    __syncthreads();  // the previous row's readers are done
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (threadIdx.x == 0) {
      float v = sv[0];
      int b = si[0];
      for (u32 w = 1; w < nw; ++w) {
        const int oi = si[w];
        const float ov = sv[w];
        if (oi != none && (b == none || ov > v || (ov == v && oi < b))) { v = ov; b = oi; }
      }
      out[r] = b == none ? 0 : b;
    }
  }
}

// 15. copies and sums
extern "C" __global__ void emoe_copy_f32(float* out, const float* x, u64 n) {
  EMOE_GRID_STRIDE(i, n) out[i] = x[i];
}

extern "C" __global__ void emoe_add_f32(float* out, const float* a, const float* b, u64 n) {
  EMOE_GRID_STRIDE(i, n) out[i] = __fadd_rn(a[i], b[i]);
}

// 16. Grouped matmul (the routed experts of one device in one launch): for each group g,
// rows row_offsets[g] .. row_offsets[g+1]-1 of out[M, N] = the same rows of x[M, K] .
// W_g^T, where W_g is the bf16 [N, K] matrix at device address weights[g]; f32
// accumulation. Rows outside [row_offsets[0], row_offsets[G]) are not written; a group
// of 0 rows never reads its pointer. Offsets that are negative, decrease or pass M trap.
// Which groups: all G when active is null; else only the listed ones, active[0] = A
// (0..G) followed by A group ids (each in 0..G-1; emoe_route_rows writes them ascending
// and distinct), the other groups' offsets and pointers never read and their rows not
// written. A bad count or id traps. The list changes which groups are visited, never
// how a group's rows are computed: a listed group's rows are bit for bit what the launch
// without the list gives them.
// Grid (column blocks, group slots), both grid-stride: slot a = blockIdx.y, a +=
// gridDim.y, over a < G (group a) or a < A (group active[1 + a]), so any grid.y is
// correct; the launcher sizes it for the groups that can have rows. Each warp owns two
// adjacent output columns n, n+1 of one group and walks the group's rows in chunks,
// reading W_g[n, :] and W_g[n+1, :] once per chunk. Fast path (K % 8 == 0, x and W_g
// 16-byte aligned, K <= EMOE_GMM_SMEM_FLOATS): the block first stages the chunk's x rows
// (EMOE_GMM_SMEM_FLOATS / K of them, at most 8) in dynamic shared memory, which the
// launcher sizes to that (ModelKernels.groupedMatmul), and the warps read x from there:
// on H200 at decode shapes (scripts/native/gmm_bench.cu) 14-24 % less time than reading x
// through L1 at 1-32 tokens, equal at 128. Otherwise rows in chunks of 8 read from global
// memory. Summation order of one output element, fixed on both paths: lane l adds, with
// fmaf in ascending order, k = 256 j + 8 l + i (i = 0..7, j = 0, 1, ...), then the 32
// lane sums meet in the xor-shuffle tree (16, 8, 4, 2, 1). The scalar path walks the
// same k sequence, so a row's result depends only on its x row, W_g[n, :] and K: not on
// the rows that share its group, its place in a chunk, the path, or alignment.
#define EMOE_GMM_SMEM_FLOATS 12288u  // 48 KiB: the default dynamic shared memory limit
__device__ __forceinline__ void emoe_gmm_store(float* out, const float* acc, u32 lane, int rows, int m0, u32 N, u64 n) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    float v = acc[i];
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(EMOE_FULL_MASK, v, o));
    if (lane == 0 && i < rows) out[(u64)(m0 + i) * N + n] = v;
  }
}

extern "C" __global__ void emoe_grouped_matmul_bf16(float* out, const float* x, const u64* weights,
                                                    const int* row_offsets, const int* active, u32 G, u32 M, u32 N,
                                                    u32 K) {
  extern __shared__ float emoe_gmm_xs[];
  if ((blockDim.x & 31) != 0 || blockDim.y != 1 || blockDim.z != 1) __trap();
  const u32 lane = threadIdx.x & 31;
  const u64 wpb = blockDim.x >> 5;
  const u64 warp0 = blockIdx.x * wpb + (threadIdx.x >> 5);
  const u64 nstride = (u64)gridDim.x * wpb * 2;
  const bool xvec = (K % 8 == 0) && ((((u64)x) & 15) == 0);
  const u32 staged = K <= EMOE_GMM_SMEM_FLOATS ? (EMOE_GMM_SMEM_FLOATS / K < 8 ? EMOE_GMM_SMEM_FLOATS / K : 8) : 0;
  const bool listed = active != nullptr;
  u32 A = G;  // group slots: all groups, or the listed ones
  if (listed) {
    const int a0 = active[0];
    if (a0 < 0 || (u32)a0 > G) __trap();
    A = (u32)a0;
  }
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {  // uniform over the block
    u32 g = a;
    if (listed) {
      const int ga = active[1 + a];
      if (ga < 0 || (u32)ga >= G) __trap();
      g = (u32)ga;
    }
    const int r0 = row_offsets[g], r1 = row_offsets[g + 1];
    if (r0 < 0 || r1 < r0 || (u32)r1 > M) __trap();
    if (r0 == r1) continue;  // uniform over the block
    const u16* wg = (const u16*)weights[g];
    const bool vec = xvec && ((((u64)wg) & 15) == 0);
    if (vec && staged > 0) {
      for (int m0 = r0; m0 < r1; m0 += (int)staged) {  // uniform over the block
        const int rows = r1 - m0 < (int)staged ? r1 - m0 : (int)staged;
        __syncthreads();  // the previous chunk's readers are done
        const float4* src = (const float4*)(x + (u64)m0 * K);
        for (u32 i = threadIdx.x; i < (u32)rows * K / 4; i += blockDim.x) ((float4*)emoe_gmm_xs)[i] = src[i];
        __syncthreads();
        for (u64 n = warp0 * 2; n < N; n += nstride) {
          const bool two = n + 1 < N;
          const u16* w0 = wg + n * K;
          const u16* w1 = two ? w0 + K : w0;
          float acc0[8], acc1[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) { acc0[i] = 0.0f; acc1[i] = 0.0f; }
          for (u32 k = lane * 8; k < K; k += 256) {
            const uint4 v0 = *(const uint4*)(w0 + k), v1 = *(const uint4*)(w1 + k);
            emoe_dot8_rows(acc0, v0, emoe_gmm_xs, K, k, rows);
            if (two) emoe_dot8_rows(acc1, v1, emoe_gmm_xs, K, k, rows);
          }
          emoe_gmm_store(out, acc0, lane, rows, m0, N, n);
          if (two) emoe_gmm_store(out, acc1, lane, rows, m0, N, n + 1);
        }
      }
      continue;
    }
    for (u64 n0 = warp0 * 2; n0 < N; n0 += nstride) {
      for (u64 n = n0; n < n0 + 2 && n < N; ++n) {
        const u16* wr = wg + n * K;
        for (int m0 = r0; m0 < r1; m0 += 8) {
          const int rows = r1 - m0 < 8 ? r1 - m0 : 8;
          const float* xb = x + (u64)m0 * K;
          float acc[8];
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
          if (vec) {
            emoe_dot_rows_vec(acc, wr, xb, K, lane, rows);
          } else {
            for (u32 k0 = lane * 8; k0 < K; k0 += 256) {
              const u32 kn = K - k0 < 8 ? K - k0 : 8;
              for (u32 j = 0; j < kn; ++j) {
                const float wf = emoe_bf16_to_f32(wr[k0 + j]);
#pragma unroll
                for (int i = 0; i < 8; ++i)
                  if (i < rows) acc[i] = fmaf(xb[(u64)i * K + k0 + j], wf, acc[i]);
              }
            }
          }
          emoe_gmm_store(out, acc, lane, rows, m0, N, n);
        }
      }
    }
  }
}

// 16b. emoe_grouped_matmul_bf16_mma and _mma_fewrows: emoe_grouped_matmul_bf16's contract (arguments, groups,
// active list, traps, rows not written) on tensor cores (sm_80 and later: mma.sync m16n8k16,
// bf16 in, f32 accumulate). The f32 activations are split exactly into three bf16 parts
// (x = hi + mid + lo, each the round-to-nearest bf16 of what the earlier parts leave: 3 x 8
// significant bits hold an f32's 24), and each part is multiplied with the bf16 weights (bf16
// products are exact): f32-level results, not bf16 activations. A finite x must stay below
// 2^127 in magnitude (its hi part must not round to infinity).
// Shape: 256 threads (8 warps); a block computes 128 output columns of up to 32 rows (4 tiles
// of 8; _fewrows: 16 rows, 2 tiles) of one group at a time. Warp w computes 16 columns (the
// mma's A operand, read straight from W_g's rows into registers a stage ahead) of every tile
// (B = x^T). K goes in 64-k stages of two 32-k chunks (_fewrows: 128-k stages of four); each
// stage's x rows are split once by the block into shared memory
// (double buffered, laid out as the B fragments: one 16-byte load per lane, part and tile)
// while the warps multiply the previous stage. Grid (column blocks, group slots), both
// grid-stride as for emoe_grouped_matmul_bf16; no dynamic shared memory.
// Fragment k order: in a chunk, lane (g = lane / 4, t = lane % 4) holds k = 8t .. 8t + 7 of its
// rows; the chunk's first mma takes 8t + 0..3 as its k = 2t, 2t + 1, 2t + 8, 2t + 9, the second
// 8t + 4..7: one permutation of a dot product's terms inside an mma, the same on both operands
// and for every row.
// Summation order of one output element, fixed: chunks in ascending k (k >= K is zero in both
// operands), each chunk's six mmas (parts lo, mid, hi; first mma then second) accumulated from
// zero, then added to the element's sum with __fadd_rn. Every row takes the same instruction
// sequence with its own x row and W_g column as operands, so a row's result depends only on
// its x row, W_g[n, :] and K: not on the rows that share its group, its place in a tile, the
// grid, or alignment (misaligned operands are loaded element by element into the same
// fragments). It differs from emoe_grouped_matmul_bf16's by rounding only (H100, scripts/
// gmm-mma-bench.sh: worst error 7-10e-7 of scale against double, CUDA cores 7e-7).
#define EMOE_MMA_COLS 128  // output columns per block (8 warps x 16)
__device__ __forceinline__ u32 emoe_pack_bf16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

// A lane's 8 x values of a chunk as B fragments: b[p] holds part p (0 hi, 1 mid, 2 lo) of
// v[0..7], two per word, so that v = b[0] + b[1] + b[2] exactly.
__device__ __forceinline__ void emoe_mma_split(uint4* b, const float* v) {
  float r[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) r[i] = v[i];
#pragma unroll
  for (int p = 0; p < 3; ++p) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[i] = emoe_pack_bf16x2(r[2 * i], r[2 * i + 1]);
      r[2 * i] = __fsub_rn(r[2 * i], __uint_as_float(w[i] << 16));
      r[2 * i + 1] = __fsub_rn(r[2 * i + 1], __uint_as_float(w[i] & 0xffff0000u));
    }
    b[p] = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

__device__ __forceinline__ void emoe_mma_bf16(float* d, uint4 a, u32 b0, u32 b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b0), "r"(b1));
}

// One chunk into sum[4] (the lane's D fragment): w0, w1 = the lane's 8 weights of rows g and
// g + 8 of its 16 columns; b = the three parts of its x fragment.
__device__ __forceinline__ void emoe_mma_chunk(float* sum, uint4 w0, uint4 w1, uint4 b2, uint4 b1, uint4 b0) {
  const uint4 a0 = make_uint4(w0.x, w1.x, w0.y, w1.y), a1 = make_uint4(w0.z, w1.z, w0.w, w1.w);
  float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  emoe_mma_bf16(d, a0, b2.x, b2.y);
  emoe_mma_bf16(d, a1, b2.z, b2.w);
  emoe_mma_bf16(d, a0, b1.x, b1.y);
  emoe_mma_bf16(d, a1, b1.z, b1.w);
  emoe_mma_bf16(d, a0, b0.x, b0.y);
  emoe_mma_bf16(d, a1, b0.z, b0.w);
#pragma unroll
  for (int i = 0; i < 4; ++i) sum[i] = __fadd_rn(sum[i], d[i]);
}

// 8 bf16 of row n of W (n < N, else zeros), k = k .. k + 7 (zeros past K), as one uint4.
__device__ __forceinline__ uint4 emoe_mma_wload(const u16* wg, u64 n, u32 N, u32 k, u32 K, bool vec) {
  if (n >= N || k >= K) return make_uint4(0, 0, 0, 0);
  const u16* p = wg + n * K + k;
  if (vec) return *(const uint4*)p;  // K % 8 == 0: k + 7 < K
  u32 w[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const u32 lo = k + 2 * i < K ? p[2 * i] : 0, hi = k + 2 * i + 1 < K ? p[2 * i + 1] : 0;
    w[i] = lo | (hi << 16);
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// 8 floats of an x row (in: the row is one of the tile's, else zeros), k = k .. k + 7 (zeros past K).
__device__ __forceinline__ void emoe_mma_xload(float* v, const float* xr, bool in, u32 k, u32 K, bool vec) {
  if (in && vec && k + 8 <= K) {
    const float4 a = *(const float4*)(xr + k), b = *(const float4*)(xr + k + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = (in && k + i < K) ? xr[k + i] : 0.0f;
}

// The lane's D fragment of one tile: sum[0..1] = column n, rows m0 + 2t + 0..1; sum[2..3] = column n + 8.
__device__ __forceinline__ void emoe_mma_store(float* out, const float* sum, int m0, int rows, u64 n, u32 N, u32 t) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * (int)t + i;
    if (r >= rows) continue;
    float* o = out + (u64)(m0 + r) * N;
    if (n < N) o[n] = sum[i];
    if (n + 8 < N) o[n + 8] = sum[2 + i];
  }
}

// The number of group slots (G, or the active list's count), and slot a's group: its rows [r0, r1) and matrix.
__device__ __forceinline__ u32 emoe_mma_slots(const int* active, u32 G) {
  if (active == nullptr) return G;
  const int a0 = active[0];
  if (a0 < 0 || (u32)a0 > G) __trap();
  return (u32)a0;
}
__device__ __forceinline__ const u16* emoe_mma_group(const u64* weights, const int* row_offsets, const int* active,
                                                     u32 a, u32 G, u32 M, int* r0, int* r1) {
  u32 gi = a;
  if (active != nullptr) {
    const int ga = active[1 + a];
    if (ga < 0 || (u32)ga >= G) __trap();
    gi = (u32)ga;
  }
  *r0 = row_offsets[gi];
  *r1 = row_offsets[gi + 1];
  if (*r0 < 0 || *r1 < *r0 || (u32)*r1 > M) __trap();
  return (const u16*)weights[gi];
}

// The body, for TILES 8-row tiles per pass and CH 32-k chunks per stage (8 x TILES x 4 x CH = 256
// staging items, one per thread).
template <int TILES, int CH>
__device__ __forceinline__ void emoe_gmm_mma(float* out, const float* x, const u64* weights, const int* row_offsets,
                                             const int* active, u32 G, u32 M, u32 N, u32 K) {
  // [buffer][chunk][tile][part][lane]: lane (g, t)'s B fragments of the tile's row g, k 8t .. 8t + 7.
  __shared__ uint4 xs[2][CH][TILES][3][32];
  constexpr u32 QS = CH * 4;  // 8-k groups per stage
  constexpr u32 STAGE_K = CH * 32;
  static_assert(8 * TILES * QS == 256, "one staging item (a row's 8 k of a stage) per thread");
  if (blockDim.x != 256 || blockDim.y != 1 || blockDim.z != 1) __trap();
  const u32 tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t4 = lane & 3;
  const u32 sr = tid / QS, sq = tid % QS;  // staging: row of the pass and 8-k group of the stage
  const bool xvec = (K % 4 == 0) && ((((u64)x) & 15) == 0);
  const u32 A = emoe_mma_slots(active, G);
  const u32 stages = (K + STAGE_K - 1) / STAGE_K;
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {  // uniform over the block
    int r0, r1;
    const u16* wg = emoe_mma_group(weights, row_offsets, active, a, G, M, &r0, &r1);
    if (r0 == r1) continue;
    const bool wvec = (K % 8 == 0) && ((((u64)wg) & 15) == 0);
    for (int m0 = r0; m0 < r1; m0 += 8 * TILES) {  // uniform
      const int rows = r1 - m0 < 8 * TILES ? r1 - m0 : 8 * TILES;
      const int tiles = (rows + 7) / 8;
      const bool stager = sr < (u32)(8 * tiles);
      const float* sxr = x + (u64)(m0 + (int)sr) * K;
      for (u64 n0 = (u64)blockIdx.x * EMOE_MMA_COLS; n0 < N; n0 += (u64)gridDim.x * EMOE_MMA_COLS) {  // uniform
        const u64 nw = n0 + 16 * warp + g;  // this lane's A rows: nw and nw + 8
        float acc[TILES][4];
#pragma unroll
        for (int j = 0; j < TILES; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
        uint4 wn[CH][2];
        float xv[8];
        auto load = [&](u32 s) {
          const u32 k0 = s * STAGE_K;
#pragma unroll
          for (int c = 0; c < CH; ++c) {
            wn[c][0] = emoe_mma_wload(wg, nw, N, k0 + 32 * c + 8 * t4, K, wvec);
            wn[c][1] = emoe_mma_wload(wg, nw + 8, N, k0 + 32 * c + 8 * t4, K, wvec);
          }
          if (stager) emoe_mma_xload(xv, sxr, (int)sr < rows, k0 + 8 * sq, K, xvec);
        };
        auto stage = [&](int buf) {
          if (!stager) return;
          uint4 b[3];
          emoe_mma_split(b, xv);
          const u32 c = sq / 4, j = sr / 8, l = (sr % 8) * 4 + sq % 4;
#pragma unroll
          for (int p = 0; p < 3; ++p) xs[buf][c][j][p][l] = b[p];
        };
        load(0);
        stage(0);
        __syncthreads();
        for (u32 s = 0; s < stages; ++s) {
          uint4 w[CH][2];
#pragma unroll
          for (int c = 0; c < CH; ++c) { w[c][0] = wn[c][0]; w[c][1] = wn[c][1]; }
          if (s + 1 < stages) load(s + 1);
          const int buf = s & 1;
#pragma unroll
          for (int c = 0; c < CH; ++c) {
            if (s * STAGE_K + 32 * c >= K) break;  // uniform
#pragma unroll
            for (int j = 0; j < TILES; ++j) {
              if (j >= tiles) break;  // uniform
              const uint4* b = xs[buf][c][j][0] + lane;
              emoe_mma_chunk(acc[j], w[c][0], w[c][1], b[64], b[32], b[0]);
            }
          }
          if (s + 1 < stages) stage(buf ^ 1);
          __syncthreads();
        }
#pragma unroll
        for (int j = 0; j < TILES; ++j)
          if (j < tiles) emoe_mma_store(out, acc[j], m0 + 8 * j, rows - 8 * j, nw, N, t4);
      }
    }
  }
}

// The two entries: the same per-row arithmetic (hence the same bits), tiled for many rows per
// group (32-row passes, 64-k stages) or for few (16-row passes, 128-k stages: half the stages,
// each with twice the weight loads in flight). ModelKernels.groupedMatmul picks by rows per group.
#if __CUDA_ARCH__ >= 800
#define EMOE_MMA_ENTRY(name, TILES, CH)                                                                            \
  extern "C" __global__ void __launch_bounds__(256) name(float* out, const float* x, const u64* weights,           \
                                                         const int* row_offsets, const int* active, u32 G, u32 M, \
                                                         u32 N, u32 K) {                                           \
    emoe_gmm_mma<TILES, CH>(out, x, weights, row_offsets, active, G, M, N, K);                                     \
  }
#else  // tensor cores: sm_80 and later (ModelKernels picks emoe_grouped_matmul_bf16 below that)
#define EMOE_MMA_ENTRY(name, TILES, CH) \
  extern "C" __global__ void name(float*, const float*, const u64*, const int*, const int*, u32, u32, u32, u32) { __trap(); }
#endif
EMOE_MMA_ENTRY(emoe_grouped_matmul_bf16_mma, 4, 2)
EMOE_MMA_ENTRY(emoe_grouped_matmul_bf16_mma_fewrows, 2, 4)


// 17. Device-side routing of one rank's T*K (token, k) pairs for one computing device.
// ids [T*K] are the rank's top-k expert ids (row t*K + k; may be read from another
// device), route [E] names the device index that computes each expert for that rank,
// and device is this launch's computing device. Output, for the experts x with
// route[x] == device only: row_offsets [E + 1] (row_offsets[x] .. row_offsets[x+1]-1 are
// expert x's rows, empty for the other experts; row_offsets[E] = the total), and for
// each sorted row p < total: rows[p] = t (the token whose hidden state is the row's input)
// and perm[p] = t*K + k (its slot). Within an expert the rows are in increasing (t, k)
// order, so the result is a pure function of the inputs. Entries of rows and perm at or
// past the total are not written. active [E + 1]: active[0] = A, the number of experts
// with at least one row here, and active[1..A] those experts in ascending order (the
// list emoe_grouped_matmul_bf16 takes); entries past A are not written. An id outside
// 0..E-1 traps.
// One block: the keys (x, or -1 for pairs another device computes) and each pair's rank
// within its expert go to shared memory; warp 0 assigns the ranks 32 pairs at a time in
// index order (__match_any_sync groups the lanes of one expert, the last of them advances
// the expert's counter), then prefix-sums the counts, 32 experts at a time, and in the
// same pass appends the experts of nonzero count to the active list (a ballot of the 32
// counts; each such lane's place is the number of set lanes below it, after those of the
// earlier passes); every thread writes the row lists.
// Integer counting only: no float math, no atomics.
extern "C" __global__ void emoe_route_rows(int* row_offsets, int* rows, int* perm, int* active, const int* ids,
                                           const int* route, u32 device, u32 T, u32 K, u32 E) {
  extern __shared__ int emoe_route_shm[];  // key [T*K], rank [T*K], count/offset [E + 1]
  if ((blockDim.x & 31) != 0 || blockDim.y != 1 || blockDim.z != 1) __trap();
  if (blockIdx.x != 0 || blockIdx.y != 0 || blockIdx.z != 0) return;
  const u32 TK = T * K;
  int* s_key = emoe_route_shm;
  int* s_rank = emoe_route_shm + TK;
  int* s_cnt = emoe_route_shm + 2 * TK;
  const u32 tid = threadIdx.x, nt = blockDim.x;
  for (u32 x = tid; x <= E; x += nt) s_cnt[x] = 0;
  for (u32 i = tid; i < TK; i += nt) {
    const int x = ids[i];
    if (x < 0 || (u32)x >= E) __trap();
    s_key[i] = route[x] == (int)device ? x : -1;
  }
  __syncthreads();
  if (tid < 32) {
    const u32 lane = tid;
    for (u32 base = 0; base < TK; base += 32) {  // uniform over the warp
      const u32 i = base + lane;
      const int x = i < TK ? s_key[i] : -1;
      const u32 peers = __match_any_sync(EMOE_FULL_MASK, x);
      const int c = x >= 0 ? s_cnt[x] : 0;
      __syncwarp();  // every lane has read its expert's counter
      if (x >= 0) {
        s_rank[i] = c + __popc(peers & ((1u << lane) - 1u));
        if (lane == 31u - __clz(peers)) s_cnt[x] = c + __popc(peers);
      }
      __syncwarp();
    }
    // Exclusive prefix sum of the counts, in place; s_cnt[E] = the total. The experts with
    // rows go to the active list in ascending order.
    int carry = 0, nact = 0;
    for (u32 b = 0; b < E; b += 32) {  // uniform over the warp
      const u32 j = b + lane;
      const int v = j < E ? s_cnt[j] : 0;
      const u32 has = __ballot_sync(EMOE_FULL_MASK, v > 0);
      if (v > 0) active[1 + nact + __popc(has & ((1u << lane) - 1u))] = (int)j;
      nact += __popc(has);
      int incl = v;
      for (u32 o = 1; o < 32; o <<= 1) {
        const int n = __shfl_up_sync(EMOE_FULL_MASK, incl, o);
        if (lane >= o) incl += n;
      }
      if (j < E) s_cnt[j] = carry + incl - v;
      carry += __shfl_sync(EMOE_FULL_MASK, incl, 31);
    }
    if (lane == 0) {
      s_cnt[E] = carry;
      active[0] = nact;
    }
  }
  __syncthreads();
  for (u32 x = tid; x <= E; x += nt) row_offsets[x] = s_cnt[x];
  for (u32 i = tid; i < TK; i += nt) {
    const int x = s_key[i];
    if (x < 0) continue;
    const int p = s_cnt[x] + s_rank[i];
    rows[p] = (int)(i / K);
    perm[p] = (int)i;
  }
}

// The row count of the *_count kernels: *count, which must be in 0..M (else trap).
__device__ __forceinline__ u32 emoe_row_count(const int* count, u32 M) {
  const int n = *count;
  if (n < 0 || (u32)n > M) __trap();
  return (u32)n;
}

// 18. emoe_gather_rows over the first *count rows: out[i, :] = x[rows[i], :] for i < *count <= M.
extern "C" __global__ void emoe_gather_rows_count(float* out, const float* x, const int* rows, const int* count, u32 M,
                                                  u32 H) {
  const u64 n = (u64)emoe_row_count(count, M) * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 r = i / H, h = i - r * H;
    out[i] = x[(u64)rows[r] * H + h];
  }
}

// 19. emoe_scatter_rows over the first *count rows: out[rows[i], :] = x[i, :] for i < *count <= M (rows distinct).
extern "C" __global__ void emoe_scatter_rows_count(float* out, const float* x, const int* rows, const int* count,
                                                   u32 M, u32 H) {
  const u64 n = (u64)emoe_row_count(count, M) * H;
  EMOE_GRID_STRIDE(i, n) {
    const u64 r = i / H, h = i - r * H;
    out[(u64)rows[r] * H + h] = x[i];
  }
}

// 20. emoe_silu_mul over the first *count rows of N: out = silu(gate) * up for elements < *count * N (*count <= M).
extern "C" __global__ void emoe_silu_mul_count(float* out, const float* gate, const float* up, const int* count, u32 M,
                                               u32 N) {
  const u64 n = (u64)emoe_row_count(count, M) * N;
  EMOE_GRID_STRIDE(i, n) {
    const float g = gate[i];
    const float d = __fadd_rn(1.0f, emoe_exp_d(-g));
    out[i] = __fmul_rn(__fdiv_rn(g, d), up[i]);
  }
}

// Fused kernels of the attention block (fewer launches per layer: at batch-1 decode every
// kernel is latency-bound). Each computes its elements with the same helpers and rounded
// operations as the unfused sequence it replaces, so on the same launch shapes the results
// are the same bits (the CPU twins are the exact compositions of the unfused twins).

// 21. Per-head RMSNorm then rotary embedding, in place, over q [T, NH, D] and k [T, KVH, D] in
// one launch (qwen3_moe's q_norm/k_norm then RoPE; replaces emoe_rmsnorm on q, on k, and
// emoe_rope on q, on k). One block per head row, block-stride: rows 0..T*NH-1 are q's
// (token row / NH, weights qw), the next T*KVH are k's (token (row - T*NH) / KVH, weights kw).
// A row is normed as emoe_rmsnorm does (thread j's partial sum over j, j + blockDim.x, ...,
// emoe_rms_inv, then (x * inv) * w), and each pair (i, i + D/2) rotated with emoe_rope_cs and
// emoe_rope's formula. The norm's bits equal emoe_rmsnorm's at 256 threads when blockDim.x >= D
// (one element per thread; the extra warps of 256 only add zeros) or blockDim.x == 256: the
// launcher gives min(256, D rounded up to 32). qw and kw null: no norm, rope only (mixtral,
// qwen2_moe; replaces the two emoe_rope launches; the launcher gives D/2 rounded up to 32
// threads). D even; the blockDim a multiple of 32.
extern "C" __global__ void emoe_qk_norm_rope(float* q, float* k, const u16* qw, const u16* kw, const int* pos, u32 T,
                                             u32 NH, u32 KVH, u32 D, float eps, float theta) {
  __shared__ float shm[32];
  const u32 half = D / 2;
  const u64 qrows = (u64)T * NH;
  const u64 rows = qrows + (u64)T * KVH;
  for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {  // uniform over the block
    const bool isq = r < qrows;
    const u64 t = isq ? r / NH : (r - qrows) / KVH;
    float* xr = isq ? q + r * D : k + (r - qrows) * D;
    const u16* w = isq ? qw : kw;
    const int p = pos[t];
    // This thread's first pair's angle, before the reduction (its latency overlaps the sums).
    float c0 = 1.0f, s0 = 0.0f;
    if (threadIdx.x < half) emoe_rope_cs(p, threadIdx.x, D, theta, &c0, &s0);
    float inv = 1.0f;
    if (w != nullptr) {
      float ss = 0.0f;
      for (u32 j = threadIdx.x; j < D; j += blockDim.x) {
        const float v = xr[j];
        ss = __fadd_rn(ss, __fmul_rn(v, v));
      }
      inv = emoe_rms_inv(ss, D, eps, shm);  // every read of the row's sums done before any write
    }
    for (u32 i = threadIdx.x; i < half; i += blockDim.x) {
      float c = c0, s = s0;
      if (i != threadIdx.x) emoe_rope_cs(p, i, D, theta, &c, &s);
      float x1 = xr[i], x2 = xr[i + half];
      if (w != nullptr) {
        x1 = __fmul_rn(__fmul_rn(x1, inv), emoe_bf16_to_f32(w[i]));
        x2 = __fmul_rn(__fmul_rn(x2, inv), emoe_bf16_to_f32(w[i + half]));
      }
      xr[i] = __fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s));
      xr[i + half] = __fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s));
    }
  }
}

// 22. q = x . wq^T [M, Nq], k = x . wk^T and v = x . wv^T [M, Nkv] in one launch (replaces three
// emoe_matmul_bf16 launches at decode): one warp per output column of the Nq + 2 Nkv, as
// emoe_matmul_small (emoe_matmul_small_col: the same dot helper, the same 16-byte load rule per
// matrix, the same shuffle reduction), so each element is the bits emoe_matmul_bf16 gives it for
// M <= EMOE_MATMUL_SMALL_ROWS. Correct for any M, but the launcher takes it for such M only (three
// emoe_matmul_bf16 launches above: their tiled path).
extern "C" __global__ void emoe_matmul_qkv_bf16(float* q, float* k, float* v, const float* x, const u16* wq,
                                                const u16* wk, const u16* wv, u32 M, u32 Nq, u32 Nkv, u32 K) {
  const u32 lane = threadIdx.x & 31;
  const u64 warp = (blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5;
  const u64 nwarps = ((u64)gridDim.x * blockDim.x) >> 5;
  const bool xvec = (K % 8 == 0) && ((((u64)x) & 15) == 0);
  const u64 cols = (u64)Nq + 2 * (u64)Nkv;
  for (u64 col = warp; col < cols; col += nwarps) {  // uniform over the warp
    float* out = q;
    const u16* w = wq;
    u32 N = Nq;
    u64 n = col;
    if (col >= Nq) {
      n = col - Nq;
      N = Nkv;
      out = k;
      w = wk;
      if (n >= Nkv) {
        n -= Nkv;
        out = v;
        w = wv;
      }
    }
    const bool vec = xvec && ((((u64)w) & 15) == 0);
    emoe_matmul_small_col(out, x, w + n * K, M, N, K, n, lane, vec);
  }
}

// 23. x[R, N] += y (the o_proj output), then xn = rmsnorm(x) * w, one block per row (replaces
// emoe_add_f32 then emoe_rmsnorm): the sum rounded once as emoe_add_f32 does, then the row normed
// as emoe_rmsnorm does (the same bits for the same block size: the launchers give both 256). xn
// must not overlap x or y.
extern "C" __global__ void emoe_add_rmsnorm(float* x, float* xn, const float* y, const u16* w, u32 R, u32 N,
                                            float eps) {
  __shared__ float shm[32];
  for (u64 r = blockIdx.x; r < R; r += gridDim.x) {
    float* xr = x + r * N;
    const float* yr = y + r * N;
    float* orow = xn + r * N;
    float ss = 0.0f;
    for (u32 j = threadIdx.x; j < N; j += blockDim.x) {
      const float v = __fadd_rn(xr[j], yr[j]);
      xr[j] = v;
      ss = __fadd_rn(ss, __fmul_rn(v, v));
    }
    const float inv = emoe_rms_inv(ss, N, eps, shm);
    for (u32 j = threadIdx.x; j < N; j += blockDim.x)  // xr[j]: this thread's own write
      orow[j] = __fmul_rn(__fmul_rn(xr[j], inv), emoe_bf16_to_f32(w[j]));
  }
}
`;

/** Every kernel in MODEL_KERNELS_SOURCE (each has a CPU twin of the same name in the mock). */
export const MODEL_KERNEL_NAMES = [
  'emoe_embed',
  'emoe_rmsnorm',
  'emoe_matmul_bf16',
  'emoe_add_bias_bf16',
  'emoe_rope',
  'emoe_kv_store',
  'emoe_attention',
  'emoe_router_topk',
  'emoe_silu_mul',
  'emoe_gather_rows',
  'emoe_scatter_rows',
  'emoe_combine_topk',
  'emoe_sigmoid_scale_rows',
  'emoe_argmax',
  'emoe_copy_f32',
  'emoe_add_f32',
  'emoe_grouped_matmul_bf16',
  'emoe_grouped_matmul_bf16_mma',
  'emoe_grouped_matmul_bf16_mma_fewrows',
  'emoe_route_rows',
  'emoe_gather_rows_count',
  'emoe_scatter_rows_count',
  'emoe_silu_mul_count',
  'emoe_qk_norm_rope',
  'emoe_matmul_qkv_bf16',
  'emoe_add_rmsnorm',
  'emoe_kv_store_f32',
  'emoe_attention_f32',
] as const;

export type ModelKernelName = (typeof MODEL_KERNEL_NAMES)[number];

// CPU twins of the model kernels in src/model/kernels/source.ts: same names, same
// argument lists, same semantics. They are the mock backend's ground truth, so they
// are plain sequential loops in a fixed order, deterministic, and written float
// operation by float operation like the TypeScript references in
// src/model/kernels/reference.ts (which round with Math.fround at each step), so the
// two agree bit for bit. Transcendental functions are evaluated in double and rounded
// once to float (the references do the same with Math.exp/pow/cos/sin).
//
// Every pointer is validated through ctx.Ptr before anything is written. Where the
// extent of a buffer depends on data (token ids, rows, slots, block tables), the
// twin reads the (validated) index array first, rejects negative indices with the
// illegal-address error a GPU would give, and validates the largest extent used.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "backends/mock/mock_kernels.h"

// The twins must not fuse a*b+c into one rounding (the references cannot).
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace emoe {
namespace {

inline float Bf16ToF32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t F32ToBf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  if ((b & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((b >> 16) | 0x40u);  // quiet NaN
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

inline float ExpD(float x) { return static_cast<float>(std::exp(static_cast<double>(x))); }

[[noreturn]] void BadIndex(const MockKernelContext& ctx, size_t arg, uint64_t at, int64_t value,
                           const std::string& what) {
  ThrowError(ErrorKind::kIllegalAddress, "mock", "Launch", 700, "MOCK_ERROR_ILLEGAL_ADDRESS",
             "kernel '" + ctx.name + "' on device " + std::to_string(ctx.device) + ": argument " +
                 std::to_string(arg) + " element " + std::to_string(at) + " is " +
                 std::to_string(value) + ", " + what);
}

[[noreturn]] void BadSize(const MockKernelContext& ctx, const std::string& what) {
  ThrowInvalidArgument("mock", "Launch", "args", what + " for kernel '" + ctx.name + "'");
}

// Largest value of idx[0..n), or -1 when n == 0; a negative entry is an illegal address.
int64_t MaxIndex(const MockKernelContext& ctx, size_t arg, const int32_t* idx, uint64_t n) {
  int64_t m = -1;
  for (uint64_t i = 0; i < n; ++i) {
    if (idx[i] < 0) BadIndex(ctx, arg, i, idx[i], "a row index must not be negative");
    if (idx[i] > m) m = idx[i];
  }
  return m;
}

// Whether the optional pointer argument `i` is given: a pointer (true), or the null address passed as the u64 0
// (false, the launchers' "none"). Anything else is an invalid argument list.
bool OptionalPtr(const MockKernelContext& ctx, size_t i) {
  if (i < ctx.args.size() && ctx.args[i].type == ArgType::kPtr) return true;
  if (ctx.U64(i) != 0) BadSize(ctx, "argument " + std::to_string(i) + ": a pointer, or the u64 0 for none");
  return false;
}

// The loops of the twins that the fused twins compose (emoe_qk_norm_rope, emoe_matmul_qkv_bf16,
// emoe_add_rmsnorm): one definition each, so a fused twin is the unfused sequence bit for bit.

// emoe_rmsnorm over R rows of N; out may alias x.
void RmsnormRows(float* out, const float* x, const uint16_t* w, uint64_t R, uint64_t N, float eps) {
  for (uint64_t r = 0; r < R; ++r) {
    const float* xr = x + r * N;
    float* orow = out + r * N;
    float ss = 0.0f;
    for (uint64_t j = 0; j < N; ++j) ss = ss + xr[j] * xr[j];
    const float mean = ss / static_cast<float>(N);
    const float inv = 1.0f / std::sqrt(mean + eps);
    for (uint64_t j = 0; j < N; ++j) orow[j] = (xr[j] * inv) * Bf16ToF32(w[j]);
  }
}

// emoe_rope in place over x[T, heads, D] (D even).
void RopeHeads(float* x, const int32_t* pos, uint64_t T, uint64_t heads, uint64_t D, float theta) {
  const uint64_t half = D / 2;
  for (uint64_t t = 0; t < T; ++t) {
    for (uint64_t j = 0; j < half; ++j) {
      const float e = static_cast<float>(2 * j) / static_cast<float>(D);
      const float p = static_cast<float>(std::pow(static_cast<double>(theta), static_cast<double>(e)));
      const float inv = 1.0f / p;
      const float a = static_cast<float>(pos[t]) * inv;
      const float c = static_cast<float>(std::cos(static_cast<double>(a)));
      const float s = static_cast<float>(std::sin(static_cast<double>(a)));
      for (uint64_t h = 0; h < heads; ++h) {
        float* xh = x + (t * heads + h) * D;
        const float x1 = xh[j], x2 = xh[j + half];
        xh[j] = x1 * c - x2 * s;
        xh[j + half] = x2 * c + x1 * s;
      }
    }
  }
}

// emoe_matmul_bf16: out[M, N] = x[M, K] . w[N, K]^T, each element a sequential dot product (k in order).
void MatmulRows(float* out, const float* x, const uint16_t* w, uint64_t M, uint64_t N, uint64_t K) {
  std::vector<float> wf(K);
  for (uint64_t n = 0; n < N && M > 0; ++n) {
    const uint16_t* wr = w + n * K;
    for (uint64_t k = 0; k < K; ++k) wf[k] = Bf16ToF32(wr[k]);
    for (uint64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc = 0.0f;
      for (uint64_t k = 0; k < K; ++k) acc = acc + xr[k] * wf[k];
      out[m * N + n] = acc;
    }
  }
}

// emoe_add_f32: out = a + b over n elements (out may be a).
void AddF32(float* out, const float* a, const float* b, uint64_t n) {
  for (uint64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// The bodies that the plain and the *_count twins share (their pointer arguments sit at the
// same places: out 0, x or gate 1, rows or up 2), over the first n rows or elements.

// out[i, :] = x[rows[i], :] for i < n.
void GatherRowsFirst(MockKernelContext& ctx, uint64_t n, uint64_t H) {
  const int32_t* rows = ctx.Ptr<int32_t>(2, n, false);
  const uint64_t R = static_cast<uint64_t>(MaxIndex(ctx, 2, rows, n) + 1);
  const float* x = ctx.Ptr<float>(1, R * H, false);
  float* out = ctx.Ptr<float>(0, n * H, true);
  for (uint64_t i = 0; i < n; ++i) {
    const float* src = x + static_cast<uint64_t>(rows[i]) * H;
    for (uint64_t h = 0; h < H; ++h) out[i * H + h] = src[h];
  }
}

// out[rows[i], :] = x[i, :] for i < n.
void ScatterRowsFirst(MockKernelContext& ctx, uint64_t n, uint64_t H) {
  const int32_t* rows = ctx.Ptr<int32_t>(2, n, false);
  const uint64_t R = static_cast<uint64_t>(MaxIndex(ctx, 2, rows, n) + 1);
  const float* x = ctx.Ptr<float>(1, n * H, false);
  float* out = ctx.Ptr<float>(0, R * H, true);
  for (uint64_t i = 0; i < n; ++i) {
    float* dst = out + static_cast<uint64_t>(rows[i]) * H;
    for (uint64_t h = 0; h < H; ++h) dst[h] = x[i * H + h];
  }
}

// out = silu(gate) * up over the first n elements.
void SiluMulFirst(MockKernelContext& ctx, uint64_t n) {
  const float* gate = ctx.Ptr<float>(1, n, false);
  const float* up = ctx.Ptr<float>(2, n, false);
  float* out = ctx.Ptr<float>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float d = 1.0f + ExpD(-g);
    out[i] = (g / d) * up[i];
  }
}

}  // namespace

// 1. emoe_embed(f32* out[T,H], const u16* table[V,H], const i32* tokens[T], u32 T, u32 H)
EMOE_MOCK_KERNEL(emoe_embed) {
  const uint64_t T = ctx.U32(3), H = ctx.U32(4);
  const int32_t* tokens = ctx.Ptr<int32_t>(2, T, false);
  const uint64_t V = static_cast<uint64_t>(MaxIndex(ctx, 2, tokens, T) + 1);
  const uint16_t* table = ctx.Ptr<uint16_t>(1, V * H, false);
  float* out = ctx.Ptr<float>(0, T * H, true);
  for (uint64_t t = 0; t < T; ++t) {
    const uint16_t* row = table + static_cast<uint64_t>(tokens[t]) * H;
    for (uint64_t h = 0; h < H; ++h) out[t * H + h] = Bf16ToF32(row[h]);
  }
}

// 2. emoe_rmsnorm(f32* out[R,N], const f32* x[R,N], const u16* w[N], u32 R, u32 N, f32 eps); out may alias x
EMOE_MOCK_KERNEL(emoe_rmsnorm) {
  const uint64_t R = ctx.U32(3), N = ctx.U32(4);
  const float eps = ctx.F32(5);
  const float* x = ctx.Ptr<float>(1, R * N, false);
  const uint16_t* w = ctx.Ptr<uint16_t>(2, R > 0 ? N : 0, false);
  float* out = ctx.Ptr<float>(0, R * N, true);
  RmsnormRows(out, x, w, R, N, eps);
}

// 3. emoe_matmul_bf16(f32* out[M,N], const f32* x[M,K], const u16* w[N,K], u32 M, u32 N, u32 K)
EMOE_MOCK_KERNEL(emoe_matmul_bf16) {
  const uint64_t M = ctx.U32(3), N = ctx.U32(4), K = ctx.U32(5);
  const float* x = ctx.Ptr<float>(1, M * K, false);
  const uint16_t* w = ctx.Ptr<uint16_t>(2, M > 0 ? N * K : 0, false);
  float* out = ctx.Ptr<float>(0, M * N, true);
  MatmulRows(out, x, w, M, N, K);
}

// 4. emoe_add_bias_bf16(f32* x[M,N], const u16* b[N], u32 M, u32 N)
EMOE_MOCK_KERNEL(emoe_add_bias_bf16) {
  const uint64_t M = ctx.U32(2), N = ctx.U32(3);
  const uint16_t* b = ctx.Ptr<uint16_t>(1, M > 0 ? N : 0, false);
  float* x = ctx.Ptr<float>(0, M * N, true);
  for (uint64_t m = 0; m < M; ++m)
    for (uint64_t n = 0; n < N; ++n) x[m * N + n] = x[m * N + n] + Bf16ToF32(b[n]);
}

// 5. emoe_rope(f32* x[T,heads,D], const i32* pos[T], u32 T, u32 heads, u32 D, f32 theta)
EMOE_MOCK_KERNEL(emoe_rope) {
  const uint64_t T = ctx.U32(2), heads = ctx.U32(3), D = ctx.U32(4);
  const float theta = ctx.F32(5);
  if (D % 2 != 0) BadSize(ctx, "an even head dim D (got " + std::to_string(D) + ")");
  const int32_t* pos = ctx.Ptr<int32_t>(1, T, false);
  float* x = ctx.Ptr<float>(0, T * heads * D, true);
  RopeHeads(x, pos, T, heads, D, theta);
}

namespace {

// KV cache elements: bf16 bits (uint16_t) or f32. The twins of sections 6 and 7 are one template
// each, instantiated for both element types, so a bf16 twin and its f32 twin differ only in
// these conversions: same validation, same indexing, same sums in the same order.
inline uint16_t KvElem(uint16_t*, float x) { return F32ToBf16(x); }
inline float KvElem(float*, float x) { return x; }
inline float KvLoad(uint16_t b) { return Bf16ToF32(b); }
inline float KvLoad(float x) { return x; }

// 6. emoe_kv_store(u16* pool, ...) and emoe_kv_store_f32(f32* pool, ...), the rest of the arguments
//    const f32* k[T,KVH,D], const f32* v[T,KVH,D], const i32* slots[T], u32 T, u32 KVH, u32 D,
//    u32 layer, u32 L, u32 BS; a negative slot is skipped
template <typename KV>
void KvStoreTwin(MockKernelContext& ctx) {
  const uint64_t T = ctx.U32(4), KVH = ctx.U32(5), D = ctx.U32(6), layer = ctx.U32(7), L = ctx.U32(8),
                 BS = ctx.U32(9);
  if (T > 0 && (BS == 0 || layer >= L)) {
    BadSize(ctx, "BS >= 1 and layer < L (got BS " + std::to_string(BS) + ", layer " + std::to_string(layer) +
                     ", L " + std::to_string(L) + ")");
  }
  const uint64_t row = KVH * D;
  const float* k = ctx.Ptr<float>(1, T * row, false);
  const float* v = ctx.Ptr<float>(2, T * row, false);
  const int32_t* slots = ctx.Ptr<int32_t>(3, T, false);
  const uint64_t blockElems = L * 2 * BS * row;
  int64_t maxBlock = -1;
  for (uint64_t t = 0; t < T; ++t) {
    if (slots[t] >= 0) maxBlock = std::max<int64_t>(maxBlock, static_cast<int64_t>(slots[t] / BS));
  }
  KV* pool = ctx.Ptr<KV>(0, static_cast<uint64_t>(maxBlock + 1) * blockElems, true);
  for (uint64_t t = 0; t < T; ++t) {
    if (slots[t] < 0) continue;
    const uint64_t slot = static_cast<uint64_t>(slots[t]);
    const uint64_t base = (slot / BS) * blockElems + layer * 2 * BS * row + (slot % BS) * row;
    for (uint64_t r = 0; r < row; ++r) {
      pool[base + r] = KvElem(pool, k[t * row + r]);
      pool[base + BS * row + r] = KvElem(pool, v[t * row + r]);
    }
  }
}

// 7. emoe_attention(f32* out[T,NH,D], const f32* q[T,NH,D], const u16* pool, const i32* block_table[S,MB],
//                   const i32* tok_seq[T], const i32* tok_pos[T], u32 T, u32 NH, u32 KVH, u32 D, u32 layer,
//                   u32 L, u32 BS, u32 MB, f32 scale), and emoe_attention_f32 (const f32* pool)
// Scores s_j = (sum_d q[d]*k_j[d]) * scale for j = 0..p; m = max s_j; e_j = exp(s_j - m);
// out[d] = (sum_j e_j * v_j[d]) / (sum_j e_j), every sum in index order. Negative position: zeros.
template <typename KV>
void AttentionTwin(MockKernelContext& ctx) {
  const uint64_t T = ctx.U32(6), NH = ctx.U32(7), KVH = ctx.U32(8), D = ctx.U32(9), layer = ctx.U32(10),
                 L = ctx.U32(11), BS = ctx.U32(12), MB = ctx.U32(13);
  const float scale = ctx.F32(14);
  if (T > 0 && (KVH == 0 || NH % KVH != 0 || BS == 0 || layer >= L)) {
    BadSize(ctx, "KVH >= 1 dividing NH, BS >= 1 and layer < L");
  }
  const float* q = ctx.Ptr<float>(1, T * NH * D, false);
  const int32_t* tok_seq = ctx.Ptr<int32_t>(4, T, false);
  const int32_t* tok_pos = ctx.Ptr<int32_t>(5, T, false);
  float* out = ctx.Ptr<float>(0, T * NH * D, true);
  int64_t maxSeq = -1;
  for (uint64_t t = 0; t < T; ++t) {
    if (tok_pos[t] < 0) continue;
    if (tok_seq[t] < 0) BadIndex(ctx, 4, t, tok_seq[t], "a sequence index must not be negative");
    if (static_cast<uint64_t>(tok_pos[t]) / BS >= MB) {
      BadIndex(ctx, 5, t, tok_pos[t], "beyond the block table's " + std::to_string(MB) + " blocks of " +
                                          std::to_string(BS));
    }
    maxSeq = std::max<int64_t>(maxSeq, tok_seq[t]);
  }
  const int32_t* table = ctx.Ptr<int32_t>(3, static_cast<uint64_t>(maxSeq + 1) * MB, false);
  int64_t maxBlock = -1;
  for (uint64_t t = 0; t < T; ++t) {
    if (tok_pos[t] < 0) continue;
    const uint64_t base = static_cast<uint64_t>(tok_seq[t]) * MB;
    for (uint64_t b = 0; b <= static_cast<uint64_t>(tok_pos[t]) / BS; ++b) {
      const int32_t blk = table[base + b];
      if (blk < 0) BadIndex(ctx, 3, base + b, blk, "a KV block index must not be negative");
      maxBlock = std::max<int64_t>(maxBlock, blk);
    }
  }
  const uint64_t row = KVH * D;
  const uint64_t blockElems = L * 2 * BS * row;
  const KV* pool = ctx.Ptr<KV>(2, static_cast<uint64_t>(maxBlock + 1) * blockElems, false);
  const uint64_t group = KVH > 0 ? NH / KVH : 1;
  std::vector<float> scores, acc(D);
  for (uint64_t t = 0; t < T; ++t) {
    const int32_t p = tok_pos[t];
    if (p < 0) {
      for (uint64_t i = 0; i < NH * D; ++i) out[t * NH * D + i] = 0.0f;
      continue;
    }
    const int32_t* bt = table + static_cast<uint64_t>(tok_seq[t]) * MB;
    scores.assign(static_cast<size_t>(p) + 1, 0.0f);
    for (uint64_t h = 0; h < NH; ++h) {
      const uint64_t g = h / group;
      const float* qh = q + (t * NH + h) * D;
      auto key = [&](uint64_t j) {
        return pool + static_cast<uint64_t>(bt[j / BS]) * blockElems + layer * 2 * BS * row + (j % BS) * row + g * D;
      };
      for (uint64_t j = 0; j <= static_cast<uint64_t>(p); ++j) {
        const KV* kp = key(j);
        float dot = 0.0f;
        for (uint64_t d = 0; d < D; ++d) dot = dot + qh[d] * KvLoad(kp[d]);
        scores[j] = dot * scale;
      }
      float m = scores[0];
      for (uint64_t j = 1; j <= static_cast<uint64_t>(p); ++j) m = std::max(m, scores[j]);
      float sum = 0.0f;
      for (uint64_t j = 0; j <= static_cast<uint64_t>(p); ++j) {
        scores[j] = ExpD(scores[j] - m);
        sum = sum + scores[j];
      }
      for (uint64_t d = 0; d < D; ++d) acc[d] = 0.0f;
      for (uint64_t j = 0; j <= static_cast<uint64_t>(p); ++j) {
        const KV* vp = key(j) + BS * row;
        for (uint64_t d = 0; d < D; ++d) acc[d] = acc[d] + scores[j] * KvLoad(vp[d]);
      }
      float* orow = out + (t * NH + h) * D;
      for (uint64_t d = 0; d < D; ++d) orow[d] = acc[d] / sum;
    }
  }
}

}  // namespace

EMOE_MOCK_KERNEL(emoe_kv_store) { KvStoreTwin<uint16_t>(ctx); }
EMOE_MOCK_KERNEL(emoe_kv_store_f32) { KvStoreTwin<float>(ctx); }
EMOE_MOCK_KERNEL(emoe_attention) { AttentionTwin<uint16_t>(ctx); }
EMOE_MOCK_KERNEL(emoe_attention_f32) { AttentionTwin<float>(ctx); }

// 8. emoe_router_topk(i32* ids[T,K], f32* weights[T,K], const f32* logits[T,E], u32 T, u32 E, u32 K, u32 renorm)
EMOE_MOCK_KERNEL(emoe_router_topk) {
  const uint64_t T = ctx.U32(3), E = ctx.U32(4), K = ctx.U32(5);
  const uint32_t renorm = ctx.U32(6);
  if (T > 0 && (E == 0 || K == 0 || K > E)) BadSize(ctx, "1 <= K <= E");
  const float* logits = ctx.Ptr<float>(2, T * E, false);
  int32_t* ids = ctx.Ptr<int32_t>(0, T * K, true);
  float* weights = ctx.Ptr<float>(1, T * K, true);
  std::vector<float> probs(E);
  for (uint64_t t = 0; t < T; ++t) {
    const float* lr = logits + t * E;
    float m = lr[0];
    for (uint64_t e = 1; e < E; ++e) m = std::max(m, lr[e]);
    float sum = 0.0f;
    for (uint64_t e = 0; e < E; ++e) {
      probs[e] = ExpD(lr[e] - m);
      sum = sum + probs[e];
    }
    for (uint64_t e = 0; e < E; ++e) probs[e] = probs[e] / sum;
    for (uint64_t k = 0; k < K; ++k) {
      float bv = -1.0f;  // probabilities are >= 0; chosen ones are marked -2
      uint64_t bi = 0;
      for (uint64_t e = 0; e < E; ++e) {
        if (probs[e] > bv) {
          bv = probs[e];
          bi = e;
        }
      }
      ids[t * K + k] = static_cast<int32_t>(bi);
      weights[t * K + k] = bv;
      probs[bi] = -2.0f;
    }
    if (renorm != 0) {
      float s = 0.0f;
      for (uint64_t k = 0; k < K; ++k) s = s + weights[t * K + k];
      for (uint64_t k = 0; k < K; ++k) weights[t * K + k] = weights[t * K + k] / s;
    }
  }
}

// 9. emoe_silu_mul(f32* out[n], const f32* gate[n], const f32* up[n], u64 n)
EMOE_MOCK_KERNEL(emoe_silu_mul) {
  SiluMulFirst(ctx, ctx.U64(3));
}

// 10. emoe_gather_rows(f32* out[M,H], const f32* x[R,H], const i32* rows[M], u32 M, u32 H)
EMOE_MOCK_KERNEL(emoe_gather_rows) {
  GatherRowsFirst(ctx, ctx.U32(3), ctx.U32(4));
}

// 11. emoe_scatter_rows(f32* out[R,H], const f32* x[M,H], const i32* rows[M], u32 M, u32 H)
EMOE_MOCK_KERNEL(emoe_scatter_rows) {
  ScatterRowsFirst(ctx, ctx.U32(3), ctx.U32(4));
}

// 12. emoe_combine_topk(f32* out[T,H], const f32* slots[T*K,H], const f32* weights[T,K], u32 T, u32 K, u32 H)
EMOE_MOCK_KERNEL(emoe_combine_topk) {
  const uint64_t T = ctx.U32(3), K = ctx.U32(4), H = ctx.U32(5);
  const float* slots = ctx.Ptr<float>(1, T * K * H, false);
  const float* weights = ctx.Ptr<float>(2, T * K, false);
  float* out = ctx.Ptr<float>(0, T * H, true);
  for (uint64_t t = 0; t < T; ++t) {
    for (uint64_t h = 0; h < H; ++h) {
      float acc = 0.0f;
      for (uint64_t k = 0; k < K; ++k) acc = acc + weights[t * K + k] * slots[(t * K + k) * H + h];
      out[t * H + h] = out[t * H + h] + acc;
    }
  }
}

// 13. emoe_sigmoid_scale_rows(f32* y[T,H], const f32* g[T], u32 T, u32 H)
EMOE_MOCK_KERNEL(emoe_sigmoid_scale_rows) {
  const uint64_t T = ctx.U32(2), H = ctx.U32(3);
  const float* g = ctx.Ptr<float>(1, T, false);
  float* y = ctx.Ptr<float>(0, T * H, true);
  for (uint64_t t = 0; t < T; ++t) {
    const float sg = 1.0f / (1.0f + ExpD(-g[t]));
    for (uint64_t h = 0; h < H; ++h) y[t * H + h] = y[t * H + h] * sg;
  }
}

// 14. emoe_argmax(i32* out[R], const f32* x[R,N], u32 R, u32 N): first maximum per row
EMOE_MOCK_KERNEL(emoe_argmax) {
  const uint64_t R = ctx.U32(2), N = ctx.U32(3);
  if (R > 0 && N == 0) BadSize(ctx, "N >= 1");
  const float* x = ctx.Ptr<float>(1, R * N, false);
  int32_t* out = ctx.Ptr<int32_t>(0, R, true);
  for (uint64_t r = 0; r < R; ++r) {
    const float* xr = x + r * N;
    float best = xr[0];
    uint64_t bi = 0;
    for (uint64_t j = 1; j < N; ++j) {
      if (xr[j] > best) {
        best = xr[j];
        bi = j;
      }
    }
    out[r] = static_cast<int32_t>(bi);
  }
}

// 15. emoe_copy_f32(f32* out, const f32* x, u64 n); emoe_add_f32(f32* out, const f32* a, const f32* b, u64 n)
EMOE_MOCK_KERNEL(emoe_copy_f32) {
  const uint64_t n = ctx.U64(2);
  const float* x = ctx.Ptr<float>(1, n, false);
  float* out = ctx.Ptr<float>(0, n, true);
  if (n > 0 && out != x) std::memmove(out, x, n * sizeof(float));
}

EMOE_MOCK_KERNEL(emoe_add_f32) {
  const uint64_t n = ctx.U64(3);
  const float* a = ctx.Ptr<float>(1, n, false);
  const float* b = ctx.Ptr<float>(2, n, false);
  float* out = ctx.Ptr<float>(0, n, true);
  AddF32(out, a, b, n);
}

// 16. emoe_grouped_matmul_bf16(f32* out[M,N], const f32* x[M,K], const u64* weights[G], const i32* row_offsets[G+1],
//                              const i32* active[G+1] or 0, u32 G, u32 M, u32 N, u32 K)
// Rows row_offsets[g]..row_offsets[g+1]-1 of out = the same rows of x . W_g^T, W_g the bf16 [N,K] matrix at
// address weights[g]. Each output element is the sequential dot product of emoe_matmul_bf16's twin (k in order),
// so a row's result depends on its x row and W_g alone, never on the other rows of its group. Offsets must be
// non-decreasing in 0..M (else the illegal-address error; checked for every group, listed or not, which is stricter
// than the CUDA kernel with a list); a group of 0 rows never dereferences its pointer; rows outside
// [row_offsets[0], row_offsets[G]) are left as they are. With an active list (active[0] = A in 0..G, then A group
// ids in 0..G-1, else the illegal-address error), only the listed groups run, in list order: an unlisted group's
// pointer is never dereferenced and its rows are left as they are; a listed group's rows are the same as without it.
static void GroupedMatmulTwin(MockKernelContext& ctx) {
  const uint64_t G = ctx.U32(5), M = ctx.U32(6), N = ctx.U32(7), K = ctx.U32(8);
  if (G == 0) BadSize(ctx, "G >= 1");
  const int32_t* offsets = ctx.Ptr<int32_t>(3, G + 1, false);
  const uint64_t* weights = ctx.Ptr<uint64_t>(2, G, false);
  for (uint64_t g = 0; g <= G; ++g) {
    const int32_t o = offsets[g];
    if (o < 0 || static_cast<uint64_t>(o) > M) {
      BadIndex(ctx, 3, g, o, "a row offset must be in 0.." + std::to_string(M));
    }
    if (g > 0 && o < offsets[g - 1]) BadIndex(ctx, 3, g, o, "row offsets must not decrease");
  }
  // The groups to run: all, or the active list's.
  std::vector<uint64_t> groups;
  if (OptionalPtr(ctx, 4)) {
    const int32_t A = *ctx.Ptr<int32_t>(4, 1, false);
    if (A < 0 || static_cast<uint64_t>(A) > G) {
      BadIndex(ctx, 4, 0, A, "an active list's count must be in 0.." + std::to_string(G));
    }
    const int32_t* active = ctx.Ptr<int32_t>(4, 1 + static_cast<uint64_t>(A), false);
    for (uint64_t a = 1; a <= static_cast<uint64_t>(A); ++a) {
      if (active[a] < 0 || static_cast<uint64_t>(active[a]) >= G) {
        BadIndex(ctx, 4, a, active[a], "an active group must be in 0.." + std::to_string(G - 1));
      }
      groups.push_back(static_cast<uint64_t>(active[a]));
    }
  } else {
    for (uint64_t g = 0; g < G; ++g) groups.push_back(g);
  }
  const float* x = ctx.Ptr<float>(1, M * K, false);
  float* out = ctx.Ptr<float>(0, M * N, true);
  // Every group's matrix is validated before anything is written.
  std::vector<const uint16_t*> w(G, nullptr);
  for (const uint64_t g : groups) {
    if (offsets[g + 1] > offsets[g]) w[g] = ctx.PtrAt<const uint16_t>(2, weights[g], N * K, false);
  }
  std::vector<float> wf(K);
  for (const uint64_t g : groups) {
    const uint64_t r0 = static_cast<uint64_t>(offsets[g]), r1 = static_cast<uint64_t>(offsets[g + 1]);
    if (r1 == r0) continue;
    for (uint64_t n = 0; n < N; ++n) {
      const uint16_t* wr = w[g] + n * K;
      for (uint64_t k = 0; k < K; ++k) wf[k] = Bf16ToF32(wr[k]);
      for (uint64_t m = r0; m < r1; ++m) {
        const float* xr = x + m * K;
        float acc = 0.0f;
        for (uint64_t k = 0; k < K; ++k) acc = acc + xr[k] * wf[k];
        out[m * N + n] = acc;
      }
    }
  }
}

EMOE_MOCK_KERNEL(emoe_grouped_matmul_bf16) { GroupedMatmulTwin(ctx); }

// 16b. emoe_grouped_matmul_bf16_mma and _mma_fewrows: the same contract on tensor cores (two tilings, the same
// bits), which differ from the CUDA cores' sums by rounding only; the twin is 16's. Like the CUDA kernels, they take
// only a block of 256 x 1 x 1 threads.
static void GroupedMatmulMmaTwin(MockKernelContext& ctx) {
  const auto& b = ctx.config.block;
  if (b[0] != 256 || b[1] != 1 || b[2] != 1) BadSize(ctx, "a block of 256 x 1 x 1 threads");
  GroupedMatmulTwin(ctx);
}
EMOE_MOCK_KERNEL(emoe_grouped_matmul_bf16_mma) { GroupedMatmulMmaTwin(ctx); }
EMOE_MOCK_KERNEL(emoe_grouped_matmul_bf16_mma_fewrows) { GroupedMatmulMmaTwin(ctx); }

// 17. emoe_route_rows(i32* row_offsets[E+1], i32* rows[T*K], i32* perm[T*K], i32* active[E+1], const i32* ids[T*K],
//                     const i32* route[E], u32 device, u32 T, u32 K, u32 E)
// For the experts x with route[x] == device: row_offsets[x]..row_offsets[x+1]-1 are expert x's sorted rows (the other
// experts get none; row_offsets[E] is the total); sorted row p < total has rows[p] = t and perm[p] = t*K + k, in
// increasing (t, k) order within an expert. Entries at or past the total are not written. active[0] = A, the number
// of experts with rows, active[1..A] those experts ascending; entries past A are not written. An id outside 0..E-1 is
// an illegal address (the CUDA kernel traps), found before anything is written. ids may be another device's memory.
EMOE_MOCK_KERNEL(emoe_route_rows) {
  const uint32_t device = ctx.U32(6);
  const uint64_t T = ctx.U32(7), K = ctx.U32(8), E = ctx.U32(9);
  const uint64_t TK = T * K;
  if (TK > 0 && E == 0) BadSize(ctx, "E >= 1");
  const int32_t* ids = ctx.Ptr<int32_t>(4, TK, false);
  const int32_t* route = ctx.Ptr<int32_t>(5, TK > 0 ? E : 0, false);
  for (uint64_t i = 0; i < TK; ++i) {
    if (ids[i] < 0 || static_cast<uint64_t>(ids[i]) >= E) {
      BadIndex(ctx, 4, i, ids[i], "an expert id must be in 0.." + std::to_string(E == 0 ? 0 : E - 1));
    }
  }
  int32_t* offsets = ctx.Ptr<int32_t>(0, E + 1, true);
  int32_t* rows = ctx.Ptr<int32_t>(1, TK, true);
  int32_t* perm = ctx.Ptr<int32_t>(2, TK, true);
  int32_t* active = ctx.Ptr<int32_t>(3, E + 1, true);
  std::vector<int32_t> next(E + 1, 0);
  for (uint64_t i = 0; i < TK; ++i) {
    if (route[ids[i]] == static_cast<int32_t>(device)) ++next[ids[i]];
  }
  int32_t total = 0, nact = 0;
  for (uint64_t x = 0; x < E; ++x) {
    const int32_t c = next[x];
    if (c > 0) active[1 + nact++] = static_cast<int32_t>(x);
    offsets[x] = total;
    next[x] = total;
    total += c;
  }
  offsets[E] = total;
  active[0] = nact;
  for (uint64_t i = 0; i < TK; ++i) {
    const int32_t x = ids[i];
    if (route[x] != static_cast<int32_t>(device)) continue;
    const int32_t p = next[x]++;
    rows[p] = static_cast<int32_t>(i / K);
    perm[p] = static_cast<int32_t>(i);
  }
}

namespace {

// The row count of the *_count twins: *count (argument `arg`), which must be in 0..M (else the illegal-address
// error, as the CUDA kernels trap).
uint64_t RowCount(const MockKernelContext& ctx, size_t arg, uint64_t M) {
  const int32_t n = *ctx.Ptr<int32_t>(arg, 1, false);
  if (n < 0 || static_cast<uint64_t>(n) > M) BadIndex(ctx, arg, 0, n, "a row count must be in 0.." + std::to_string(M));
  return static_cast<uint64_t>(n);
}

}  // namespace

// 18. emoe_gather_rows_count(f32* out[M,H], const f32* x[R,H], const i32* rows[M], const i32* count[1], u32 M, u32 H):
// emoe_gather_rows over the first *count (<= M) rows; the rest of out is left as it is.
EMOE_MOCK_KERNEL(emoe_gather_rows_count) {
  const uint64_t M = ctx.U32(4), H = ctx.U32(5);
  GatherRowsFirst(ctx, RowCount(ctx, 3, M), H);
}

// 19. emoe_scatter_rows_count(f32* out[R,H], const f32* x[M,H], const i32* rows[M], const i32* count[1], u32 M, u32 H):
// emoe_scatter_rows over the first *count (<= M) rows.
EMOE_MOCK_KERNEL(emoe_scatter_rows_count) {
  const uint64_t M = ctx.U32(4), H = ctx.U32(5);
  ScatterRowsFirst(ctx, RowCount(ctx, 3, M), H);
}

// 20. emoe_silu_mul_count(f32* out[M,N], const f32* gate[M,N], const f32* up[M,N], const i32* count[1], u32 M, u32 N):
// emoe_silu_mul over the first *count (<= M) rows of N elements.
EMOE_MOCK_KERNEL(emoe_silu_mul_count) {
  const uint64_t M = ctx.U32(4), N = ctx.U32(5);
  SiluMulFirst(ctx, RowCount(ctx, 3, M) * N);
}

// 21. emoe_qk_norm_rope(f32* q[T,NH,D], f32* k[T,KVH,D], const u16* qw[D] or 0, const u16* kw[D] or 0,
//                       const i32* pos[T], u32 T, u32 NH, u32 KVH, u32 D, f32 eps, f32 theta)
// With the norm weights: emoe_rmsnorm in place over q's T*NH rows (qw) and k's T*KVH rows (kw) of D, then emoe_rope
// over q and over k; without (both 0): the two emoe_rope only. Every pointer is validated before anything is written.
EMOE_MOCK_KERNEL(emoe_qk_norm_rope) {
  const uint64_t T = ctx.U32(5), NH = ctx.U32(6), KVH = ctx.U32(7), D = ctx.U32(8);
  const float eps = ctx.F32(9), theta = ctx.F32(10);
  if (D % 2 != 0) BadSize(ctx, "an even head dim D (got " + std::to_string(D) + ")");
  const bool qn = OptionalPtr(ctx, 2), kn = OptionalPtr(ctx, 3);
  if (qn != kn) BadSize(ctx, "both norm weights (arguments 2 and 3) or neither");
  const uint64_t rows = T * (NH + KVH);
  const uint16_t* qw = qn ? ctx.Ptr<uint16_t>(2, rows > 0 ? D : 0, false) : nullptr;
  const uint16_t* kw = kn ? ctx.Ptr<uint16_t>(3, rows > 0 ? D : 0, false) : nullptr;
  const int32_t* pos = ctx.Ptr<int32_t>(4, T, false);
  float* q = ctx.Ptr<float>(0, T * NH * D, true);
  float* k = ctx.Ptr<float>(1, T * KVH * D, true);
  if (qn) {
    RmsnormRows(q, q, qw, T * NH, D, eps);
    RmsnormRows(k, k, kw, T * KVH, D, eps);
  }
  RopeHeads(q, pos, T, NH, D, theta);
  RopeHeads(k, pos, T, KVH, D, theta);
}

// 22. emoe_matmul_qkv_bf16(f32* q[M,Nq], f32* k[M,Nkv], f32* v[M,Nkv], const f32* x[M,K], const u16* wq[Nq,K],
//                          const u16* wk[Nkv,K], const u16* wv[Nkv,K], u32 M, u32 Nq, u32 Nkv, u32 K)
// emoe_matmul_bf16 three times: q = x . wq^T, k = x . wk^T, v = x . wv^T.
EMOE_MOCK_KERNEL(emoe_matmul_qkv_bf16) {
  const uint64_t M = ctx.U32(7), Nq = ctx.U32(8), Nkv = ctx.U32(9), K = ctx.U32(10);
  const float* x = ctx.Ptr<float>(3, M * K, false);
  const uint16_t* wq = ctx.Ptr<uint16_t>(4, M > 0 ? Nq * K : 0, false);
  const uint16_t* wk = ctx.Ptr<uint16_t>(5, M > 0 ? Nkv * K : 0, false);
  const uint16_t* wv = ctx.Ptr<uint16_t>(6, M > 0 ? Nkv * K : 0, false);
  float* q = ctx.Ptr<float>(0, M * Nq, true);
  float* k = ctx.Ptr<float>(1, M * Nkv, true);
  float* v = ctx.Ptr<float>(2, M * Nkv, true);
  MatmulRows(q, x, wq, M, Nq, K);
  MatmulRows(k, x, wk, M, Nkv, K);
  MatmulRows(v, x, wv, M, Nkv, K);
}

// 23. emoe_add_rmsnorm(f32* x[R,N], f32* xn[R,N], const f32* y[R,N], const u16* w[N], u32 R, u32 N, f32 eps)
// emoe_add_f32 (x = x + y) then emoe_rmsnorm (xn = rmsnorm(x) * w).
EMOE_MOCK_KERNEL(emoe_add_rmsnorm) {
  const uint64_t R = ctx.U32(4), N = ctx.U32(5);
  const float eps = ctx.F32(6);
  const float* y = ctx.Ptr<float>(2, R * N, false);
  const uint16_t* w = ctx.Ptr<uint16_t>(3, R > 0 ? N : 0, false);
  float* x = ctx.Ptr<float>(0, R * N, true);
  float* xn = ctx.Ptr<float>(1, R * N, true);
  AddF32(x, x, y, R * N);
  RmsnormRows(xn, x, w, R, N, eps);
}

}  // namespace emoe

// Grouped expert matmul variants at decode shapes (Qwen3-30B-A3B: E = 128 experts,
// top-8, hidden 2048, expert intermediate 768), timed against a plain streaming read
// of the same weight bytes. Standalone (nvcc -O3 -arch=sm_90 gmm_bench.cu): no code
// shared with the addon, so it can try kernel shapes before one goes into
// src/model/kernels/source.ts. Every variant must give the same bits as v0 (the
// kernel the engine runs today): the summation order of an output element is fixed.
//
// usage: gmm_bench [tokens ...]   (default 1 8 32 128); prints one JSON line per case.
#include "gmm_setup.h"

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;

__device__ __forceinline__ void dot8(float* acc, uint4 wv, const float* xb, u64 ldx, u32 k, int rows) {
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

__device__ __forceinline__ float xor_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// C columns n0.. of one group over `rows` x rows at xb (global or shared memory): the lane's
// share of each dot product, one 16-byte weight load per column per step (v1, v2).
template <int C>
__device__ __forceinline__ void dot_cols(float (*acc)[8], const u16* wg, u64 n0, int cols, const float* xb, u32 K, u32 lane, int rows) {
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[c][i] = 0.0f;
  for (u32 k = lane * 8; k < K; k += 256) {
    uint4 wv[C];
#pragma unroll
    for (int c = 0; c < C; ++c) wv[c] = c < cols ? *(const uint4*)(wg + (n0 + c) * K + k) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int c = 0; c < C; ++c) dot8(acc[c], wv[c], xb, K, k, rows);
  }
}

// The lane sums of C columns reduced and written (lane 0) for rows m0 .. m0 + rows - 1.
template <int C>
__device__ __forceinline__ void store_cols(float* out, float (*acc)[8], u32 lane, int rows, int cols, int m0, u32 N, u64 n0) {
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const float v = xor_sum(acc[c][i]);
      if (lane == 0 && i < rows && c < cols) out[(u64)(m0 + i) * N + n0 + c] = v;
    }
}

// The block copies `rows` x rows of K floats to shared memory (every thread takes part).
__device__ __forceinline__ void stage_rows(float* xs, const float* src, int rows, u32 K) {
  __syncthreads();  // the previous chunk's readers are done
  for (u32 i = threadIdx.x; i < (u32)rows * K / 4; i += blockDim.x) ((float4*)xs)[i] = ((const float4*)src)[i];
  __syncthreads();
}

// v0: the engine's kernel (vector path only): one warp per output column of one group.
__global__ void gmm_v0(float* out, const float* x, const u64* weights, const int* off, const int* active, u32 N, u32 K) {
  const u32 lane = threadIdx.x & 31;
  const u64 wpb = blockDim.x >> 5;
  const u64 warp0 = blockIdx.x * wpb + (threadIdx.x >> 5);
  const u64 nstride = (u64)gridDim.x * wpb;
  const u32 A = (u32)active[0];
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {
    const u32 g = (u32)active[1 + a];
    const int r0 = off[g], r1 = off[g + 1];
    if (r0 == r1) continue;
    const u16* wg = (const u16*)weights[g];
    for (u64 n = warp0; n < N; n += nstride) {
      const u16* wr = wg + n * K;
      for (int m0 = r0; m0 < r1; m0 += 8) {
        const int rows = r1 - m0 < 8 ? r1 - m0 : 8;
        const float* xb = x + (u64)m0 * K;
        float acc[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = 0.0f;
        for (u32 k = lane * 8; k < K; k += 256) dot8(acc, *(const uint4*)(wr + k), xb, K, k, rows);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float v = xor_sum(acc[i]);
          if (lane == 0 && i < rows) out[(u64)(m0 + i) * N + n] = v;
        }
      }
    }
  }
}

// v1<C>: one warp per C adjacent output columns; each x load (16 bytes of 8 rows) serves
// C weight loads, and C independent 16-byte weight loads are in flight per lane. Each
// output element's summation order is v0's.
template <int C>
__global__ void gmm_v1(float* out, const float* x, const u64* weights, const int* off, const int* active, u32 N, u32 K) {
  const u32 lane = threadIdx.x & 31;
  const u64 wpb = blockDim.x >> 5;
  const u64 warp0 = blockIdx.x * wpb + (threadIdx.x >> 5);
  const u64 nstride = (u64)gridDim.x * wpb * C;
  const u32 A = (u32)active[0];
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {
    const u32 g = (u32)active[1 + a];
    const int r0 = off[g], r1 = off[g + 1];
    if (r0 == r1) continue;
    const u16* wg = (const u16*)weights[g];
    for (u64 n0 = warp0 * C; n0 < N; n0 += nstride) {
      const int cols = N - n0 < (u64)C ? (int)(N - n0) : C;
      for (int m0 = r0; m0 < r1; m0 += 8) {
        const int rows = r1 - m0 < 8 ? r1 - m0 : 8;
        float acc[C][8];
        dot_cols<C>(acc, wg, n0, cols, x + (u64)m0 * K, K, lane, rows);
        store_cols<C>(out, acc, lane, rows, cols, m0, N, n0);
      }
    }
  }
}

// v2<C>: v1 with the group's x rows (up to 8 at a time) staged in shared memory by the
// block first (K <= 2048: 8 rows x 2048 x 4 = 64 KiB dynamic shared memory).
template <int C>
__global__ void gmm_v2(float* out, const float* x, const u64* weights, const int* off, const int* active, u32 N, u32 K) {
  extern __shared__ float xs[];
  const u32 lane = threadIdx.x & 31;
  const u64 wpb = blockDim.x >> 5;
  const u64 warp0 = blockIdx.x * wpb + (threadIdx.x >> 5);
  const u64 nstride = (u64)gridDim.x * wpb * C;
  const u32 A = (u32)active[0];
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {
    const u32 g = (u32)active[1 + a];
    const int r0 = off[g], r1 = off[g + 1];
    if (r0 == r1) continue;
    const u16* wg = (const u16*)weights[g];
    for (int m0 = r0; m0 < r1; m0 += 8) {
      const int rows = r1 - m0 < 8 ? r1 - m0 : 8;
      stage_rows(xs, x + (u64)m0 * K, rows, K);
      for (u64 n0 = warp0 * C; n0 < N; n0 += nstride) {
        const int cols = N - n0 < (u64)C ? (int)(N - n0) : C;
        float acc[C][8];
        dot_cols<C>(acc, wg, n0, cols, xs, K, lane, rows);
        store_cols<C>(out, acc, lane, rows, cols, m0, N, n0);
      }
    }
  }
}

// v3<C>: v2 with every 16-byte weight load of the lane's share of a row issued before any
// of them is used (K <= 2048: at most 8 loads per column in flight per lane), so a warp has
// 8*C loads outstanding instead of C. Same summation order as v0.
template <int C>
__global__ void gmm_v3(float* out, const float* x, const u64* weights, const int* off, const int* active, u32 N, u32 K) {
  extern __shared__ float xs[];
  const u32 lane = threadIdx.x & 31;
  const u64 wpb = blockDim.x >> 5;
  const u64 warp0 = blockIdx.x * wpb + (threadIdx.x >> 5);
  const u64 nstride = (u64)gridDim.x * wpb * C;
  const u32 A = (u32)active[0];
  const u32 iters = (K - lane * 8 + 255) / 256;  // k = lane*8 + 256 j < K
  for (u32 a = blockIdx.y; a < A; a += gridDim.y) {
    const u32 g = (u32)active[1 + a];
    const int r0 = off[g], r1 = off[g + 1];
    if (r0 == r1) continue;
    const u16* wg = (const u16*)weights[g];
    for (int m0 = r0; m0 < r1; m0 += 8) {
      const int rows = r1 - m0 < 8 ? r1 - m0 : 8;
      stage_rows(xs, x + (u64)m0 * K, rows, K);
      for (u64 n0 = warp0 * C; n0 < N; n0 += nstride) {
        const int cols = N - n0 < (u64)C ? (int)(N - n0) : C;
        uint4 wv[C][8];
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
          for (int j = 0; j < 8; ++j)
            wv[c][j] = (c < cols && (u32)j < iters) ? *(const uint4*)(wg + (n0 + c) * K + lane * 8 + 256 * j) : make_uint4(0, 0, 0, 0);
        float acc[C][8];
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[c][i] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; ++j)
          if ((u32)j < iters)
#pragma unroll
            for (int c = 0; c < C; ++c) dot8(acc[c], wv[c][j], xs, K, lane * 8 + 256 * j, rows);
        store_cols<C>(out, acc, lane, rows, cols, m0, N, n0);
      }
    }
  }
}

struct Case {
  int T;
  int E = 128, topK = 8, H = 2048, I = 768;
};

int main(int argc, char** argv) {
  std::vector<int> tokens;
  for (int i = 1; i < argc; ++i) tokens.push_back(atoi(argv[i]));
  if (tokens.empty()) tokens = {1, 8, 32, 128};
  const int E = 128, topK = 8, H = 2048, I = 768;
  const int LAYERS = 8;  // distinct weights per repetition, so L2 (50-60 MB) never holds a layer
  std::mt19937 rng(7);
  // Weights: LAYERS x E experts x (gate [I,H], up [I,H], down [H,I]).
  const size_t per = (size_t)I * H;
  const ExpertWeights weights = upload_expert_weights(random_bf16(per * 3 * E, rng), LAYERS, E, per);
  const u64* dptrs = weights.table;
  float* sink;
  CK(cudaMalloc(&sink, 4));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  CK(cudaFuncSetAttribute(gmm_v2<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * 2048 * 4));
  CK(cudaFuncSetAttribute(gmm_v2<4>, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * 2048 * 4));
  CK(cudaFuncSetAttribute(gmm_v3<1>, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * 2048 * 4));
  CK(cudaFuncSetAttribute(gmm_v3<2>, cudaFuncAttributeMaxDynamicSharedMemorySize, 8 * 2048 * 4));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));

  for (int T : tokens) {
    const Routing route = route_uniform(T, E, topK, rng);
    const std::vector<int>& off = route.off;
    const std::vector<int>& active = route.active;
    const int A = active[0];
    const int M = T * topK;
    CaseBuffers buf = case_buffers(route, M, H, I, rng);
    int *doff = buf.off, *dact = buf.active;
    float *x = buf.x, *xd = buf.xd, *gate = buf.gate, *up = buf.up, *down = buf.down;
    const double bytes = (double)A * 3 * per * 2;  // weight bytes of one layer's active experts
    // A variant: three launches (gate, up over x; down over xd) for layer l.
    auto layer = [&](int v, int l, float* go, float* uo, float* dn) {
      const u64* p = dptrs + (size_t)l * 3 * E;
      const int slots = std::min(A, 65535);
      auto launch = [&](const u64* w, float* o, const float* in, u32 N, u32 K) {
        switch (v) {
          case 0: gmm_v0<<<dim3((N + 7) / 8, slots), 256>>>(o, in, w, doff, dact, N, K); break;
          case 1: gmm_v1<2><<<dim3((N + 15) / 16, slots), 256>>>(o, in, w, doff, dact, N, K); break;
          case 2: gmm_v1<4><<<dim3((N + 31) / 32, slots), 256>>>(o, in, w, doff, dact, N, K); break;
          case 3: gmm_v2<2><<<dim3((N + 15) / 16, slots), 256, 8 * K * 4>>>(o, in, w, doff, dact, N, K); break;
          case 4: gmm_v2<4><<<dim3((N + 31) / 32, slots), 256, 8 * K * 4>>>(o, in, w, doff, dact, N, K); break;
          case 5: gmm_v1<2><<<dim3((N + 31) / 32, slots), 128>>>(o, in, w, doff, dact, N, K); break;
          case 6: gmm_v1<4><<<dim3((N + 63) / 64, slots), 128>>>(o, in, w, doff, dact, N, K); break;
          case 7: gmm_v0<<<dim3((N + 3) / 4, slots), 128>>>(o, in, w, doff, dact, N, K); break;
          case 8: gmm_v3<1><<<dim3((N + 7) / 8, slots), 256, 8 * K * 4>>>(o, in, w, doff, dact, N, K); break;
          case 9: gmm_v3<2><<<dim3((N + 15) / 16, slots), 256, 8 * K * 4>>>(o, in, w, doff, dact, N, K); break;
          case 10: gmm_v3<1><<<dim3((N + 3) / 4, slots), 128, 8 * K * 4>>>(o, in, w, doff, dact, N, K); break;
          case 99: stream_read<<<dim3(std::max(1u, (u32)(per / 8 / 256 / 4)), slots), 256>>>(sink, w, dact, per); break;
        }
      };
      launch(p, go, x, I, H);
      launch(p + E, uo, x, I, H);
      launch(p + 2 * E, dn, xd, H, I);
    };
    const char* names[] = {"v0 warp/col 256t", "v1 2 cols/warp 256t", "v1 4 cols/warp 256t", "v2 smem x, 2 cols",
                           "v2 smem x, 4 cols", "v1 2 cols/warp 128t", "v1 4 cols/warp 128t", "v0 warp/col 128t",
                           "v3 smem x, loads ahead, 1 col", "v3 smem x, loads ahead, 2 cols", "v3 1 col 128t"};
    std::vector<float> ref[3];
    const int variants[] = {99, 0, 3, 5, 8, 9, 10};
    for (int v : variants) {
      for (int l = 0; l < LAYERS; ++l) layer(v, l, gate, up, down);  // warm-up
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      const int reps = 5;
      CK(cudaEventRecord(e0));
      for (int r = 0; r < reps; ++r)
        for (int l = 0; l < LAYERS; ++l) layer(v, l, gate, up, down);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      const double perLayerUs = ms * 1000.0 / (reps * LAYERS);
      bool same = true;
      if (v != 99) {
        float* outs[3] = {gate, up, down};
        size_t sizes[3] = {(size_t)M * I, (size_t)M * I, (size_t)M * H};
        for (int q = 0; q < 3; ++q) {
          std::vector<float> h(sizes[q]);
          CK(cudaMemcpy(h.data(), outs[q], sizes[q] * 4, cudaMemcpyDeviceToHost));
          if (v == 0) ref[q] = h;
          else same = same && memcmp(h.data(), ref[q].data(), sizes[q] * 4) == 0;
        }
        CK(cudaMemset(gate, 0, (size_t)M * I * 4));
        CK(cudaMemset(up, 0, (size_t)M * I * 4));
        CK(cudaMemset(down, 0, (size_t)M * H * 4));
      }
      printf("{\"gpu\":\"%s\",\"tokens\":%d,\"activeExperts\":%d,\"variant\":\"%s\",\"usPerLayer\":%.2f,\"GBps\":%.1f,\"sameBitsAsV0\":%s}\n",
             prop.name, T, A, v == 99 ? "stream read (reference)" : names[v], perLayerUs, bytes / (perLayerUs * 1e-6) / 1e9,
             same ? "true" : "false");
      fflush(stdout);
    }
    buf.free_all();
  }
  return 0;
}

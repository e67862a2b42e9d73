// Shared setup of the grouped expert matmul benchmarks (gmm_bench.cu, gmm_mma_bench.cu):
// error checking, a streaming-read reference kernel, expert weights uploaded per layer, and
// uniform top-k routing of T tokens. Header-only, compiled with each benchmark by nvcc.
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#define CK(x)                                                                          \
  do {                                                                                 \
    cudaError_t e_ = (x);                                                              \
    if (e_ != cudaSuccess) {                                                           \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      exit(1);                                                                         \
    }                                                                                  \
  } while (0)

// The bandwidth reference: every active group's weight bytes read once (16-byte loads), summed.
__global__ void stream_read(float* sink, const unsigned long long* weights, const int* active, unsigned long long elems) {
  const unsigned A = (unsigned)active[0];
  float s = 0.0f;
  for (unsigned a = blockIdx.y; a < A; a += gridDim.y) {
    const uint4* w = (const uint4*)weights[active[1 + a]];
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < elems / 8;
         i += (unsigned long long)gridDim.x * blockDim.x) {
      const uint4 v = w[i];
      s += __uint_as_float(v.x) + __uint_as_float(v.w);
    }
  }
  if (s == 1.2345f) sink[0] = s;
}

// n bf16 values uniform in [-0.05, 0.05], rounded to nearest even.
inline std::vector<unsigned short> random_bf16(size_t n, std::mt19937& rng) {
  std::vector<unsigned short> v(n);
  std::uniform_real_distribution<float> d(-0.05f, 0.05f);
  for (auto& e : v) {
    const float f = d(rng);
    unsigned b;
    memcpy(&b, &f, 4);
    e = (unsigned short)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
  }
  return v;
}

// One layer's expert weights (E experts x gate [I,H], up [I,H], down [H,I], `per` = I*H
// elements each, expert-major) copied to `layers` layers on the device, so L2 never holds a
// layer. ptrs[(l * 3 + m) * E + e] is layer l's matrix m (gate, up, down) of expert e; the same
// table is returned on the device.
struct ExpertWeights {
  unsigned short* dev = nullptr;
  std::vector<unsigned long long> ptrs;
  unsigned long long* table = nullptr;
};
inline ExpertWeights upload_expert_weights(const std::vector<unsigned short>& layer, int layers, int E, size_t per) {
  ExpertWeights w;
  CK(cudaMalloc(&w.dev, (size_t)layers * E * 3 * per * 2));
  for (int l = 0; l < layers; ++l)
    CK(cudaMemcpy(w.dev + (size_t)l * E * 3 * per, layer.data(), layer.size() * 2, cudaMemcpyHostToDevice));
  w.ptrs.resize((size_t)layers * 3 * E);
  for (int l = 0; l < layers; ++l)
    for (int m = 0; m < 3; ++m)
      for (int e = 0; e < E; ++e)
        w.ptrs[((size_t)l * 3 + m) * E + e] = (unsigned long long)(w.dev + (((size_t)l * E + e) * 3 + m) * per);
  CK(cudaMalloc(&w.table, w.ptrs.size() * 8));
  CK(cudaMemcpy(w.table, w.ptrs.data(), w.ptrs.size() * 8, cudaMemcpyHostToDevice));
  return w;
}

// T tokens each picking topK distinct experts uniformly; rows grouped by expert. off[E + 1]
// row offsets, active = {A, the experts with rows ascending}, groupOf[row] = its expert.
struct Routing {
  std::vector<int> off, active, groupOf;
};
inline Routing route_uniform(int T, int E, int topK, std::mt19937& rng) {
  std::vector<int> count(E, 0);
  for (int t = 0; t < T; ++t) {
    std::vector<int> ids(E);
    for (int e = 0; e < E; ++e) ids[e] = e;
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int k = 0; k < topK; ++k) count[ids[k]]++;
  }
  Routing r;
  r.off.assign(E + 1, 0);
  r.active.assign(1, 0);
  for (int e = 0; e < E; ++e) {
    r.off[e + 1] = r.off[e] + count[e];
    if (count[e] > 0) r.active.push_back(e);
    for (int i = 0; i < count[e]; ++i) r.groupOf.push_back(e);
  }
  r.active[0] = (int)r.active.size() - 1;
  return r;
}

// One case's device buffers: the routing (off, active), the expert inputs x [M, H] (4 floats
// of room after it) and xd [M, I] (uniform in [-1, 1], host copies kept), and the outputs.
struct CaseBuffers {
  int *off = nullptr, *active = nullptr;
  float *x = nullptr, *xd = nullptr, *gate = nullptr, *up = nullptr, *down = nullptr;
  std::vector<float> hx, hxd;
  void free_all() {
    cudaFree(off); cudaFree(active); cudaFree(x); cudaFree(xd); cudaFree(gate); cudaFree(up); cudaFree(down);
  }
};
inline CaseBuffers case_buffers(const Routing& r, int M, int H, int I, std::mt19937& rng) {
  CaseBuffers b;
  CK(cudaMalloc(&b.off, r.off.size() * 4));
  CK(cudaMalloc(&b.active, r.active.size() * 4));
  CK(cudaMemcpy(b.off, r.off.data(), r.off.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(b.active, r.active.data(), r.active.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMalloc(&b.x, ((size_t)M * H + 4) * 4));
  CK(cudaMalloc(&b.xd, (size_t)M * I * 4));
  CK(cudaMalloc(&b.gate, (size_t)M * I * 4));
  CK(cudaMalloc(&b.up, (size_t)M * I * 4));
  CK(cudaMalloc(&b.down, (size_t)M * H * 4));
  b.hx.resize((size_t)M * H);
  b.hxd.resize((size_t)M * I);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  for (auto& v : b.hx) v = d(rng);
  for (auto& v : b.hxd) v = d(rng);
  CK(cudaMemcpy(b.x, b.hx.data(), b.hx.size() * 4, cudaMemcpyHostToDevice));
  CK(cudaMemcpy(b.xd, b.hxd.data(), b.hxd.size() * 4, cudaMemcpyHostToDevice));
  return b;
}

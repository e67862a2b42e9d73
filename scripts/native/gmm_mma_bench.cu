// The engine's two grouped expert matmuls, compiled from the engine's own kernel source
// (MODEL_KERNELS_SOURCE, written to a header by scripts/gmm-mma-bench.sh): the CUDA-core
// kernel (emoe_grouped_matmul_bf16) against the tensor-core one (emoe_grouped_matmul_bf16_mma)
// at Qwen3-30B-A3B expert shapes (E = 128 experts, top-8, hidden 2048, expert intermediate
// 768), each launched with the geometry ModelKernels.groupedMatmul gives it, timed against a
// plain streaming read of the same weight bytes. It also checks, for the tensor-core kernel:
// - error against a double-precision reference on sampled rows (relative to max(|ref|, rms));
// - that a row's bits do not depend on its group: the same rows with one group per row, and
//   with x misaligned (element-by-element loads), give the grouped launch's bits.
// usage: gmm_mma_bench [tokens ...]   (default 1 8 32 128 512 2048); one JSON line per case.
#include <cmath>

#include EMOE_KERNELS_HEADER
#include "gmm_setup.h"

static float bf16f(u16 b) {
  u32 u = (u32)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// The launches as ModelKernels.groupedMatmul makes them (variant 0: CUDA cores, 1: tensor cores,
// tiled for many rows per group, 2: tensor cores, tiled for few).
static void gmm(int v, float* out, const float* x, const u64* w, const int* off, const int* act, u32 G, u32 M, u32 N,
                u32 K, u32 slots) {
  slots = std::max(1u, std::min(slots, 65535u));
  if (v == 0) {
    const u32 staged = (K % 8 == 0 && K <= 12288) ? std::min(8u, 12288u / K) : 0;
    emoe_grouped_matmul_bf16<<<dim3((N + 15) / 16, slots), 256, staged * K * 4>>>(out, x, w, off, act, G, M, N, K);
  } else if (v == 1) {
    emoe_grouped_matmul_bf16_mma<<<dim3((N + 127) / 128, slots), 256>>>(out, x, w, off, act, G, M, N, K);
  } else {
    emoe_grouped_matmul_bf16_mma_fewrows<<<dim3((N + 127) / 128, slots), 256>>>(out, x, w, off, act, G, M, N, K);
  }
}

int main(int argc, char** argv) {
  std::vector<int> tokens;
  for (int i = 1; i < argc; ++i) tokens.push_back(atoi(argv[i]));
  if (tokens.empty()) tokens = {1, 8, 32, 128, 512, 2048};
  const int E = 128, topK = 8, H = 2048, I = 768;
  const int LAYERS = 8;  // distinct weights per repetition, so L2 never holds a layer
  std::mt19937 rng(7);
  const size_t per = (size_t)I * H;
  const std::vector<u16> hw = random_bf16(per * 3 * E, rng);  // one layer's weights, copied to each layer
  const ExpertWeights weights = upload_expert_weights(hw, LAYERS, E, per);
  const std::vector<u64>& ptrs = weights.ptrs;
  const u64* dptrs = weights.table;
  float* sink;
  CK(cudaMalloc(&sink, 4));
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  bool allOk = true;

  for (int T : tokens) {
    const Routing route = route_uniform(T, E, topK, rng);
    const std::vector<int>& active = route.active;
    const std::vector<int>& groupOf = route.groupOf;
    const int A = active[0];
    const int M = T * topK;
    CaseBuffers buf = case_buffers(route, M, H, I, rng);
    int *doff = buf.off, *dact = buf.active;
    float *x = buf.x, *xd = buf.xd, *gate = buf.gate, *up = buf.up, *down = buf.down;
    const std::vector<float>& hx = buf.hx;
    const std::vector<float>& hxd = buf.hxd;
    const double bytes = (double)A * 3 * per * 2;  // weight bytes of one layer's active experts
    auto layer = [&](int v, int l) {
      const u64* p = dptrs + (size_t)l * 3 * E;
      if (v == 99) {
        const dim3 grid(std::max(1u, (u32)(per / 8 / 256 / 4)), (u32)std::min(A, 65535));
        for (int m = 0; m < 3; ++m) stream_read<<<grid, 256>>>(sink, p + m * E, dact, per);
        return;
      }
      gmm(v, gate, x, p, doff, dact, E, M, I, H, std::min(E, M));
      gmm(v, up, x, p + E, doff, dact, E, M, I, H, std::min(E, M));
      gmm(v, down, xd, p + 2 * E, doff, dact, E, M, H, I, std::min(E, M));
    };
    double us[3] = {0, 0, 0};
    const char* names[] = {"cuda cores", "tensor cores", "tensor cores, few-rows tiling"};
    for (int v : {99, 0, 1, 2}) {
      for (int l = 0; l < LAYERS; ++l) layer(v, l);  // warm-up
      CK(cudaGetLastError());
      CK(cudaDeviceSynchronize());
      const int reps = T >= 512 ? 2 : 5;
      CK(cudaEventRecord(e0));
      for (int r = 0; r < reps; ++r)
        for (int l = 0; l < LAYERS; ++l) layer(v, l);
      CK(cudaEventRecord(e1));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      const double perLayerUs = ms * 1000.0 / (reps * LAYERS);
      if (v != 99) us[v] = perLayerUs;
      printf("{\"gpu\":\"%s\",\"tokens\":%d,\"activeExperts\":%d,\"kernel\":\"%s\",\"usPerLayer\":%.2f,\"weightGBps\":%.1f}\n",
             prop.name, T, A, v == 99 ? "stream read (reference)" : names[v], perLayerUs,
             bytes / (perLayerUs * 1e-6) / 1e9);
      fflush(stdout);
    }
    // Checks on layer 0 (tensor cores): error against double on sampled rows, for each matrix.
    double worst[3] = {0, 0, 0};
    std::vector<float> outs[3][3];
    for (int v = 0; v < 3; ++v) {
      layer(v, 0);
      CK(cudaDeviceSynchronize());
      float* d[3] = {gate, up, down};
      size_t n[3] = {(size_t)M * I, (size_t)M * I, (size_t)M * H};
      for (int q = 0; q < 3; ++q) {
        outs[v][q].resize(n[q]);
        CK(cudaMemcpy(outs[v][q].data(), d[q], n[q] * 4, cudaMemcpyDeviceToHost));
      }
    }
    std::uniform_int_distribution<int> pick(0, M - 1);
    for (int q = 0; q < 3; ++q) {
      const u32 N = q < 2 ? I : H, K = q < 2 ? H : I;
      const std::vector<float>& in = q < 2 ? hx : hxd;
      std::vector<double> ref;
      std::vector<int> rowsChecked;
      for (int s = 0; s < 24; ++s) {
        const int r = pick(rng);
        rowsChecked.push_back(r);
        const u16* w = hw.data() + ((size_t)groupOf[r] * 3 + q) * per;
        for (u32 n = 0; n < N; ++n) {
          double acc = 0;
          for (u32 k = 0; k < K; ++k) acc += (double)in[(size_t)r * K + k] * bf16f(w[(size_t)n * K + k]);
          ref.push_back(acc);
        }
      }
      double ss = 0;
      for (double v : ref) ss += v * v;
      const double rms = std::sqrt(ss / ref.size());
      for (int v = 0; v < 3; ++v)
        for (size_t i = 0; i < ref.size(); ++i) {
          const int r = rowsChecked[i / N];
          const double got = outs[v][q][(size_t)r * N + i % N];
          worst[v] = std::max(worst[v], std::fabs(got - ref[i]) / std::max(std::fabs(ref[i]), rms));
        }
    }
    // Invariance: one group per row (the row's expert pointer), and x misaligned by one float.
    bool sameOnePerRow = true, sameMisaligned = true, sameTilings = true;
    for (int q = 0; q < 3; ++q) sameTilings = sameTilings && memcmp(outs[1][q].data(), outs[2][q].data(), outs[1][q].size() * 4) == 0;
    {
      std::vector<u64> rowPtrs(M);
      std::vector<int> rowOff(M + 1);
      for (int r = 0; r <= M; ++r) rowOff[r] = r;
      for (int r = 0; r < M; ++r) rowPtrs[r] = ptrs[groupOf[r]];  // layer 0, gate
      u64* drp;
      int* dro;
      CK(cudaMalloc(&drp, M * 8));
      CK(cudaMalloc(&dro, (M + 1) * 4));
      CK(cudaMemcpy(drp, rowPtrs.data(), M * 8, cudaMemcpyHostToDevice));
      CK(cudaMemcpy(dro, rowOff.data(), (M + 1) * 4, cudaMemcpyHostToDevice));
      CK(cudaMemset(gate, 0, (size_t)M * I * 4));
      gmm(1, gate, x, drp, dro, nullptr, M, M, I, H, M);
      std::vector<float> h((size_t)M * I);
      CK(cudaMemcpy(h.data(), gate, h.size() * 4, cudaMemcpyDeviceToHost));
      sameOnePerRow = memcmp(h.data(), outs[1][0].data(), h.size() * 4) == 0;
      CK(cudaMemcpy(x + 1, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
      CK(cudaMemset(gate, 0, (size_t)M * I * 4));
      gmm(1, gate, x + 1, dptrs, doff, dact, E, M, I, H, std::min(E, M));
      CK(cudaMemcpy(h.data(), gate, h.size() * 4, cudaMemcpyDeviceToHost));
      sameMisaligned = memcmp(h.data(), outs[1][0].data(), h.size() * 4) == 0;
      CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
      cudaFree(drp);
      cudaFree(dro);
    }
    CK(cudaGetLastError());
    const bool ok = worst[1] < 1e-4 && sameOnePerRow && sameMisaligned && sameTilings;
    allOk = allOk && ok;
    printf("{\"gpu\":\"%s\",\"tokens\":%d,\"speedup\":%.2f,\"speedupFewRows\":%.2f,\"worstErrCudaCores\":%.2e,"
           "\"worstErrTensorCores\":%.2e,\"sameBitsBothTilings\":%s,\"sameBitsOneGroupPerRow\":%s,\"sameBitsMisalignedX\":%s,\"ok\":%s}\n",
           prop.name, T, us[0] / us[1], us[0] / us[2], worst[0], worst[1], sameTilings ? "true" : "false",
           sameOnePerRow ? "true" : "false", sameMisaligned ? "true" : "false", ok ? "true" : "false");
    fflush(stdout);
    buf.free_all();
  }
  return allOk ? 0 : 1;
}

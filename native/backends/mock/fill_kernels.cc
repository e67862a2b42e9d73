// CPU twins of the seeded fill kernels in src/runtime/basic-kernels.ts. The math
// is the same operation by operation (exact integer hash, exact float scaling,
// one rounded multiply, round-to-nearest-even to bf16), so results match the
// CUDA kernels bit for bit.
#include <cstdint>
#include <cstring>

#include "backends/mock/mock_kernels.h"

namespace emoe {
namespace {

uint64_t Mix64(uint64_t x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

float Uniform(uint64_t seed, uint64_t i, float scale) {
  uint64_t z = Mix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull);
  volatile float u = static_cast<float>(static_cast<uint32_t>(z >> 40)) * (1.0f / 16777216.0f);
  volatile float two_u_minus_one = u * 2.0f - 1.0f;  // exact; volatile keeps the compiler from fusing
  return two_u_minus_one * scale;
}

}  // namespace

// emoe_fill_uniform_bf16(ptr out_u16, u64 n, u64 seed, f32 scale)
EMOE_MOCK_KERNEL(emoe_fill_uniform_bf16) {
  uint64_t n = ctx.U64(1);
  uint64_t seed = ctx.U64(2);
  float scale = ctx.F32(3);
  uint16_t* out = ctx.Ptr<uint16_t>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) {
    float v = Uniform(seed, i, scale);
    uint32_t b;
    std::memcpy(&b, &v, 4);
    b += 0x7fffu + ((b >> 16) & 1u);
    out[i] = static_cast<uint16_t>(b >> 16);
  }
}

// emoe_fill_uniform_f32(ptr out, u64 n, u64 seed, f32 scale)
EMOE_MOCK_KERNEL(emoe_fill_uniform_f32) {
  uint64_t n = ctx.U64(1);
  uint64_t seed = ctx.U64(2);
  float scale = ctx.F32(3);
  float* out = ctx.Ptr<float>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) out[i] = Uniform(seed, i, scale);
}

// emoe_fill_random_u32(ptr out, u64 n_words, u64 seed)
EMOE_MOCK_KERNEL(emoe_fill_random_u32) {
  uint64_t n = ctx.U64(1);
  uint64_t seed = ctx.U64(2);
  uint32_t* out = ctx.Ptr<uint32_t>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) out[i] = static_cast<uint32_t>(Mix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull) >> 32);
}

}  // namespace emoe

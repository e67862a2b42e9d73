// Generic kernels the runtime itself needs (fills, checksums) and tests use.
// The mock backend registers CPU twins under the same names
// (native/backends/mock/mock_kernels.cc); keep the semantics identical.
export const BASIC_KERNELS_SOURCE = String.raw`
typedef unsigned int u32;
typedef unsigned long long u64;

extern "C" __global__ void emoe_fill_u32(u32* out, u32 value, u64 n) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = value;
}

extern "C" __global__ void emoe_vector_add_f32(float* out, const float* a, const float* b, u64 n) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = a[i] + b[i];
}

extern "C" __global__ void emoe_scale_f32(float* x, float alpha, u64 n) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) x[i] *= alpha;
}

// Seeded synthetic fills. Element i gets z = mix64(seed + (i + 1) * golden);
// u = (z >> 40) / 2^24 is exact in float, v = (2u - 1) * scale rounds once
// (IEEE, no contraction possible), and bf16 is taken by round-to-nearest-even on
// the bits — so the CUDA kernels and the mock's CPU twins agree bit for bit.
__device__ __forceinline__ u64 emoe_mix64(u64 x) {
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}
__device__ __forceinline__ float emoe_uniform(u64 seed, u64 i, float scale) {
  u64 z = emoe_mix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull);
  float u = (float)(unsigned)(z >> 40) * (1.0f / 16777216.0f);
  return __fmul_rn(__fsub_rn(__fmul_rn(u, 2.0f), 1.0f), scale);
}

extern "C" __global__ void emoe_fill_uniform_bf16(unsigned short* out, u64 n, u64 seed, float scale) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
    unsigned b = __float_as_uint(emoe_uniform(seed, i, scale));
    b += 0x7fffu + ((b >> 16) & 1u);
    out[i] = (unsigned short)(b >> 16);
  }
}

extern "C" __global__ void emoe_fill_uniform_f32(float* out, u64 n, u64 seed, float scale) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    out[i] = emoe_uniform(seed, i, scale);
}

extern "C" __global__ void emoe_fill_random_u32(u32* out, u64 n, u64 seed) {
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    out[i] = (u32)(emoe_mix64(seed + (i + 1) * 0x9e3779b97f4a7c15ull) >> 32);
}

// out[0] = sum over i of data[i] * (i + 1), modulo 2^64: position-sensitive, and
// independent of the reduction order (integer addition is associative), so the
// CUDA kernel and the mock's CPU twin agree bit for bit. Launch with out zeroed.
extern "C" __global__ void emoe_checksum_u32(u64* out, const u32* data, u64 n) {
  u64 acc = 0;
  for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
    acc += (u64)data[i] * (i + 1);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if ((threadIdx.x & 31) == 0) atomicAdd(out, acc);
}
`;

const MASK64 = 0xffffffffffffffffn;
function mix64(x: bigint): bigint {
  x = ((x ^ (x >> 30n)) * 0xbf58476d1ce4e5b9n) & MASK64;
  x = ((x ^ (x >> 27n)) * 0x94d049bb133111ebn) & MASK64;
  return x ^ (x >> 31n);
}

/** Host reference of emoe_fill_uniform_bf16 (slow: for tests on small tensors). */
export function uniformBf16(n: number, seed: bigint, scale: number): Uint16Array {
  const out = new Uint16Array(n);
  const f = new Float32Array(1);
  const u32 = new Uint32Array(f.buffer);
  for (let i = 0; i < n; i++) {
    const z = mix64((seed + BigInt(i + 1) * 0x9e3779b97f4a7c15n) & MASK64);
    const u = Math.fround(Number(z >> 40n) / 16777216);
    f[0] = Math.fround(Math.fround(Math.fround(u * 2) - 1) * Math.fround(scale));
    let b = u32[0]!;
    b = (b + 0x7fff + ((b >>> 16) & 1)) >>> 0;
    out[i] = b >>> 16;
  }
  return out;
}

/** 64-bit FNV-1a of a string: per-tensor seeds for synthetic fills. */
export function fnv1a64(text: string, basis = 0xcbf29ce484222325n): bigint {
  let h = basis;
  for (const byte of Buffer.from(text, 'utf8')) h = ((h ^ BigInt(byte)) * 0x100000001b3n) & MASK64;
  return h;
}

/** Host reference of emoe_checksum_u32, for checking either backend. */
export function checksumU32(bytes: Uint8Array): bigint {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.byteLength / 4));
  let acc = 0n;
  for (let i = 0; i < words.length; i++) acc = (acc + BigInt(words[i]!) * BigInt(i + 1)) & 0xffffffffffffffffn;
  return acc;
}

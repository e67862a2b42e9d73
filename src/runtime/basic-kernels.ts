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

/** Host reference of emoe_checksum_u32, for checking either backend. */
export function checksumU32(bytes: Uint8Array): bigint {
  const words = new Uint32Array(bytes.buffer, bytes.byteOffset, Math.floor(bytes.byteLength / 4));
  let acc = 0n;
  for (let i = 0; i < words.length; i++) acc = (acc + BigInt(words[i]!) * BigInt(i + 1)) & 0xffffffffffffffffn;
  return acc;
}

// Kernel-twin registry and the test kernels whose CUDA twins live in the cuda tests.
#include "backends/mock/mock_kernels.h"

#include <cstdio>
#include <map>
#include <mutex>

namespace emoe {

namespace {

struct Registry {
  std::mutex mu;
  std::map<std::string, MockKernelFn> kernels;
};

// Function-local static: twins register from other files' static initialisers,
// which may run before this file's globals are constructed.
Registry& GetRegistry() {
  static Registry* registry = new Registry();  // never destroyed: used until exit
  return *registry;
}

}  // namespace

const char* ArgTypeName(ArgType type) {
  switch (type) {
    case ArgType::kPtr: return "ptr";
    case ArgType::kI32: return "i32";
    case ArgType::kU32: return "u32";
    case ArgType::kI64: return "i64";
    case ArgType::kU64: return "u64";
    case ArgType::kF32: return "f32";
    case ArgType::kF64: return "f64";
  }
  return "?";
}

void RegisterMockKernel(const std::string& name, MockKernelFn fn) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  if (!r.kernels.emplace(name, fn).second) {
    std::fprintf(stderr, "elasticmoe mock: kernel twin '%s' registered twice; keeping the first\n",
                 name.c_str());
  }
}

MockKernelFn FindMockKernel(const std::string& name) {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  auto it = r.kernels.find(name);
  return it == r.kernels.end() ? nullptr : it->second;
}

std::vector<std::string> MockKernelNames() {
  Registry& r = GetRegistry();
  std::lock_guard<std::mutex> lock(r.mu);
  std::vector<std::string> names;
  for (const auto& entry : r.kernels) names.push_back(entry.first);
  return names;
}

const KernelArg& MockKernelContext::Arg(size_t i, ArgType expected) const {
  if (i >= args.size()) {
    ThrowInvalidArgument("mock", "Launch", "args",
                         "at least " + std::to_string(i + 1) + " values for kernel '" + name +
                             "' (got " + std::to_string(args.size()) + ")");
  }
  if (args[i].type != expected) {
    ThrowInvalidArgument("mock", "Launch", "args",
                         "of type " + std::string(ArgTypeName(expected)) + " at index " +
                             std::to_string(i) + " for kernel '" + name + "' (got " +
                             ArgTypeName(args[i].type) + ")");
  }
  return args[i];
}

void MockKernelContext::TooLarge(size_t i, uint64_t count, size_t elem) const {
  ThrowInvalidArgument("mock", "Launch", "args",
                       "a count that fits in memory for kernel '" + name + "' argument " +
                           std::to_string(i) + " (" + std::to_string(count) + " elements of " +
                           std::to_string(elem) + " bytes)");
}

void MockKernelContext::Misaligned(size_t i, uint64_t address, size_t align) const {
  // CUDA's misaligned access is sticky like an illegal address; the mock treats it the same.
  char buf[32];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(address));
  ThrowError(ErrorKind::kIllegalAddress, "mock", "Launch", 716, "MOCK_ERROR_MISALIGNED_ADDRESS",
             "kernel '" + name + "' argument " + std::to_string(i) + " on device " +
                 std::to_string(device) + ": address " + buf + " is not aligned to " +
                 std::to_string(align) + " bytes");
}

// ---- test kernels (CUDA twins have the same names, argument lists and results)

// emoe_fill_u32(ptr out, u32 value, u64 n): out[i] = value for i < n.
EMOE_MOCK_KERNEL(emoe_fill_u32) {
  uint64_t n = ctx.U64(2);
  uint32_t value = ctx.U32(1);
  uint32_t* out = ctx.Ptr<uint32_t>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) out[i] = value;
}

// emoe_vector_add_f32(ptr out, ptr a, ptr b, u64 n): out[i] = a[i] + b[i].
EMOE_MOCK_KERNEL(emoe_vector_add_f32) {
  uint64_t n = ctx.U64(3);
  float* out = ctx.Ptr<float>(0, n, true);
  const float* a = ctx.Ptr<float>(1, n, false);
  const float* b = ctx.Ptr<float>(2, n, false);
  for (uint64_t i = 0; i < n; ++i) out[i] = a[i] + b[i];
}

// emoe_scale_f32(ptr x, f32 alpha, u64 n): x[i] *= alpha, in place.
EMOE_MOCK_KERNEL(emoe_scale_f32) {
  uint64_t n = ctx.U64(2);
  float alpha = ctx.F32(1);
  float* x = ctx.Ptr<float>(0, n, true);
  for (uint64_t i = 0; i < n; ++i) x[i] *= alpha;
}

// emoe_checksum_u32(ptr out_u64, ptr data, u64 n_words): *out += sum (u64)data[i] * (i+1)
// modulo 2^64 (position-sensitive, so a swapped pair of words changes it). It adds,
// like the CUDA twin's atomicAdd, so callers zero `out` first on both backends.
EMOE_MOCK_KERNEL(emoe_checksum_u32) {
  uint64_t n = ctx.U64(2);
  uint64_t* out = ctx.Ptr<uint64_t>(0, 1, true);
  const uint32_t* data = ctx.Ptr<uint32_t>(1, n, false);
  uint64_t sum = 0;
  for (uint64_t i = 0; i < n; ++i) sum += static_cast<uint64_t>(data[i]) * (i + 1);
  *out += sum;
}

}  // namespace emoe

// CPU twins of device kernels for the mock backend. A twin computes the whole
// launch (grid and block are informational) on the stream's worker thread, with
// the same argument list and semantics as its CUDA kernel of the same name.
//
// Adding a twin in its own file:
//   #include "backends/mock/mock_kernels.h"
//   EMOE_MOCK_KERNEL(emoe_my_kernel) {
//     float* out = ctx.Ptr<float>(0, n, /*write=*/true);  // validate every pointer first,
//     ...                                                  // then write: a bad pointer throws
//   }
// List the file in sources.gypi. binding.gyp links every object directly; a static
// library (CMake's emoe_core) would drop an object that nothing references, so
// such a target must link the mock's objects whole (OBJECT library or
// --whole-archive) or the twins in it silently go missing (GetFunction: kNotFound).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "core/backend.h"

namespace emoe {

class MockKernelContext {
 public:
  // Throws the illegal-address Error (kIllegalAddress) when [address, address+bytes)
  // is not mapped with access for the launching device. Provided by the backend,
  // which holds its mapping table locked for the whole launch.
  using AccessCheck = std::function<void(uint64_t address, uint64_t bytes, bool write,
                                         size_t arg_index)>;

  MockKernelContext(const LaunchConfig& config, const std::vector<KernelArg>& args, int device,
                    const std::string& name, AccessCheck check)
      : config(config), args(args), device(device), name(name), check_(std::move(check)) {}

  const LaunchConfig& config;
  const std::vector<KernelArg>& args;
  int device;              // the stream's device
  const std::string& name; // the kernel name, for messages

  // Pointer argument `i` as T*, valid for `count` elements. Validates type, bounds,
  // alignment and access before returning; call it for every pointer before writing.
  template <typename T>
  T* Ptr(size_t i, uint64_t count, bool write) const {
    return PtrAt<T>(i, Arg(i, ArgType::kPtr).u64, count, write);
  }
  // A device address the kernel reads from memory rather than takes as an argument
  // (an entry of the pointer array at argument `i`), as T*, valid for `count`
  // elements: the same checks as Ptr, reported against argument `i`.
  template <typename T>
  T* PtrAt(size_t i, uint64_t address, uint64_t count, bool write) const {
    if (count > UINT64_MAX / sizeof(T)) TooLarge(i, count, sizeof(T));
    if (address % alignof(T) != 0) Misaligned(i, address, alignof(T));
    if (count > 0) check_(address, count * sizeof(T), write, i);
    return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
  }
  uint64_t U64(size_t i) const { return Arg(i, ArgType::kU64).u64; }
  int64_t I64(size_t i) const { return Arg(i, ArgType::kI64).i64; }
  uint32_t U32(size_t i) const { return Arg(i, ArgType::kU32).u32; }
  int32_t I32(size_t i) const { return Arg(i, ArgType::kI32).i32; }
  float F32(size_t i) const { return Arg(i, ArgType::kF32).f32; }
  double F64(size_t i) const { return Arg(i, ArgType::kF64).f64; }

 private:
  // Throws kInvalidArgument (argument "args") for a missing index or a type mismatch:
  // the twin's reads define the kernel's argument list.
  const KernelArg& Arg(size_t i, ArgType expected) const;
  [[noreturn]] void TooLarge(size_t i, uint64_t count, size_t elem) const;
  [[noreturn]] void Misaligned(size_t i, uint64_t address, size_t align) const;
  AccessCheck check_;
};

using MockKernelFn = void (*)(MockKernelContext& ctx);

// Thread-safe. A second registration of a name is ignored with a warning on stderr
// (static initialisation order across files is unspecified, so "last wins" would be random).
void RegisterMockKernel(const std::string& name, MockKernelFn fn);
// nullptr when no twin is registered under `name`.
MockKernelFn FindMockKernel(const std::string& name);
std::vector<std::string> MockKernelNames();

const char* ArgTypeName(ArgType type);

}  // namespace emoe

// Defines and registers a twin at static-initialisation time. The body sees `ctx`.
#define EMOE_MOCK_KERNEL(kname)                                                       \
  static void emoe_mock_twin_##kname(::emoe::MockKernelContext& ctx);                \
  [[maybe_unused]] static const bool emoe_mock_twin_registered_##kname =             \
      (::emoe::RegisterMockKernel(#kname, &emoe_mock_twin_##kname), true);            \
  static void emoe_mock_twin_##kname(::emoe::MockKernelContext& ctx)

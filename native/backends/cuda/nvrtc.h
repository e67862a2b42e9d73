// NVRTC (run-time CUDA C++ compiler), loaded by dlopen on first use so that a
// machine without the toolkit can still run PTX/cubin modules.
#pragma once

#include <string>
#include <vector>

namespace emoe {
namespace cuda {

struct CompiledModule {
  std::string image;  // cubin bytes, or PTX text with its terminating NUL
  bool cubin = false;
  std::string arch;   // the --gpu-architecture used, e.g. "sm_90" or "compute_90"
};

class Nvrtc {
 public:
  // Loads NVRTC once per process (per `library` override) and returns it.
  // `library` empty: libnvrtc.so.<driver major> first, then .13, .12, each by
  // soname, then under $CUDA_HOME/lib64, $CUDA_PATH/lib64 and /usr/local/cuda/lib64.
  // Throws kBackendUnavailable listing every attempt's dlerror text.
  static const Nvrtc& Get(const std::string& library, int driver_version);

  // Compiles `source` for a device of compute capability major.minor: a cubin
  // for sm_<major><minor> when this NVRTC supports that architecture, else PTX
  // for the newest compute_XX it supports below it (the driver JITs it). An
  // --gpu-architecture/-arch in `options` is honoured as given. The program log
  // goes to *log (may be null), also on failure; failure throws kCompile with
  // the log in the message.
  CompiledModule Compile(const std::string& source, const std::string& name,
                         const std::vector<std::string>& options, int cc_major, int cc_minor,
                         std::string* log) const;

  const std::string& path() const { return path_; }
  int major() const { return major_; }
  int minor() const { return minor_; }

 private:
  Nvrtc() = default;
  using Program = struct _nvrtcProgram*;
  using Result = int;

  std::string path_;
  int major_ = 0, minor_ = 0;

  Result (*version_)(int*, int*) = nullptr;
  const char* (*get_error_string_)(Result) = nullptr;
  Result (*create_program_)(Program*, const char*, const char*, int, const char* const*,
                            const char* const*) = nullptr;
  Result (*destroy_program_)(Program*) = nullptr;
  Result (*compile_program_)(Program, int, const char* const*) = nullptr;
  Result (*get_ptx_size_)(Program, size_t*) = nullptr;
  Result (*get_ptx_)(Program, char*) = nullptr;
  Result (*get_cubin_size_)(Program, size_t*) = nullptr;  // optional (NVRTC 11.1+)
  Result (*get_cubin_)(Program, char*) = nullptr;         // optional
  Result (*get_log_size_)(Program, size_t*) = nullptr;
  Result (*get_log_)(Program, char*) = nullptr;
  Result (*num_supported_archs_)(int*) = nullptr;  // optional (NVRTC 11.2+)
  Result (*supported_archs_)(int*) = nullptr;      // optional

  [[noreturn]] void Throw(Result r, const char* api, const std::string& message) const;
  std::string ResultName(Result r) const;
  std::vector<int> SupportedArchs() const;
};

}  // namespace cuda
}  // namespace emoe

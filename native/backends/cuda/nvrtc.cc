#include "backends/cuda/nvrtc.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <utility>

#include "core/dynlib.h"
#include "core/status.h"

namespace emoe {
namespace cuda {
namespace {

constexpr int kNvrtcSuccess = 0;
constexpr int kNvrtcBuiltinOperationFailure = 7;

std::vector<std::string> Candidates(const std::string& library, int driver_version) {
  if (!library.empty()) return {library};
  // Prefer the NVRTC of the driver's own major version: a cubin or PTX from a
  // newer toolkit than the driver may not load.
  std::vector<int> majors;
  const int driver_major = driver_version / 1000;
  if (driver_major >= 12) majors.push_back(driver_major);
  for (int m : {13, 12}) {
    if (std::find(majors.begin(), majors.end(), m) == majors.end()) majors.push_back(m);
  }
  std::vector<std::string> dirs;
  for (const char* env : {"CUDA_HOME", "CUDA_PATH"}) {
    const char* v = std::getenv(env);
    if (v != nullptr && *v != '\0') dirs.push_back(std::string(v) + "/lib64/");
  }
  dirs.push_back("/usr/local/cuda/lib64/");

  std::vector<std::string> out;
  for (int m : majors) out.push_back("libnvrtc.so." + std::to_string(m));
  for (const auto& dir : dirs) {
    for (int m : majors) out.push_back(dir + "libnvrtc.so." + std::to_string(m));
  }
  return out;
}

// NVRTC dlopens libnvrtc-builtins.so.<major>.<minor> at its first compile, by
// soname: when libnvrtc came from an absolute path that is not on the loader's
// search path, that fails (NVRTC_ERROR_BUILTIN_OPERATION_FAILURE). Loading it
// first from libnvrtc's own folder makes the later lookup by soname succeed.
void PreloadBuiltins(void* any_nvrtc_symbol, int major, int minor) {
  Dl_info info{};
  if (dladdr(any_nvrtc_symbol, &info) == 0 || info.dli_fname == nullptr) return;
  std::string dir = info.dli_fname;
  const auto slash = dir.rfind('/');
  if (slash == std::string::npos) return;  // found by soname: builtins will be too
  dir.resize(slash + 1);
  const std::string builtins =
      dir + "libnvrtc-builtins.so." + std::to_string(major) + "." + std::to_string(minor);
  // Failure is fine here: NVRTC will report its own error at compile time.
  (void)dlopen(builtins.c_str(), RTLD_NOW | RTLD_LOCAL);
}

bool HasArchOption(const std::vector<std::string>& options) {
  for (const auto& o : options) {
    if (o.rfind("-arch", 0) == 0 || o.rfind("--gpu-architecture", 0) == 0) return true;
  }
  return false;
}

}  // namespace

const Nvrtc& Nvrtc::Get(const std::string& library, int driver_version) {
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Nvrtc*>();
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(library);
  if (it != cache->end()) return *it->second;

  auto* lib = new DynLib();  // never freed: the table below points into it
  if (!lib->Open(Candidates(library, driver_version))) {
    std::string error = lib->error();
    delete lib;
    ThrowError(ErrorKind::kBackendUnavailable, "cuda", "dlopen(libnvrtc)", 0, "NVRTC_NOT_FOUND",
               "NVRTC is needed to compile CUDA source: " + error +
                   ". Install the toolkit's NVRTC (e.g. package cuda-nvrtc-13-0), add its lib64 "
                   "folder to LD_LIBRARY_PATH, pass options.nvrtcLibrary, or load PTX/cubin "
                   "instead");
  }
  std::unique_ptr<Nvrtc> n(new Nvrtc());
  n->path_ = lib->path();
  std::string missing;
  auto need = [&](auto& fn, const char* symbol) {
    if (!lib->Resolve(fn, symbol)) missing += (missing.empty() ? "" : ", ") + std::string(symbol);
  };
  need(n->version_, "nvrtcVersion");
  need(n->get_error_string_, "nvrtcGetErrorString");
  need(n->create_program_, "nvrtcCreateProgram");
  need(n->destroy_program_, "nvrtcDestroyProgram");
  need(n->compile_program_, "nvrtcCompileProgram");
  need(n->get_ptx_size_, "nvrtcGetPTXSize");
  need(n->get_ptx_, "nvrtcGetPTX");
  need(n->get_log_size_, "nvrtcGetProgramLogSize");
  need(n->get_log_, "nvrtcGetProgramLog");
  if (!lib->Resolve(n->get_cubin_size_, "nvrtcGetCUBINSize") ||
      !lib->Resolve(n->get_cubin_, "nvrtcGetCUBIN")) {
    n->get_cubin_size_ = nullptr;
    n->get_cubin_ = nullptr;
  }
  if (!lib->Resolve(n->num_supported_archs_, "nvrtcGetNumSupportedArchs") ||
      !lib->Resolve(n->supported_archs_, "nvrtcGetSupportedArchs")) {
    n->num_supported_archs_ = nullptr;
    n->supported_archs_ = nullptr;
  }
  if (!missing.empty()) {
    const std::string path = lib->path();
    delete lib;  // DynLib never dlcloses; deleting only drops our bookkeeping
    ThrowError(ErrorKind::kBackendUnavailable, "cuda", "dlsym(libnvrtc)", 0, "NVRTC_NOT_FOUND",
               path + " lacks " + missing);
  }
  if (n->version_(&n->major_, &n->minor_) != kNvrtcSuccess) n->major_ = n->minor_ = 0;
  if (n->major_ > 0) {
    PreloadBuiltins(reinterpret_cast<void*>(n->version_), n->major_, n->minor_);
  }
  Nvrtc* raw = n.release();
  (*cache)[library] = raw;
  return *raw;
}

std::string Nvrtc::ResultName(Result r) const {
  const char* s = get_error_string_ != nullptr ? get_error_string_(r) : nullptr;
  return s != nullptr ? s : "NVRTC_ERROR_" + std::to_string(r);
}

void Nvrtc::Throw(Result r, const char* api, const std::string& message) const {
  ErrorKind kind = ErrorKind::kCompile;
  std::string text = message;
  if (r == kNvrtcBuiltinOperationFailure) {
    kind = ErrorKind::kBackendUnavailable;
    text += " (libnvrtc-builtins.so." + std::to_string(major_) + "." + std::to_string(minor_) +
            " could not be loaded: put " + path_ + "'s folder on LD_LIBRARY_PATH)";
  }
  ThrowError(kind, "cuda", api, r, ResultName(r), text);
}

std::vector<int> Nvrtc::SupportedArchs() const {
  std::vector<int> archs;
  int n = 0;
  if (num_supported_archs_ == nullptr || num_supported_archs_(&n) != kNvrtcSuccess || n <= 0) {
    return archs;
  }
  archs.resize(n);
  if (supported_archs_(archs.data()) != kNvrtcSuccess) archs.clear();
  return archs;
}

CompiledModule Nvrtc::Compile(const std::string& source, const std::string& name,
                              const std::vector<std::string>& options, int cc_major, int cc_minor,
                              std::string* log) const {
  CompiledModule out;
  std::vector<std::string> opts = options;
  const bool user_arch = HasArchOption(options);
  bool want_cubin = get_cubin_ != nullptr;
  if (!user_arch) {
    const int arch = cc_major * 10 + cc_minor;
    const std::vector<int> supported = SupportedArchs();
    int target = arch;
    if (!supported.empty() &&
        std::find(supported.begin(), supported.end(), arch) == supported.end()) {
      // This NVRTC predates the device: emit PTX for the newest architecture it
      // knows below the device's; the driver JIT-compiles it at load.
      int best = 0;
      for (int a : supported) {
        if (a <= arch && a > best) best = a;
      }
      if (best > 0) {
        target = best;
        want_cubin = false;
      }
    }
    out.arch = (want_cubin ? "sm_" : "compute_") + std::to_string(target);
    opts.push_back("--gpu-architecture=" + out.arch);
  }

  Program prog = nullptr;
  Result r = create_program_(&prog, source.c_str(), name.c_str(), 0, nullptr, nullptr);
  if (r != kNvrtcSuccess) Throw(r, "nvrtcCreateProgram", "creating program " + name);
  // Destroy the program on every path out of here.
  struct Guard {
    const Nvrtc* self;
    Program* p;
    ~Guard() { self->destroy_program_(p); }
  } guard{this, &prog};

  std::vector<const char*> argv;
  argv.reserve(opts.size());
  for (const auto& o : opts) argv.push_back(o.c_str());
  const Result compiled = compile_program_(prog, static_cast<int>(argv.size()), argv.data());

  std::string program_log;
  size_t log_size = 0;
  if (get_log_size_(prog, &log_size) == kNvrtcSuccess && log_size > 1) {
    program_log.resize(log_size);
    if (get_log_(prog, &program_log[0]) != kNvrtcSuccess) program_log.clear();
    while (!program_log.empty() && program_log.back() == '\0') program_log.pop_back();
  }
  if (log != nullptr) *log = program_log;
  if (compiled != kNvrtcSuccess) {
    std::string options_text;
    for (const auto& o : opts) options_text += " " + o;
    Throw(compiled, "nvrtcCompileProgram",
          name + " failed to compile (options:" + options_text + ")" +
              (program_log.empty() ? std::string() : ":\n" + program_log));
  }

  // A cubin exists only for a real sm_XX target; with a user-given
  // compute_XX its size is 0 and PTX is the product.
  size_t size = 0;
  if (want_cubin && get_cubin_size_(prog, &size) == kNvrtcSuccess && size > 0) {
    out.image.resize(size);
    r = get_cubin_(prog, &out.image[0]);
    if (r != kNvrtcSuccess) Throw(r, "nvrtcGetCUBIN", "reading the cubin of " + name);
    out.cubin = true;
    return out;
  }
  r = get_ptx_size_(prog, &size);
  if (r != kNvrtcSuccess) Throw(r, "nvrtcGetPTXSize", "reading the PTX of " + name);
  out.image.assign(size + 1, '\0');  // size counts the NUL; one more is harmless
  r = get_ptx_(prog, &out.image[0]);
  if (r != kNvrtcSuccess) Throw(r, "nvrtcGetPTX", "reading the PTX of " + name);
  out.cubin = false;
  if (out.arch.empty()) out.arch = "(from options)";
  return out;
}

}  // namespace cuda
}  // namespace emoe

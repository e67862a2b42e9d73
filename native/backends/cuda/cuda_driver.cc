#include "backends/cuda/cuda_driver.h"

#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "core/dynlib.h"

namespace emoe {
namespace cuda {
namespace {

// Resolves the whole table. cuda.h renames many functions with macros
// (cuMemGetInfo -> cuMemGetInfo_v2, ...): by dlsym we must ask for the exported
// name the macro expands to, never the plain one, or we get the old ABI.
// Every versioned symbol of this backend is chosen here and nowhere else.
bool ResolveAll(const DynLib& lib, Driver* d, std::string* missing) {
  auto need = [&](auto& fn, const char* symbol) {
    if (!lib.Resolve(fn, symbol)) *missing += (missing->empty() ? "" : ", ") + std::string(symbol);
  };
  auto want = [&](auto& fn, const char* symbol) { return lib.Resolve(fn, symbol); };

  need(d->cuGetErrorName, "cuGetErrorName");
  need(d->cuGetErrorString, "cuGetErrorString");
  need(d->cuInit, "cuInit");
  need(d->cuDriverGetVersion, "cuDriverGetVersion");

  need(d->cuDeviceGet, "cuDeviceGet");
  need(d->cuDeviceGetCount, "cuDeviceGetCount");
  need(d->cuDeviceGetName, "cuDeviceGetName");
  need(d->cuDeviceGetAttribute, "cuDeviceGetAttribute");
  want(d->cuDeviceGetPCIBusId, "cuDeviceGetPCIBusId");
  need(d->cuDeviceCanAccessPeer, "cuDeviceCanAccessPeer");

  need(d->cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  need(d->cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2");
  need(d->cuDevicePrimaryCtxReset, "cuDevicePrimaryCtxReset_v2");
  need(d->cuCtxSetCurrent, "cuCtxSetCurrent");
  need(d->cuCtxSynchronize, "cuCtxSynchronize");
  need(d->cuMemGetInfo, "cuMemGetInfo_v2");

  // VMM calls (CUDA 10.2+) have a single, unversioned export.
  need(d->cuMemGetAllocationGranularity, "cuMemGetAllocationGranularity");
  need(d->cuMemAddressReserve, "cuMemAddressReserve");
  need(d->cuMemAddressFree, "cuMemAddressFree");
  need(d->cuMemCreate, "cuMemCreate");
  need(d->cuMemRelease, "cuMemRelease");
  need(d->cuMemMap, "cuMemMap");
  need(d->cuMemUnmap, "cuMemUnmap");
  need(d->cuMemSetAccess, "cuMemSetAccess");
  need(d->cuMemExportToShareableHandle, "cuMemExportToShareableHandle");
  need(d->cuMemImportFromShareableHandle, "cuMemImportFromShareableHandle");
  need(d->cuMemGetAllocationPropertiesFromHandle, "cuMemGetAllocationPropertiesFromHandle");

  need(d->cuMemHostAlloc, "cuMemHostAlloc");
  need(d->cuMemFreeHost, "cuMemFreeHost");

  // Stream-taking calls also export *_ptsz / *_ptds variants (per-thread
  // default stream); we always pass an explicit stream, so the legacy names fit.
  need(d->cuStreamCreate, "cuStreamCreate");
  need(d->cuStreamDestroy, "cuStreamDestroy_v2");
  need(d->cuStreamSynchronize, "cuStreamSynchronize");
  need(d->cuStreamWaitEvent, "cuStreamWaitEvent");
  need(d->cuEventCreate, "cuEventCreate");
  need(d->cuEventDestroy, "cuEventDestroy_v2");
  need(d->cuEventRecord, "cuEventRecord");
  need(d->cuEventSynchronize, "cuEventSynchronize");
  // _v2 exists from driver 12.8 on (cuda.h maps the plain name to it there).
  if (!want(d->cuEventElapsedTime, "cuEventElapsedTime_v2")) {
    need(d->cuEventElapsedTime, "cuEventElapsedTime");
  }

  need(d->cuMemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2");
  need(d->cuMemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2");
  need(d->cuMemcpyDtoHAsync, "cuMemcpyDtoHAsync_v2");
  // The async memset never got a _v2 (only the synchronous cuMemsetD8_v2 did).
  need(d->cuMemsetD8Async, "cuMemsetD8Async");

  need(d->cuModuleLoadData, "cuModuleLoadData");
  want(d->cuModuleLoadDataEx, "cuModuleLoadDataEx");
  need(d->cuModuleUnload, "cuModuleUnload");
  need(d->cuModuleGetFunction, "cuModuleGetFunction");
  need(d->cuLaunchKernel, "cuLaunchKernel");

  // Stream capture. cuda.h maps cuStreamBeginCapture to cuStreamBeginCapture_v2
  // (CUDA 10.1+, the one that takes a mode; the plain export is CUDA 10.0's
  // one-argument form: never use it). cuStreamEndCapture, cuStreamIsCapturing and
  // cuGraphLaunch have a single export (their _ptsz forms are for the per-thread
  // default stream). cuGraphInstantiateWithFlags (11.4+) is what CUDA 12's
  // cuGraphInstantiate macro expands to. All optional: see the table.
  want(d->cuStreamBeginCapture, "cuStreamBeginCapture_v2");
  want(d->cuStreamEndCapture, "cuStreamEndCapture");
  want(d->cuStreamIsCapturing, "cuStreamIsCapturing");
  want(d->cuGraphInstantiateWithFlags, "cuGraphInstantiateWithFlags");
  want(d->cuGraphLaunch, "cuGraphLaunch");
  want(d->cuGraphExecDestroy, "cuGraphExecDestroy");
  want(d->cuGraphDestroy, "cuGraphDestroy");
  want(d->cuGraphUpload, "cuGraphUpload");
  return missing->empty();
}

struct Loaded {
  DynLib lib;
  Driver driver;
};

}  // namespace

const Driver* LoadDriver(const std::string& library, std::string* error, const char** step) {
  // One table per library name for the life of the process: ProbeCuda and
  // every backend share it, and nothing is ever unloaded (see DynLib).
  static std::mutex mu;
  static auto* cache = new std::map<std::string, Loaded*>();
  const std::string name = library.empty() ? "libcuda.so.1" : library;

  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(name);
  if (it != cache->end()) return &it->second->driver;

  auto* loaded = new Loaded();
  if (!loaded->lib.Open({name})) {
    *step = "dlopen";
    *error = loaded->lib.error() +
             " (is the NVIDIA driver installed? `nvidia-smi` should work; or pass "
             "options.cudaLibrary with the path of libcuda.so.1)";
    delete loaded;  // safe: nothing was opened
    return nullptr;
  }
  std::string missing;
  if (!ResolveAll(loaded->lib, &loaded->driver, &missing)) {
    *step = "dlsym";
    *error = loaded->lib.path() + " lacks " + missing +
             " (driver too old? this backend needs a CUDA 12+ driver)";
    delete loaded;  // the library stays loaded (DynLib never dlcloses); harmless
    return nullptr;
  }
  loaded->driver.path = loaded->lib.path();
  (*cache)[name] = loaded;
  return &loaded->driver;
}

std::string FormatDriverVersion(int version) {
  std::ostringstream os;
  os << version / 1000 << "." << (version % 1000) / 10 << " (driver API " << version << ")";
  return os.str();
}

std::string ErrorName(const Driver& d, CUresult r) {
  const char* s = nullptr;
  if (d.cuGetErrorName != nullptr && d.cuGetErrorName(r, &s) == CUDA_SUCCESS && s != nullptr) {
    return s;
  }
  return "CUDA_ERROR_" + std::to_string(r);
}

std::string ErrorString(const Driver& d, CUresult r) {
  const char* s = nullptr;
  if (d.cuGetErrorString != nullptr && d.cuGetErrorString(r, &s) == CUDA_SUCCESS &&
      s != nullptr) {
    return s;
  }
  return "unknown error " + std::to_string(r);
}

ErrorKind KindOf(CUresult r) {
  switch (r) {
    case CUDA_ERROR_OUT_OF_MEMORY:
      return ErrorKind::kOutOfMemory;
    // Sticky kernel/copy faults: the context is unusable until reset.
    case CUDA_ERROR_ILLEGAL_ADDRESS:
    case CUDA_ERROR_HARDWARE_STACK_ERROR:
    case CUDA_ERROR_ILLEGAL_INSTRUCTION:
    case CUDA_ERROR_MISALIGNED_ADDRESS:
    case CUDA_ERROR_INVALID_ADDRESS_SPACE:
    case CUDA_ERROR_INVALID_PC:
    case CUDA_ERROR_LAUNCH_FAILED:
      return ErrorKind::kIllegalAddress;
    case CUDA_ERROR_INVALID_VALUE:
    case CUDA_ERROR_INVALID_DEVICE:
      return ErrorKind::kInvalidArgument;
    case CUDA_ERROR_INVALID_HANDLE:
    case CUDA_ERROR_INVALID_CONTEXT:
      return ErrorKind::kInvalidHandle;
    case CUDA_ERROR_PEER_ACCESS_UNSUPPORTED:
    case CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED:
    case CUDA_ERROR_PEER_ACCESS_NOT_ENABLED:
    case CUDA_ERROR_TOO_MANY_PEERS:
      return ErrorKind::kPeerAccess;
    case CUDA_ERROR_NOT_FOUND:
      return ErrorKind::kNotFound;
    case CUDA_ERROR_NOT_SUPPORTED:
      return ErrorKind::kNotSupported;
    // An operation that a capture does not allow (or that met an invalidated one).
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED:
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED:
    case CUDA_ERROR_STREAM_CAPTURE_MERGE:
    case CUDA_ERROR_STREAM_CAPTURE_ISOLATION:
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
    case CUDA_ERROR_CAPTURED_EVENT:
    case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD:
      return ErrorKind::kNotSupported;
    // A capture sequence got wrong by the caller: ended on the wrong stream, or
    // with a forked stream never joined back.
    case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED:
    case CUDA_ERROR_STREAM_CAPTURE_UNJOINED:
      return ErrorKind::kInvalidArgument;
    // A module image the driver cannot use on this device: the kernel
    // "failed to compile" from the caller's point of view.
    case CUDA_ERROR_INVALID_IMAGE:
    case CUDA_ERROR_NO_BINARY_FOR_GPU:
    case CUDA_ERROR_INVALID_PTX:
    case CUDA_ERROR_JIT_COMPILER_NOT_FOUND:
    case CUDA_ERROR_UNSUPPORTED_PTX_VERSION:
    case CUDA_ERROR_JIT_COMPILATION_DISABLED:
      return ErrorKind::kCompile;
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_DEVICE_UNAVAILABLE:
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_SYSTEM_NOT_READY:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE:
    case CUDA_ERROR_UNKNOWN:
      return ErrorKind::kBackendUnavailable;
    default:
      return ErrorKind::kInternal;
  }
}

namespace {

// What the caller can do about it, by kind; empty where the text says enough.
const char* Hint(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kOutOfMemory:
      return "free chunks, streams or modules on that device, or use another device";
    case ErrorKind::kIllegalAddress:
      // [measured, driver 580 / CUDA 13.0] the sticky state covers every device
      // of the process, and resetting primary contexts does not clear it.
      return "the error is sticky: later CUDA work of this process fails, on every "
             "device, and ResetDevice cannot clear it (measured on driver 580); restart the "
             "process. Check that every range the kernel or copy touched was mapped and "
             "that SetAccess granted the device running it";
    case ErrorKind::kPeerAccess:
      return "check CanAccessPeer and `nvidia-smi topo -m`; at most 8 direct peers per device";
    case ErrorKind::kBackendUnavailable:
      return "check `nvidia-smi`, CUDA_VISIBLE_DEVICES and that the driver matches the "
             "kernel module";
    default:
      return "";
  }
}

// What to do about a stream-capture error; null for other codes.
const char* CaptureHint(CUresult r) {
  switch (r) {
    case CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED:
      return "the operation is not permitted while the stream is capturing (synchronizing it, "
             "querying or synchronizing a captured event, a copy from pageable memory); the "
             "capture is invalidated: EndCapture ends it with an error, then capture again";
    case CUDA_ERROR_STREAM_CAPTURE_INVALIDATED:
      return "an earlier call invalidated this capture (it returned the first error); "
             "EndCapture on the origin stream ends it: capture again";
    case CUDA_ERROR_STREAM_CAPTURE_MERGE:
      return "a capturing stream waited on an event recorded by another capture: two captures "
             "cannot merge";
    case CUDA_ERROR_STREAM_CAPTURE_UNMATCHED:
      return "end the capture on the stream where BeginCapture was called";
    case CUDA_ERROR_STREAM_CAPTURE_UNJOINED:
      return "every stream that joined the capture (by waiting on an event recorded during it) "
             "must be joined back: record an event on it after its last captured work and make "
             "the origin stream wait on it before EndCapture";
    case CUDA_ERROR_STREAM_CAPTURE_ISOLATION:
      return "during a capture a stream may wait only on events recorded during the same "
             "capture; wait for outside work before BeginCapture";
    case CUDA_ERROR_STREAM_CAPTURE_IMPLICIT:
      return "the legacy default stream would depend on a capture; this backend uses "
             "non-blocking streams, so some other code used the legacy stream";
    case CUDA_ERROR_CAPTURED_EVENT:
      return "the event's latest record was captured into a graph, so it marks no work that "
             "will complete; record it again outside capture before synchronizing or timing it";
    case CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD:
      return "end the capture from the thread that began it";
    default:
      return nullptr;
  }
}

}  // namespace

void ThrowCu(const Driver& d, CUresult r, const char* api, const std::string& context,
             const char* argument) {
  Status s;
  s.kind = KindOf(r);
  s.backend = "cuda";
  s.api = api;
  s.code = r;
  s.code_name = ErrorName(d, r);
  s.message = ErrorString(d, r);
  // Some driver strings end in a period; the context reads on after them.
  while (!s.message.empty() && (s.message.back() == '.' || s.message.back() == ' ')) {
    s.message.pop_back();
  }
  if (!context.empty()) s.message += " while " + context;
  const char* capture_hint = CaptureHint(r);
  const char* hint = r == CUDA_ERROR_CONTEXT_IS_DESTROYED
                         ? "the device's primary context is gone (a ResetDevice that could not "
                           "reopen it after a sticky error?); restart the process"
                         : capture_hint != nullptr ? capture_hint : Hint(s.kind);
  if (*hint != '\0') s.message += std::string("; ") + hint;
  if (s.kind == ErrorKind::kInvalidArgument) {
    s.argument = r == CUDA_ERROR_INVALID_DEVICE ? "device" : (argument != nullptr ? argument : "");
  }
  throw Error(std::move(s));
}

}  // namespace cuda
}  // namespace emoe

// The few CUDA driver types and entry points the reference programs in this
// folder use, loaded from libcuda.so.1 with dlopen (no cuda.h needed). Shared by
// p2p_ref.cc and attach_ref.cc; independent of native/ on purpose, so the
// reference figures share no code with the addon they are compared with.
#pragma once
#include <dlfcn.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

namespace ref {

// Program name used in error messages (set by main).
inline const char* g_program = "ref";


// ---- the few driver types and entry points used (no cuda.h needed)
using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUhandle = unsigned long long;  // CUmemGenericAllocationHandle
using CUcontext = struct CUctx_st*;
using CUstream = struct CUstream_st*;
using CUevent = struct CUevent_st*;

struct CUmemLocation {
  int type;
  int id;
};
struct CUmemAllocationProp {
  int type;
  int requestedHandleTypes;
  CUmemLocation location;
  void* win32HandleMetaData;
  struct {
    unsigned char compressionType, gpuDirectRDMACapable;
    unsigned short usage;
    unsigned char reserved[4];
  } allocFlags;
};
static_assert(sizeof(CUmemAllocationProp) == 32, "CUmemAllocationProp is 32 bytes");
struct CUmemAccessDesc {
  CUmemLocation location;
  int flags;
};
static_assert(sizeof(CUmemAccessDesc) == 12, "CUmemAccessDesc is 12 bytes");

constexpr int kLocationDevice = 1, kAllocPinned = 1, kProtReadWrite = 3, kGranularityMinimum = 0;
constexpr int kHandlePosixFd = 1;  // CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR

struct Cu {
  CUresult (*GetErrorName)(CUresult, const char**);
  CUresult (*Init)(unsigned);
  CUresult (*DriverGetVersion)(int*);
  CUresult (*DeviceGet)(CUdevice*, int);
  CUresult (*DeviceGetCount)(int*);
  CUresult (*DeviceGetName)(char*, int, CUdevice);
  CUresult (*DeviceCanAccessPeer)(int*, CUdevice, CUdevice);
  CUresult (*PrimaryCtxRetain)(CUcontext*, CUdevice);
  CUresult (*CtxSetCurrent)(CUcontext);
  CUresult (*GetGranularity)(size_t*, const CUmemAllocationProp*, int);
  CUresult (*AddressReserve)(CUdeviceptr*, size_t, size_t, CUdeviceptr, unsigned long long);
  CUresult (*AddressFree)(CUdeviceptr, size_t);
  CUresult (*Create)(CUhandle*, size_t, const CUmemAllocationProp*, unsigned long long);
  CUresult (*Release)(CUhandle);
  CUresult (*Map)(CUdeviceptr, size_t, size_t, CUhandle, unsigned long long);
  CUresult (*Unmap)(CUdeviceptr, size_t);
  CUresult (*SetAccess)(CUdeviceptr, size_t, const CUmemAccessDesc*, size_t);
  CUresult (*StreamCreate)(CUstream*, unsigned);
  CUresult (*StreamSynchronize)(CUstream);
  CUresult (*EventCreate)(CUevent*, unsigned);
  CUresult (*EventRecord)(CUevent, CUstream);
  CUresult (*EventSynchronize)(CUevent);
  CUresult (*EventElapsedTime)(float*, CUevent, CUevent);
  CUresult (*MemcpyDtoDAsync)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
  CUresult (*MemcpyDtoH)(void*, CUdeviceptr, size_t);
  CUresult (*MemsetD8Async)(CUdeviceptr, unsigned char, size_t, CUstream);
  CUresult (*ExportToShareableHandle)(void*, CUhandle, int, unsigned long long);
  CUresult (*ImportFromShareableHandle)(CUhandle*, void*, int);
  CUresult (*MemHostAlloc)(void**, size_t, unsigned);
  CUresult (*MemFreeHost)(void*);
  CUresult (*MemcpyHtoDAsync)(CUdeviceptr, const void*, size_t, CUstream);
};
inline Cu cu;

[[noreturn]] inline void Die(const std::string& message) {
  std::string escaped;
  for (char c : message) {
    if (c == '"' || c == '\\') escaped += '\\';
    escaped += (c == '\n' ? ' ' : c);
  }
  std::printf("{\"source\":\"ref\",\"error\":\"%s\"}\n", escaped.c_str());
  std::fflush(stdout);
  std::fprintf(stderr, "%s: %s\n", g_program, message.c_str());
  std::exit(1);
}

inline void Check(CUresult r, const char* api) {
  if (r == 0) return;
  const char* name = nullptr;
  if (cu.GetErrorName == nullptr || cu.GetErrorName(r, &name) != 0 || name == nullptr) {
    name = "unknown";
  }
  Die(std::string(api) + " failed: " + name + " (" + std::to_string(r) + ")");
}

template <typename Fn>
inline void Load(void* lib, Fn*& out, const char* symbol) {
  out = reinterpret_cast<Fn*>(dlsym(lib, symbol));
  if (out == nullptr) Die(std::string("libcuda.so.1 lacks ") + symbol);
}

inline void LoadDriver() {
  void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* e = dlerror();
    Die(e != nullptr ? e : "dlopen(libcuda.so.1) failed");
  }
  // Exported names: cuda.h maps several calls to their _v2 symbols.
  Load(lib, cu.GetErrorName, "cuGetErrorName");
  Load(lib, cu.Init, "cuInit");
  Load(lib, cu.DriverGetVersion, "cuDriverGetVersion");
  Load(lib, cu.DeviceGet, "cuDeviceGet");
  Load(lib, cu.DeviceGetCount, "cuDeviceGetCount");
  Load(lib, cu.DeviceGetName, "cuDeviceGetName");
  Load(lib, cu.DeviceCanAccessPeer, "cuDeviceCanAccessPeer");
  Load(lib, cu.PrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
  Load(lib, cu.CtxSetCurrent, "cuCtxSetCurrent");
  Load(lib, cu.GetGranularity, "cuMemGetAllocationGranularity");
  Load(lib, cu.AddressReserve, "cuMemAddressReserve");
  Load(lib, cu.AddressFree, "cuMemAddressFree");
  Load(lib, cu.Create, "cuMemCreate");
  Load(lib, cu.Release, "cuMemRelease");
  Load(lib, cu.Map, "cuMemMap");
  Load(lib, cu.Unmap, "cuMemUnmap");
  Load(lib, cu.SetAccess, "cuMemSetAccess");
  Load(lib, cu.StreamCreate, "cuStreamCreate");
  Load(lib, cu.StreamSynchronize, "cuStreamSynchronize");
  Load(lib, cu.EventCreate, "cuEventCreate");
  Load(lib, cu.EventRecord, "cuEventRecord");
  Load(lib, cu.EventSynchronize, "cuEventSynchronize");
  cu.EventElapsedTime = reinterpret_cast<decltype(cu.EventElapsedTime)>(
      dlsym(lib, "cuEventElapsedTime_v2"));  // driver 12.8+
  if (cu.EventElapsedTime == nullptr) Load(lib, cu.EventElapsedTime, "cuEventElapsedTime");
  Load(lib, cu.MemcpyDtoDAsync, "cuMemcpyDtoDAsync_v2");
  Load(lib, cu.MemcpyDtoH, "cuMemcpyDtoH_v2");
  Load(lib, cu.MemsetD8Async, "cuMemsetD8Async");
  Load(lib, cu.ExportToShareableHandle, "cuMemExportToShareableHandle");
  Load(lib, cu.ImportFromShareableHandle, "cuMemImportFromShareableHandle");
  Load(lib, cu.MemHostAlloc, "cuMemHostAlloc");
  Load(lib, cu.MemFreeHost, "cuMemFreeHost");
  Load(lib, cu.MemcpyHtoDAsync, "cuMemcpyHtoDAsync_v2");
}

inline uint64_t EnvBytes(const char* name, uint64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoull(v, nullptr, 10) : fallback;
}

inline double NowMs() {
  using namespace std::chrono;
  return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

}  // namespace ref

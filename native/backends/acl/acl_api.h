// The slice of the CANN ACL runtime (libascendcl.so) that the acl backend calls,
// declared here because no CANN headers exist at build time: the addon must build
// and load on machines without the toolkit, so every function is resolved with
// dlsym at run time and every symbol is optional (availability varies by release).
//
// Layouts and enum values follow the public acl/acl_rt.h and acl/acl_base.h of
// CANN 8.x (hicann/runtime); the static_asserts below pin the sizes we rely on.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "core/dynlib.h"

namespace emoe {
namespace acl {

// ---- scalar types and opaque handles
using aclError = int;
using aclrtStream = void*;
using aclrtEvent = void*;
using aclrtDrvMemHandle = void*;
using aclrtBinHandle = void*;
using aclrtFuncHandle = void*;
using aclrtArgsHandle = void*;
using aclrtParamHandle = void*;

// ---- error codes (acl_base.h; 107xxx/207xxx are the runtime's own codes)
constexpr aclError ACL_SUCCESS = 0;
constexpr aclError ACL_ERROR_INVALID_PARAM = 100000;
constexpr aclError ACL_ERROR_UNINITIALIZE = 100001;
constexpr aclError ACL_ERROR_REPEAT_INITIALIZE = 100002;
constexpr aclError ACL_ERROR_RT_PARAM_INVALID = 107000;
constexpr aclError ACL_ERROR_RT_INVALID_DEVICEID = 107001;
constexpr aclError ACL_ERROR_RT_CONTEXT_NULL = 107002;
constexpr aclError ACL_ERROR_BAD_ALLOC = 200000;
constexpr aclError ACL_ERROR_RT_FEATURE_NOT_SUPPORT = 207000;
constexpr aclError ACL_ERROR_RT_MEMORY_ALLOCATION = 207001;
constexpr aclError ACL_ERROR_RT_NO_DEVICE = 207004;
constexpr aclError ACL_ERROR_RT_NO_PERMISSION = 207006;

// ---- enums. C enums are int-sized on every ABI CANN supports, so each is
// declared as int32_t inside the structs.
// aclrtMemAttr: ACL_DDR_MEM 0, ACL_HBM_MEM 1, ACL_DDR_MEM_HUGE 2,
// ACL_DDR_MEM_NORMAL 3, ACL_HBM_MEM_HUGE 4 (2 MiB pages), ...
constexpr int32_t ACL_DDR_MEM = 0;
constexpr int32_t ACL_HBM_MEM = 1;
constexpr int32_t ACL_HBM_MEM_HUGE = 4;
constexpr int32_t ACL_MEM_HANDLE_TYPE_NONE = 0;        // aclrtMemHandleType
constexpr int32_t ACL_MEM_ALLOCATION_TYPE_PINNED = 0;  // aclrtMemAllocationType
constexpr int32_t ACL_MEM_LOCATION_TYPE_HOST = 0;      // aclrtMemLocationType
constexpr int32_t ACL_MEM_LOCATION_TYPE_DEVICE = 1;
constexpr int32_t ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM = 0;  // aclrtMemGranularityOptions
constexpr int32_t ACL_RT_MEM_ACCESS_FLAGS_NONE = 0x0;        // aclrtMemAccessFlags
constexpr int32_t ACL_RT_MEM_ACCESS_FLAGS_READWRITE = 0x3;
constexpr int32_t ACL_MEMCPY_HOST_TO_DEVICE = 1;  // aclrtMemcpyKind
constexpr int32_t ACL_MEMCPY_DEVICE_TO_HOST = 2;
constexpr int32_t ACL_MEMCPY_DEVICE_TO_DEVICE = 3;
constexpr uint32_t ACL_EVENT_SYNC = 0x1;  // aclrtCreateEventWithFlag flags
constexpr uint32_t ACL_EVENT_TIME_LINE = 0x8;

// ---- structs. Note the field order differs from CUDA's CUmemLocation /
// CUmemAccessDesc: the location has its id FIRST, the access descriptor its flags
// first. Getting either wrong makes the driver read a garbage device id.
struct aclrtMemLocation {
  uint32_t id;
  int32_t type;  // aclrtMemLocationType
};

struct aclrtPhysicalMemProp {
  int32_t handleType;      // aclrtMemHandleType
  int32_t allocationType;  // aclrtMemAllocationType
  int32_t memAttr;         // aclrtMemAttr
  aclrtMemLocation location;
  uint64_t reserve;
};

struct aclrtMemAccessDesc {
  int32_t flags;  // aclrtMemAccessFlags
  aclrtMemLocation location;
  uint8_t rsv[12];
};

static_assert(sizeof(aclrtMemLocation) == 8, "aclrtMemLocation layout");
static_assert(offsetof(aclrtPhysicalMemProp, location) == 12, "aclrtPhysicalMemProp layout");
static_assert(offsetof(aclrtPhysicalMemProp, reserve) == 24, "aclrtPhysicalMemProp layout");
static_assert(sizeof(aclrtPhysicalMemProp) == 32, "aclrtPhysicalMemProp layout");
static_assert(offsetof(aclrtMemAccessDesc, location) == 4, "aclrtMemAccessDesc layout");
static_assert(sizeof(aclrtMemAccessDesc) == 24, "aclrtMemAccessDesc layout");

// ---- the function table. One line per symbol: name, the CANN release that
// introduced it where NATIVE_APIS.md records one ("" = not recorded), return type
// and parameter list. Pointer parameters to the opaque option structs we never
// fill (aclrtBinaryLoadOptions, aclrtLaunchKernelCfg) are declared void*.
#define EMOE_ACL_FUNCTIONS(X)                                                                   \
  X(aclInit, "", aclError, (const char* configPath))                                             \
  X(aclFinalize, "", aclError, ())                                                               \
  X(aclGetRecentErrMsg, "", const char*, ())                                                     \
  X(aclrtGetVersion, "", aclError, (int32_t * major, int32_t * minor, int32_t * patch))          \
  X(aclrtGetSocName, "", const char*, ())                                                        \
  X(aclrtSetDevice, "", aclError, (int32_t device))                                              \
  X(aclrtResetDevice, "", aclError, (int32_t device))                                            \
  X(aclrtGetDeviceCount, "", aclError, (uint32_t * count))                                       \
  X(aclrtSynchronizeDevice, "", aclError, ())                                                    \
  X(aclrtGetMemInfo, "", aclError, (int32_t attr, size_t * free, size_t * total))                \
  X(aclrtDeviceCanAccessPeer, "", aclError, (int32_t * can, int32_t device, int32_t peer))       \
  X(aclrtDeviceEnablePeerAccess, "", aclError, (int32_t peer, uint32_t flags))                   \
  X(aclrtMemGetAllocationGranularity, "", aclError,                                              \
    (aclrtPhysicalMemProp * prop, int32_t option, size_t * granularity))                         \
  X(aclrtReserveMemAddress, "", aclError,                                                        \
    (void** virPtr, size_t size, size_t alignment, void* expectPtr, uint64_t flags))             \
  X(aclrtReleaseMemAddress, "", aclError, (void* virPtr))                                        \
  X(aclrtMallocPhysical, "", aclError,                                                           \
    (aclrtDrvMemHandle * handle, size_t size, const aclrtPhysicalMemProp* prop, uint64_t flags)) \
  X(aclrtFreePhysical, "", aclError, (aclrtDrvMemHandle handle))                                 \
  X(aclrtMapMem, "", aclError,                                                                   \
    (void* virPtr, size_t size, size_t offset, aclrtDrvMemHandle handle, uint64_t flags))        \
  X(aclrtUnmapMem, "", aclError, (void* virPtr))                                                 \
  X(aclrtMemSetAccess, "CANN 8.5", aclError,                                                     \
    (void* virPtr, size_t size, aclrtMemAccessDesc* desc, size_t count))                         \
  X(aclrtMemExportToShareableHandle, "", aclError,                                               \
    (aclrtDrvMemHandle handle, int32_t handleType, uint64_t flags, uint64_t * shareable))        \
  X(aclrtMemSetPidToShareableHandle, "", aclError,                                               \
    (uint64_t shareable, int32_t * pids, size_t count))                                          \
  X(aclrtMemImportFromShareableHandle, "", aclError,                                             \
    (uint64_t shareable, int32_t device, aclrtDrvMemHandle * handle))                            \
  X(aclrtDeviceGetBareTgid, "", aclError, (int32_t * pid))                                       \
  X(aclrtMallocHost, "", aclError, (void** ptr, size_t size))                                    \
  X(aclrtFreeHost, "", aclError, (void* ptr))                                                    \
  X(aclrtCreateStream, "", aclError, (aclrtStream * stream))                                     \
  X(aclrtSynchronizeStream, "", aclError, (aclrtStream stream))                                  \
  X(aclrtDestroyStream, "", aclError, (aclrtStream stream))                                      \
  X(aclrtCreateEventWithFlag, "", aclError, (aclrtEvent * event, uint32_t flag))                 \
  X(aclrtDestroyEvent, "", aclError, (aclrtEvent event))                                         \
  X(aclrtRecordEvent, "", aclError, (aclrtEvent event, aclrtStream stream))                      \
  X(aclrtStreamWaitEvent, "", aclError, (aclrtStream stream, aclrtEvent event))                  \
  X(aclrtSynchronizeEvent, "", aclError, (aclrtEvent event))                                     \
  X(aclrtEventElapsedTime, "", aclError, (float* ms, aclrtEvent start, aclrtEvent end))          \
  X(aclrtMemcpyAsync, "", aclError,                                                              \
    (void* dst, size_t destMax, const void* src, size_t count, int32_t kind, aclrtStream stream)) \
  X(aclrtMemsetAsync, "", aclError,                                                              \
    (void* dst, size_t destMax, int32_t value, size_t count, aclrtStream stream))                \
  X(aclrtBinaryLoadFromFile, "CANN 8.2", aclError,                                               \
    (const char* path, void* options, aclrtBinHandle* bin))                                      \
  X(aclrtBinaryUnLoad, "", aclError, (aclrtBinHandle bin))                                       \
  X(aclrtBinaryGetFunction, "", aclError,                                                        \
    (aclrtBinHandle bin, const char* kernelName, aclrtFuncHandle* function))                     \
  X(aclrtKernelArgsInit, "", aclError, (aclrtFuncHandle function, aclrtArgsHandle * args))       \
  X(aclrtKernelArgsAppend, "", aclError,                                                         \
    (aclrtArgsHandle args, void* param, size_t paramSize, aclrtParamHandle* paramHandle))        \
  X(aclrtKernelArgsFinalize, "", aclError, (aclrtArgsHandle args))                               \
  X(aclrtLaunchKernelWithConfig, "", aclError,                                                   \
    (aclrtFuncHandle function, uint32_t numBlocks, aclrtStream stream, void* cfg,                \
     aclrtArgsHandle args, void* reserve))

// One loaded libascendcl.so: its resolved function table plus the process-wide
// aclInit bookkeeping, which belongs to the library rather than to one backend
// because aclInit may be called only once per process in older CANN releases.
struct Api {
#define EMOE_ACL_FIELD(name, since, ret, params) ret(*name) params = nullptr;
  EMOE_ACL_FUNCTIONS(EMOE_ACL_FIELD)
#undef EMOE_ACL_FIELD

  DynLib lib;

  // Guards the two fields below. `initialised_by_us`: our aclInit returned
  // ACL_SUCCESS (not REPEAT_INITIALIZE, which means the host application did it).
  // `users`: live backends on this library; the last one finalizes.
  std::mutex init_mu;
  bool initialised_by_us = false;
  int users = 0;
};

// The library candidates in search order: `override_path` alone when non-empty,
// else "libascendcl.so", $ASCEND_HOME_PATH/lib64, $ASCEND_TOOLKIT_HOME/lib64 and
// the default toolkit install path.
std::vector<std::string> LibraryCandidates(const std::string& override_path);

// Loads the first candidate that opens and resolves its table. The table is
// resolved once per candidate list and shared afterwards. Returns nullptr when
// nothing loads, with *error naming every path tried and its dlerror text.
std::shared_ptr<Api> LoadApi(const std::vector<std::string>& candidates, std::string* error);

// The CANN release that introduced `symbol`, or "" when not recorded.
const char* IntroducedIn(const char* symbol);

// "ACL_ERROR_RT_MEMORY_ALLOCATION" for 207001, "ACL_ERROR_<code>" when unknown.
std::string CodeName(aclError code);

}  // namespace acl
}  // namespace emoe

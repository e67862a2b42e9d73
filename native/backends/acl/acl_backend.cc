// The acl backend: Huawei Ascend NPUs through the CANN ACL runtime.
//
// THIS BACKEND HAS NEVER RUN ON ASCEND HARDWARE. It was written from the public
// CANN headers and documentation (see acl_api.h) and has only been exercised
// against the fake libascendcl.so in test/fixtures/fake_ascendcl.c, which checks
// argument handling and error paths, not device behaviour. Treat every ACL
// semantic it relies on as unverified until it has run on a real NPU.
//
// Shape: a thin translation of the Backend interface onto aclrt* calls, plus the
// bookkeeping ACL does not do for us: handle tables, which chunk is mapped where
// (so Map/Unmap/SetAccess can enforce the CUDA-like contract), and which devices
// this thread has made current.
#include "backends/acl/acl_backend.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "backends/acl/acl_api.h"

namespace emoe {
namespace {

using acl::aclError;
using acl::Api;

constexpr const char* kBackend = "acl";

// ---- error translation

ErrorKind KindFor(aclError code, bool peer_call) {
  switch (code) {
    case acl::ACL_ERROR_RT_MEMORY_ALLOCATION:
    case acl::ACL_ERROR_BAD_ALLOC:
      return ErrorKind::kOutOfMemory;
    case acl::ACL_ERROR_INVALID_PARAM:
    case acl::ACL_ERROR_RT_PARAM_INVALID:
      return ErrorKind::kInvalidArgument;
    case acl::ACL_ERROR_RT_FEATURE_NOT_SUPPORT:
      return ErrorKind::kNotSupported;
    case acl::ACL_ERROR_RT_NO_DEVICE:
    case acl::ACL_ERROR_UNINITIALIZE:
      return ErrorKind::kBackendUnavailable;
    case acl::ACL_ERROR_RT_NO_PERMISSION:
      // "No permission" from a peer call means the two devices cannot reach each
      // other; from anything else it is not something the caller can act on.
      return peer_call ? ErrorKind::kPeerAccess : ErrorKind::kInternal;
  }
  return ErrorKind::kInternal;
}

std::string Hex(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

void* Ptr(DevicePtr p) { return reinterpret_cast<void*>(static_cast<uintptr_t>(p)); }
DevicePtr Addr(const void* p) { return static_cast<DevicePtr>(reinterpret_cast<uintptr_t>(p)); }

// ---- the calling thread's current device
//
// ACL's current device is per thread and aclrtSetDevice is reference counted per
// call (each call must be balanced by an aclrtResetDevice before the device is
// really released). So each thread remembers which device it last made current
// for which backend generation, and calls aclrtSetDevice only when that changes;
// the backend counts its calls and balances them on destruction. A generation is
// unique per backend instance and renewed by ResetDevice, so a stale entry (other
// instance, device reset since) simply causes one more aclrtSetDevice.
std::atomic<uint64_t> g_next_generation{1};

struct ThreadDevice {
  uint64_t generation = 0;
  int device = -1;
};
thread_local ThreadDevice t_device;

class AclBackend final : public Backend {
 public:
  AclBackend(std::shared_ptr<Api> api, int device_count)
      : api_(std::move(api)), device_count_(device_count), generation_(g_next_generation++) {}
  ~AclBackend() override;

  const char* Name() const override { return kBackend; }

  int DeviceCount() override { return device_count_; }
  DeviceInfo GetDeviceInfo(int device) override;
  bool CanAccessPeer(int device, int peer) override;

  uint64_t Granularity(int device) override;
  DevicePtr ReserveRange(uint64_t size, uint64_t alignment) override;
  void FreeRange(DevicePtr base, uint64_t size) override;
  ChunkId CreateChunk(int device, uint64_t size, bool exportable) override;
  void ReleaseChunk(ChunkId chunk) override;
  uint64_t ChunkSize(ChunkId chunk) override;
  int ChunkDevice(ChunkId chunk) override;
  void Map(DevicePtr address, uint64_t size, ChunkId chunk) override;
  void Unmap(DevicePtr address, uint64_t size) override;
  void SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) override;

  uint64_t ExportChunk(ChunkId chunk) override;
  void AllowImport(uint64_t shareable, const std::vector<int32_t>& pids) override;
  int32_t ImportPid() override;
  ChunkId ImportChunk(uint64_t shareable, int device, uint64_t size) override;

  void* HostAlloc(uint64_t size) override;
  void HostFree(void* ptr) override;

  StreamId CreateStream(int device) override;
  void DestroyStream(StreamId stream) override;
  void SynchronizeStream(StreamId stream) override;
  EventId CreateEvent(int device, bool timing) override;
  void DestroyEvent(EventId event) override;
  void RecordEvent(EventId event, StreamId stream) override;
  void StreamWaitEvent(StreamId stream, EventId event) override;
  void SynchronizeEvent(EventId event) override;
  float ElapsedMs(EventId start, EventId end) override;

  void CopyDeviceToDevice(DevicePtr dst, DevicePtr src, uint64_t bytes, StreamId stream) override;
  void CopyHostToDevice(DevicePtr dst, const void* src, uint64_t bytes, StreamId stream) override;
  void CopyDeviceToHost(void* dst, DevicePtr src, uint64_t bytes, StreamId stream) override;
  void MemsetD8(DevicePtr dst, uint8_t value, uint64_t bytes, StreamId stream) override;

  ModuleId LoadModule(int device, const ModuleSource& source, std::string* log) override;
  void UnloadModule(ModuleId module) override;
  FunctionId GetFunction(ModuleId module, const std::string& name) override;
  void Launch(FunctionId function, const LaunchConfig& config, StreamId stream,
              const std::vector<KernelArg>& args) override;

  // Stream capture is not implemented here (see GraphsNotSupported).
  void BeginCapture(StreamId stream) override { GraphsNotSupported("BeginCapture"); }
  GraphId EndCapture(StreamId stream) override { GraphsNotSupported("EndCapture"); }
  GraphId EndCaptureDeferred(StreamId stream) override { GraphsNotSupported("EndCapture"); }
  void InstantiateGraph(GraphId graph) override { GraphsNotSupported("InstantiateGraph"); }
  void LaunchGraph(GraphId graph, StreamId stream) override { GraphsNotSupported("LaunchGraph"); }
  void DestroyGraph(GraphId graph) override { GraphsNotSupported("DestroyGraph"); }

  void ResetDevice(int device) override;

 private:
  // CANN has the same facility (aclmdlRICaptureBegin / aclmdlRICaptureEnd on a
  // stream, aclmdlRIExecuteAsync to replay, aclmdlRIDestroy), but this project has
  // no Ascend hardware to test it on, and the fake libascendcl.so could check
  // only the calls, not the capture rules (joins, what is legal during capture).
  // Refusing is better than an untested translation: callers run steps eagerly.
  [[noreturn]] void GraphsNotSupported(const char* method) const {
    ThrowError(ErrorKind::kNotSupported, kBackend, method, 0, "NOT_SUPPORTED",
               "stream capture and graph replay are not implemented on the acl backend (CANN's "
               "aclmdlRICapture* APIs are untested here: no Ascend hardware); launch the work "
               "directly on the stream instead");
  }

  struct Chunk {
    acl::aclrtDrvMemHandle handle = nullptr;
    uint64_t size = 0;
    int device = 0;
    bool imported = false;
    bool released = false;  // ReleaseChunk ran while mapped: freed at the last Unmap
    int map_count = 0;
    bool exported = false;
    uint64_t shareable = 0;
  };
  struct Range {  // one ReserveRange reservation
    uint64_t size = 0;
    int mapped = 0;  // live mappings inside it
    int device = -1;  // device and origin of those mappings: ACL forbids mixing
    bool imported = false;
  };
  struct Mapping {
    uint64_t size = 0;
    std::shared_ptr<Chunk> chunk;
    std::set<int> access;  // devices granted access (ACL's map grants the owner)
  };
  struct Stream {
    acl::aclrtStream handle = nullptr;
    int device = 0;
  };
  struct Event {
    acl::aclrtEvent handle = nullptr;
    int device = 0;
    bool timing = false;
  };
  struct Module {
    acl::aclrtBinHandle handle = nullptr;
    int device = 0;
    std::string path;
  };
  struct Function {
    acl::aclrtFuncHandle handle = nullptr;
    ModuleId module = 0;
    int device = 0;
    std::string name;
  };

  // Returns `fn`, or throws kNotSupported naming the missing symbol.
  template <typename Fn>
  Fn* Need(Fn* fn, const char* symbol, const std::string& purpose = "") const {
    if (fn == nullptr) ThrowMissing(symbol, purpose);
    return fn;
  }
  [[noreturn]] void ThrowMissing(const char* symbol, const std::string& purpose) const;
  void Check(aclError rc, const char* api, const std::string& what, bool peer_call = false) const {
    if (rc != acl::ACL_SUCCESS) Fail(rc, api, what, KindFor(rc, peer_call));
  }
  [[noreturn]] void Fail(aclError rc, const char* api, const std::string& what,
                         ErrorKind kind) const;
  [[noreturn]] void BadHandle(const char* method, const char* what, uint64_t id) const;

  void ValidateDevice(int device, const char* method, const char* argument = "device") const;
  void ValidateSize(uint64_t size, uint64_t granularity, const char* method) const;
  acl::aclrtPhysicalMemProp PropFor(int device) const;

  void Use(int device);  // makes `device` current on this thread (aclrtSetDevice)
  int AnyDevice();       // a device for calls that take none: this thread's, else ours, else 0
  void EnsurePeer(int a, int b);
  void SynchronizeDeviceQueues(int device);

  // Lookups; the caller holds mu_.
  std::shared_ptr<Chunk> ChunkLocked(ChunkId id, const char* method) const;
  Stream StreamLocked(StreamId id, const char* method) const;
  Event EventLocked(EventId id, const char* method) const;
  Range* RangeLocked(DevicePtr address, uint64_t size);
  int DeviceOfLocked(DevicePtr address) const;  // -1 when not inside one of our mappings
  bool PinnedLocked(const void* p, uint64_t bytes) const;
  void DropDeviceLocked(int device);

  std::shared_ptr<Api> api_;
  const int device_count_;
  std::atomic<uint64_t> generation_;

  // Guards the tables. Never held across a call that waits for the device
  // (synchronize, destroy-after-sync): copies and launches from other threads
  // must not stall behind one.
  mutable std::mutex mu_;
  uint64_t next_id_ = 1;  // one counter for every kind: a stream id is never a valid chunk id
  std::map<uint64_t, uint64_t> granularity_;  // device -> bytes
  std::map<ChunkId, std::shared_ptr<Chunk>> chunks_;
  std::map<DevicePtr, Range> ranges_;
  std::map<DevicePtr, Mapping> mappings_;
  std::map<uint64_t, std::shared_ptr<Chunk>> exported_;  // shareable handle -> chunk
  std::map<StreamId, Stream> streams_;
  std::map<EventId, Event> events_;
  std::map<ModuleId, Module> modules_;
  std::map<FunctionId, Function> functions_;
  std::map<uintptr_t, uint64_t> host_allocs_;  // HostAlloc base -> size

  std::mutex device_mu_;  // leaf lock
  std::map<int, uint64_t> set_counts_;  // device -> our aclrtSetDevice calls

  std::mutex peer_mu_;  // lock order: mu_, then peer_mu_, then device_mu_
  std::set<std::pair<int, int>> peers_enabled_;  // (low, high), both directions enabled
};

#define ACL_FN(name) Need(api_->name, #name)
#define ACL_CHECK(name, what, ...) Check(ACL_FN(name)(__VA_ARGS__), #name, what)

// ---- errors

void AclBackend::ThrowMissing(const char* symbol, const std::string& purpose) const {
  std::string since = acl::IntroducedIn(symbol);
  std::string msg = api_->lib.path() + " does not export " + symbol;
  msg += since.empty() ? " (not in this CANN release)"
                       : " (introduced in " + since + "; upgrade CANN)";
  if (!purpose.empty()) msg += "; it is needed to " + purpose;
  ThrowError(ErrorKind::kNotSupported, kBackend, symbol, 0, "ACL_SYMBOL_NOT_FOUND", msg);
}

void AclBackend::Fail(aclError rc, const char* api, const std::string& what, ErrorKind kind) const {
  std::string msg = what + ": " + api + " returned " + acl::CodeName(rc) + " (" +
                    std::to_string(rc) + ")";
  // aclGetRecentErrMsg is per thread and says more than the code (e.g. which
  // limit was hit); it exists in every CANN 8 release but stay optional anyway.
  if (api_->aclGetRecentErrMsg != nullptr) {
    const char* recent = api_->aclGetRecentErrMsg();
    if (recent != nullptr && recent[0] != '\0') msg += "; ACL says: " + std::string(recent);
  }
  if (kind == ErrorKind::kOutOfMemory) msg += "; release chunks or allocate less on this device";
  ThrowError(kind, kBackend, api, rc, acl::CodeName(rc), msg);
}

void AclBackend::BadHandle(const char* method, const char* what, uint64_t id) const {
  ThrowError(ErrorKind::kInvalidHandle, kBackend, method, 0, "INVALID_HANDLE",
             std::string("unknown or released ") + what + " " + std::to_string(id));
}

void AclBackend::ValidateDevice(int device, const char* method, const char* argument) const {
  if (device < 0 || device >= device_count_) {
    ThrowInvalidArgument(kBackend, method, argument,
                         "a device ordinal in [0, " + std::to_string(device_count_) + ") (got " +
                             std::to_string(device) + ")");
  }
}

void AclBackend::ValidateSize(uint64_t size, uint64_t granularity, const char* method) const {
  if (size == 0 || size % granularity != 0) {
    ThrowInvalidArgument(kBackend, method, "size",
                         "a non-zero multiple of the granularity, " + std::to_string(granularity) +
                             " bytes (got " + std::to_string(size) + ")");
  }
}

acl::aclrtPhysicalMemProp AclBackend::PropFor(int device) const {
  // The only combination ACL accepts for VMM today: no shareable handle type at
  // creation (export is a separate call), pinned, 2 MiB huge pages of HBM.
  acl::aclrtPhysicalMemProp prop;
  std::memset(&prop, 0, sizeof prop);
  prop.handleType = acl::ACL_MEM_HANDLE_TYPE_NONE;
  prop.allocationType = acl::ACL_MEM_ALLOCATION_TYPE_PINNED;
  prop.memAttr = acl::ACL_HBM_MEM_HUGE;
  prop.location.id = static_cast<uint32_t>(device);
  prop.location.type = acl::ACL_MEM_LOCATION_TYPE_DEVICE;
  return prop;
}

// ---- per-thread device

void AclBackend::Use(int device) {
  const uint64_t generation = generation_.load();
  if (t_device.generation == generation && t_device.device == device) return;
  Check(ACL_FN(aclrtSetDevice)(device), "aclrtSetDevice", "device " + std::to_string(device));
  {
    std::lock_guard<std::mutex> lock(device_mu_);
    ++set_counts_[device];
  }
  t_device.generation = generation;
  t_device.device = device;
}

int AclBackend::AnyDevice() {
  if (t_device.generation == generation_.load() && t_device.device >= 0) return t_device.device;
  {
    // Prefer a device this backend already holds: setting a new one creates a
    // context there, which costs device memory.
    std::lock_guard<std::mutex> lock(device_mu_);
    for (const auto& [device, count] : set_counts_)
      if (count > 0) return device;
  }
  return 0;
}

void AclBackend::EnsurePeer(int a, int b) {
  if (a == b || a < 0 || b < 0) return;
  const auto key = std::minmax(a, b);
  std::lock_guard<std::mutex> lock(peer_mu_);
  if (peers_enabled_.count(key) != 0) return;
  // aclrtDeviceEnablePeerAccess enables access from the *current* device to the
  // peer, so each direction is enabled with its own device current. Done once per
  // pair: a repeated enable is an error on ACL.
  auto enable = Need(api_->aclrtDeviceEnablePeerAccess, "aclrtDeviceEnablePeerAccess",
                     "copy between devices " + std::to_string(a) + " and " + std::to_string(b));
  Use(a);
  Check(enable(b, 0), "aclrtDeviceEnablePeerAccess",
        "enabling device " + std::to_string(a) + " -> " + std::to_string(b), true);
  Use(b);
  Check(enable(a, 0), "aclrtDeviceEnablePeerAccess",
        "enabling device " + std::to_string(b) + " -> " + std::to_string(a), true);
  peers_enabled_.insert(key);
}

void AclBackend::SynchronizeDeviceQueues(int device) {
  Use(device);
  if (api_->aclrtSynchronizeDevice != nullptr) {
    Check(api_->aclrtSynchronizeDevice(), "aclrtSynchronizeDevice",
          "waiting for device " + std::to_string(device) + " before unmapping");
    return;
  }
  // Without aclrtSynchronizeDevice, wait for the queues we know of on that device.
  std::vector<acl::aclrtStream> queues;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& [id, s] : streams_)
      if (s.device == device) queues.push_back(s.handle);
  }
  for (auto s : queues)
    ACL_CHECK(aclrtSynchronizeStream, "waiting for a stream before unmapping", s);
}

// ---- lookups (mu_ held)

std::shared_ptr<AclBackend::Chunk> AclBackend::ChunkLocked(ChunkId id, const char* method) const {
  auto it = chunks_.find(id);
  if (it == chunks_.end()) BadHandle(method, "chunk", id);
  return it->second;
}

AclBackend::Stream AclBackend::StreamLocked(StreamId id, const char* method) const {
  auto it = streams_.find(id);
  if (it == streams_.end()) BadHandle(method, "stream", id);
  return it->second;
}

AclBackend::Event AclBackend::EventLocked(EventId id, const char* method) const {
  auto it = events_.find(id);
  if (it == events_.end()) BadHandle(method, "event", id);
  return it->second;
}

AclBackend::Range* AclBackend::RangeLocked(DevicePtr address, uint64_t size) {
  auto it = ranges_.upper_bound(address);
  if (it == ranges_.begin()) return nullptr;
  --it;
  if (address + size > it->first + it->second.size) return nullptr;
  return &it->second;
}

int AclBackend::DeviceOfLocked(DevicePtr address) const {
  auto it = mappings_.upper_bound(address);
  if (it == mappings_.begin()) return -1;
  --it;
  if (address >= it->first + it->second.size) return -1;
  return it->second.chunk->device;
}

bool AclBackend::PinnedLocked(const void* p, uint64_t bytes) const {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = host_allocs_.upper_bound(a);
  if (it == host_allocs_.begin()) return false;
  --it;
  return a + bytes <= it->first + it->second;
}

// ---- devices

DeviceInfo AclBackend::GetDeviceInfo(int device) {
  ValidateDevice(device, "GetDeviceInfo");
  Use(device);
  DeviceInfo info;
  info.ordinal = device;
  if (api_->aclrtGetSocName != nullptr) {
    const char* soc = api_->aclrtGetSocName();  // e.g. "Ascend910B1"; one SoC per host
    if (soc != nullptr) info.name = soc;
  }
  if (info.name.empty()) info.name = "Ascend NPU " + std::to_string(device);
  size_t free_bytes = 0, total_bytes = 0;
  ACL_CHECK(aclrtGetMemInfo, "device " + std::to_string(device), acl::ACL_HBM_MEM, &free_bytes,
            &total_bytes);
  if (total_bytes == 0) {
    // Inference cards (Atlas 300/310) have DDR rather than HBM.
    ACL_CHECK(aclrtGetMemInfo, "device " + std::to_string(device), acl::ACL_DDR_MEM, &free_bytes,
              &total_bytes);
  }
  info.total_bytes = total_bytes;
  info.free_bytes = free_bytes;
  return info;  // cc 0.0, multiprocessors 0, no PCI id: no ACL equivalent used here
}

bool AclBackend::CanAccessPeer(int device, int peer) {
  ValidateDevice(device, "CanAccessPeer");
  ValidateDevice(peer, "CanAccessPeer", "peer");
  if (device == peer) return true;  // a device always reaches its own memory
  int32_t can = 0;
  Check(ACL_FN(aclrtDeviceCanAccessPeer)(&can, device, peer), "aclrtDeviceCanAccessPeer",
        "devices " + std::to_string(device) + " and " + std::to_string(peer), true);
  return can != 0;
}

// ---- virtual memory

uint64_t AclBackend::Granularity(int device) {
  ValidateDevice(device, "Granularity");
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = granularity_.find(device);
    if (it != granularity_.end()) return it->second;
  }
  acl::aclrtPhysicalMemProp prop = PropFor(device);
  size_t granularity = 0;
  Use(device);
  ACL_CHECK(aclrtMemGetAllocationGranularity, "device " + std::to_string(device), &prop,
            acl::ACL_RT_MEM_ALLOC_GRANULARITY_MINIMUM, &granularity);
  if (granularity == 0) {
    ThrowError(ErrorKind::kInternal, kBackend, "aclrtMemGetAllocationGranularity", 0, "ACL_SUCCESS",
               "granularity 0 reported for device " + std::to_string(device));
  }
  std::lock_guard<std::mutex> lock(mu_);
  granularity_[device] = granularity;
  return granularity;
}

DevicePtr AclBackend::ReserveRange(uint64_t size, uint64_t alignment) {
  const int device = AnyDevice();  // reservations are not tied to a device; any context will do
  const uint64_t granularity = Granularity(device);
  ValidateSize(size, granularity, "ReserveRange");
  if (alignment != 0 && alignment != granularity) {
    ThrowInvalidArgument(kBackend, "ReserveRange", "alignment",
                         "0 or the granularity (" + std::to_string(granularity) +
                             " bytes) on ACL, which only reserves granularity-aligned ranges");
  }
  Use(device);
  void* base = nullptr;
  // ACL takes alignment 0 (its default is the page granularity) and no hint.
  ACL_CHECK(aclrtReserveMemAddress, "reserving " + std::to_string(size) + " bytes", &base,
            static_cast<size_t>(size), 0, nullptr, 0);
  std::lock_guard<std::mutex> lock(mu_);
  Range range;
  range.size = size;
  ranges_[Addr(base)] = range;
  return Addr(base);
}

void AclBackend::FreeRange(DevicePtr base, uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ranges_.find(base);
  if (it == ranges_.end())
    ThrowInvalidArgument(kBackend, "FreeRange", "base", "the base of a range from ReserveRange");
  if (it->second.size != size) {
    ThrowInvalidArgument(kBackend, "FreeRange", "size",
                         "the reserved size " + std::to_string(it->second.size));
  }
  if (it->second.mapped > 0) {
    ThrowInvalidArgument(kBackend, "FreeRange", "base",
                         "a fully unmapped range (" + std::to_string(it->second.mapped) +
                             " mapping(s) still inside it)");
  }
  Use(AnyDevice());
  ACL_CHECK(aclrtReleaseMemAddress, "range " + Hex(base), Ptr(base));
  ranges_.erase(it);
}

ChunkId AclBackend::CreateChunk(int device, uint64_t size, bool exportable) {
  // `exportable` needs nothing on ACL: any physical handle can be exported later.
  ValidateDevice(device, "CreateChunk");
  ValidateSize(size, Granularity(device), "CreateChunk");
  const acl::aclrtPhysicalMemProp prop = PropFor(device);
  Use(device);
  acl::aclrtDrvMemHandle handle = nullptr;
  ACL_CHECK(aclrtMallocPhysical,
            std::to_string(size) + " bytes on device " + std::to_string(device), &handle,
            static_cast<size_t>(size), &prop, 0);
  auto chunk = std::make_shared<Chunk>();
  chunk->handle = handle;
  chunk->size = size;
  chunk->device = device;
  std::lock_guard<std::mutex> lock(mu_);
  const ChunkId id = next_id_++;
  chunks_[id] = chunk;
  return id;
}

void AclBackend::ReleaseChunk(ChunkId id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto chunk = ChunkLocked(id, "ReleaseChunk");
  if (chunk->map_count == 0) {
    Use(chunk->device);
    ACL_CHECK(aclrtFreePhysical, "chunk " + std::to_string(id), chunk->handle);
  } else {
    // CUDA semantics: the handle goes now, the memory at the last unmap. ACL
    // itself wants handles unmapped before aclrtFreePhysical, so we defer it.
    chunk->released = true;
  }
  chunks_.erase(id);
  if (chunk->exported) exported_.erase(chunk->shareable);
}

uint64_t AclBackend::ChunkSize(ChunkId id) {
  std::lock_guard<std::mutex> lock(mu_);
  return ChunkLocked(id, "ChunkSize")->size;
}

int AclBackend::ChunkDevice(ChunkId id) {
  std::lock_guard<std::mutex> lock(mu_);
  return ChunkLocked(id, "ChunkDevice")->device;
}

void AclBackend::Map(DevicePtr address, uint64_t size, ChunkId id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto chunk = ChunkLocked(id, "Map");
  if (size != chunk->size) {
    // aclrtMapMem takes a size and offset, but only whole handles at offset 0
    // are supported; enforce the CUDA rule here rather than trust ACL to.
    ThrowError(ErrorKind::kNotSupported, kBackend, "Map", 0, "NOT_SUPPORTED",
               "only whole chunks map: size " + std::to_string(size) + " != chunk size " +
                   std::to_string(chunk->size));
  }
  Range* range = RangeLocked(address, size);
  if (range == nullptr) {
    ThrowInvalidArgument(kBackend, "Map", "address",
                         "inside one range from ReserveRange for all " + std::to_string(size) +
                             " bytes (got " + Hex(address) + ")");
  }
  auto next = mappings_.lower_bound(address);
  bool overlaps = next != mappings_.end() && next->first < address + size;
  if (next != mappings_.begin()) {
    auto prev = std::prev(next);
    overlaps = overlaps || prev->first + prev->second.size > address;
  }
  if (overlaps) {
    ThrowInvalidArgument(kBackend, "Map", "address",
                         "an unmapped part of the range (" + Hex(address) + " overlaps a mapping)");
  }
  if (range->mapped > 0 && range->device != chunk->device) {
    ThrowError(ErrorKind::kNotSupported, kBackend, "Map", 0, "NOT_SUPPORTED",
               "one ACL reservation may not mix devices: it holds device " +
                   std::to_string(range->device) + " chunks, this chunk is on device " +
                   std::to_string(chunk->device));
  }
  if (range->mapped > 0 && range->imported != chunk->imported) {
    ThrowError(ErrorKind::kNotSupported, kBackend, "Map", 0, "NOT_SUPPORTED",
               "one ACL reservation may not mix local and imported chunks");
  }
  Use(chunk->device);
  ACL_CHECK(aclrtMapMem, "chunk " + std::to_string(id) + " at " + Hex(address), Ptr(address),
            static_cast<size_t>(size), 0, chunk->handle, 0);
  // ACL's map already grants the chunk's own device access (there is no "mapped
  // but inaccessible" state as on CUDA); record that so SetAccess can diff.
  Mapping mapping;
  mapping.size = size;
  mapping.chunk = chunk;
  mapping.access = {chunk->device};
  mappings_[address] = std::move(mapping);
  ++chunk->map_count;
  ++range->mapped;
  range->device = chunk->device;
  range->imported = chunk->imported;
}

void AclBackend::Unmap(DevicePtr address, uint64_t size) {
  int device = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = mappings_.find(address);
    if (it == mappings_.end()) {
      ThrowInvalidArgument(kBackend, "Unmap", "address",
                           "the address of one Map call (" + Hex(address) +
                               " is not; partial unmaps are not supported)");
    }
    if (it->second.size != size) {
      ThrowInvalidArgument(kBackend, "Unmap", "size",
                           "the mapped size " + std::to_string(it->second.size) +
                               " (an unmap covers exactly one Map call)");
    }
    device = it->second.chunk->device;
  }
  // aclrtUnmapMem does not wait for queued copies or kernels that still touch
  // the range (torch_npu synchronizes first for the same reason); unmapping under
  // them faults the device. Done without the lock so other threads keep going.
  SynchronizeDeviceQueues(device);

  std::lock_guard<std::mutex> lock(mu_);
  auto it = mappings_.find(address);
  if (it == mappings_.end() || it->second.size != size) {  // unmapped meanwhile
    ThrowInvalidArgument(kBackend, "Unmap", "address", "a live mapping (" + Hex(address) + ")");
  }
  Use(device);
  ACL_CHECK(aclrtUnmapMem, "mapping at " + Hex(address), Ptr(address));
  auto chunk = it->second.chunk;
  mappings_.erase(it);
  if (Range* range = RangeLocked(address, size)) --range->mapped;
  if (--chunk->map_count == 0 && chunk->released) {
    ACL_CHECK(aclrtFreePhysical, "released chunk mapped at " + Hex(address), chunk->handle);
  }
}

void AclBackend::SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) {
  for (int d : devices) ValidateDevice(d, "SetAccess", "devices");
  if (size == 0) ThrowInvalidArgument(kBackend, "SetAccess", "size", "non-zero");
  const std::set<int> wanted(devices.begin(), devices.end());

  std::lock_guard<std::mutex> lock(mu_);
  // Split [address, address+size) into the mappings that cover it.
  struct Piece {
    DevicePtr start;
    uint64_t length;
    Mapping* mapping;
  };
  std::vector<Piece> pieces;
  for (DevicePtr cursor = address; cursor < address + size;) {
    auto it = mappings_.upper_bound(cursor);
    if (it == mappings_.begin() || cursor >= std::prev(it)->first + std::prev(it)->second.size) {
      ThrowInvalidArgument(kBackend, "SetAccess", "address",
                           "a fully mapped range (nothing is mapped at " + Hex(cursor) + ")");
    }
    --it;
    const DevicePtr end = std::min(address + size, it->first + it->second.size);
    pieces.push_back({cursor, end - cursor, &it->second});
    cursor = end;
  }

  if (api_->aclrtMemSetAccess == nullptr) {
    // Older CANN: aclrtMapMem already granted the owning device, which is all we
    // can express. Anything else (peers, or revoking) needs aclrtMemSetAccess.
    for (const Piece& p : pieces) {
      if (wanted != std::set<int>{p.mapping->chunk->device}) {
        ThrowMissing("aclrtMemSetAccess", "grant access to devices other than the chunk's own (" +
                                              std::to_string(p.mapping->chunk->device) + ")");
      }
    }
    return;
  }

  for (const Piece& p : pieces) {
    const int owner = p.mapping->chunk->device;
    for (int d : wanted) EnsurePeer(owner, d);
    // Grant every listed device, and revoke the ones granted before that are no
    // longer listed: the new list replaces the old one.
    std::vector<acl::aclrtMemAccessDesc> descs;
    auto add = [&descs](int device, int32_t flags) {
      acl::aclrtMemAccessDesc desc;
      std::memset(&desc, 0, sizeof desc);
      desc.flags = flags;
      desc.location.id = static_cast<uint32_t>(device);
      desc.location.type = acl::ACL_MEM_LOCATION_TYPE_DEVICE;
      descs.push_back(desc);
    };
    for (int d : wanted) add(d, acl::ACL_RT_MEM_ACCESS_FLAGS_READWRITE);
    for (int d : p.mapping->access)
      if (wanted.count(d) == 0) add(d, acl::ACL_RT_MEM_ACCESS_FLAGS_NONE);
    if (descs.empty()) continue;
    Use(owner);
    ACL_CHECK(aclrtMemSetAccess, std::to_string(p.length) + " bytes at " + Hex(p.start),
              Ptr(p.start), static_cast<size_t>(p.length), descs.data(), descs.size());
    p.mapping->access = wanted;
  }
}

// ---- sharing across processes

uint64_t AclBackend::ExportChunk(ChunkId id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto chunk = ChunkLocked(id, "ExportChunk");
  // ACL refuses to export one handle twice, and the integer stays valid for the
  // chunk's lifetime, so a second export hands back the same one.
  if (chunk->exported) return chunk->shareable;
  Use(chunk->device);
  uint64_t shareable = 0;
  // Flags 0 keeps pid validation on: importers must be whitelisted by AllowImport.
  ACL_CHECK(aclrtMemExportToShareableHandle, "chunk " + std::to_string(id), chunk->handle,
            acl::ACL_MEM_HANDLE_TYPE_NONE, 0, &shareable);
  chunk->exported = true;
  chunk->shareable = shareable;
  exported_[shareable] = chunk;
  return shareable;
}

void AclBackend::AllowImport(uint64_t shareable, const std::vector<int32_t>& pids) {
  if (pids.empty()) return;
  int device = -1;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = exported_.find(shareable);
    if (it != exported_.end()) device = it->second->device;
  }
  Use(device >= 0 ? device : AnyDevice());
  std::vector<int32_t> list(pids);  // the ACL prototype takes a non-const array
  ACL_CHECK(aclrtMemSetPidToShareableHandle, "shareable handle " + Hex(shareable), shareable,
            list.data(), list.size());
}

int32_t AclBackend::ImportPid() {
  if (api_->aclrtDeviceGetBareTgid == nullptr) {
    // Older CANN: the OS pid is the best available answer (it matches the bare
    // tgid outside containers and VMs).
    return static_cast<int32_t>(getpid());
  }
  Use(AnyDevice());
  int32_t pid = 0;
  ACL_CHECK(aclrtDeviceGetBareTgid, "this process", &pid);
  return pid;
}

ChunkId AclBackend::ImportChunk(uint64_t shareable, int device, uint64_t size) {
  ValidateDevice(device, "ImportChunk");
  // ACL cannot tell us the imported size, so it is only checked for shape here.
  ValidateSize(size, Granularity(device), "ImportChunk");
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (exported_.count(shareable) != 0) {
      ThrowError(ErrorKind::kNotSupported, kBackend, "ImportChunk", 0, "NOT_SUPPORTED",
                 "ACL cannot import a handle in the process that exported it; map the original "
                 "chunk instead");
    }
  }
  Use(device);
  acl::aclrtDrvMemHandle handle = nullptr;
  ACL_CHECK(aclrtMemImportFromShareableHandle,
            "shareable handle " + Hex(shareable) + " on device " + std::to_string(device),
            shareable, device, &handle);
  auto chunk = std::make_shared<Chunk>();
  chunk->handle = handle;
  chunk->size = size;
  chunk->device = device;
  chunk->imported = true;
  std::lock_guard<std::mutex> lock(mu_);
  const ChunkId id = next_id_++;
  chunks_[id] = chunk;
  return id;
}

// ---- pinned host memory

void* AclBackend::HostAlloc(uint64_t size) {
  if (size == 0) ThrowInvalidArgument(kBackend, "HostAlloc", "size", "non-zero");
  Use(AnyDevice());
  void* p = nullptr;
  ACL_CHECK(aclrtMallocHost, std::to_string(size) + " bytes of pinned host memory", &p,
            static_cast<size_t>(size));
  std::lock_guard<std::mutex> lock(mu_);
  host_allocs_[reinterpret_cast<uintptr_t>(p)] = size;
  return p;
}

void AclBackend::HostFree(void* ptr) {
  if (ptr == nullptr) return;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = host_allocs_.find(reinterpret_cast<uintptr_t>(ptr));
  if (it == host_allocs_.end()) BadHandle("HostFree", "host allocation", Addr(ptr));
  Use(AnyDevice());
  ACL_CHECK(aclrtFreeHost, "host allocation " + Hex(Addr(ptr)), ptr);
  host_allocs_.erase(it);
}

// ---- streams and events

StreamId AclBackend::CreateStream(int device) {
  ValidateDevice(device, "CreateStream");
  Use(device);
  acl::aclrtStream s = nullptr;
  ACL_CHECK(aclrtCreateStream, "device " + std::to_string(device), &s);
  std::lock_guard<std::mutex> lock(mu_);
  const StreamId id = next_id_++;
  streams_[id] = Stream{s, device};
  return id;
}

void AclBackend::DestroyStream(StreamId id) {
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(id, "DestroyStream");
    streams_.erase(id);
  }
  Use(s.device);
  // The contract waits for queued work first. The stream is destroyed even if
  // that wait reports an (asynchronous, sticky) error, which is then reported.
  const aclError sync = api_->aclrtSynchronizeStream != nullptr
                            ? api_->aclrtSynchronizeStream(s.handle)
                            : acl::ACL_SUCCESS;
  ACL_CHECK(aclrtDestroyStream, "stream " + std::to_string(id), s.handle);
  Check(sync, "aclrtSynchronizeStream", "stream " + std::to_string(id));
}

void AclBackend::SynchronizeStream(StreamId id) {
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(id, "SynchronizeStream");
  }
  Use(s.device);
  ACL_CHECK(aclrtSynchronizeStream, "stream " + std::to_string(id), s.handle);
}

EventId AclBackend::CreateEvent(int device, bool timing) {
  ValidateDevice(device, "CreateEvent");
  Use(device);
  acl::aclrtEvent e = nullptr;
  const uint32_t flags =
      timing ? (acl::ACL_EVENT_TIME_LINE | acl::ACL_EVENT_SYNC) : acl::ACL_EVENT_SYNC;
  ACL_CHECK(aclrtCreateEventWithFlag, "device " + std::to_string(device), &e, flags);
  std::lock_guard<std::mutex> lock(mu_);
  const EventId id = next_id_++;
  events_[id] = Event{e, device, timing};
  return id;
}

void AclBackend::DestroyEvent(EventId id) {
  Event e;
  {
    std::lock_guard<std::mutex> lock(mu_);
    e = EventLocked(id, "DestroyEvent");
    events_.erase(id);
  }
  Use(e.device);
  ACL_CHECK(aclrtDestroyEvent, "event " + std::to_string(id), e.handle);
}

void AclBackend::RecordEvent(EventId event, StreamId stream) {
  Event e;
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    e = EventLocked(event, "RecordEvent");
    s = StreamLocked(stream, "RecordEvent");
  }
  Use(s.device);
  ACL_CHECK(aclrtRecordEvent, "event " + std::to_string(event), e.handle, s.handle);
}

void AclBackend::StreamWaitEvent(StreamId stream, EventId event) {
  Event e;
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(stream, "StreamWaitEvent");
    e = EventLocked(event, "StreamWaitEvent");
  }
  Use(s.device);
  ACL_CHECK(aclrtStreamWaitEvent, "stream " + std::to_string(stream), s.handle, e.handle);
}

void AclBackend::SynchronizeEvent(EventId event) {
  Event e;
  {
    std::lock_guard<std::mutex> lock(mu_);
    e = EventLocked(event, "SynchronizeEvent");
  }
  Use(e.device);
  ACL_CHECK(aclrtSynchronizeEvent, "event " + std::to_string(event), e.handle);
}

float AclBackend::ElapsedMs(EventId start, EventId end) {
  Event a, b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    a = EventLocked(start, "ElapsedMs");
    b = EventLocked(end, "ElapsedMs");
  }
  if (!a.timing)
    ThrowInvalidArgument(kBackend, "ElapsedMs", "start", "an event created with timing");
  if (!b.timing)
    ThrowInvalidArgument(kBackend, "ElapsedMs", "end", "an event created with timing");
  Use(a.device);
  float ms = 0;
  ACL_CHECK(aclrtEventElapsedTime, "events " + std::to_string(start) + ".." + std::to_string(end),
            &ms, a.handle, b.handle);
  return ms;
}

// ---- copies and fills

void AclBackend::CopyDeviceToDevice(DevicePtr dst, DevicePtr src, uint64_t bytes, StreamId stream) {
  Stream s;
  int src_device, dst_device;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(stream, "CopyDeviceToDevice");
    src_device = DeviceOfLocked(src);
    dst_device = DeviceOfLocked(dst);
  }
  if (bytes == 0) return;
  if (dst == 0) ThrowInvalidArgument(kBackend, "CopyDeviceToDevice", "dst", "a device address");
  if (src == 0) ThrowInvalidArgument(kBackend, "CopyDeviceToDevice", "src", "a device address");
  // Cross-device copies need peer access from the stream's device to the other
  // side, enabled lazily once per pair. Addresses outside our own mappings (whose
  // device we cannot tell) rely on SetAccess having enabled it.
  EnsurePeer(s.device, src_device);
  EnsurePeer(s.device, dst_device);
  Use(s.device);
  ACL_CHECK(aclrtMemcpyAsync, std::to_string(bytes) + " bytes " + Hex(src) + " -> " + Hex(dst),
            Ptr(dst), static_cast<size_t>(bytes), Ptr(src), static_cast<size_t>(bytes),
            acl::ACL_MEMCPY_DEVICE_TO_DEVICE, s.handle);
}

void AclBackend::CopyHostToDevice(DevicePtr dst, const void* src, uint64_t bytes, StreamId stream) {
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(stream, "CopyHostToDevice");
    if (bytes == 0) return;
    // ACL's asynchronous copies are defined only for aclrtMallocHost memory;
    // refusing anything else beats undefined behaviour on the device.
    if (src == nullptr || !PinnedLocked(src, bytes)) {
      ThrowInvalidArgument(kBackend, "CopyHostToDevice", "src",
                           "pinned host memory from HostAlloc covering all " +
                               std::to_string(bytes) + " bytes");
    }
  }
  if (dst == 0) ThrowInvalidArgument(kBackend, "CopyHostToDevice", "dst", "a device address");
  Use(s.device);
  ACL_CHECK(aclrtMemcpyAsync, std::to_string(bytes) + " bytes host -> " + Hex(dst), Ptr(dst),
            static_cast<size_t>(bytes), src, static_cast<size_t>(bytes),
            acl::ACL_MEMCPY_HOST_TO_DEVICE, s.handle);
}

void AclBackend::CopyDeviceToHost(void* dst, DevicePtr src, uint64_t bytes, StreamId stream) {
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(stream, "CopyDeviceToHost");
    if (bytes == 0) return;
    if (dst == nullptr || !PinnedLocked(dst, bytes)) {
      ThrowInvalidArgument(kBackend, "CopyDeviceToHost", "dst",
                           "pinned host memory from HostAlloc covering all " +
                               std::to_string(bytes) + " bytes");
    }
  }
  if (src == 0) ThrowInvalidArgument(kBackend, "CopyDeviceToHost", "src", "a device address");
  Use(s.device);
  ACL_CHECK(aclrtMemcpyAsync, std::to_string(bytes) + " bytes " + Hex(src) + " -> host", dst,
            static_cast<size_t>(bytes), Ptr(src), static_cast<size_t>(bytes),
            acl::ACL_MEMCPY_DEVICE_TO_HOST, s.handle);
}

void AclBackend::MemsetD8(DevicePtr dst, uint8_t value, uint64_t bytes, StreamId stream) {
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    s = StreamLocked(stream, "MemsetD8");
  }
  if (bytes == 0) return;
  if (dst == 0) ThrowInvalidArgument(kBackend, "MemsetD8", "dst", "a device address");
  Use(s.device);
  ACL_CHECK(aclrtMemsetAsync, std::to_string(bytes) + " bytes at " + Hex(dst), Ptr(dst),
            static_cast<size_t>(bytes), static_cast<int32_t>(value), static_cast<size_t>(bytes),
            s.handle);
}

// ---- kernels

ModuleId AclBackend::LoadModule(int device, const ModuleSource& source, std::string* log) {
  ValidateDevice(device, "LoadModule");
  if (log != nullptr) log->clear();  // nothing is compiled here, so there is no log
  if (source.format != ModuleFormat::kAscendBinary) {
    ThrowError(ErrorKind::kNotSupported, kBackend, "LoadModule", 0, "NOT_SUPPORTED",
               "the ACL backend loads Ascend C binaries (ModuleFormat::kAscendBinary); CUDA "
               "source/PTX cannot run on Ascend");
  }
  auto load = Need(api_->aclrtBinaryLoadFromFile, "aclrtBinaryLoadFromFile", "load kernels");
  const std::string& path = source.data;
  if (path.empty()) {
    ThrowInvalidArgument(kBackend, "LoadModule", "source.data",
                         "the path of an Ascend C kernel binary (.o)");
  }
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    const int err = errno;
    ThrowError(ErrorKind::kNotFound, kBackend, "LoadModule", err, "ERRNO_" + std::to_string(err),
               "kernel binary " + path + ": " + std::strerror(err));
  }
  Use(device);
  acl::aclrtBinHandle bin = nullptr;
  Check(load(path.c_str(), nullptr, &bin), "aclrtBinaryLoadFromFile",
        path + " on device " + std::to_string(device) +
            " (binaries are built for one SoC; check it matches this device)");
  std::lock_guard<std::mutex> lock(mu_);
  const ModuleId id = next_id_++;
  modules_[id] = Module{bin, device, path};
  return id;
}

void AclBackend::UnloadModule(ModuleId id) {
  Module m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = modules_.find(id);
    if (it == modules_.end()) BadHandle("UnloadModule", "module", id);
    m = it->second;
    modules_.erase(it);
    for (auto f = functions_.begin(); f != functions_.end();)
      f = f->second.module == id ? functions_.erase(f) : std::next(f);
  }
  Use(m.device);
  ACL_CHECK(aclrtBinaryUnLoad, m.path, m.handle);
}

FunctionId AclBackend::GetFunction(ModuleId id, const std::string& name) {
  Module m;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = modules_.find(id);
    if (it == modules_.end()) BadHandle("GetFunction", "module", id);
    m = it->second;
  }
  Use(m.device);
  acl::aclrtFuncHandle f = nullptr;
  const aclError rc = ACL_FN(aclrtBinaryGetFunction)(m.handle, name.c_str(), &f);
  if (rc != acl::ACL_SUCCESS) {
    // A bad name comes back as a parameter error; report it as what it is.
    ErrorKind kind = KindFor(rc, false);
    if (kind == ErrorKind::kInvalidArgument || kind == ErrorKind::kInternal)
      kind = ErrorKind::kNotFound;
    Fail(rc, "aclrtBinaryGetFunction", "kernel '" + name + "' in " + m.path, kind);
  }
  std::lock_guard<std::mutex> lock(mu_);
  const FunctionId fid = next_id_++;
  functions_[fid] = Function{f, id, m.device, name};
  return fid;
}

void AclBackend::Launch(FunctionId function, const LaunchConfig& config, StreamId stream,
                        const std::vector<KernelArg>& args) {
  Function fn;
  Stream s;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = functions_.find(function);
    if (it == functions_.end()) BadHandle("Launch", "function", function);
    fn = it->second;
    s = StreamLocked(stream, "Launch");
  }
  if (s.device != fn.device) {
    ThrowInvalidArgument(kBackend, "Launch", "stream",
                         "a stream on device " + std::to_string(fn.device) +
                             ", where the kernel's module was loaded");
  }
  const uint64_t blocks =
      uint64_t{config.grid[0]} * uint64_t{config.grid[1]} * uint64_t{config.grid[2]};
  if (blocks == 0 || blocks > std::numeric_limits<uint32_t>::max()) {
    ThrowInvalidArgument(kBackend, "Launch", "config.grid",
                         "a non-zero block count below 2^32 (grid product)");
  }
  if (config.block[0] != 1 || config.block[1] != 1 || config.block[2] != 1) {
    ThrowInvalidArgument(kBackend, "Launch", "config.block",
                         "{1, 1, 1}: Ascend C kernels have no thread blocks; the grid product "
                         "is the number of AI Core blocks");
  }
  if (config.shared_bytes != 0) {
    ThrowError(ErrorKind::kNotSupported, kBackend, "Launch", 0, "NOT_SUPPORTED",
               "shared_bytes has no ACL equivalent in this backend");
  }
  // Resolve all four before touching the args handle, so a missing symbol fails
  // cleanly rather than halfway through building the argument list.
  auto init = ACL_FN(aclrtKernelArgsInit);
  auto append = ACL_FN(aclrtKernelArgsAppend);
  auto finalize = ACL_FN(aclrtKernelArgsFinalize);
  auto launch = ACL_FN(aclrtLaunchKernelWithConfig);

  Use(s.device);
  acl::aclrtArgsHandle handle = nullptr;
  Check(init(fn.handle, &handle), "aclrtKernelArgsInit", "kernel '" + fn.name + "'");
  std::vector<KernelArg> values(args);  // Append takes a non-const pointer; it copies the bytes
  for (size_t i = 0; i < values.size(); ++i) {
    size_t width = 8;
    switch (values[i].type) {
      case ArgType::kI32:
      case ArgType::kU32:
      case ArgType::kF32:
        width = 4;
        break;
      case ArgType::kPtr:
      case ArgType::kI64:
      case ArgType::kU64:
      case ArgType::kF64:
        width = 8;
        break;
    }
    // Every union member starts at offset 0, so this addresses the 4- or 8-byte
    // value whatever its type.
    acl::aclrtParamHandle param = nullptr;
    Check(append(handle, &values[i].u64, width, &param), "aclrtKernelArgsAppend",
          "argument " + std::to_string(i) + " of kernel '" + fn.name + "'");
  }
  Check(finalize(handle), "aclrtKernelArgsFinalize", "kernel '" + fn.name + "'");
  Check(launch(fn.handle, static_cast<uint32_t>(blocks), s.handle, nullptr, handle, nullptr),
        "aclrtLaunchKernelWithConfig",
        "kernel '" + fn.name + "' with " + std::to_string(blocks) + " blocks");
}

// ---- health

void AclBackend::DropDeviceLocked(int device) {
  auto erase_if = [](auto& table, auto pred) {
    for (auto it = table.begin(); it != table.end();)
      it = pred(it->second) ? table.erase(it) : std::next(it);
  };
  erase_if(streams_, [device](const Stream& s) { return s.device == device; });
  erase_if(events_, [device](const Event& e) { return e.device == device; });
  erase_if(modules_, [device](const Module& m) { return m.device == device; });
  erase_if(functions_, [device](const Function& f) { return f.device == device; });
  for (auto it = mappings_.begin(); it != mappings_.end();) {
    if (it->second.chunk->device != device) {
      ++it;
      continue;
    }
    if (Range* range = RangeLocked(it->first, it->second.size)) --range->mapped;
    it = mappings_.erase(it);
  }
  erase_if(chunks_, [device](const std::shared_ptr<Chunk>& c) { return c->device == device; });
  erase_if(exported_, [device](const std::shared_ptr<Chunk>& c) { return c->device == device; });
}

void AclBackend::ResetDevice(int device) {
  ValidateDevice(device, "ResetDevice");
  // Hold at least one reference, then drop all of ours: aclrtResetDevice is
  // reference counted, and only our own references are ours to drop.
  Use(device);
  uint64_t count = 0;
  {
    std::lock_guard<std::mutex> lock(device_mu_);
    count = set_counts_[device];
    set_counts_[device] = 0;
  }
  for (uint64_t i = 0; i < count; ++i) {
    const aclError rc = ACL_FN(aclrtResetDevice)(device);
    // Only the first can fail meaningfully; later ones may find it already gone.
    if (i == 0) Check(rc, "aclrtResetDevice", "device " + std::to_string(device));
  }
  // Every thread must make the device current again, and every resource that
  // lived on it is gone: their handles now report kInvalidHandle.
  generation_ = g_next_generation++;
  {
    std::lock_guard<std::mutex> lock(mu_);
    DropDeviceLocked(device);
  }
  {
    std::lock_guard<std::mutex> lock(peer_mu_);
    for (auto it = peers_enabled_.begin(); it != peers_enabled_.end();)
      it = (it->first == device || it->second == device) ? peers_enabled_.erase(it) : std::next(it);
  }
  Use(device);
}

// ---- teardown

AclBackend::~AclBackend() {
  // Best effort and never throwing: give back what is still held, then balance
  // our aclrtSetDevice calls, then finalize ACL if we were the ones to init it.
  auto quietly = [](auto&& step) {
    try {
      step();
    } catch (...) {
    }
  };
  std::set<std::shared_ptr<Chunk>> chunks;
  for (auto& [id, c] : chunks_) chunks.insert(c);
  std::set<int> mapped_devices;
  for (auto& [addr, m] : mappings_) mapped_devices.insert(m.chunk->device);
  for (int d : mapped_devices) quietly([&] { SynchronizeDeviceQueues(d); });
  for (auto& [addr, m] : mappings_) {
    chunks.insert(m.chunk);
    quietly([&, addr = addr, device = m.chunk->device] {
      Use(device);
      if (api_->aclrtUnmapMem != nullptr) api_->aclrtUnmapMem(Ptr(addr));
    });
  }
  for (auto& c : chunks) {
    quietly([&] {
      Use(c->device);
      if (api_->aclrtFreePhysical != nullptr) api_->aclrtFreePhysical(c->handle);
    });
  }
  for (auto& [base, r] : ranges_) {
    quietly([&, base = base] {
      Use(AnyDevice());
      if (api_->aclrtReleaseMemAddress != nullptr) api_->aclrtReleaseMemAddress(Ptr(base));
    });
  }
  for (auto& [id, e] : events_) {
    quietly([&, e = e] {
      Use(e.device);
      if (api_->aclrtDestroyEvent != nullptr) api_->aclrtDestroyEvent(e.handle);
    });
  }
  for (auto& [id, s] : streams_) {
    quietly([&, s = s] {
      Use(s.device);
      if (api_->aclrtSynchronizeStream != nullptr) api_->aclrtSynchronizeStream(s.handle);
      if (api_->aclrtDestroyStream != nullptr) api_->aclrtDestroyStream(s.handle);
    });
  }
  for (auto& [id, m] : modules_) {
    quietly([&, m = m] {
      Use(m.device);
      if (api_->aclrtBinaryUnLoad != nullptr) api_->aclrtBinaryUnLoad(m.handle);
    });
  }
  for (auto& [p, size] : host_allocs_) {
    quietly([&, p = p] {
      Use(AnyDevice());
      if (api_->aclrtFreeHost != nullptr) api_->aclrtFreeHost(reinterpret_cast<void*>(p));
    });
  }
  if (api_->aclrtResetDevice != nullptr) {
    for (auto& [device, count] : set_counts_)
      for (uint64_t i = 0; i < count; ++i) api_->aclrtResetDevice(device);
  }
  std::lock_guard<std::mutex> lock(api_->init_mu);
  if (--api_->users == 0 && api_->initialised_by_us && api_->aclFinalize != nullptr) {
    api_->aclFinalize();
    api_->initialised_by_us = false;
  }
}

// ---- load, init, probe

// Loads the library, initialises ACL (once per process) and counts devices. On
// success, and when `add_user` is set, registers a backend on the library under
// the same lock, so a backend being destroyed cannot finalize in between.
std::shared_ptr<Api> Initialise(const BackendOptions& options, bool add_user, ProbeResult* r) {
  std::string error;
  auto api = acl::LoadApi(acl::LibraryCandidates(options.acl_library), &error);
  if (api == nullptr) {
    r->reason = error;
    return nullptr;
  }
  r->library = api->lib.path();
  auto recent = [&api]() -> std::string {
    const char* m = api->aclGetRecentErrMsg != nullptr ? api->aclGetRecentErrMsg() : nullptr;
    return m != nullptr && m[0] != '\0' ? std::string("; ACL says: ") + m : std::string();
  };
  // The three calls without which nothing else can work; everything else is
  // optional and reported when first needed.
  const std::pair<const char*, bool> required[] = {
      {"aclInit", api->aclInit != nullptr},
      {"aclrtGetDeviceCount", api->aclrtGetDeviceCount != nullptr},
      {"aclrtSetDevice", api->aclrtSetDevice != nullptr}};
  for (const auto& [symbol, present] : required) {
    if (!present) {
      r->reason = api->lib.path() + " loaded but does not export " + symbol +
                  "; it is not a usable CANN ACL runtime";
      return nullptr;
    }
  }
  if (api->aclrtGetVersion != nullptr) {
    int32_t major = 0, minor = 0, patch = 0;
    if (api->aclrtGetVersion(&major, &minor, &patch) == acl::ACL_SUCCESS) {
      r->version = "ACL " + std::to_string(major) + "." + std::to_string(minor) + "." +
                   std::to_string(patch);
    }
  }

  std::lock_guard<std::mutex> lock(api->init_mu);
  if (!api->initialised_by_us) {
    const aclError rc = api->aclInit(nullptr);
    if (rc == acl::ACL_SUCCESS) {
      api->initialised_by_us = true;
    } else if (rc != acl::ACL_ERROR_REPEAT_INITIALIZE) {  // already initialised by the host: fine
      r->reason = "aclInit failed with " + acl::CodeName(rc) + " (" + std::to_string(rc) + ")" +
                  recent() + "; check the CANN installation and driver (npu-smi info)";
      return nullptr;
    }
  }
  uint32_t count = 0;
  const aclError rc = api->aclrtGetDeviceCount(&count);
  if (rc != acl::ACL_SUCCESS) {
    r->reason = "aclrtGetDeviceCount failed with " + acl::CodeName(rc) + " (" +
                std::to_string(rc) + ")" + recent() + "; check the driver (npu-smi info)";
    return nullptr;
  }
  if (count == 0) {
    r->reason = "no Ascend device visible (aclrtGetDeviceCount returned 0); check "
                "ASCEND_RT_VISIBLE_DEVICES and the driver (npu-smi info)";
    return nullptr;
  }
  r->available = true;
  r->device_count = static_cast<int>(count);
  if (add_user) ++api->users;
  // A probe leaves ACL initialised on purpose: older CANN allows aclInit only
  // once per process, so finalizing here would break the CreateBackend that
  // usually follows. The last backend to go finalizes (initialised_by_us).
  return api;
}

}  // namespace

ProbeResult ProbeAcl(const BackendOptions& options) {
  ProbeResult r;
  try {
    Initialise(options, false, &r);
  } catch (const std::exception& e) {
    r = ProbeResult();
    r.reason = e.what();
  } catch (...) {
    r = ProbeResult();
    r.reason = "unknown error while probing ACL";
  }
  return r;
}

std::shared_ptr<Backend> CreateAclBackend(const BackendOptions& options) {
  ProbeResult r;
  auto api = Initialise(options, true, &r);
  if (api == nullptr) {
    ThrowError(ErrorKind::kBackendUnavailable, kBackend, "CreateBackend", 0, "BACKEND_UNAVAILABLE",
               r.reason);
  }
  return std::make_shared<AclBackend>(std::move(api), r.device_count);
}

}  // namespace emoe

// The cuda backend: Backend over the CUDA driver API, resolved at run time
// (cuda_driver.h). Chunks are VMM allocations (cuMemCreate), ranges are VA
// reservations, and every call first makes the primary context of the device
// it touches current, because the current context is per thread and methods
// run on the JS main thread and on libuv workers alike.
//
// Locking: mu_ guards the handle tables, the contexts and the set of capture
// origins; vmm_mu_ guards the reservation and mapping tables and is held across
// the VMM driver call it validates for (validate, call, record must not
// interleave). Order: vmm_mu_ before mu_. No lock is held across copies,
// launches, captures or synchronizations.
//
// Stream capture is the driver's: the backend only remembers which streams
// began a capture (to name the mistakes it can see before the driver does) and
// owns the executable graphs. Captures use CU_STREAM_CAPTURE_MODE_RELAXED, see
// BeginCapture.
#include "backends/cuda/cuda_backend.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cinttypes>
#include <climits>
#include <cstdio>
#include <map>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <unordered_map>
#include <unordered_set>
#include <utility>

#include "backends/cuda/cuda_driver.h"
#include "backends/cuda/nvrtc.h"

namespace emoe {
namespace cuda {
namespace {

constexpr const char* kName = "cuda";
// Pinned host memory is allocated in this device's context (portable, so every
// context may use it); resetting that device frees it.
constexpr int kHostDevice = 0;

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%" PRIx64, v);
  return buf;
}

// "64 MiB", "3 GiB", else "12345 bytes": sizes in messages people read.
std::string Bytes(uint64_t v) {
  constexpr uint64_t kMiB = 1ull << 20, kGiB = 1ull << 30;
  if (v != 0 && v % kGiB == 0) return std::to_string(v / kGiB) + " GiB";
  if (v != 0 && v % kMiB == 0) return std::to_string(v / kMiB) + " MiB";
  return std::to_string(v) + " bytes";
}

std::string DeviceText(int device) { return "device " + std::to_string(device); }

// [measured, driver 580] a copy or fill touching a range that is unmapped, or
// mapped without access for the stream's device, fails at once with
// CUDA_ERROR_INVALID_VALUE (not a sticky illegal address): say what to check.
std::string AccessHint(int device, const char* which) {
  return std::string(" (") + which + ": every byte must be mapped, with access for device " +
         std::to_string(device) + " granted by SetAccess)";
}

[[noreturn]] void FailArg(const char* api, const char* argument, const std::string& expectation) {
  ThrowInvalidArgument(kName, api, argument, expectation);
}

[[noreturn]] void InvalidHandle(const char* api, const char* kind, uint64_t id) {
  ThrowError(ErrorKind::kInvalidHandle, kName, api, 0, "INVALID_HANDLE",
             std::string("unknown or released ") + kind + " handle " + std::to_string(id));
}

[[noreturn]] void NotSupported(const char* api, const std::string& message) {
  ThrowError(ErrorKind::kNotSupported, kName, api, 0, "NOT_SUPPORTED", message);
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const Driver& d, int driver_version, const BackendOptions& options);
  ~CudaBackend() override;

  const char* Name() const override { return kName; }

  int DeviceCount() override { return static_cast<int>(devices_.size()); }
  DeviceInfo GetDeviceInfo(int device) override;
  bool CanAccessPeer(int device, int peer) override;

  uint64_t Granularity(int device) override;
  DevicePtr ReserveRange(uint64_t size, uint64_t alignment) override;
  void FreeRange(DevicePtr base, uint64_t size) override;
  ChunkId CreateChunk(int device, uint64_t size, bool exportable) override;
  void ReleaseChunk(ChunkId chunk) override;
  uint64_t ChunkSize(ChunkId chunk) override { return FindChunk(chunk, "ChunkSize").size; }
  int ChunkDevice(ChunkId chunk) override { return FindChunk(chunk, "ChunkDevice").device; }
  void Map(DevicePtr address, uint64_t size, ChunkId chunk) override;
  void Unmap(DevicePtr address, uint64_t size) override;
  void SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) override;

  uint64_t ExportChunk(ChunkId chunk) override;
  void AllowImport(uint64_t, const std::vector<int32_t>&) override {}  // acl only
  int32_t ImportPid() override { return static_cast<int32_t>(getpid()); }
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

  void BeginCapture(StreamId stream) override;
  GraphId EndCapture(StreamId stream) override;
  GraphId EndCaptureDeferred(StreamId stream) override;
  void InstantiateGraph(GraphId graph) override;
  /** The device's graph upload stream (Device::upload), created at the first call; its context is current. */
  CUstream UploadStream(int device, const char* api);
  void LaunchGraph(GraphId graph, StreamId stream) override;
  void DestroyGraph(GraphId graph) override;

  // Resets the primary context of `device` (cuDevicePrimaryCtxReset) and
  // retains it again. Every stream, event, module and function of the device
  // is invalid afterwards (dropped here: using one is kInvalidHandle), and so
  // are its graphs, and pinned host memory when device == kHostDevice. Chunks, reservations and
  // mappings stay in the tables: they belong to the process's address space,
  // and releasing them reports whatever the driver says.
  // [measured, driver 580 / CUDA 13.0] this does NOT clear an illegal address:
  // that error poisons every device of the process and the retain after the
  // reset fails with it (thrown here as kIllegalAddress). Recovery means a new
  // process.
  void ResetDevice(int device) override;

 private:
  struct Device {
    CUdevice handle = 0;
    CUcontext ctx = nullptr;  // primary context; guarded by mu_ (ResetDevice swaps it)
    int retains = 0;          // cuDevicePrimaryCtxRetain calls to undo at destruction
    std::string name, pci_bus_id;
    int cc_major = 0, cc_minor = 0, multiprocessors = 0;
    uint64_t granularity = 0;
    bool posix_fd = false;  // can export chunks as POSIX fds
    // Where InstantiateGraph uploads each new executable graph (created at the first one; guarded
    // by mu_): not an engine's stream, which may be capturing meanwhile.
    CUstream upload = nullptr;
  };
  struct Chunk {
    CUmemGenericAllocationHandle handle = 0;
    uint64_t size = 0;
    int device = 0;
    bool exportable = false;
  };
  struct Mapping {
    uint64_t size = 0;
    ChunkId chunk = 0;
    int device = 0;           // the chunk's device
    std::vector<int> access;  // devices granted by SetAccess (sorted, unique)
  };
  struct Stream {
    CUstream handle = nullptr;
    int device = 0;
  };
  struct Event {
    CUevent handle = nullptr;
    int device = 0;
    bool timing = false;
  };
  struct Module {
    CUmodule handle = nullptr;
    int device = 0;
  };
  struct Function {
    CUfunction handle = nullptr;
    int device = 0;
    ModuleId module = 0;
    std::string name;
  };
  struct Graph {
    CUgraphExec exec = nullptr;  // null until instantiated
    CUgraph raw = nullptr;       // the captured graph, until instantiated
    int device = 0;              // the origin stream's: its context destroys the graph
  };

  void InitDevice(int ordinal);
  void ReleaseContexts();

  // Throws emoe::Error for a failed driver call; `context` is called only then.
  template <typename Context>
  void Check(CUresult r, const char* api, Context&& context, const char* argument = "") const {
    if (r != CUDA_SUCCESS) ThrowCu(d_, r, api, context(), argument);
  }

  void CheckDevice(int device, const char* api, const char* argument = "device") const;
  void CheckGranules(uint64_t size, uint64_t granularity, const char* api,
                     const char* argument) const;
  // Makes `device`'s primary context current on this thread.
  void Use(int device, const char* api);

  template <typename T>
  T Find(const std::unordered_map<uint64_t, T>& table, uint64_t id, const char* kind,
         const char* api) const {
    std::shared_lock<std::shared_mutex> lock(mu_);
    auto it = table.find(id);
    if (it == table.end()) InvalidHandle(api, kind, id);
    return it->second;
  }
  // Removes and returns the entry: the handle is gone once its release method
  // is called, even if the driver then reports an error.
  template <typename T>
  T Take(std::unordered_map<uint64_t, T>& table, uint64_t id, const char* kind, const char* api) {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto it = table.find(id);
    if (it == table.end()) InvalidHandle(api, kind, id);
    T value = std::move(it->second);
    table.erase(it);
    return value;
  }
  template <typename T>
  uint64_t Insert(std::unordered_map<uint64_t, T>& table, T value) {
    const uint64_t id = next_id_.fetch_add(1);
    std::unique_lock<std::shared_mutex> lock(mu_);
    table.emplace(id, std::move(value));
    return id;
  }
  Chunk FindChunk(ChunkId id, const char* api) const { return Find(chunks_, id, "chunk", api); }
  Stream FindStream(StreamId id, const char* api) const {
    return Find(streams_, id, "stream", api);
  }
  Event FindEvent(EventId id, const char* api) const { return Find(events_, id, "event", api); }

  // Host copies: whether [p, p+bytes) lies in one HostAlloc allocation.
  bool Pinned(const void* p, uint64_t bytes) const;
  // Refuses a copy from or to pageable memory on a capturing stream, before the
  // driver sees it (the capture stays valid): a graph copies host memory when it
  // runs, which needs pinned memory. The N-API layer only passes HostAlloc
  // memory; this protects native callers.
  void CheckHostSideForCapture(const Stream& s, StreamId stream, const void* host,
                               uint64_t bytes, const char* api, const char* argument);
  // Abandons the capture begun on `s`, if any (its graph is discarded). Requires
  // the stream's device to be current.
  void AbandonCapture(StreamId stream, const Stream& s);

  // Requires vmm_mu_. Mappings fully inside [address, address+size) that tile
  // it exactly; throws kInvalidArgument naming `address` otherwise.
  std::vector<Mapping*> CoveringMappings(DevicePtr address, uint64_t size, const char* api);
  uint64_t MaxGranularity() const { return max_granularity_; }

  const Driver& d_;
  const int driver_version_;
  const BackendOptions options_;
  std::vector<Device> devices_;  // fixed size after construction
  uint64_t max_granularity_ = 0;
  std::atomic<uint64_t> next_id_{1};  // one counter for every kind: a mix-up never aliases

  mutable std::shared_mutex mu_;
  std::unordered_map<ChunkId, Chunk> chunks_;
  std::unordered_map<StreamId, Stream> streams_;
  std::unordered_map<EventId, Event> events_;
  std::unordered_map<ModuleId, Module> modules_;
  std::unordered_map<FunctionId, Function> functions_;
  std::unordered_map<GraphId, Graph> graphs_;
  std::unordered_set<StreamId> capture_origins_;  // BeginCapture called, EndCapture not yet
  std::map<void*, uint64_t> host_;  // pinned host allocation -> size (ordered: range lookups)

  std::mutex vmm_mu_;
  std::map<DevicePtr, uint64_t> reservations_;  // base -> size
  std::map<DevicePtr, Mapping> mappings_;       // address -> mapping
};

// ---------------------------------------------------------------- lifetime

CudaBackend::CudaBackend(const Driver& d, int driver_version, const BackendOptions& options)
    : d_(d), driver_version_(driver_version), options_(options) {
  int count = 0;
  Check(d_.cuDeviceGetCount(&count), "cuDeviceGetCount",
        [] { return std::string("counting devices"); });
  if (count <= 0) {
    ThrowError(ErrorKind::kBackendUnavailable, kName, "cuDeviceGetCount", 0, "NO_DEVICE",
               "the driver loaded but sees no CUDA device; check nvidia-smi and "
               "CUDA_VISIBLE_DEVICES");
  }
  devices_.resize(count);
  try {
    for (int i = 0; i < count; ++i) InitDevice(i);
  } catch (...) {
    ReleaseContexts();  // the destructor will not run for a throwing constructor
    throw;
  }
}

void CudaBackend::InitDevice(int ordinal) {
  Device& dev = devices_[ordinal];
  const std::string where = DeviceText(ordinal);
  Check(d_.cuDeviceGet(&dev.handle, ordinal), "cuDeviceGet", [&] { return "opening " + where; });
  char name[256] = {};
  Check(d_.cuDeviceGetName(name, sizeof name, dev.handle), "cuDeviceGetName",
        [&] { return "naming " + where; });
  dev.name = name;
  auto attr = [&](int attribute, const char* what) {
    int v = 0;
    Check(d_.cuDeviceGetAttribute(&v, attribute, dev.handle), "cuDeviceGetAttribute",
          [&] { return std::string("reading ") + what + " of " + where; });
    return v;
  };
  dev.cc_major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "COMPUTE_CAPABILITY_MAJOR");
  dev.cc_minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "COMPUTE_CAPABILITY_MINOR");
  dev.multiprocessors = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "MULTIPROCESSOR_COUNT");
  if (attr(CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
           "VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED") == 0) {
    ThrowError(ErrorKind::kBackendUnavailable, kName, "cuDeviceGetAttribute", 0, "NOT_SUPPORTED",
               where + " (" + dev.name +
                   ") does not support virtual memory management, which every chunk of this "
                   "backend needs (cuMemCreate/cuMemMap); hide it with CUDA_VISIBLE_DEVICES");
  }
  dev.posix_fd = attr(CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED,
                      "HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED") != 0;
  if (d_.cuDeviceGetPCIBusId != nullptr) {
    char bus[64] = {};
    if (d_.cuDeviceGetPCIBusId(bus, sizeof bus, dev.handle) == CUDA_SUCCESS) dev.pci_bus_id = bus;
  }

  Check(d_.cuDevicePrimaryCtxRetain(&dev.ctx, dev.handle), "cuDevicePrimaryCtxRetain",
        [&] { return "retaining the primary context of " + where; });
  dev.retains = 1;
  Check(d_.cuCtxSetCurrent(dev.ctx), "cuCtxSetCurrent",
        [&] { return "making the primary context of " + where + " current"; });

  // The size rule for chunks; asked for both handle types CreateChunk uses so
  // that a size valid for one is valid for the other.
  for (int handle_type : {CU_MEM_HANDLE_TYPE_NONE, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR}) {
    if (handle_type == CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR && !dev.posix_fd) continue;
    CUmemAllocationProp prop{};
    prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop.requestedHandleTypes = handle_type;
    prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop.location.id = dev.handle;
    size_t g = 0;
    Check(d_.cuMemGetAllocationGranularity(&g, &prop, CU_MEM_ALLOC_GRANULARITY_MINIMUM),
          "cuMemGetAllocationGranularity", [&] { return "reading the granularity of " + where; });
    dev.granularity = std::max<uint64_t>(dev.granularity, g);
  }
  if (dev.granularity == 0) dev.granularity = 2ull << 20;  // never 0 (a modulus below)
  max_granularity_ = std::max(max_granularity_, dev.granularity);
}

void CudaBackend::ReleaseContexts() {
  d_.cuCtxSetCurrent(nullptr);  // no thread should keep a context we drop
  for (Device& dev : devices_) {
    for (; dev.retains > 0; --dev.retains) d_.cuDevicePrimaryCtxRelease(dev.handle);
    dev.ctx = nullptr;
  }
}

CudaBackend::~CudaBackend() {
  // Best effort and silent: a destructor cannot report, and at process exit the
  // driver may already be shutting down (calls then return DEINITIALIZED).
  // Freeing what is left matters when a process opens backends repeatedly.
  std::lock_guard<std::mutex> vmm_lock(vmm_mu_);
  std::unique_lock<std::shared_mutex> lock(mu_);
  auto use = [&](int device) { return d_.cuCtxSetCurrent(devices_[device].ctx) == CUDA_SUCCESS; };
  // Captures still open are abandoned first: synchronizing a context with a
  // capturing stream fails.
  for (StreamId id : capture_origins_) {
    auto s = streams_.find(id);
    if (s == streams_.end() || !use(s->second.device)) continue;
    CUgraph graph = nullptr;
    d_.cuStreamEndCapture(s->second.handle, &graph);
    if (graph != nullptr) d_.cuGraphDestroy(graph);
  }
  capture_origins_.clear();
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (use(static_cast<int>(i))) d_.cuCtxSynchronize();  // nothing may still use what we free
  }
  for (auto& e : graphs_) {
    if (!use(e.second.device)) continue;
    if (e.second.exec != nullptr) d_.cuGraphExecDestroy(e.second.exec);
    if (e.second.raw != nullptr) d_.cuGraphDestroy(e.second.raw);
  }
  for (auto& e : streams_) {
    if (use(e.second.device)) d_.cuStreamDestroy(e.second.handle);
  }
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (devices_[i].upload != nullptr && use(static_cast<int>(i))) d_.cuStreamDestroy(devices_[i].upload);
  }
  for (auto& e : events_) {
    if (use(e.second.device)) d_.cuEventDestroy(e.second.handle);
  }
  for (auto& e : modules_) {
    if (use(e.second.device)) d_.cuModuleUnload(e.second.handle);
  }
  if (!host_.empty() && use(kHostDevice)) {
    for (auto& e : host_) d_.cuMemFreeHost(e.first);
  }
  for (auto& e : mappings_) {
    if (use(e.second.device)) d_.cuMemUnmap(e.first, e.second.size);
  }
  for (auto& e : reservations_) {
    if (use(0)) d_.cuMemAddressFree(e.first, e.second);
  }
  for (auto& e : chunks_) {
    if (use(e.second.device)) d_.cuMemRelease(e.second.handle);
  }
  streams_.clear();
  events_.clear();
  functions_.clear();
  graphs_.clear();
  modules_.clear();
  host_.clear();
  mappings_.clear();
  reservations_.clear();
  chunks_.clear();
  ReleaseContexts();
}

// ---------------------------------------------------------------- helpers

void CudaBackend::CheckDevice(int device, const char* api, const char* argument) const {
  if (device < 0 || device >= static_cast<int>(devices_.size())) {
    FailArg(api, argument,
            "a device ordinal in [0, " + std::to_string(devices_.size()) + ") (got " +
                std::to_string(device) + ")");
  }
}

void CudaBackend::CheckGranules(uint64_t size, uint64_t granularity, const char* api,
                                const char* argument) const {
  if (size == 0 || size % granularity != 0) {
    FailArg(api, argument,
            "a positive multiple of the granularity, " + Bytes(granularity) + " (got " +
                std::to_string(size) + ")");
  }
}

void CudaBackend::Use(int device, const char* api) {
  CUcontext ctx = nullptr;
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    ctx = devices_[device].ctx;
  }
  Check(d_.cuCtxSetCurrent(ctx), "cuCtxSetCurrent", [&] {
    return "making the primary context of " + DeviceText(device) + " current for " + api;
  });
}

std::vector<CudaBackend::Mapping*> CudaBackend::CoveringMappings(DevicePtr address, uint64_t size,
                                                                 const char* api) {
  std::vector<Mapping*> covered;
  const uint64_t end = address + size;
  auto it = mappings_.find(address);
  for (uint64_t cur = address; cur < end; ++it) {
    if (it == mappings_.end() || it->first != cur || cur + it->second.size > end) {
      FailArg(api, "address",
              "a range tiled exactly by mappings made with Map ([" + Hex(address) + ", " +
                  Hex(end) + ") has an unmapped or partly covered part at " + Hex(cur) + ")");
    }
    covered.push_back(&it->second);
    cur += it->second.size;
  }
  return covered;
}

// ---------------------------------------------------------------- devices

DeviceInfo CudaBackend::GetDeviceInfo(int device) {
  CheckDevice(device, "GetDeviceInfo");
  Use(device, "GetDeviceInfo");
  size_t free_bytes = 0, total_bytes = 0;
  Check(d_.cuMemGetInfo(&free_bytes, &total_bytes), "cuMemGetInfo",
        [&] { return "reading the memory of " + DeviceText(device); });
  const Device& dev = devices_[device];
  DeviceInfo info;
  info.ordinal = device;
  info.name = dev.name;
  info.total_bytes = total_bytes;
  info.free_bytes = free_bytes;
  info.cc_major = dev.cc_major;
  info.cc_minor = dev.cc_minor;
  info.multiprocessors = dev.multiprocessors;
  info.pci_bus_id = dev.pci_bus_id;
  return info;
}

bool CudaBackend::CanAccessPeer(int device, int peer) {
  CheckDevice(device, "CanAccessPeer");
  CheckDevice(peer, "CanAccessPeer", "peer");
  if (device == peer) return true;
  int can = 0;
  Check(d_.cuDeviceCanAccessPeer(&can, devices_[device].handle, devices_[peer].handle),
        "cuDeviceCanAccessPeer",
        [&] { return "asking whether " + DeviceText(device) + " can access " + DeviceText(peer); });
  return can != 0;
}

// ---------------------------------------------------------------- virtual memory

uint64_t CudaBackend::Granularity(int device) {
  CheckDevice(device, "Granularity");
  return devices_[device].granularity;
}

DevicePtr CudaBackend::ReserveRange(uint64_t size, uint64_t alignment) {
  const char* api = "ReserveRange";
  const uint64_t g = MaxGranularity();  // a range may hold chunks of any device
  CheckGranules(size, g, api, "size");
  if (alignment != 0 && ((alignment & (alignment - 1)) != 0 || alignment % g != 0)) {
    FailArg(api, "alignment", "0 or a power of two multiple of " + Bytes(g) + " (got " +
                                  std::to_string(alignment) + ")");
  }
  Use(0, api);  // VA space is per process; any context will do
  std::lock_guard<std::mutex> lock(vmm_mu_);
  CUdeviceptr base = 0;
  Check(d_.cuMemAddressReserve(&base, size, alignment == 0 ? g : alignment, 0, 0),
        "cuMemAddressReserve", [&] { return "reserving " + Bytes(size) + " of address space"; },
        "size");
  reservations_[base] = size;
  return base;
}

void CudaBackend::FreeRange(DevicePtr base, uint64_t size) {
  const char* api = "FreeRange";
  Use(0, api);
  std::lock_guard<std::mutex> lock(vmm_mu_);
  auto it = reservations_.find(base);
  if (it == reservations_.end() || it->second != size) {
    FailArg(api, "base", "the base and size of a reservation made by ReserveRange (got " +
                             Hex(base) + ", " + std::to_string(size) + " bytes)");
  }
  auto m = mappings_.lower_bound(base);
  if (m != mappings_.end() && m->first < base + size) {
    FailArg(api, "base", "a reservation with nothing mapped in it: a chunk is still mapped at " +
                             Hex(m->first) + "; Unmap it first");
  }
  reservations_.erase(it);
  Check(d_.cuMemAddressFree(base, size), "cuMemAddressFree",
        [&] { return "freeing " + Bytes(size) + " of address space at " + Hex(base); });
}

ChunkId CudaBackend::CreateChunk(int device, uint64_t size, bool exportable) {
  const char* api = "CreateChunk";
  CheckDevice(device, api);
  const Device& dev = devices_[device];
  CheckGranules(size, dev.granularity, api, "size");
  if (exportable && !dev.posix_fd) {
    NotSupported(api, DeviceText(device) + " cannot export memory as POSIX file descriptors "
                                           "(HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 0)");
  }
  Use(device, api);
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  // Exporting later needs the handle type now: export of a handle created
  // without it fails.
  prop.requestedHandleTypes =
      exportable ? CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR : CU_MEM_HANDLE_TYPE_NONE;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev.handle;
  CUmemGenericAllocationHandle handle = 0;
  Check(d_.cuMemCreate(&handle, size, &prop, 0), "cuMemCreate", [&] {
    return "creating a chunk of " + Bytes(size) + " on " + DeviceText(device) +
           (exportable ? " (exportable)" : "");
  }, "size");
  return Insert(chunks_, Chunk{handle, size, device, exportable});
}

void CudaBackend::ReleaseChunk(ChunkId chunk) {
  const char* api = "ReleaseChunk";
  Chunk c = Take(chunks_, chunk, "chunk", api);
  Use(c.device, api);
  // Mappings keep the memory alive: it is freed at the last unmap.
  Check(d_.cuMemRelease(c.handle), "cuMemRelease", [&] {
    return "releasing chunk " + std::to_string(chunk) + " (" + Bytes(c.size) + " on " +
           DeviceText(c.device) + ")";
  });
}

void CudaBackend::Map(DevicePtr address, uint64_t size, ChunkId chunk) {
  const char* api = "Map";
  const Chunk c = FindChunk(chunk, api);
  Use(c.device, api);
  std::lock_guard<std::mutex> lock(vmm_mu_);
  auto r = reservations_.upper_bound(address);
  const bool inside = r != reservations_.begin() && size <= std::prev(r)->second &&
                      address - std::prev(r)->first <= std::prev(r)->second - size;
  if (!inside) {
    FailArg(api, "address", "inside a reservation made by ReserveRange, with room for " +
                                Bytes(size) + " (got " + Hex(address) + ")");
  }
  auto next = mappings_.lower_bound(address);
  bool overlaps = next != mappings_.end() && next->first < address + size;
  if (!overlaps && next != mappings_.begin()) {
    auto prev = std::prev(next);
    overlaps = prev->first + prev->second.size > address;
  }
  if (overlaps) {
    FailArg(api, "address", "free of existing mappings (" + Hex(address) + " + " + Bytes(size) +
                                " overlaps one)");
  }
  // The caller's size goes to the driver as is: a partial map must fail there
  // (CUDA_ERROR_NOT_SUPPORTED), the same rule the mock enforces itself.
  Check(d_.cuMemMap(address, size, 0, c.handle, 0), "cuMemMap", [&] {
    return "mapping chunk " + std::to_string(chunk) + " (" + Bytes(c.size) + " on " +
           DeviceText(c.device) + ") at " + Hex(address) + " with size " + Bytes(size);
  }, "address");
  mappings_[address] = Mapping{size, chunk, c.device, {}};
}

void CudaBackend::Unmap(DevicePtr address, uint64_t size) {
  const char* api = "Unmap";
  std::lock_guard<std::mutex> lock(vmm_mu_);
  auto it = mappings_.find(address);
  if (it == mappings_.end()) {
    FailArg(api, "address", "the address of an earlier Map call (nothing is mapped at " +
                                Hex(address) + ")");
  }
  if (it->second.size != size) {
    FailArg(api, "size", "the size of the Map call at " + Hex(address) + ", " +
                             Bytes(it->second.size) + " (got " + std::to_string(size) +
                             "): a partial unmap is not allowed");
  }
  const int device = it->second.device;
  Use(device, api);
  Check(d_.cuMemUnmap(address, size), "cuMemUnmap",
        [&] { return "unmapping " + Bytes(size) + " at " + Hex(address); }, "size");
  mappings_.erase(it);
}

void CudaBackend::SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) {
  const char* api = "SetAccess";
  for (int d : devices) CheckDevice(d, api, "devices");
  std::vector<int> grant = devices;
  std::sort(grant.begin(), grant.end());
  grant.erase(std::unique(grant.begin(), grant.end()), grant.end());
  if (size == 0 || address + size < address) FailArg(api, "size", "positive");

  std::lock_guard<std::mutex> lock(vmm_mu_);
  std::vector<Mapping*> covered = CoveringMappings(address, size, api);
  // cuMemSetAccess only changes the devices it is given; to replace the access
  // list, devices granted before and absent now are set to PROT_NONE.
  std::vector<int> before;
  for (const Mapping* m : covered) before.insert(before.end(), m->access.begin(), m->access.end());
  std::sort(before.begin(), before.end());
  before.erase(std::unique(before.begin(), before.end()), before.end());
  std::vector<CUmemAccessDesc> desc;
  for (int d : grant) {
    desc.push_back(CUmemAccessDesc{{CU_MEM_LOCATION_TYPE_DEVICE, devices_[d].handle},
                                   CU_MEM_ACCESS_FLAGS_PROT_READWRITE});
  }
  for (int d : before) {
    if (std::binary_search(grant.begin(), grant.end(), d)) continue;
    desc.push_back(CUmemAccessDesc{{CU_MEM_LOCATION_TYPE_DEVICE, devices_[d].handle},
                                   CU_MEM_ACCESS_FLAGS_PROT_NONE});
  }
  if (!desc.empty()) {
    Use(covered.front()->device, api);
    Check(d_.cuMemSetAccess(address, size, desc.data(), desc.size()), "cuMemSetAccess", [&] {
      std::string list;
      for (int d : grant) list += (list.empty() ? "" : ", ") + std::to_string(d);
      return "granting devices [" + list + "] access to " + Bytes(size) + " at " + Hex(address);
    }, "devices");
  }
  for (Mapping* m : covered) m->access = grant;
}

// ---------------------------------------------------------------- sharing

uint64_t CudaBackend::ExportChunk(ChunkId chunk) {
  const char* api = "ExportChunk";
  const Chunk c = FindChunk(chunk, api);
  if (!c.exportable) {
    NotSupported(api, "chunk " + std::to_string(chunk) +
                          " was created without exportable; create it exportable to share it");
  }
  Use(c.device, api);
  int fd = -1;  // the driver writes an int for POSIX_FILE_DESCRIPTOR
  Check(d_.cuMemExportToShareableHandle(&fd, c.handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
        "cuMemExportToShareableHandle",
        [&] { return "exporting chunk " + std::to_string(chunk) + " as a file descriptor"; });
  return static_cast<uint64_t>(fd);
}

ChunkId CudaBackend::ImportChunk(uint64_t shareable, int device, uint64_t size) {
  const char* api = "ImportChunk";
  CheckDevice(device, api);
  CheckGranules(size, devices_[device].granularity, api, "size");
  if (shareable > static_cast<uint64_t>(INT_MAX)) {
    FailArg(api, "shareable", "an open file descriptor (got " + std::to_string(shareable) + ")");
  }
  const int fd = static_cast<int>(shareable);
  Use(device, api);
  CUmemGenericAllocationHandle handle = 0;
  // The fd travels by value inside the pointer argument, as cuda.h documents.
  void* os_handle = reinterpret_cast<void*>(static_cast<uintptr_t>(fd));
  Check(d_.cuMemImportFromShareableHandle(&handle, os_handle,
                                          CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
        "cuMemImportFromShareableHandle", [&] {
          return "importing file descriptor " + std::to_string(fd) + " on " + DeviceText(device);
        }, "shareable");
  CUmemAllocationProp prop{};
  const CUresult r = d_.cuMemGetAllocationPropertiesFromHandle(&prop, handle);
  if (r != CUDA_SUCCESS) {
    d_.cuMemRelease(handle);
    ThrowCu(d_, r, "cuMemGetAllocationPropertiesFromHandle",
            "reading the properties of the chunk imported from fd " + std::to_string(fd));
  }
  if (prop.location.type != CU_MEM_LOCATION_TYPE_DEVICE ||
      prop.location.id != devices_[device].handle) {
    d_.cuMemRelease(handle);
    FailArg(api, "device",
            "the device the exported chunk lives on: it is on device " +
                std::to_string(prop.location.id) + " of this process, not " +
                std::to_string(device) +
                " (ordinals differ between processes with different CUDA_VISIBLE_DEVICES)");
  }
  // The size cannot be read back (no API returns it): it is the caller's word;
  // a wrong one fails at Map.
  const bool exportable =
      (prop.requestedHandleTypes & CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR) != 0;
  return Insert(chunks_, Chunk{handle, size, device, exportable});
}

// ---------------------------------------------------------------- host memory

void* CudaBackend::HostAlloc(uint64_t size) {
  const char* api = "HostAlloc";
  if (size == 0) FailArg(api, "size", "positive");
  Use(kHostDevice, api);
  void* p = nullptr;
  // Portable: pinned for every context, so copies on any device run at full speed.
  Check(d_.cuMemHostAlloc(&p, size, CU_MEMHOSTALLOC_PORTABLE), "cuMemHostAlloc",
        [&] { return "allocating " + Bytes(size) + " of pinned host memory"; }, "size");
  std::unique_lock<std::shared_mutex> lock(mu_);
  host_[p] = size;
  return p;
}

void CudaBackend::HostFree(void* ptr) {
  const char* api = "HostFree";
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto it = host_.find(ptr);
    if (it == host_.end()) {
      ThrowError(ErrorKind::kInvalidHandle, kName, api, 0, "INVALID_HANDLE",
                 "unknown or released pinned host buffer at " +
                     Hex(reinterpret_cast<uintptr_t>(ptr)) + " (not from HostAlloc, or freed)");
    }
    host_.erase(it);
  }
  Use(kHostDevice, api);
  Check(d_.cuMemFreeHost(ptr), "cuMemFreeHost",
        [&] { return "freeing pinned host memory at " + Hex(reinterpret_cast<uintptr_t>(ptr)); });
}

// ---------------------------------------------------------------- streams and events

StreamId CudaBackend::CreateStream(int device) {
  const char* api = "CreateStream";
  CheckDevice(device, api);
  Use(device, api);
  CUstream s = nullptr;
  // Non-blocking: no implicit sync with the legacy default stream.
  Check(d_.cuStreamCreate(&s, CU_STREAM_NON_BLOCKING), "cuStreamCreate",
        [&] { return "creating a stream on " + DeviceText(device); });
  return Insert(streams_, Stream{s, device});
}

void CudaBackend::DestroyStream(StreamId stream) {
  const char* api = "DestroyStream";
  const Stream s = Take(streams_, stream, "stream", api);
  Use(s.device, api);
  AbandonCapture(stream, s);  // a capture begun here can never be ended afterwards
  // Wait first: the caller may free memory right after, and queued work must
  // not touch it. Destroy even if the wait reports an (async) error (a stream
  // that joined another stream's capture cannot be synchronized: the driver says
  // so, and invalidates that capture).
  const CUresult sync = d_.cuStreamSynchronize(s.handle);
  const CUresult destroy = d_.cuStreamDestroy(s.handle);
  auto where = [&] {
    return "destroying stream " + std::to_string(stream) + " on " + DeviceText(s.device);
  };
  Check(sync, "cuStreamSynchronize", where);
  Check(destroy, "cuStreamDestroy", where);
}

void CudaBackend::SynchronizeStream(StreamId stream) {
  const char* api = "SynchronizeStream";
  const Stream s = FindStream(stream, api);
  Use(s.device, api);
  Check(d_.cuStreamSynchronize(s.handle), "cuStreamSynchronize", [&] {
    return "synchronizing stream " + std::to_string(stream) + " on " + DeviceText(s.device);
  });
}

EventId CudaBackend::CreateEvent(int device, bool timing) {
  const char* api = "CreateEvent";
  CheckDevice(device, api);
  Use(device, api);
  CUevent e = nullptr;
  Check(d_.cuEventCreate(&e, timing ? CU_EVENT_DEFAULT : CU_EVENT_DISABLE_TIMING), "cuEventCreate",
        [&] { return "creating an event on " + DeviceText(device); });
  return Insert(events_, Event{e, device, timing});
}

void CudaBackend::DestroyEvent(EventId event) {
  const char* api = "DestroyEvent";
  const Event e = Take(events_, event, "event", api);
  Use(e.device, api);
  Check(d_.cuEventDestroy(e.handle), "cuEventDestroy",
        [&] { return "destroying event " + std::to_string(event); });
}

void CudaBackend::RecordEvent(EventId event, StreamId stream) {
  const char* api = "RecordEvent";
  const Event e = FindEvent(event, api);
  const Stream s = FindStream(stream, api);
  if (e.device != s.device) {
    // The driver would say INVALID_HANDLE; the real rule is one device.
    FailArg(api, "event", "an event of the stream's device " + std::to_string(s.device) +
                              " (event " + std::to_string(event) + " is on device " +
                              std::to_string(e.device) + ")");
  }
  Use(s.device, api);
  Check(d_.cuEventRecord(e.handle, s.handle), "cuEventRecord", [&] {
    return "recording event " + std::to_string(event) + " on stream " + std::to_string(stream);
  });
}

void CudaBackend::StreamWaitEvent(StreamId stream, EventId event) {
  const char* api = "StreamWaitEvent";
  const Stream s = FindStream(stream, api);
  const Event e = FindEvent(event, api);
  Use(s.device, api);  // the event may be of another device: that is allowed
  Check(d_.cuStreamWaitEvent(s.handle, e.handle, 0), "cuStreamWaitEvent", [&] {
    return "making stream " + std::to_string(stream) + " wait for event " + std::to_string(event);
  });
}

void CudaBackend::SynchronizeEvent(EventId event) {
  const char* api = "SynchronizeEvent";
  const Event e = FindEvent(event, api);
  Use(e.device, api);
  Check(d_.cuEventSynchronize(e.handle), "cuEventSynchronize",
        [&] { return "waiting for event " + std::to_string(event); });
}

float CudaBackend::ElapsedMs(EventId start, EventId end) {
  const char* api = "ElapsedMs";
  const Event a = FindEvent(start, api);
  const Event b = FindEvent(end, api);
  if (!a.timing) FailArg(api, "start", "an event created with timing");
  if (!b.timing) FailArg(api, "end", "an event created with timing");
  Use(a.device, api);
  float ms = 0.0f;
  Check(d_.cuEventElapsedTime(&ms, a.handle, b.handle), "cuEventElapsedTime", [&] {
    return "timing events " + std::to_string(start) + " -> " + std::to_string(end) +
           " (both must be recorded and complete)";
  });
  return ms;
}

// ---------------------------------------------------------------- copies and fills

void CudaBackend::CopyDeviceToDevice(DevicePtr dst, DevicePtr src, uint64_t bytes,
                                     StreamId stream) {
  const char* api = "CopyDeviceToDevice";
  const Stream s = FindStream(stream, api);
  if (bytes == 0) return;
  Use(s.device, api);
  // Across devices this is a UVA copy: it needs access for the stream's device
  // on both ranges (SetAccess), not cuCtxEnablePeerAccess.
  Check(d_.cuMemcpyDtoDAsync(dst, src, bytes, s.handle), "cuMemcpyDtoDAsync", [&] {
    return "copying " + Bytes(bytes) + " from " + Hex(src) + " to " + Hex(dst) + " on " +
           DeviceText(s.device) + AccessHint(s.device, "both ranges");
  });
}

void CudaBackend::CopyHostToDevice(DevicePtr dst, const void* src, uint64_t bytes,
                                   StreamId stream) {
  const char* api = "CopyHostToDevice";
  const Stream s = FindStream(stream, api);
  if (bytes == 0) return;
  if (src == nullptr) FailArg(api, "src", "a host pointer");
  Use(s.device, api);
  CheckHostSideForCapture(s, stream, src, bytes, api, "src");
  Check(d_.cuMemcpyHtoDAsync(dst, src, bytes, s.handle), "cuMemcpyHtoDAsync", [&] {
    return "copying " + Bytes(bytes) + " from host to " + Hex(dst) + " on " +
           DeviceText(s.device) + AccessHint(s.device, "dst");
  }, "dst");
}

void CudaBackend::CopyDeviceToHost(void* dst, DevicePtr src, uint64_t bytes, StreamId stream) {
  const char* api = "CopyDeviceToHost";
  const Stream s = FindStream(stream, api);
  if (bytes == 0) return;
  if (dst == nullptr) FailArg(api, "dst", "a host pointer");
  Use(s.device, api);
  CheckHostSideForCapture(s, stream, dst, bytes, api, "dst");
  Check(d_.cuMemcpyDtoHAsync(dst, src, bytes, s.handle), "cuMemcpyDtoHAsync", [&] {
    return "copying " + Bytes(bytes) + " from " + Hex(src) + " to host on " +
           DeviceText(s.device) + AccessHint(s.device, "src");
  }, "src");
}

void CudaBackend::MemsetD8(DevicePtr dst, uint8_t value, uint64_t bytes, StreamId stream) {
  const char* api = "MemsetD8";
  const Stream s = FindStream(stream, api);
  if (bytes == 0) return;
  Use(s.device, api);
  Check(d_.cuMemsetD8Async(dst, value, bytes, s.handle), "cuMemsetD8Async", [&] {
    return "filling " + Bytes(bytes) + " at " + Hex(dst) + " on " + DeviceText(s.device) +
           AccessHint(s.device, "dst");
  }, "dst");
}

// ---------------------------------------------------------------- kernels

ModuleId CudaBackend::LoadModule(int device, const ModuleSource& source, std::string* log) {
  const char* api = "LoadModule";
  CheckDevice(device, api);
  if (log != nullptr) log->clear();
  if (source.format == ModuleFormat::kAscendBinary) {
    NotSupported(api, "Ascend kernel binaries load only on the acl backend");
  }
  if (source.data.empty()) FailArg(api, "source", "non-empty module data");

  const Device& dev = devices_[device];
  CompiledModule compiled;
  const void* image = nullptr;
  std::string what;
  switch (source.format) {
    case ModuleFormat::kCudaSource: {
      const Nvrtc& nvrtc = Nvrtc::Get(options_.nvrtc_library, driver_version_);
      compiled = nvrtc.Compile(source.data, source.name, source.options, dev.cc_major,
                               dev.cc_minor, log);
      image = compiled.image.data();
      what = std::string(compiled.cubin ? "cubin" : "PTX") + " compiled by " + nvrtc.path() +
             " for " + compiled.arch;
      break;
    }
    case ModuleFormat::kPtx:
      image = source.data.c_str();  // NUL-terminated, as the driver needs for PTX
      what = "PTX";
      break;
    case ModuleFormat::kCubin:
      image = source.data.data();
      what = "cubin/fatbin image";
      break;
    default:
      FailArg(api, "source", "a known module format");
  }

  Use(device, api);
  CUmodule module = nullptr;
  CUresult r;
  std::string jit_log;
  if (d_.cuModuleLoadDataEx != nullptr) {
    // Ask for the JIT error log: without it a PTX failure says only "invalid PTX".
    char buffer[8192] = {};
    int keys[] = {CU_JIT_ERROR_LOG_BUFFER, CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES};
    void* values[] = {buffer, reinterpret_cast<void*>(static_cast<uintptr_t>(sizeof buffer))};
    r = d_.cuModuleLoadDataEx(&module, image, 2, keys, values);
    buffer[sizeof buffer - 1] = '\0';
    jit_log = buffer;
  } else {
    r = d_.cuModuleLoadData(&module, image);
  }
  if (r != CUDA_SUCCESS) {
    if (log != nullptr && !jit_log.empty()) *log += (log->empty() ? "" : "\n") + jit_log;
    ThrowCu(d_, r, "cuModuleLoadData",
            "loading " + what + " '" + source.name + "' on " + DeviceText(device) + " (sm_" +
                std::to_string(dev.cc_major) + std::to_string(dev.cc_minor) + ")" +
                (jit_log.empty() ? std::string() : ": " + jit_log));
  }
  return Insert(modules_, Module{module, device});
}

void CudaBackend::UnloadModule(ModuleId module) {
  const char* api = "UnloadModule";
  Module m;
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto it = modules_.find(module);
    if (it == modules_.end()) InvalidHandle(api, "module", module);
    m = it->second;
    modules_.erase(it);
    // Its functions die with it.
    for (auto f = functions_.begin(); f != functions_.end();) {
      f = f->second.module == module ? functions_.erase(f) : std::next(f);
    }
  }
  Use(m.device, api);
  Check(d_.cuModuleUnload(m.handle), "cuModuleUnload",
        [&] { return "unloading module " + std::to_string(module); });
}

FunctionId CudaBackend::GetFunction(ModuleId module, const std::string& name) {
  const char* api = "GetFunction";
  const Module m = Find(modules_, module, "module", api);
  Use(m.device, api);
  CUfunction f = nullptr;
  const CUresult r = d_.cuModuleGetFunction(&f, m.handle, name.c_str());
  if (r == CUDA_ERROR_NOT_FOUND) {
    ThrowError(ErrorKind::kNotFound, kName, "cuModuleGetFunction", r, ErrorName(d_, r),
               "kernel '" + name + "' is not in module " + std::to_string(module) +
                   " (declare it extern \"C\" __global__, or pass its mangled name)");
  }
  Check(r, "cuModuleGetFunction", [&] { return "looking up kernel '" + name + "'"; }, "name");
  return Insert(functions_, Function{f, m.device, module, name});
}

void CudaBackend::Launch(FunctionId function, const LaunchConfig& config, StreamId stream,
                         const std::vector<KernelArg>& args) {
  const char* api = "Launch";
  const Function f = Find(functions_, function, "function", api);
  const Stream s = FindStream(stream, api);
  if (f.device != s.device) {
    FailArg(api, "stream", "a stream of device " + std::to_string(f.device) +
                               ", where the kernel's module was loaded (got one of device " +
                               std::to_string(s.device) + ")");
  }
  for (int i = 0; i < 3; ++i) {
    if (config.grid[i] == 0 || config.block[i] == 0) {
      FailArg(api, "config", "grid and block dimensions of at least 1");
    }
  }
  // cuLaunchKernel reads each parameter through a pointer, as many bytes as the
  // kernel's parameter has: point at the member of the right width in a local
  // copy that outlives the call.
  std::vector<KernelArg> values(args);
  std::vector<void*> params(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    KernelArg& v = values[i];
    switch (v.type) {
      case ArgType::kPtr:
      case ArgType::kU64: params[i] = &v.u64; break;
      case ArgType::kI64: params[i] = &v.i64; break;
      case ArgType::kI32: params[i] = &v.i32; break;
      case ArgType::kU32: params[i] = &v.u32; break;
      case ArgType::kF32: params[i] = &v.f32; break;
      case ArgType::kF64: params[i] = &v.f64; break;
      default:
        FailArg(api, "args", "arguments of a known type (argument " + std::to_string(i) + ")");
    }
  }
  Use(s.device, api);
  Check(d_.cuLaunchKernel(f.handle, config.grid[0], config.grid[1], config.grid[2],
                          config.block[0], config.block[1], config.block[2], config.shared_bytes,
                          s.handle, params.empty() ? nullptr : params.data(), nullptr),
        "cuLaunchKernel", [&] {
          std::ostringstream os;
          os << "launching kernel '" << f.name << "' with grid (" << config.grid[0] << ", "
             << config.grid[1] << ", " << config.grid[2] << "), block (" << config.block[0] << ", "
             << config.block[1] << ", " << config.block[2] << "), " << config.shared_bytes
             << " bytes of shared memory and " << args.size() << " arguments on "
             << DeviceText(s.device);
          return os.str();
        }, "config");
}

// ---------------------------------------------------------------- stream capture

bool CudaBackend::Pinned(const void* p, uint64_t bytes) const {
  std::shared_lock<std::shared_mutex> lock(mu_);
  auto it = host_.upper_bound(const_cast<void*>(p));
  if (it == host_.begin()) return false;
  --it;
  const auto base = reinterpret_cast<uintptr_t>(it->first);
  const auto addr = reinterpret_cast<uintptr_t>(p);
  return addr >= base && addr - base <= it->second && bytes <= it->second - (addr - base);
}

void CudaBackend::CheckHostSideForCapture(const Stream& s, StreamId stream, const void* host,
                                          uint64_t bytes, const char* api,
                                          const char* argument) {
  if (d_.cuStreamIsCapturing == nullptr || Pinned(host, bytes)) return;
  int status = CU_STREAM_CAPTURE_STATUS_NONE;
  if (d_.cuStreamIsCapturing(s.handle, &status) != CUDA_SUCCESS ||
      status == CU_STREAM_CAPTURE_STATUS_NONE) {
    return;  // not capturing (or cannot tell): the driver decides as usual
  }
  ThrowError(ErrorKind::kNotSupported, kName, api, CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED,
             "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
             std::string(argument) + " [" + Hex(reinterpret_cast<uintptr_t>(host)) + ", +" +
                 std::to_string(bytes) + ") is not pinned memory from HostAlloc, and stream " +
                 std::to_string(stream) +
                 " is capturing: a graph copies host memory when it runs, which pageable memory "
                 "does not allow; use a host buffer from HostAlloc (refused before the driver "
                 "saw it: the capture is still valid)");
}

void CudaBackend::AbandonCapture(StreamId stream, const Stream& s) {
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (capture_origins_.erase(stream) == 0) return;
  }
  CUgraph graph = nullptr;
  d_.cuStreamEndCapture(s.handle, &graph);  // whatever it says, the capture is over
  if (graph != nullptr) d_.cuGraphDestroy(graph);
}

void CudaBackend::BeginCapture(StreamId stream) {
  const char* api = "BeginCapture";
  // All or nothing: never begin a capture that could not be ended and replayed.
  const std::pair<bool, const char*> symbols[] = {
      {d_.cuStreamBeginCapture != nullptr, "cuStreamBeginCapture_v2"},
      {d_.cuStreamEndCapture != nullptr, "cuStreamEndCapture"},
      {d_.cuStreamIsCapturing != nullptr, "cuStreamIsCapturing"},
      {d_.cuGraphInstantiateWithFlags != nullptr, "cuGraphInstantiateWithFlags"},
      {d_.cuGraphLaunch != nullptr, "cuGraphLaunch"},
      {d_.cuGraphExecDestroy != nullptr, "cuGraphExecDestroy"},
      {d_.cuGraphDestroy != nullptr, "cuGraphDestroy"},
  };
  for (const auto& symbol : symbols) {
    if (!symbol.first) {
      NotSupported(api, d_.path + " lacks " + symbol.second +
                            ", which stream capture needs (driver older than CUDA 11.4?); launch "
                            "the work directly instead");
    }
  }
  const Stream s = FindStream(stream, api);
  {
    std::shared_lock<std::shared_mutex> lock(mu_);
    if (capture_origins_.count(stream) != 0) {
      FailArg(api, "stream", "a stream that is not capturing (BeginCapture was called on stream " +
                                 std::to_string(stream) + " and EndCapture was not)");
    }
  }
  Use(s.device, api);
  // RELAXED, because the capturing thread is the JS main thread, which also runs
  // every other runtime call of the process (chunk creation and mapping, pinned
  // host allocation, synchronizeSync of other streams, the scaling layer) and may
  // do so while a capture is open across an `await`. GLOBAL would make such
  // "potentially unsafe" calls fail, and invalidate the capture, on every thread;
  // THREAD_LOCAL still on the main thread. RELAXED forbids only what necessarily
  // conflicts with the capture (synchronizing a capturing stream, querying a
  // captured event), which is reported as such; none of our calls allocates in
  // stream order, so nothing a capture must see is lost. It also lets EndCapture
  // run on another thread than BeginCapture.
  Check(d_.cuStreamBeginCapture(s.handle, CU_STREAM_CAPTURE_MODE_RELAXED), "cuStreamBeginCapture",
        [&] {
          return "beginning a capture on stream " + std::to_string(stream) + " of " +
                 DeviceText(s.device) +
                 " (a stream that joined another capture cannot begin its own)";
        },
        "stream");
  std::unique_lock<std::shared_mutex> lock(mu_);
  capture_origins_.insert(stream);
}

GraphId CudaBackend::EndCapture(StreamId stream) {
  const GraphId id = EndCaptureDeferred(stream);
  try {
    InstantiateGraph(id);
  } catch (...) {
    try {
      DestroyGraph(id);
    } catch (...) {
      // The instantiation's error is the one to report.
    }
    throw;
  }
  return id;
}

GraphId CudaBackend::EndCaptureDeferred(StreamId stream) {
  const char* api = "EndCapture";
  const Stream s = FindStream(stream, api);
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    if (capture_origins_.erase(stream) == 0) {
      // Caught here, before the driver: ending a joined stream's capture on it
      // (CUDA_ERROR_STREAM_CAPTURE_UNMATCHED) would invalidate the capture.
      FailArg(api, "stream",
              "the stream BeginCapture was called on (stream " + std::to_string(stream) +
                  " is not capturing, or joined another stream's capture by waiting on an "
                  "event recorded during it: end that capture on its origin stream)");
    }
  }
  Use(s.device, api);
  CUgraph graph = nullptr;
  const CUresult r = d_.cuStreamEndCapture(s.handle, &graph);
  if (r != CUDA_SUCCESS) {
    if (graph != nullptr) d_.cuGraphDestroy(graph);
    ThrowCu(d_, r, "cuStreamEndCapture",
            "ending the capture on stream " + std::to_string(stream) + " of " +
                DeviceText(s.device) + " (it has ended without a graph)",
            "stream");
  }
  if (graph == nullptr) {
    ThrowError(ErrorKind::kInternal, kName, "cuStreamEndCapture", 0, "NO_GRAPH",
               "the driver ended the capture on stream " + std::to_string(stream) +
                   " without an error and without a graph");
  }
  return Insert(graphs_, Graph{nullptr, graph, s.device});
}

void CudaBackend::InstantiateGraph(GraphId graph) {
  const char* api = "InstantiateGraph";
  const Graph g = Find(graphs_, graph, "graph", api);
  if (g.exec != nullptr) {
    FailArg(api, "graph", "a graph from EndCaptureDeferred that is not instantiated yet (graph " +
                              std::to_string(graph) + " is)");
  }
  Use(g.device, api);
  CUgraphExec exec = nullptr;
  // No lock held: instantiation is the long part, and other threads keep launching.
  Check(d_.cuGraphInstantiateWithFlags(&exec, g.raw, 0), "cuGraphInstantiateWithFlags", [&] {
    return "instantiating graph " + std::to_string(graph) + " (captured on " + DeviceText(g.device) + ")";
  });
  bool gone = false;
  {
    std::unique_lock<std::shared_mutex> lock(mu_);
    auto it = graphs_.find(graph);
    if (it == graphs_.end() || it->second.raw != g.raw) {
      gone = true;
    } else {
      it->second.exec = exec;
      it->second.raw = nullptr;
    }
  }
  if (gone) {
    // Destroyed (or its device reset) while it was being instantiated.
    d_.cuGraphExecDestroy(exec);
    InvalidHandle(api, "graph", graph);
  }
  // The executable graph is independent of the graph it was made from.
  d_.cuGraphDestroy(g.raw);
  // Uploaded now (on this thread, the pool's with EndCaptureDeferred), not at its first launch: a
  // graph captured ahead of a scale is first launched right after the switch-over, where the
  // upload held the event loop. Stream-ordered on the device's upload stream; the driver orders
  // the graph's launches after it.
  if (d_.cuGraphUpload != nullptr) {
    const CUstream upload = UploadStream(g.device, api);
    Check(d_.cuGraphUpload(exec, upload), "cuGraphUpload", [&] {
      return "uploading graph " + std::to_string(graph) + " to " + DeviceText(g.device);
    });
  }
}

CUstream CudaBackend::UploadStream(int device, const char* api) {
  std::unique_lock<std::shared_mutex> lock(mu_);
  Device& dev = devices_[device];
  if (dev.upload == nullptr) {
    // The device's context is current on this thread (the caller's Use).
    Check(d_.cuStreamCreate(&dev.upload, CU_STREAM_NON_BLOCKING), "cuStreamCreate",
          [&] { return std::string("creating the graph upload stream of ") + DeviceText(device) + " (" + api + ")"; });
  }
  return dev.upload;
}

void CudaBackend::LaunchGraph(GraphId graph, StreamId stream) {
  const char* api = "LaunchGraph";
  const Graph g = Find(graphs_, graph, "graph", api);
  if (g.exec == nullptr) {
    FailArg(api, "graph", "an instantiated graph (graph " + std::to_string(graph) +
                              " came from EndCaptureDeferred: call InstantiateGraph first)");
  }
  const Stream s = FindStream(stream, api);
  Use(s.device, api);
  Check(d_.cuGraphLaunch(g.exec, s.handle), "cuGraphLaunch", [&] {
    return "launching graph " + std::to_string(graph) + " on stream " + std::to_string(stream) +
           " of " + DeviceText(s.device);
  });
}

void CudaBackend::DestroyGraph(GraphId graph) {
  const char* api = "DestroyGraph";
  const Graph g = Take(graphs_, graph, "graph", api);
  Use(g.device, api);
  if (g.exec == nullptr) {
    Check(d_.cuGraphDestroy(g.raw), "cuGraphDestroy",
          [&] { return "destroying graph " + std::to_string(graph) + " (not instantiated)"; });
    return;
  }
  // Launches already queued complete first (the driver defers the release).
  Check(d_.cuGraphExecDestroy(g.exec), "cuGraphExecDestroy",
        [&] { return "destroying graph " + std::to_string(graph); });
}

// ---------------------------------------------------------------- health

void CudaBackend::ResetDevice(int device) {
  const char* api = "ResetDevice";
  CheckDevice(device, api);
  std::unique_lock<std::shared_mutex> lock(mu_);
  Device& dev = devices_[device];
  Check(d_.cuDevicePrimaryCtxReset(dev.handle), "cuDevicePrimaryCtxReset",
        [&] { return "resetting the primary context of " + DeviceText(device); });
  // The context is gone: drop the handles it owned so that later use is
  // kInvalidHandle instead of a dangling driver pointer.
  auto drop = [device](auto& table) {
    for (auto it = table.begin(); it != table.end();) {
      it = it->second.device == device ? table.erase(it) : std::next(it);
    }
  };
  for (const auto& e : streams_) {
    if (e.second.device == device) capture_origins_.erase(e.first);
  }
  drop(streams_);
  drop(events_);
  drop(functions_);
  drop(modules_);
  // Graphs begun on this device. One begun elsewhere with nodes on this device
  // (a cross-device fork) stays, and fails in the driver if launched again. A graph not
  // instantiated yet (EndCaptureDeferred) is dropped without cuGraphDestroy: another thread
  // may be instantiating it (InstantiateGraph then reports it gone); its host memory leaks.
  drop(graphs_);
  dev.upload = nullptr;  // destroyed with the context
  if (device == kHostDevice) host_.clear();

  // The reset keeps our retain count; retaining again hands back a live
  // context, and the destructor releases every retain. [measured, driver 580 /
  // CUDA 13.0] after CUDA_ERROR_ILLEGAL_ADDRESS this retain fails with the same
  // error even when every device is reset: the sticky state is process-wide.
  CUcontext ctx = nullptr;
  const CUresult r = d_.cuDevicePrimaryCtxRetain(&ctx, dev.handle);
  if (r != CUDA_SUCCESS) {
    ThrowCu(d_, r, "cuDevicePrimaryCtxRetain",
            "retaining the primary context of " + DeviceText(device) +
                " after its reset (this driver keeps a sticky error for the whole process: "
                "no reset clears it, only a new process does)");
  }
  dev.ctx = ctx;
  dev.retains++;
  Check(d_.cuCtxSetCurrent(ctx), "cuCtxSetCurrent",
        [&] { return "making the reset context of " + DeviceText(device) + " current"; });
}

// ---------------------------------------------------------------- loading

// The steps ProbeCuda and CreateCudaBackend share. Returns the driver, or null
// with *failure describing the first step that failed.
const Driver* OpenDriver(const BackendOptions& options, ProbeResult* probe, Status* failure) {
  failure->kind = ErrorKind::kBackendUnavailable;
  failure->backend = kName;
  std::string error;
  const char* step = "dlopen";
  const Driver* d = LoadDriver(options.cuda_library, &error, &step);
  if (d == nullptr) {
    failure->api = step;
    failure->code_name = std::string(step) == "dlopen" ? "LIBRARY_NOT_FOUND" : "SYMBOL_NOT_FOUND";
    failure->message = error;
    return nullptr;
  }
  probe->library = d->path;
  auto fail = [&](CUresult r, const char* api) {
    failure->api = api;
    failure->code = r;
    failure->code_name = ErrorName(*d, r);
    failure->message = std::string(api) + " failed: " + failure->code_name + " (" +
                       ErrorString(*d, r) + ")";
    return nullptr;
  };
  CUresult r = d->cuInit(0);
  if (r != CUDA_SUCCESS) return fail(r, "cuInit");
  int version = 0;
  r = d->cuDriverGetVersion(&version);
  if (r != CUDA_SUCCESS) return fail(r, "cuDriverGetVersion");
  probe->version = FormatDriverVersion(version);
  int count = 0;
  r = d->cuDeviceGetCount(&count);
  if (r != CUDA_SUCCESS) return fail(r, "cuDeviceGetCount");
  probe->device_count = count;
  if (count == 0) {
    failure->api = "cuDeviceGetCount";
    failure->code_name = "NO_DEVICE";
    failure->message = "the driver loaded but sees no CUDA device (check nvidia-smi and "
                       "CUDA_VISIBLE_DEVICES)";
    return nullptr;
  }
  return d;
}

int DriverVersion(const Driver& d) {
  int v = 0;
  return d.cuDriverGetVersion(&v) == CUDA_SUCCESS ? v : 0;
}

}  // namespace
}  // namespace cuda

ProbeResult ProbeCuda(const BackendOptions& options) {
  ProbeResult probe;
  try {
    Status failure;
    probe.available = cuda::OpenDriver(options, &probe, &failure) != nullptr;
    if (!probe.available) probe.reason = failure.message;
  } catch (const std::exception& e) {  // never throws, whatever happens below
    probe.available = false;
    probe.reason = e.what();
  }
  return probe;
}

std::shared_ptr<Backend> CreateCudaBackend(const BackendOptions& options) {
  ProbeResult probe;
  Status failure;
  const cuda::Driver* d = cuda::OpenDriver(options, &probe, &failure);
  if (d == nullptr) throw Error(failure);
  try {
    return std::make_shared<cuda::CudaBackend>(*d, cuda::DriverVersion(*d), options);
  } catch (const Error& e) {
    // Whatever stopped the backend from starting makes it unavailable; keep
    // the driver's api, code and text.
    Status s = e.status();
    s.kind = ErrorKind::kBackendUnavailable;
    throw Error(s);
  }
}

}  // namespace emoe

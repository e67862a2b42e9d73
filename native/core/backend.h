// The one backend interface. Three implementations: cuda, acl, mock.
// Thin and dumb: resources, copies, launches, errors. No policy lives here.
//
// Contract for every implementation:
//  - Every method is thread-safe: it is called from the JS main thread and from
//    libuv worker threads (AsyncWorker::Execute). A backend that has per-thread
//    state (the CUDA current context) sets it at the start of every call.
//  - Failure is reported by throwing emoe::Error (core/status.h) with the API
//    name, numeric code and code name of the underlying call.
//  - Handles (ChunkId, StreamId, ...) are opaque non-zero integers owned by the
//    backend; an unknown or released handle throws kInvalidHandle.
//  - Sizes and offsets are bytes. Addresses (DevicePtr) are virtual addresses in
//    this process: real device VAs for cuda/acl, host VAs for mock.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/status.h"

namespace emoe {

using DevicePtr = uint64_t;
using ChunkId = uint64_t;
using StreamId = uint64_t;
using EventId = uint64_t;
using ModuleId = uint64_t;
using FunctionId = uint64_t;
using GraphId = uint64_t;

struct DeviceInfo {
  int ordinal = 0;
  std::string name;
  uint64_t total_bytes = 0;
  uint64_t free_bytes = 0;
  int cc_major = 0;  // compute capability (cuda); 0 elsewhere
  int cc_minor = 0;
  int multiprocessors = 0;
  std::string pci_bus_id;  // empty when unknown
};

struct BackendOptions {
  int mock_devices = 4;                    // mock: number of simulated devices (1..64)
  uint64_t mock_capacity = 8ull << 30;     // mock: bytes per device
  std::string cuda_library;                // override "libcuda.so.1"
  std::string nvrtc_library;               // override the libnvrtc search list
  std::string acl_library;                 // override "libascendcl.so"
};

struct ProbeResult {
  bool available = false;
  int device_count = 0;
  std::string reason;   // why unavailable (dlerror text, init error, no device)
  std::string library;  // the library path that loaded, if any
  std::string version;  // driver/runtime version where known
};

enum class ModuleFormat {
  kPtx,         // NUL-terminated PTX text
  kCubin,       // cubin or fatbin image
  kCudaSource,  // CUDA C++ source, compiled at run time with NVRTC
  kAscendBinary // path of an Ascend C kernel binary (.o) on disk
};

struct ModuleSource {
  ModuleFormat format = ModuleFormat::kCudaSource;
  std::string data;                  // bytes, source text, or file path
  std::string name = "module.cu";    // program name for compile logs
  std::vector<std::string> options;  // NVRTC options, e.g. "--use_fast_math"
};

enum class ArgType : uint8_t { kPtr, kI32, kU32, kI64, kU64, kF32, kF64 };

struct KernelArg {
  ArgType type = ArgType::kU64;
  // Value storage; kPtr stores the device address in u64.
  union {
    int32_t i32;
    uint32_t u32;
    int64_t i64;
    uint64_t u64;
    float f32;
    double f64;
  };
  KernelArg() : u64(0) {}
};

struct LaunchConfig {
  uint32_t grid[3] = {1, 1, 1};
  uint32_t block[3] = {1, 1, 1};
  uint32_t shared_bytes = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* Name() const = 0;

  // ---- devices
  virtual int DeviceCount() = 0;
  virtual DeviceInfo GetDeviceInfo(int device) = 0;  // memory figures are current
  virtual bool CanAccessPeer(int device, int peer) = 0;

  // ---- virtual memory
  // Minimum allocation granularity for chunks on `device` (2 MiB on H100/H200/mock).
  virtual uint64_t Granularity(int device) = 0;
  // Reserves `size` bytes of virtual address space (size a multiple of the
  // granularity; alignment 0 = granularity).
  virtual DevicePtr ReserveRange(uint64_t size, uint64_t alignment) = 0;
  // Frees a reservation made by ReserveRange; everything in it must be unmapped.
  virtual void FreeRange(DevicePtr base, uint64_t size) = 0;
  // A physical chunk on `device`; size a multiple of the granularity.
  // `exportable` asks for a shareable handle type at creation (cuda needs it).
  virtual ChunkId CreateChunk(int device, uint64_t size, bool exportable) = 0;
  // Releases the chunk handle; memory is freed at the last unmap (as in CUDA).
  virtual void ReleaseChunk(ChunkId chunk) = 0;
  virtual uint64_t ChunkSize(ChunkId chunk) = 0;
  virtual int ChunkDevice(ChunkId chunk) = 0;
  // Maps the whole chunk at `address` (inside a reservation). `size` must equal
  // the chunk size: a partial map is rejected (kNotSupported, like cuMemMap).
  // A fresh mapping has no access until SetAccess.
  virtual void Map(DevicePtr address, uint64_t size, ChunkId chunk) = 0;
  // Unmaps exactly what one Map call mapped (a partial unmap is kInvalidArgument).
  virtual void Unmap(DevicePtr address, uint64_t size) = 0;
  // Grants read/write access on [address, address+size) to every listed device
  // (replaces the previous access list). The range must be fully mapped.
  virtual void SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) = 0;

  // ---- sharing across processes
  // cuda/mock: returns a new POSIX fd the caller owns (and must close);
  // acl: returns the uint64 shareable handle.
  virtual uint64_t ExportChunk(ChunkId chunk) = 0;
  // acl: whitelists importer pids for a shareable handle; no-op for cuda/mock.
  virtual void AllowImport(uint64_t shareable, const std::vector<int32_t>& pids) = 0;
  // The pid an exporter must whitelist for this process (acl: bare tgid).
  virtual int32_t ImportPid() = 0;
  // Imports a chunk exported by another process. cuda/mock: `shareable` is an fd
  // the caller still owns (close it after import). The size must be learned out
  // of band; a mismatch is rejected where the backend can tell.
  virtual ChunkId ImportChunk(uint64_t shareable, int device, uint64_t size) = 0;

  // ---- pinned host memory (async copies need it)
  virtual void* HostAlloc(uint64_t size) = 0;
  virtual void HostFree(void* ptr) = 0;

  // ---- streams and events
  virtual StreamId CreateStream(int device) = 0;
  virtual void DestroyStream(StreamId stream) = 0;  // waits for queued work first
  virtual void SynchronizeStream(StreamId stream) = 0;  // reports async errors (sticky)
  virtual EventId CreateEvent(int device, bool timing) = 0;
  virtual void DestroyEvent(EventId event) = 0;
  virtual void RecordEvent(EventId event, StreamId stream) = 0;
  virtual void StreamWaitEvent(StreamId stream, EventId event) = 0;
  virtual void SynchronizeEvent(EventId event) = 0;
  virtual float ElapsedMs(EventId start, EventId end) = 0;

  // ---- copies and fills: asynchronous, in order on the stream
  // Within one device or across devices (the stream's device needs access to both).
  virtual void CopyDeviceToDevice(DevicePtr dst, DevicePtr src, uint64_t bytes, StreamId stream) = 0;
  virtual void CopyHostToDevice(DevicePtr dst, const void* src, uint64_t bytes, StreamId stream) = 0;
  virtual void CopyDeviceToHost(void* dst, DevicePtr src, uint64_t bytes, StreamId stream) = 0;
  virtual void MemsetD8(DevicePtr dst, uint8_t value, uint64_t bytes, StreamId stream) = 0;

  // ---- kernels
  // Loads a module for `device`. For kCudaSource, compiles with NVRTC first; the
  // compile log is written to *log (also on failure, in the error message).
  virtual ModuleId LoadModule(int device, const ModuleSource& source, std::string* log) = 0;
  virtual void UnloadModule(ModuleId module) = 0;
  virtual FunctionId GetFunction(ModuleId module, const std::string& name) = 0;
  virtual void Launch(FunctionId function, const LaunchConfig& config, StreamId stream,
                      const std::vector<KernelArg>& args) = 0;

  // ---- stream capture into replayable graphs
  // Work queued on a capturing stream is recorded, not run. Another stream that
  // waits (StreamWaitEvent) on an event recorded during the capture joins it:
  // its later work is recorded into the same graph, ordered after that record,
  // until the origin stream waits on an event recorded on it after its last
  // captured work ("joined back"). Records and waits inside the capture become
  // graph edges only: a replay records no event.
  // During a capture: synchronizing a capturing stream, synchronizing or timing
  // an event whose latest record was captured, and a capturing stream waiting on
  // an event recorded outside the capture fail with kNotSupported and invalidate
  // the capture (CUDA's rule). A host copy of a capturing stream must use
  // HostAlloc memory (kNotSupported otherwise; the capture stays valid). Host
  // memory is read (H2D) and written (D2H) when the graph runs, at the addresses
  // captured; kernel arguments are the values captured.
  //
  // Starts capturing `stream` (kInvalidArgument naming "stream" if it is capturing already).
  virtual void BeginCapture(StreamId stream) = 0;
  // Ends the capture begun on `stream` and returns an instantiated graph. The
  // capture ends (every joined stream leaves it) even when this throws:
  // kNotSupported if it was invalidated, kInvalidArgument naming "stream" if a
  // joined stream was not joined back, or if `stream` is not an origin.
  virtual GraphId EndCapture(StreamId stream) = 0;
  // EndCapture without the instantiation: the graph takes InstantiateGraph before
  // LaunchGraph (kInvalidArgument naming "graph" until then); DestroyGraph takes it
  // either way. Fails and ends the capture as EndCapture does.
  virtual GraphId EndCaptureDeferred(StreamId stream) = 0;
  // Instantiates a graph from EndCaptureDeferred (kInvalidArgument naming "graph" if it
  // is instantiated already). Host work, milliseconds for a thousand nodes: it may run
  // on another thread while this one keeps queueing work, as long as nothing else uses
  // this graph meanwhile. On failure the graph stays uninstantiated (destroy it).
  virtual void InstantiateGraph(GraphId graph) = 0;
  // Runs the whole graph, in order on `stream` (work queued on it before runs
  // first; work queued after waits for it). Each recorded operation runs on the
  // device of the stream that captured it. A graph may be launched many times.
  virtual void LaunchGraph(GraphId graph, StreamId stream) = 0;
  // Launches already queued finish; later use of the id is kInvalidHandle.
  virtual void DestroyGraph(GraphId graph) = 0;

  // ---- health
  // Clears a sticky error (illegal address) on `device`. On cuda this resets the
  // primary context: every resource of that device becomes invalid.
  virtual void ResetDevice(int device) = 0;

  // ---- test hooks (mock only; others throw kNotSupported)
  // Makes the nth (1-based, counted from now) call of `op` (a method name above,
  // e.g. "CreateChunk", "CopyDeviceToDevice", "Map") throw an error of `kind`.
  virtual void InjectFault(const std::string& op, uint64_t nth, ErrorKind kind);
  virtual void ClearFaults();
};

// Names of the backends compiled into this build ("cuda", "acl", "mock").
std::vector<std::string> CompiledBackends();

// Probes a backend without keeping it: loads its library, initialises, counts
// devices. Never throws; the reason says why it is unavailable.
ProbeResult ProbeBackend(const std::string& name, const BackendOptions& options);

// Creates a backend; throws kBackendUnavailable with the probe's reason, or
// kInvalidArgument for an unknown name.
std::shared_ptr<Backend> CreateBackend(const std::string& name, const BackendOptions& options);

}  // namespace emoe

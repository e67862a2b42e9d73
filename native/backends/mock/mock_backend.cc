// The mock backend: simulated devices on the host CPU, faithful to the CUDA VMM
// rules the other backends live by, so that the whole system runs in CI.
//  - A chunk is a memfd; a reservation is PROT_NONE anonymous address space; Map
//    puts the memfd over it (MAP_SHARED|MAP_FIXED), so aliasing and cross-process
//    sharing (fd passing) behave like real device memory.
//  - A fresh mapping has no access; SetAccess records the device list and makes the
//    pages readable and writable. Copies and kernels check the list against the
//    stream's device when they execute and poison the device on a violation, like
//    CUDA's sticky ILLEGAL_ADDRESS.
//  - Each stream is a worker thread running its queue in order.
//  - Stream capture (CUDA's rules): work queued on a capturing stream becomes a
//    graph node instead of running; a stream that waits on an event recorded
//    during a capture joins it; EndCapture checks that every joined stream was
//    joined back and instantiates the graph; LaunchGraph queues one op that runs
//    every node, each with the device of the stream that captured it, in an order
//    that respects the captured dependencies but runs independent branches in the
//    reverse of their capture order (so a missing dependency shows up here, not
//    only on a GPU).
//
// Locking: mu_ guards the handle tables, chunk bookkeeping and capture state;
// fault_mu_ the armed faults; host_mu_ (shared) the pinned host allocations;
// map_mu_ (shared) reservations and mappings. Order: mu_, host_mu_, map_mu_.
// Stream workers take map_mu_ shared for the whole of a copy or kernel (so a check
// and the memcpy see the same mappings) and never take mu_ while holding it.
// A replayed host copy holds host_mu_ shared, so HostFree cannot unmap the buffer
// under it. map_mu_ prefers writers: busy streams must not starve Map/Unmap/SetAccess.
#include "backends/mock/mock_backend.h"

#include <fcntl.h>
#include <pthread.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <queue>
#include <set>
#include <shared_mutex>  // std::shared_lock, std::shared_mutex
#include <thread>

#include "backends/mock/mock_kernels.h"

namespace emoe {
namespace {

constexpr uint64_t kGranularity = 2ull << 20;
constexpr const char* kName = "mock";
constexpr const char* kMemfdPrefix = "emoe-mock-dev";
// Numeric codes mirror the CUresult of the same failure.
constexpr int64_t kCodeOutOfMemory = 2;
constexpr int64_t kCodeInvalidHandle = 400;
constexpr int64_t kCodeIllegalState = 401;
constexpr int64_t kCodeNotFound = 500;
constexpr int64_t kCodeNotReady = 600;
constexpr int64_t kCodeIllegalAddress = 700;
constexpr int64_t kCodeNotSupported = 801;
constexpr int64_t kCodeCaptureUnsupported = 900;
constexpr int64_t kCodeCaptureInvalidated = 901;
constexpr int64_t kCodeCaptureMerge = 902;
constexpr int64_t kCodeCaptureUnmatched = 903;
constexpr int64_t kCodeCaptureUnjoined = 904;
constexpr int64_t kCodeCaptureIsolation = 905;
constexpr int64_t kCodeCapturedEvent = 907;
constexpr int64_t kCodeInternal = 999;

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

Status MakeStatus(ErrorKind kind, const std::string& api, int64_t code,
                  const std::string& code_name, const std::string& message) {
  Status s;
  s.kind = kind;
  s.backend = kName;
  s.api = api;
  s.code = code;
  s.code_name = code_name;
  s.message = message;
  return s;
}

[[noreturn]] void Fail(ErrorKind kind, const std::string& api, int64_t code,
                       const std::string& code_name, const std::string& message) {
  throw Error(MakeStatus(kind, api, code, code_name, message));
}

[[noreturn]] void FailErrno(const std::string& api, const std::string& what, int err) {
  ErrorKind kind = (err == ENOMEM || err == EMFILE || err == ENFILE) ? ErrorKind::kOutOfMemory
                                                                     : ErrorKind::kInternal;
  Fail(kind, api, err, "MOCK_ERROR_ERRNO", what + " failed: " + std::strerror(err));
}

[[noreturn]] void FailArg(const std::string& api, const std::string& argument,
                          const std::string& expectation) {
  ThrowInvalidArgument(kName, api, argument, expectation);
}

// An invalid argument that carries the CUDA-like code of the rule it broke.
[[noreturn]] void FailArgCode(const std::string& api, const std::string& argument, int64_t code,
                              const std::string& code_name, const std::string& message) {
  Status s = MakeStatus(ErrorKind::kInvalidArgument, api, code, code_name, message);
  s.argument = argument;
  throw Error(std::move(s));
}

bool Overflows(uint64_t a, uint64_t b) { return a + b < a; }

// A reader-writer lock that lets a waiting writer in before new readers. glibc's
// default rwlock (behind std::shared_mutex) prefers readers, so streams running
// back-to-back copies could hold off a Map indefinitely.
class WriterPreferringLock {
 public:
  WriterPreferringLock() {
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&lock_, &attr);
    pthread_rwlockattr_destroy(&attr);
  }
  ~WriterPreferringLock() { pthread_rwlock_destroy(&lock_); }
  WriterPreferringLock(const WriterPreferringLock&) = delete;
  WriterPreferringLock& operator=(const WriterPreferringLock&) = delete;
  void lock() { pthread_rwlock_wrlock(&lock_); }
  void unlock() { pthread_rwlock_unlock(&lock_); }
  void lock_shared() { pthread_rwlock_rdlock(&lock_); }
  void unlock_shared() { pthread_rwlock_unlock(&lock_); }

 private:
  pthread_rwlock_t lock_;
};

// Every method that InjectFault may target.
const char* const kFaultOps[] = {
    "GetDeviceInfo", "CanAccessPeer", "ReserveRange", "FreeRange", "CreateChunk",
    "ReleaseChunk", "Map", "Unmap", "SetAccess", "ExportChunk", "AllowImport", "ImportChunk",
    "HostAlloc", "HostFree", "CreateStream", "DestroyStream", "SynchronizeStream",
    "CreateEvent", "DestroyEvent", "RecordEvent", "StreamWaitEvent", "SynchronizeEvent",
    "ElapsedMs", "CopyDeviceToDevice", "CopyHostToDevice", "CopyDeviceToHost", "MemsetD8",
    "LoadModule", "UnloadModule", "GetFunction", "Launch", "BeginCapture", "EndCapture",
    "InstantiateGraph", "LaunchGraph", "DestroyGraph", "ResetDevice"};

// Physical memory of one chunk. Shared by its handle and its mappings: it is freed
// (capacity returned, memfd closed) when the handle is released and the last
// mapping is gone, as CUDA frees at the last of cuMemRelease / cuMemUnmap.
struct ChunkMem {
  int device = 0;
  uint64_t size = 0;
  int fd = -1;
  bool exportable = false;
  bool imported = false;  // counted against the exporter's capacity, not ours
  bool released = false;
  int maps = 0;
  ~ChunkMem() {
    if (fd >= 0) close(fd);
  }
};

struct Mapping {
  uint64_t size = 0;
  std::shared_ptr<ChunkMem> mem;
  std::vector<int> access;  // devices that may touch it (sorted, unique)
};

// One recorded operation of a capture: what it runs and what it runs after.
struct GraphNode {
  const char* api = "";
  int device = 0;        // the capturing stream's device: the node runs as that device
  StreamId stream = 0;   // the stream that captured it (for messages)
  bool touches_memory = true;
  std::function<void()> run;  // takes its own locks; throws Error
  std::vector<size_t> deps;   // earlier nodes it runs after (sorted, unique)
};

// One capture sequence, from BeginCapture on its origin stream to EndCapture.
// Guarded by the backend's mu_.
struct Capture {
  StreamId origin = 0;
  std::vector<GraphNode> nodes;
  // Every stream capturing into it (the origin and the streams that joined) ->
  // the nodes its next operation depends on (sorted, unique).
  std::map<StreamId, std::vector<size_t>> frontier;
  std::set<int> devices;          // every device a node runs on
  bool ended = false;
  std::optional<Status> invalid;  // the first offence; EndCapture then fails
};

// An instantiated graph. Immutable once built; queued launches share it.
struct Graph {
  GraphId id = 0;
  std::vector<GraphNode> nodes;
  std::vector<size_t> order;  // the replay order (a topological order)
  std::vector<int> devices;
};

struct Event {
  int device = 0;
  bool timing = false;
  std::mutex mu;
  std::condition_variable cv;
  uint64_t enqueued = 0;   // records enqueued so far (sequence numbers 1..n)
  uint64_t completed = 0;  // highest record sequence a worker has reached
  std::chrono::steady_clock::time_point time;
  // Set (under the backend's mu_) when the latest record was made by a capturing
  // stream: that record is a set of graph nodes, not a point in any queue.
  std::shared_ptr<Capture> captured;
  std::vector<size_t> captured_nodes;
};

struct Op {
  const char* api;
  bool touches_memory;  // skipped once the device is poisoned (records and waits still run)
  std::function<void()> run;
};

struct Stream {
  StreamId id = 0;
  int device = 0;
  std::mutex mu;
  std::condition_variable cv;  // new work, stop, and "drained"
  std::deque<Op> queue;
  bool busy = false;
  bool stop = false;
  std::optional<Status> error;  // first async error since the last synchronize
  std::thread worker;
  std::shared_ptr<Capture> capture;  // the capture it records into (under mu_); null: none
};

struct Module {
  int device = 0;
};

struct Function {
  ModuleId module = 0;
  int device = 0;
  std::string name;
  MockKernelFn fn = nullptr;
};

// The host side of a copy: the pointer and the argument that named it.
struct HostSpan {
  const void* ptr = nullptr;
  const char* argument = nullptr;
};

struct Fault {
  std::string op;
  uint64_t nth = 0;
  uint64_t remaining = 0;  // calls left until it fires
  ErrorKind kind = ErrorKind::kInternal;
};

class MockBackend final : public Backend {
 public:
  MockBackend(int devices, uint64_t capacity)
      : devices_(devices), capacity_(capacity), used_(devices, 0),
        poisoned_(new std::atomic<bool>[devices]) {
    for (int d = 0; d < devices; ++d) poisoned_[d] = false;
  }

  ~MockBackend() override {
    std::map<StreamId, std::shared_ptr<Stream>> streams;
    {
      std::lock_guard<std::mutex> lock(mu_);
      streams.swap(streams_);
    }
    for (auto& entry : streams) StopWorker(*entry.second);
    // Munmapping each reservation removes whatever is still mapped in it; the memfds
    // close when the last ChunkMem reference (table or mapping) goes.
    for (const auto& r : reservations_) munmap(reinterpret_cast<void*>(r.first), r.second);
    mappings_.clear();
    chunks_.clear();
    for (const auto& h : host_) munmap(h.first, h.second);
  }

  const char* Name() const override { return kName; }

  // ---- devices

  int DeviceCount() override { return devices_; }

  DeviceInfo GetDeviceInfo(int device) override {
    Hook("GetDeviceInfo");
    CheckDevice("GetDeviceInfo", device);
    DeviceInfo info;
    info.ordinal = device;
    info.name = "Mock Device " + std::to_string(device);
    info.total_bytes = capacity_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      info.free_bytes = capacity_ - used_[device];
    }
    info.multiprocessors = 4;
    info.pci_bus_id = "mock:" + std::to_string(device);
    return info;
  }

  bool CanAccessPeer(int device, int peer) override {
    Hook("CanAccessPeer");
    CheckDevice("CanAccessPeer", device);
    CheckDevice("CanAccessPeer", peer, "peer");
    return device != peer;  // CUDA answers false for a device and itself
  }

  // ---- virtual memory

  uint64_t Granularity(int device) override {
    CheckDevice("Granularity", device);
    return kGranularity;
  }

  DevicePtr ReserveRange(uint64_t size, uint64_t alignment) override {
    const char* api = "ReserveRange";
    Hook(api);
    CheckGranules(api, "size", size);
    uint64_t align = alignment == 0 ? kGranularity : alignment;
    if ((align & (align - 1)) != 0 || align % kGranularity != 0) {
      FailArg(api, "alignment", "0 or a power of two multiple of " + std::to_string(kGranularity));
    }
    if (Overflows(size, align)) FailArg(api, "size", "small enough to reserve");
    // Over-reserve, then trim both ends to get an aligned range.
    uint64_t span = size + align;
    void* p = mmap(nullptr, span, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      Fail(ErrorKind::kOutOfMemory, api, err, "MOCK_ERROR_OUT_OF_MEMORY",
           "cannot reserve " + std::to_string(size) + " bytes of address space: " +
               std::strerror(err));
    }
    uint64_t raw = reinterpret_cast<uint64_t>(p);
    uint64_t base = (raw + align - 1) & ~(align - 1);
    if (base > raw) munmap(p, base - raw);
    uint64_t tail = raw + span - (base + size);
    if (tail > 0) munmap(reinterpret_cast<void*>(base + size), tail);
    std::unique_lock<WriterPreferringLock> lock(map_mu_);
    reservations_[base] = size;
    return base;
  }

  void FreeRange(DevicePtr base, uint64_t size) override {
    const char* api = "FreeRange";
    Hook(api);
    std::unique_lock<WriterPreferringLock> lock(map_mu_);
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
    munmap(reinterpret_cast<void*>(base), size);
    reservations_.erase(it);
  }

  ChunkId CreateChunk(int device, uint64_t size, bool exportable) override {
    const char* api = "CreateChunk";
    Hook(api);
    CheckDevice(api, device);
    CheckGranules(api, "size", size);
    CheckNotPoisoned(api, device);
    std::lock_guard<std::mutex> lock(mu_);
    uint64_t free_bytes = capacity_ - used_[device];
    if (size > free_bytes) {
      Fail(ErrorKind::kOutOfMemory, api, kCodeOutOfMemory, "MOCK_ERROR_OUT_OF_MEMORY",
           "cannot create a chunk of " + std::to_string(size) + " bytes on mock device " +
               std::to_string(device) + ": " + std::to_string(free_bytes) + " bytes free of " +
               std::to_string(capacity_));
    }
    std::string name = kMemfdPrefix + std::to_string(device);
    int fd = memfd_create(name.c_str(), MFD_CLOEXEC);
    if (fd < 0) FailErrno(api, "memfd_create", errno);
    auto mem = std::make_shared<ChunkMem>();
    mem->fd = fd;  // owned from here on
    if (ftruncate(fd, static_cast<off_t>(size)) != 0) FailErrno(api, "ftruncate", errno);
    mem->device = device;
    mem->size = size;
    mem->exportable = exportable;
    used_[device] += size;
    ChunkId id = NextId();
    chunks_[id] = std::move(mem);
    return id;
  }

  void ReleaseChunk(ChunkId chunk) override {
    Hook("ReleaseChunk");
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<ChunkMem> mem = FindChunk("ReleaseChunk", chunk);
    chunks_.erase(chunk);
    mem->released = true;
    MaybeFreeChunk(*mem);
  }

  uint64_t ChunkSize(ChunkId chunk) override {
    std::lock_guard<std::mutex> lock(mu_);
    return FindChunk("ChunkSize", chunk)->size;
  }

  int ChunkDevice(ChunkId chunk) override {
    std::lock_guard<std::mutex> lock(mu_);
    return FindChunk("ChunkDevice", chunk)->device;
  }

  void Map(DevicePtr address, uint64_t size, ChunkId chunk) override {
    const char* api = "Map";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<ChunkMem> mem = FindChunk(api, chunk);
    if (size != mem->size) {
      Fail(ErrorKind::kNotSupported, api, kCodeNotSupported, "MOCK_ERROR_NOT_SUPPORTED",
           "only whole chunks map: size " + std::to_string(size) + " differs from chunk " +
               std::to_string(chunk) + "'s size " + std::to_string(mem->size) +
               " (cuMemMap rejects partial maps the same way)");
    }
    std::unique_lock<WriterPreferringLock> map_lock(map_mu_);
    if (address % kGranularity != 0) {
      FailArg(api, "address", "aligned to " + std::to_string(kGranularity) + " bytes (got " +
                                  Hex(address) + ")");
    }
    if (!InsideReservation(address, size)) {
      FailArg(api, "address", "inside a reservation made by ReserveRange, with room for " +
                                  std::to_string(size) + " bytes (got " + Hex(address) + ")");
    }
    auto next = mappings_.lower_bound(address);
    bool overlaps = next != mappings_.end() && next->first < address + size;
    if (!overlaps && next != mappings_.begin()) {
      auto prev = std::prev(next);
      overlaps = prev->first + prev->second.size > address;
    }
    if (overlaps) {
      FailArg(api, "address", "free of existing mappings (" + Hex(address) + " overlaps one)");
    }
    // PROT_NONE: a fresh mapping has no access until SetAccess, as in CUDA.
    void* p = mmap(reinterpret_cast<void*>(address), size, PROT_NONE, MAP_SHARED | MAP_FIXED,
                   mem->fd, 0);
    if (p == MAP_FAILED) FailErrno(api, "mmap of the chunk's memfd", errno);
    mappings_[address] = Mapping{size, mem, {}};
    mem->maps++;
  }

  void Unmap(DevicePtr address, uint64_t size) override {
    const char* api = "Unmap";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    std::unique_lock<WriterPreferringLock> map_lock(map_mu_);
    auto it = mappings_.find(address);
    if (it == mappings_.end() || it->second.size != size) {
      FailArg(api, "address", "the address and size of one earlier Map call (got " + Hex(address) +
                                  ", " + std::to_string(size) + " bytes)");
    }
    // Put the reservation back over the hole so the range stays reserved.
    void* p = mmap(reinterpret_cast<void*>(address), size, PROT_NONE,
                   MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) FailErrno(api, "mmap restoring the reservation", errno);
    std::shared_ptr<ChunkMem> mem = std::move(it->second.mem);
    mappings_.erase(it);
    mem->maps--;
    MaybeFreeChunk(*mem);
  }

  void SetAccess(DevicePtr address, uint64_t size, const std::vector<int>& devices) override {
    const char* api = "SetAccess";
    Hook(api);
    for (int d : devices) CheckDevice(api, d, "devices");
    std::vector<int> access = devices;
    std::sort(access.begin(), access.end());
    access.erase(std::unique(access.begin(), access.end()), access.end());
    if (size == 0 || Overflows(address, size)) FailArg(api, "size", "positive");
    std::unique_lock<WriterPreferringLock> map_lock(map_mu_);
    // Access is per mapping, so the range must be whole consecutive mappings.
    std::vector<std::pair<const uint64_t, Mapping>*> covered;
    uint64_t end = address + size;
    auto it = mappings_.find(address);
    for (uint64_t cur = address; cur < end; ++it) {
      if (it == mappings_.end() || it->first != cur || cur + it->second.size > end) {
        FailArg(api, "address", "a range covered exactly by consecutive mappings ([" + Hex(address) +
                                    ", " + Hex(end) + ") has an unmapped or partly covered part at " +
                                    Hex(cur) + ")");
      }
      covered.push_back(&*it);
      cur += it->second.size;
    }
    int prot = access.empty() ? PROT_NONE : PROT_READ | PROT_WRITE;
    for (auto* m : covered) {
      if (mprotect(reinterpret_cast<void*>(m->first), m->second.size, prot) != 0) {
        FailErrno(api, "mprotect", errno);
      }
      m->second.access = access;
    }
  }

  // ---- sharing

  uint64_t ExportChunk(ChunkId chunk) override {
    const char* api = "ExportChunk";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<ChunkMem> mem = FindChunk(api, chunk);
    if (!mem->exportable) {
      Fail(ErrorKind::kNotSupported, api, kCodeNotSupported, "MOCK_ERROR_NOT_SUPPORTED",
           "chunk " + std::to_string(chunk) +
               " was created without exportable; create it exportable to share it (as on CUDA)");
    }
    int fd = fcntl(mem->fd, F_DUPFD_CLOEXEC, 0);
    if (fd < 0) FailErrno(api, "dup of the chunk's memfd", errno);
    return static_cast<uint64_t>(fd);
  }

  void AllowImport(uint64_t, const std::vector<int32_t>&) override { Hook("AllowImport"); }

  int32_t ImportPid() override { return static_cast<int32_t>(getpid()); }

  ChunkId ImportChunk(uint64_t shareable, int device, uint64_t size) override {
    const char* api = "ImportChunk";
    Hook(api);
    CheckDevice(api, device);
    if (shareable > static_cast<uint64_t>(INT32_MAX)) FailArg(api, "shareable", "a file descriptor");
    int fd = static_cast<int>(shareable);
    // /proc names a memfd "/memfd:<name> (deleted)"; ours carry the owning device.
    char target[256] = {0};
    std::string link = "/proc/self/fd/" + std::to_string(fd);
    ssize_t n = readlink(link.c_str(), target, sizeof(target) - 1);
    std::string prefix = std::string("/memfd:") + kMemfdPrefix;
    if (n < 0 || std::strncmp(target, prefix.c_str(), prefix.size()) != 0) {
      FailArg(api, "shareable", "a file descriptor exported by the mock backend (fd " +
                                    std::to_string(fd) + " is " + (n < 0 ? "not open" : target) + ")");
    }
    const char* digits = target + prefix.size();
    int owner = std::isdigit(static_cast<unsigned char>(*digits)) ? std::atoi(digits) : -1;
    if (owner != device) {
      FailArg(api, "device", "the chunk's device " + std::to_string(owner) + " (got " +
                                 std::to_string(device) + ")");
    }
    struct stat st;
    if (fstat(fd, &st) != 0) FailErrno(api, "fstat", errno);
    if (static_cast<uint64_t>(st.st_size) != size) {
      FailArg(api, "size", "the exported chunk's size " + std::to_string(st.st_size) + " (got " +
                               std::to_string(size) + ")");
    }
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);  // the caller keeps and closes its fd
    if (own < 0) FailErrno(api, "dup", errno);
    auto mem = std::make_shared<ChunkMem>();
    mem->fd = own;
    mem->device = device;
    mem->size = size;
    mem->exportable = true;  // an fd-backed import can be passed on again
    mem->imported = true;
    std::lock_guard<std::mutex> lock(mu_);
    ChunkId id = NextId();
    chunks_[id] = std::move(mem);
    return id;
  }

  // ---- host memory

  void* HostAlloc(uint64_t size) override {
    const char* api = "HostAlloc";
    Hook(api);
    if (size == 0) FailArg(api, "size", "positive");
    void* p = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      int err = errno;
      Fail(ErrorKind::kOutOfMemory, api, err, "MOCK_ERROR_OUT_OF_MEMORY",
           "cannot allocate " + std::to_string(size) + " bytes of host memory: " + std::strerror(err));
    }
    std::unique_lock<std::shared_mutex> lock(host_mu_);
    host_[p] = size;
    return p;
  }

  void HostFree(void* ptr) override {
    Hook("HostFree");
    std::unique_lock<std::shared_mutex> lock(host_mu_);  // waits for replayed copies using it
    auto it = host_.find(ptr);
    if (it == host_.end()) FailArg("HostFree", "ptr", "a pointer returned by HostAlloc");
    munmap(it->first, it->second);
    host_.erase(it);
  }

  // ---- streams and events

  StreamId CreateStream(int device) override {
    Hook("CreateStream");
    CheckDevice("CreateStream", device);
    auto s = std::make_shared<Stream>();
    s->device = device;
    std::lock_guard<std::mutex> lock(mu_);
    s->id = NextId();
    try {
      s->worker = std::thread([this, raw = s.get()] { RunWorker(*raw); });
    } catch (const std::system_error& e) {
      Fail(ErrorKind::kInternal, "CreateStream", e.code().value(), "MOCK_ERROR_THREAD", e.what());
    }
    streams_[s->id] = s;
    return s->id;
  }

  void DestroyStream(StreamId stream) override {
    const char* api = "DestroyStream";
    Hook(api);
    std::shared_ptr<Stream> s;
    std::optional<Status> capturing;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s = FindStream(api, stream);
      streams_.erase(stream);
      if (std::shared_ptr<Capture> c = s->capture) {
        if (c->origin == stream) {
          // The capture is abandoned: nothing can end it any more.
          EndCaptureLocked(c);
        } else {
          // As on cuda, where the synchronize before the destroy fails: the
          // stream goes, the capture it was part of is invalidated.
          capturing = MakeStatus(
              ErrorKind::kNotSupported, api, kCodeCaptureUnsupported,
              "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED",
              "stream " + std::to_string(stream) + " was part of the capture begun on stream " +
                  std::to_string(c->origin) +
                  " (it cannot be synchronized before it is destroyed); it is destroyed and that "
                  "capture is invalidated: EndCapture on stream " + std::to_string(c->origin) +
                  " ends it with an error");
          if (!c->invalid) c->invalid = capturing;
          c->frontier.erase(stream);
          s->capture.reset();
        }
      }
    }
    StopWorker(*s);  // drains the queue first
    if (capturing) throw Error(*capturing);
  }

  void SynchronizeStream(StreamId stream) override {
    const char* api = "SynchronizeStream";
    Hook(api, stream);
    std::shared_ptr<Stream> s;
    {
      std::lock_guard<std::mutex> lock(mu_);
      s = FindStream(api, stream);
      if (s->capture) {
        CheckCaptureUsable(api, *s);
        FailInCapture(s->capture.get(), ErrorKind::kNotSupported, api, kCodeCaptureUnsupported,
                      "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED",
                      "stream " + std::to_string(stream) + " is capturing (" +
                          CaptureText(*s->capture) +
                          "): its work is recorded, not run, so there is nothing to wait for; "
                          "synchronize before BeginCapture or after EndCapture");
      }
    }
    {
      std::unique_lock<std::mutex> lock(s->mu);
      s->cv.wait(lock, [&] { return s->queue.empty() && !s->busy; });
      if (s->error) {
        Status st = std::move(*s->error);
        s->error.reset();
        st.api = api;  // reported here, like cuStreamSynchronize; the message names the op
        throw Error(std::move(st));
      }
    }
    CheckNotPoisoned(api, s->device);
  }

  EventId CreateEvent(int device, bool timing) override {
    Hook("CreateEvent");
    CheckDevice("CreateEvent", device);
    auto e = std::make_shared<Event>();
    e->device = device;
    e->timing = timing;
    std::lock_guard<std::mutex> lock(mu_);
    EventId id = NextId();
    events_[id] = std::move(e);
    return id;
  }

  void DestroyEvent(EventId event) override {
    Hook("DestroyEvent");
    std::lock_guard<std::mutex> lock(mu_);
    FindEvent("DestroyEvent", event);
    events_.erase(event);  // queued records and waits hold their own reference
  }

  void RecordEvent(EventId event, StreamId stream) override {
    const char* api = "RecordEvent";
    Hook(api, stream);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<Event> e = FindEvent(api, event);
    std::shared_ptr<Stream> s = FindStream(api, stream);
    if (e->device != s->device) {
      FailArg(api, "stream", "on the event's device " + std::to_string(e->device) + " (stream " +
                                 std::to_string(stream) + " is on device " +
                                 std::to_string(s->device) + ")");
    }
    if (s->capture) {
      // A captured record marks the stream's captured work so far: a stream that
      // waits on it depends on those nodes (and joins the capture). Nothing is queued.
      CheckCaptureUsable(api, *s);
      e->captured = s->capture;
      e->captured_nodes = s->capture->frontier[stream];
      return;
    }
    e->captured.reset();
    e->captured_nodes.clear();
    uint64_t seq;
    {
      std::lock_guard<std::mutex> elock(e->mu);
      seq = ++e->enqueued;
    }
    Enqueue(*s, Op{api, false, [e, seq] {
                     std::lock_guard<std::mutex> elock(e->mu);
                     if (seq > e->completed) {  // an older record finishing late changes nothing
                       e->completed = seq;
                       e->time = std::chrono::steady_clock::now();
                     }
                     e->cv.notify_all();
                   }});
  }

  void StreamWaitEvent(StreamId stream, EventId event) override {
    const char* api = "StreamWaitEvent";
    Hook(api, stream);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<Stream> s = FindStream(api, stream);
    std::shared_ptr<Event> e = FindEvent(api, event);
    if (s->capture) CheckCaptureUsable(api, *s);
    if (std::shared_ptr<Capture> from = e->captured) {
      const std::string what = "event " + std::to_string(event) + "'s latest record was captured";
      if (from->ended) {
        FailInCapture(s->capture.get(), ErrorKind::kInvalidArgument, api, kCodeCapturedEvent,
                      "MOCK_ERROR_CAPTURED_EVENT",
                      what + " by a capture that has ended, so it marks no work stream " +
                          std::to_string(stream) +
                          " could wait for; record it again outside capture first");
      }
      if (from->invalid) {
        FailInCapture(s->capture.get(), ErrorKind::kNotSupported, api, kCodeCaptureInvalidated,
                      "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED",
                      what + " by the capture begun on stream " + std::to_string(from->origin) +
                          ", which an earlier call invalidated (" + from->invalid->api + ": " +
                          from->invalid->message + ")");
      }
      if (!s->capture) {
        // CUDA's fork: the waiting stream joins the capture; its next work depends
        // on what the event marks. Work it queued before keeps running as usual.
        s->capture = from;
        from->frontier[stream] = e->captured_nodes;
        return;
      }
      if (s->capture != from) {
        Invalidate(*from, MakeStatus(ErrorKind::kNotSupported, api, kCodeCaptureMerge,
                                     "MOCK_ERROR_STREAM_CAPTURE_MERGE",
                                     "stream " + std::to_string(stream) +
                                         " of another capture waited on " + what + " by it"));
        FailInCapture(s->capture.get(), ErrorKind::kNotSupported, api, kCodeCaptureMerge,
                      "MOCK_ERROR_STREAM_CAPTURE_MERGE",
                      "stream " + std::to_string(stream) + " records into " +
                          CaptureText(*s->capture) + " and " + what + " by " + CaptureText(*from) +
                          ": two captures cannot merge (both are invalidated)");
      }
      std::vector<size_t>& f = from->frontier[stream];
      f.insert(f.end(), e->captured_nodes.begin(), e->captured_nodes.end());
      std::sort(f.begin(), f.end());
      f.erase(std::unique(f.begin(), f.end()), f.end());
      return;
    }
    uint64_t target;
    {
      std::lock_guard<std::mutex> elock(e->mu);
      target = e->enqueued;  // the most recent record at the time of this call
    }
    if (target == 0) return;  // never recorded: nothing to wait for, as in CUDA
    if (s->capture) {
      FailInCapture(s->capture.get(), ErrorKind::kNotSupported, api, kCodeCaptureIsolation,
                    "MOCK_ERROR_STREAM_CAPTURE_ISOLATION",
                    "stream " + std::to_string(stream) + " is capturing (" +
                        CaptureText(*s->capture) + ") and event " + std::to_string(event) +
                        " was recorded outside the capture: a graph cannot depend on work "
                        "outside it; make the stream wait before BeginCapture");
    }
    Enqueue(*s, Op{api, false, [e, target] {
                     std::unique_lock<std::mutex> elock(e->mu);
                     e->cv.wait(elock, [&] { return e->completed >= target; });
                   }});
  }

  void SynchronizeEvent(EventId event) override {
    const char* api = "SynchronizeEvent";
    Hook(api);
    std::shared_ptr<Event> e;
    {
      std::lock_guard<std::mutex> lock(mu_);
      e = FindEvent(api, event);
      CheckNotCaptured(api, event, *e, "");
    }
    {
      std::unique_lock<std::mutex> elock(e->mu);
      uint64_t target = e->enqueued;
      e->cv.wait(elock, [&] { return e->completed >= target; });
    }
    CheckNotPoisoned(api, e->device);
  }

  float ElapsedMs(EventId start, EventId end) override {
    const char* api = "ElapsedMs";
    Hook(api);
    std::shared_ptr<Event> a, b;
    {
      std::lock_guard<std::mutex> lock(mu_);
      a = FindEvent(api, start);
      b = FindEvent(api, end);
      if (a->captured && b->captured) {
        // Both illegal: the one reported below is start's; end's capture is hit too.
        Invalidate(*b->captured,
                   MakeStatus(ErrorKind::kNotSupported, api, kCodeCapturedEvent,
                              "MOCK_ERROR_CAPTURED_EVENT", CapturedEventText(end, *b, " (end)")));
      }
      CheckNotCaptured(api, start, *a, " (start)");
      CheckNotCaptured(api, end, *b, " (end)");
    }
    auto when = [&](const std::shared_ptr<Event>& e, EventId id, const char* arg) {
      if (!e->timing) {
        Fail(ErrorKind::kNotSupported, api, kCodeNotSupported, "MOCK_ERROR_NOT_SUPPORTED",
             "event " + std::to_string(id) + " (" + arg + ") was created without timing");
      }
      std::lock_guard<std::mutex> elock(e->mu);
      if (e->enqueued == 0 || e->completed < e->enqueued) {
        // CUDA answers NOT_READY; there is no such kind, and the caller passed an
        // event it may not use yet, so it is an invalid argument naming which one.
        std::string why = e->enqueued == 0
                              ? "has never been recorded"
                              : "has not completed yet (NOT_READY): synchronize it first";
        Status st = MakeStatus(ErrorKind::kInvalidArgument, api, kCodeNotReady,
                               "MOCK_ERROR_NOT_READY",
                               "event " + std::to_string(id) + " (" + arg + ") " + why);
        st.argument = arg;
        throw Error(std::move(st));
      }
      return e->time;
    };
    auto t0 = when(a, start, "start");
    auto t1 = when(b, end, "end");
    return std::chrono::duration<float, std::milli>(t1 - t0).count();
  }

  // ---- copies (validated when they execute, like device-side faults)

  void CopyDeviceToDevice(DevicePtr dst, DevicePtr src, uint64_t bytes, StreamId stream) override {
    const char* api = "CopyDeviceToDevice";
    Hook(api, stream);
    // A peer copy needs the stream's device to have access to both sides.
    EnqueueMemoryOp(api, stream, bytes, [=](int device) {
      CheckRange(api, stream, device, src, bytes, "source");
      CheckRange(api, stream, device, dst, bytes, "destination");
      std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
    });
  }

  void CopyHostToDevice(DevicePtr dst, const void* src, uint64_t bytes, StreamId stream) override {
    const char* api = "CopyHostToDevice";
    Hook(api, stream);
    if (src == nullptr && bytes > 0) FailArg(api, "src", "a host pointer");
    EnqueueMemoryOp(api, stream, bytes, [=](int device) {
      CheckRange(api, stream, device, dst, bytes, "destination");
      std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
    }, HostSpan{src, "src"});
  }

  void CopyDeviceToHost(void* dst, DevicePtr src, uint64_t bytes, StreamId stream) override {
    const char* api = "CopyDeviceToHost";
    Hook(api, stream);
    if (dst == nullptr && bytes > 0) FailArg(api, "dst", "a host pointer");
    EnqueueMemoryOp(api, stream, bytes, [=](int device) {
      CheckRange(api, stream, device, src, bytes, "source");
      std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
    }, HostSpan{dst, "dst"});
  }

  void MemsetD8(DevicePtr dst, uint8_t value, uint64_t bytes, StreamId stream) override {
    const char* api = "MemsetD8";
    Hook(api, stream);
    EnqueueMemoryOp(api, stream, bytes, [=](int device) {
      CheckRange(api, stream, device, dst, bytes, "destination");
      std::memset(reinterpret_cast<void*>(dst), value, bytes);
    });
  }

  // ---- kernels (CPU twins, resolved by name)

  ModuleId LoadModule(int device, const ModuleSource& source, std::string* log) override {
    const char* api = "LoadModule";
    Hook(api);
    CheckDevice(api, device);
    CheckNotPoisoned(api, device);
    // The mock cannot compile or load device code: any format is accepted and
    // GetFunction resolves names against the registered CPU twins.
    if (log) *log = "mock: module '" + source.name + "' accepted; kernels resolve to CPU twins by name";
    std::lock_guard<std::mutex> lock(mu_);
    ModuleId id = NextId();
    modules_[id] = Module{device};
    return id;
  }

  void UnloadModule(ModuleId module) override {
    Hook("UnloadModule");
    std::lock_guard<std::mutex> lock(mu_);
    if (modules_.erase(module) == 0) InvalidHandle("UnloadModule", "module", module);
    // A module's functions die with it, as in CUDA (queued launches already hold their twin).
    for (auto it = functions_.begin(); it != functions_.end();) {
      it = it->second.module == module ? functions_.erase(it) : std::next(it);
    }
  }

  FunctionId GetFunction(ModuleId module, const std::string& name) override {
    const char* api = "GetFunction";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    auto m = modules_.find(module);
    if (m == modules_.end()) InvalidHandle(api, "module", module);
    MockKernelFn fn = FindMockKernel(name);
    if (!fn) {
      Fail(ErrorKind::kNotFound, api, kCodeNotFound, "MOCK_ERROR_NOT_FOUND",
           "no CPU twin is registered for kernel '" + name + "' in the mock backend");
    }
    FunctionId id = NextId();
    functions_[id] = Function{module, m->second.device, name, fn};
    return id;
  }

  void Launch(FunctionId function, const LaunchConfig& config, StreamId stream,
              const std::vector<KernelArg>& args) override {
    const char* api = "Launch";
    Hook(api, stream);
    std::lock_guard<std::mutex> lock(mu_);
    auto f = functions_.find(function);
    if (f == functions_.end()) InvalidHandle(api, "function", function);
    std::shared_ptr<Stream> s = FindStream(api, stream);
    if (f->second.device != s->device) {
      FailArg(api, "stream", "on device " + std::to_string(f->second.device) + " where kernel '" +
                                 f->second.name + "' was loaded (stream " + std::to_string(stream) +
                                 " is on device " + std::to_string(s->device) + ")");
    }
    CheckNotPoisoned(api, s->device);
    MockKernelFn fn = f->second.fn;
    std::string name = f->second.name;
    int device = s->device;
    // The arguments are copied here: a captured launch replays these values.
    std::function<void()> run = [this, fn, name, config, args, device, stream] {
      std::shared_lock<WriterPreferringLock> map_lock(map_mu_);
      MockKernelContext ctx(config, args, device, name,
                            [&](uint64_t addr, uint64_t bytes, bool write, size_t i) {
                              CheckRange("Launch", stream, device, addr, bytes,
                                         "kernel '" + name + "' argument " + std::to_string(i) +
                                             (write ? " (written)" : " (read)"));
                            });
      fn(ctx);
    };
    if (s->capture) {
      CheckCaptureUsable(api, *s);
      Record(*s, api, true, std::move(run));
      return;
    }
    Enqueue(*s, Op{api, true, std::move(run)});
  }

  // ---- stream capture

  void BeginCapture(StreamId stream) override {
    const char* api = "BeginCapture";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<Stream> s = FindStream(api, stream);
    CheckNotPoisoned(api, s->device);
    if (s->capture) {
      const std::string why =
          s->capture->origin == stream
              ? "is capturing already (BeginCapture was called on it and EndCapture was not)"
              : "is part of " + CaptureText(*s->capture) +
                    " (it waited on an event recorded during it); a stream records into one "
                    "capture at a time";
      FailArgCode(api, "stream", kCodeIllegalState, "MOCK_ERROR_ILLEGAL_STATE",
                  "stream " + std::to_string(stream) + " " + why);
    }
    auto c = std::make_shared<Capture>();
    c->origin = stream;
    c->frontier[stream] = {};
    s->capture = std::move(c);
  }

  GraphId EndCapture(StreamId stream) override { return EndCaptureImpl(stream, false); }
  GraphId EndCaptureDeferred(StreamId stream) override { return EndCaptureImpl(stream, true); }

  void InstantiateGraph(GraphId graph) override {
    const char* api = "InstantiateGraph";
    Hook(api);
    std::lock_guard<std::mutex> lock(mu_);
    if (graphs_.count(graph) == 0) InvalidHandle(api, "graph", graph);
    if (deferred_.erase(graph) == 0) {
      FailArg(api, "graph", "a graph from EndCaptureDeferred that is not instantiated yet (graph " +
                                std::to_string(graph) + " is)");
    }
  }

 private:
  GraphId EndCaptureImpl(StreamId stream, bool defer) {
    const char* api = "EndCapture";
    // An injected fault stands for a failed end or instantiation: like those,
    // it still ends the capture (when `stream` is an origin).
    std::optional<Status> fault = DueFault(api);
    std::lock_guard<std::mutex> lock(mu_);
    if (fault) {
      auto it = streams_.find(stream);
      if (it != streams_.end() && it->second->capture && it->second->capture->origin == stream) {
        EndCaptureLocked(it->second->capture);
      }
      throw Error(*fault);
    }
    std::shared_ptr<Stream> s = FindStream(api, stream);
    std::shared_ptr<Capture> c = s->capture;
    if (!c) {
      FailArgCode(api, "stream", kCodeIllegalState, "MOCK_ERROR_ILLEGAL_STATE",
                  "stream " + std::to_string(stream) + " is not capturing; call BeginCapture first");
    }
    if (c->origin != stream) {
      FailArgCode(api, "stream", kCodeCaptureUnmatched, "MOCK_ERROR_STREAM_CAPTURE_UNMATCHED",
                  "stream " + std::to_string(stream) + " joined " + CaptureText(*c) +
                      " (it waited on an event recorded during it); end the capture on stream " +
                      std::to_string(c->origin));
    }
    EndCaptureLocked(c);  // from here on, whatever happens, no stream captures into it
    if (c->invalid) {
      Fail(ErrorKind::kNotSupported, api, kCodeCaptureInvalidated,
           "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED",
           "the capture on stream " + std::to_string(stream) +
               " was invalidated by an earlier call (" + c->invalid->api + ": " +
               c->invalid->message + "); it has ended without a graph: capture again");
    }
    // Every joined stream must be joined back: its latest captured work must be
    // something the origin's next operation already depends on.
    std::vector<char> joined(c->nodes.size(), 0);
    std::vector<size_t> todo = c->frontier[stream];
    while (!todo.empty()) {
      size_t n = todo.back();
      todo.pop_back();
      if (joined[n]) continue;
      joined[n] = 1;
      todo.insert(todo.end(), c->nodes[n].deps.begin(), c->nodes[n].deps.end());
    }
    std::string unjoined;
    for (const auto& entry : c->frontier) {
      bool ok = std::all_of(entry.second.begin(), entry.second.end(),
                            [&](size_t n) { return joined[n] != 0; });
      if (!ok) unjoined += (unjoined.empty() ? "" : ", ") + std::to_string(entry.first);
    }
    if (!unjoined.empty()) {
      FailArgCode(api, "stream", kCodeCaptureUnjoined, "MOCK_ERROR_STREAM_CAPTURE_UNJOINED",
                  "stream(s) " + unjoined + " joined the capture on stream " +
                      std::to_string(stream) +
                      " and were not joined back: record an event on each after its last "
                      "captured work and make stream " + std::to_string(stream) +
                      " wait on it before EndCapture; the capture has ended without a graph");
    }
    auto g = std::make_shared<Graph>();
    g->id = NextId();
    g->nodes = std::move(c->nodes);
    g->devices.assign(c->devices.begin(), c->devices.end());
    g->order = ReplayOrder(g->nodes);
    graphs_[g->id] = g;
    if (defer) deferred_.insert(g->id);
    return g->id;
  }

 public:

  void LaunchGraph(GraphId graph, StreamId stream) override {
    const char* api = "LaunchGraph";
    Hook(api, stream);
    std::lock_guard<std::mutex> lock(mu_);
    auto it = graphs_.find(graph);
    if (it == graphs_.end()) InvalidHandle(api, "graph", graph);
    if (deferred_.count(graph) != 0) {
      FailArg(api, "graph", "an instantiated graph (graph " + std::to_string(graph) +
                                " came from EndCaptureDeferred: call InstantiateGraph first)");
    }
    std::shared_ptr<const Graph> g = it->second;
    std::shared_ptr<Stream> s = FindStream(api, stream);
    CheckNotPoisoned(api, s->device);
    for (int d : g->devices) CheckNotPoisoned(api, d);
    if (s->capture) {
      // A graph launched into a capture becomes one node of the outer graph.
      CheckCaptureUsable(api, *s);
      s->capture->devices.insert(g->devices.begin(), g->devices.end());
      Record(*s, api, true, [this, g, stream] { Replay(*g, stream); });
      return;
    }
    Enqueue(*s, Op{api, true, [this, g, stream] { Replay(*g, stream); }});
  }

  void DestroyGraph(GraphId graph) override {
    Hook("DestroyGraph");
    std::lock_guard<std::mutex> lock(mu_);
    // Launches already queued hold their own reference and still run.
    if (graphs_.erase(graph) == 0) InvalidHandle("DestroyGraph", "graph", graph);
    deferred_.erase(graph);
  }

  // ---- health and test hooks

  void ResetDevice(int device) override {
    Hook("ResetDevice");
    CheckDevice("ResetDevice", device);
    // Unlike cuda (where the context reset invalidates every resource of the device),
    // the mock only clears the poison and pending stream errors: chunks, mappings,
    // streams and modules stay valid. Callers must not rely on either behaviour.
    std::lock_guard<std::mutex> lock(mu_);
    poisoned_[device] = false;
    for (auto& entry : streams_) {
      if (entry.second->device != device) continue;
      std::lock_guard<std::mutex> slock(entry.second->mu);
      entry.second->error.reset();
    }
  }

  void InjectFault(const std::string& op, uint64_t nth, ErrorKind kind) override {
    bool known = std::any_of(std::begin(kFaultOps), std::end(kFaultOps),
                             [&](const char* name) { return op == name; });
    if (!known) FailArg("InjectFault", "op", "the name of a Backend method (got '" + op + "')");
    if (nth == 0) FailArg("InjectFault", "nth", "at least 1");
    std::lock_guard<std::mutex> lock(fault_mu_);
    faults_.push_back(Fault{op, nth, nth, kind});
  }

  void ClearFaults() override {
    std::lock_guard<std::mutex> lock(fault_mu_);
    faults_.clear();
  }

 private:
  // Counts a call of `op` for every armed fault on it; the error of the one that is due.
  std::optional<Status> DueFault(const char* op) {
    std::lock_guard<std::mutex> lock(fault_mu_);
    if (faults_.empty()) return std::nullopt;
    std::optional<Fault> fire;
    for (auto it = faults_.begin(); it != faults_.end();) {
      if (it->op == op && --it->remaining == 0) {
        if (!fire) fire = *it;  // two faults due on one call: one error, both spent
        it = faults_.erase(it);
      } else {
        ++it;
      }
    }
    if (!fire) return std::nullopt;
    return MakeStatus(fire->kind, op, kCodeInternal, "MOCK_FAULT_INJECTED",
                      "injected fault: " + fire->op + " call #" + std::to_string(fire->nth));
  }

  // Throws the fault due on this call of `op`, if any. Called before mu_ is taken.
  // A fault in an operation queued on a capturing `stream` invalidates its capture,
  // as a failed call during a CUDA capture does.
  void Hook(const char* op, StreamId stream = 0) {
    std::optional<Status> fire = DueFault(op);
    if (!fire) return;
    if (stream != 0) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = streams_.find(stream);
      if (it != streams_.end() && it->second->capture) Invalidate(*it->second->capture, *fire);
    }
    throw Error(*fire);
  }

  ChunkId NextId() { return next_id_++; }  // one counter for every kind: a mix-up never aliases

  void CheckDevice(const char* api, int device, const char* argument = "device") const {
    if (device < 0 || device >= devices_) {
      FailArg(api, argument, "a device ordinal in [0, " + std::to_string(devices_) + ") (got " +
                                 std::to_string(device) + ")");
    }
  }

  static void CheckGranules(const char* api, const char* argument, uint64_t size) {
    if (size == 0 || size % kGranularity != 0) {
      FailArg(api, argument, "a positive multiple of " + std::to_string(kGranularity) + " (got " +
                                 std::to_string(size) + ")");
    }
  }

  void CheckNotPoisoned(const char* api, int device) const {
    if (poisoned_[device]) {
      std::string d = std::to_string(device);
      Fail(ErrorKind::kIllegalAddress, api, kCodeIllegalAddress, "MOCK_ERROR_ILLEGAL_ADDRESS",
           "device " + d + " is poisoned by an earlier illegal address; call ResetDevice(" + d + ")");
    }
  }

  [[noreturn]] static void InvalidHandle(const char* api, const char* kind, uint64_t id) {
    Fail(ErrorKind::kInvalidHandle, api, kCodeInvalidHandle, "MOCK_ERROR_INVALID_HANDLE",
         std::string("unknown ") + kind + " handle " + std::to_string(id));
  }

  // The Find* helpers require mu_.
  std::shared_ptr<ChunkMem> FindChunk(const char* api, ChunkId id) {
    auto it = chunks_.find(id);
    if (it == chunks_.end()) InvalidHandle(api, "chunk", id);
    return it->second;
  }
  std::shared_ptr<Stream> FindStream(const char* api, StreamId id) {
    auto it = streams_.find(id);
    if (it == streams_.end()) InvalidHandle(api, "stream", id);
    return it->second;
  }
  std::shared_ptr<Event> FindEvent(const char* api, EventId id) {
    auto it = events_.find(id);
    if (it == events_.end()) InvalidHandle(api, "event", id);
    return it->second;
  }

  // ---- capture helpers; all require mu_

  static std::string CaptureText(const Capture& c) {
    return "the capture begun on stream " + std::to_string(c.origin);
  }

  static void Invalidate(Capture& c, const Status& why) {
    if (!c.ended && !c.invalid) c.invalid = why;  // the first offence is the one to report
  }

  // Throws this failure of an operation that is illegal during a capture, after
  // invalidating `c` (null: no capture concerned), as CUDA invalidates it.
  [[noreturn]] static void FailInCapture(Capture* c, ErrorKind kind, const char* api, int64_t code,
                                         const char* code_name, const std::string& message) {
    Status st = MakeStatus(kind, api, code, code_name, message);
    if (c != nullptr && !c->ended) {
      Invalidate(*c, st);
      st.message += "; " + CaptureText(*c) + " is invalidated: EndCapture on stream " +
                    std::to_string(c->origin) + " ends it with an error";
    }
    throw Error(std::move(st));
  }

  // Any use of a stream whose capture is invalidated fails until EndCapture (CUDA's rule).
  static void CheckCaptureUsable(const char* api, const Stream& s) {
    const Capture& c = *s.capture;
    if (!c.invalid) return;
    Fail(ErrorKind::kNotSupported, api, kCodeCaptureInvalidated,
         "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED",
         "stream " + std::to_string(s.id) + " records into " + CaptureText(c) +
             ", which an earlier call invalidated (" + c.invalid->api + ": " + c.invalid->message +
             "); call EndCapture on stream " + std::to_string(c.origin) +
             " to end it, then capture again");
  }

  // Synchronizing or timing an event whose latest record was captured is illegal:
  // that record is a set of graph nodes, not work that will complete.
  static void CheckNotCaptured(const char* api, EventId id, const Event& e, const char* which) {
    if (!e.captured) return;
    // While its capture runs: not supported in capture; after it ended, the driver
    // answers INVALID_VALUE (measured on H200, driver 580).
    FailInCapture(e.captured.get(), e.captured->ended ? ErrorKind::kInvalidArgument : ErrorKind::kNotSupported, api,
                  kCodeCapturedEvent,
                  "MOCK_ERROR_CAPTURED_EVENT", CapturedEventText(id, e, which));
  }
  static std::string CapturedEventText(EventId id, const Event& e, const char* which) {
    return "event " + std::to_string(id) + which + "'s latest record was captured by " +
           CaptureText(*e.captured) +
           ", so it marks no work that will complete; record it again outside capture first";
  }

  // Takes every stream of the capture out of capture mode. By value: the streams
  // may hold the last references.
  void EndCaptureLocked(std::shared_ptr<Capture> c) {
    c->ended = true;
    for (const auto& entry : c->frontier) {
      auto it = streams_.find(entry.first);
      if (it != streams_.end() && it->second->capture == c) it->second->capture.reset();
    }
  }

  // Appends a node for work queued on capturing stream `s`, after the stream's
  // current dependencies; the stream's next work depends on it alone.
  void Record(Stream& s, const char* api, bool touches_memory, std::function<void()> run) {
    Capture& c = *s.capture;
    std::vector<size_t>& f = c.frontier[s.id];
    GraphNode n;
    n.api = api;
    n.device = s.device;
    n.stream = s.id;
    n.touches_memory = touches_memory;
    n.run = std::move(run);
    n.deps = f;
    c.nodes.push_back(std::move(n));
    c.devices.insert(s.device);
    f.assign(1, c.nodes.size() - 1);
  }

  // A topological order that, among the nodes ready at each step, runs the one
  // captured last: independent branches replay in the reverse of their capture
  // order, so work that only happened to be ordered by the capture shows up wrong.
  static std::vector<size_t> ReplayOrder(const std::vector<GraphNode>& nodes) {
    std::vector<size_t> pending(nodes.size());
    std::vector<std::vector<size_t>> users(nodes.size());
    std::priority_queue<size_t> ready;
    for (size_t i = 0; i < nodes.size(); ++i) {
      pending[i] = nodes[i].deps.size();
      for (size_t d : nodes[i].deps) users[d].push_back(i);
      if (pending[i] == 0) ready.push(i);
    }
    std::vector<size_t> order;
    order.reserve(nodes.size());
    while (!ready.empty()) {
      size_t n = ready.top();
      ready.pop();
      order.push_back(n);
      for (size_t u : users[n]) {
        if (--pending[u] == 0) ready.push(u);
      }
    }
    return order;  // every node: dependencies only point to earlier nodes
  }

  // Runs every node of `g` on the calling worker (the launch stream's). A node on a
  // device poisoned before it ran does nothing, like work on a dead context; the
  // first failure stops the replay and poisons the node's device if it is an
  // illegal address (the launch stream's worker then poisons its own device too).
  void Replay(const Graph& g, StreamId launch) {
    for (size_t i : g.order) {
      const GraphNode& n = g.nodes[i];
      if (n.touches_memory && poisoned_[n.device]) continue;
      try {
        n.run();
      } catch (const Error& e) {
        Status st = e.status();
        if (st.kind == ErrorKind::kIllegalAddress) poisoned_[n.device] = true;
        st.message = "graph " + std::to_string(g.id) + " launched on stream " +
                     std::to_string(launch) + ", node " + std::to_string(i) + " (" + n.api +
                     " captured on stream " + std::to_string(n.stream) + ", device " +
                     std::to_string(n.device) + "): " + st.message;
        throw Error(std::move(st));
      }
    }
  }

  std::shared_ptr<Stream> GetStream(const char* api, StreamId id) {
    std::lock_guard<std::mutex> lock(mu_);
    return FindStream(api, id);
  }

  // Requires host_mu_ (shared is enough). Whether [p, p+bytes) lies in one live
  // HostAlloc allocation.
  bool HostLiveLocked(const void* p, uint64_t bytes) const {
    auto it = host_.upper_bound(const_cast<void*>(p));
    if (it == host_.begin()) return false;
    --it;
    auto base = reinterpret_cast<uintptr_t>(it->first);
    auto addr = reinterpret_cast<uintptr_t>(p);
    return addr >= base && !Overflows(addr, bytes) && addr + bytes <= base + it->second;
  }

  // Requires mu_. Frees a chunk's memory once released and unmapped everywhere here.
  void MaybeFreeChunk(ChunkMem& mem) {
    if (!mem.released || mem.maps > 0 || mem.fd < 0) return;
    close(mem.fd);
    mem.fd = -1;
    if (!mem.imported) used_[mem.device] -= mem.size;
  }

  // Requires map_mu_.
  bool InsideReservation(uint64_t address, uint64_t size) const {
    if (Overflows(address, size)) return false;
    auto it = reservations_.upper_bound(address);
    if (it == reservations_.begin()) return false;
    --it;
    return address >= it->first && address + size <= it->first + it->second;
  }

  // Requires map_mu_ (shared is enough). Throws the illegal-address error unless every
  // byte of [address, address+bytes) is mapped with access for `device`.
  void CheckRange(const char* api, StreamId stream, int device, uint64_t address, uint64_t bytes,
                  const std::string& what) const {
    std::string problem;
    uint64_t cur = address;
    uint64_t end = Overflows(address, bytes) ? UINT64_MAX : address + bytes;
    while (cur < end && problem.empty()) {
      auto it = mappings_.upper_bound(cur);
      if (it == mappings_.begin() || std::prev(it)->first + std::prev(it)->second.size <= cur) {
        problem = Hex(cur) + " is not mapped";
        break;
      }
      const Mapping& m = std::prev(it)->second;
      if (!std::binary_search(m.access.begin(), m.access.end(), device)) {
        problem = Hex(cur) + " is mapped but device " + std::to_string(device) +
                  " has no access to it (SetAccess lists " + AccessList(m.access) + ")";
      }
      cur = std::prev(it)->first + m.size;
    }
    if (problem.empty()) return;
    Fail(ErrorKind::kIllegalAddress, api, kCodeIllegalAddress, "MOCK_ERROR_ILLEGAL_ADDRESS",
         "illegal address in " + std::string(api) + " on stream " + std::to_string(stream) +
             " (device " + std::to_string(device) + "): " + what + " [" + Hex(address) + ", +" +
             std::to_string(bytes) + "): " + problem);
  }

  static std::string AccessList(const std::vector<int>& access) {
    if (access.empty()) return "no device";
    std::string s = "devices";
    for (int d : access) s += " " + std::to_string(d);
    return s;
  }

  // The shared half of every copy and memset: handle and poison checks at call time;
  // the range checks and the memcpy run on the worker under map_mu_. On a capturing
  // stream the work becomes a graph node instead; a host side must then be HostAlloc
  // memory, and is checked to be still allocated each time the graph runs.
  void EnqueueMemoryOp(const char* api, StreamId stream, uint64_t bytes,
                       std::function<void(int device)> body, HostSpan host = {}) {
    std::lock_guard<std::mutex> lock(mu_);
    std::shared_ptr<Stream> s = FindStream(api, stream);
    CheckNotPoisoned(api, s->device);
    if (s->capture) CheckCaptureUsable(api, *s);
    if (bytes == 0) return;  // nothing to touch, as CUDA accepts empty copies
    int device = s->device;
    if (!s->capture) {
      Enqueue(*s, Op{api, true, [this, body = std::move(body), device] {
                       std::shared_lock<WriterPreferringLock> map_lock(map_mu_);
                       body(device);
                     }});
      return;
    }
    if (host.ptr == nullptr) {
      Record(*s, api, true, [this, body = std::move(body), device] {
        std::shared_lock<WriterPreferringLock> map_lock(map_mu_);
        body(device);
      });
      return;
    }
    {
      std::shared_lock<std::shared_mutex> host_lock(host_mu_);
      if (!HostLiveLocked(host.ptr, bytes)) {
        // Refused before anything is recorded: the capture stays valid.
        Fail(ErrorKind::kNotSupported, api, kCodeCaptureUnsupported,
             "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED",
             std::string(host.argument) + " [" + Hex(reinterpret_cast<uintptr_t>(host.ptr)) +
                 ", +" + std::to_string(bytes) + ") is not pinned memory from HostAlloc, and stream " +
                 std::to_string(stream) + " is capturing (" + CaptureText(*s->capture) +
                 "): a graph copies host memory when it runs, which pageable memory does not "
                 "allow; use a host buffer from HostAlloc");
      }
    }
    Record(*s, api, true, [this, api, stream, body = std::move(body), device, host, bytes] {
      std::shared_lock<std::shared_mutex> host_lock(host_mu_);  // HostFree waits for the copy
      if (!HostLiveLocked(host.ptr, bytes)) {
        Fail(ErrorKind::kIllegalAddress, api, kCodeIllegalAddress, "MOCK_ERROR_ILLEGAL_ADDRESS",
             std::string("illegal address in ") + api + " on stream " + std::to_string(stream) +
                 " (device " + std::to_string(device) + "): host " + host.argument + " [" +
                 Hex(reinterpret_cast<uintptr_t>(host.ptr)) + ", +" + std::to_string(bytes) +
                 ") was freed after it was captured; keep host buffers alive while a graph "
                 "that copies them exists");
      }
      std::shared_lock<WriterPreferringLock> map_lock(map_mu_);
      body(device);
    });
  }

  static void Enqueue(Stream& s, Op op) {
    std::lock_guard<std::mutex> lock(s.mu);
    s.queue.push_back(std::move(op));
    s.cv.notify_all();
  }

  void RunWorker(Stream& s) {
    std::unique_lock<std::mutex> lock(s.mu);
    for (;;) {
      s.cv.wait(lock, [&] { return s.stop || !s.queue.empty(); });
      if (s.queue.empty()) return;  // stop requested and drained
      Op op = std::move(s.queue.front());
      s.queue.pop_front();
      s.busy = true;
      lock.unlock();
      std::optional<Status> failure;
      // Once the device is poisoned, later memory work does nothing (as on a dead
      // CUDA context); records and waits still run so that nothing waits forever.
      if (!op.touches_memory || !poisoned_[s.device]) {
        try {
          op.run();
        } catch (const Error& e) {
          failure = e.status();
        } catch (const std::exception& e) {
          failure = MakeStatus(ErrorKind::kInternal, op.api, kCodeInternal, "MOCK_ERROR_INTERNAL",
                               e.what());
        }
      }
      if (failure && failure->kind == ErrorKind::kIllegalAddress) poisoned_[s.device] = true;
      lock.lock();
      if (failure && !s.error) s.error = std::move(failure);
      s.busy = false;
      s.cv.notify_all();
    }
  }

  static void StopWorker(Stream& s) {
    {
      std::lock_guard<std::mutex> lock(s.mu);
      s.stop = true;
      s.cv.notify_all();
    }
    if (s.worker.joinable()) s.worker.join();
  }

  const int devices_;
  const uint64_t capacity_;

  std::mutex mu_;
  uint64_t next_id_ = 1;
  std::vector<uint64_t> used_;  // bytes of live chunks created here, per device
  std::map<ChunkId, std::shared_ptr<ChunkMem>> chunks_;
  std::map<StreamId, std::shared_ptr<Stream>> streams_;
  std::map<EventId, std::shared_ptr<Event>> events_;
  std::map<ModuleId, Module> modules_;
  std::map<FunctionId, Function> functions_;
  std::map<GraphId, std::shared_ptr<const Graph>> graphs_;
  std::set<GraphId> deferred_;  // from EndCaptureDeferred, not instantiated yet
  std::unique_ptr<std::atomic<bool>[]> poisoned_;  // read by workers without mu_

  std::shared_mutex host_mu_;
  std::map<void*, uint64_t> host_;  // HostAlloc base -> size

  mutable WriterPreferringLock map_mu_;
  std::map<uint64_t, uint64_t> reservations_;  // base -> size
  std::map<uint64_t, Mapping> mappings_;       // address -> mapping

  std::mutex fault_mu_;
  std::vector<Fault> faults_;
};

}  // namespace

ProbeResult ProbeMock(const BackendOptions& options) {
  ProbeResult r;
  r.available = true;
  r.device_count = options.mock_devices;
  r.library = "builtin";
  r.version = "mock-1";
  return r;
}

std::shared_ptr<Backend> CreateMockBackend(const BackendOptions& options) {
  if (options.mock_devices < 1 || options.mock_devices > 64) {
    FailArg("CreateMockBackend", "mockDevices",
            "an integer in [1, 64] (got " + std::to_string(options.mock_devices) + ")");
  }
  if (options.mock_capacity == 0 || options.mock_capacity % kGranularity != 0) {
    FailArg("CreateMockBackend", "mockCapacity",
            "a positive multiple of 2 MiB (" + std::to_string(kGranularity) + " bytes; got " +
                std::to_string(options.mock_capacity) + ")");
  }
  return std::make_shared<MockBackend>(options.mock_devices, options.mock_capacity);
}

}  // namespace emoe

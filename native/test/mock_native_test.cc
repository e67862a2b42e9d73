// Native unit test of the mock backend: the CUDA rules it mirrors (VMM, access,
// sticky illegal addresses, streams, events, sharing), its kernels and its test
// hooks. Plain main(); a failed check prints what failed and exits non-zero.
#include <dirent.h>
#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "backends/mock/mock_backend.h"
#include "backends/mock/mock_kernels.h"
#include "core/backend.h"

using namespace emoe;

namespace {

constexpr uint64_t kMiB = 1ull << 20;
constexpr uint64_t kGran = 2 * kMiB;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      std::exit(1);                                                              \
    }                                                                            \
  } while (0)

bool Contains(const std::string& s, const std::string& needle) {
  return s.find(needle) != std::string::npos;
}

// Runs f, which must throw emoe::Error of `kind` whose code name, message and
// argument contain the given strings (empty = not checked). Returns the status.
Status ExpectErrorAt(const char* expr, int line, const std::function<void()>& f, ErrorKind kind,
                     const std::string& code_name = "", const std::string& needle = "",
                     const std::string& argument = "") {
  try {
    f();
  } catch (const Error& e) {
    const Status& s = e.status();
    bool ok = s.kind == kind && s.backend == "mock" && !s.api.empty() &&
              (code_name.empty() || s.code_name == code_name) &&
              (needle.empty() || Contains(s.message, needle)) &&
              (argument.empty() || s.argument == argument);
    if (!ok) {
      std::fprintf(stderr,
                   "line %d: %s threw the wrong error: kind %s (want %s), api '%s', code_name '%s' "
                   "(want '%s'), argument '%s' (want '%s'), message '%s' (want it to contain '%s')\n",
                   line, expr, ErrorKindName(s.kind), ErrorKindName(kind), s.api.c_str(),
                   s.code_name.c_str(), code_name.c_str(), s.argument.c_str(), argument.c_str(),
                   s.message.c_str(), needle.c_str());
      std::exit(1);
    }
    return s;
  }
  std::fprintf(stderr, "line %d: %s did not throw (want %s)\n", line, expr, ErrorKindName(kind));
  std::exit(1);
}
#define EXPECT_ERROR(expr, ...) ExpectErrorAt(#expr, __LINE__, [&] { expr; }, __VA_ARGS__)

int CountOpenFds() {
  int n = 0;
  DIR* d = opendir("/proc/self/fd");
  while (dirent* e = readdir(d)) n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

// A test-only twin that blocks its stream until the gate opens: makes "still
// running" states deterministic. Registered from this file through the macro.
std::mutex g_gate_mu;
std::condition_variable g_gate_cv;
bool g_gate_open = true;
void CloseGate() {
  std::lock_guard<std::mutex> l(g_gate_mu);
  g_gate_open = false;
}
void OpenGate() {
  std::lock_guard<std::mutex> l(g_gate_mu);
  g_gate_open = true;
  g_gate_cv.notify_all();
}

}  // namespace

EMOE_MOCK_KERNEL(test_gate_wait) {
  std::unique_lock<std::mutex> l(g_gate_mu);
  g_gate_cv.wait(l, [] { return g_gate_open; });
}

namespace {

KernelArg Ptr(DevicePtr p) {
  KernelArg a;
  a.type = ArgType::kPtr;
  a.u64 = p;
  return a;
}
KernelArg U64(uint64_t v) {
  KernelArg a;
  a.type = ArgType::kU64;
  a.u64 = v;
  return a;
}
KernelArg U32(uint32_t v) {
  KernelArg a;
  a.type = ArgType::kU32;
  a.u32 = v;
  return a;
}
KernelArg F32(float v) {
  KernelArg a;
  a.type = ArgType::kF32;
  a.f32 = v;
  return a;
}

BackendOptions Options(int devices, uint64_t capacity) {
  BackendOptions o;
  o.mock_devices = devices;
  o.mock_capacity = capacity;
  return o;
}

// A chunk mapped at a fresh reservation with access for `access`.
struct Buffer {
  DevicePtr base = 0;
  uint64_t size = 0;
  ChunkId chunk = 0;
};
Buffer MakeBuffer(Backend& b, int device, uint64_t size, const std::vector<int>& access,
                  bool exportable = false) {
  Buffer buf;
  buf.size = size;
  buf.base = b.ReserveRange(size, 0);
  buf.chunk = b.CreateChunk(device, size, exportable);
  b.Map(buf.base, size, buf.chunk);
  b.SetAccess(buf.base, size, access);
  return buf;
}
void FreeBuffer(Backend& b, const Buffer& buf) {
  b.Unmap(buf.base, buf.size);
  b.ReleaseChunk(buf.chunk);
  b.FreeRange(buf.base, buf.size);
}

// ---------------------------------------------------------------------------

void TestFactoryAndProbe() {
  EXPECT_ERROR(CreateMockBackend(Options(0, 64 * kMiB)), ErrorKind::kInvalidArgument, "", "", "mockDevices");
  EXPECT_ERROR(CreateMockBackend(Options(65, 64 * kMiB)), ErrorKind::kInvalidArgument, "", "", "mockDevices");
  EXPECT_ERROR(CreateMockBackend(Options(2, 0)), ErrorKind::kInvalidArgument, "", "", "mockCapacity");
  EXPECT_ERROR(CreateMockBackend(Options(2, 3 * kMiB)), ErrorKind::kInvalidArgument, "", "", "mockCapacity");
  ProbeResult p = ProbeMock(Options(5, 64 * kMiB));
  CHECK(p.available && p.device_count == 5 && p.version == "mock-1");
  auto b = CreateMockBackend(Options(64, 2 * kMiB));
  CHECK(b->DeviceCount() == 64);
}

void TestDevices() {
  auto b = CreateMockBackend(Options(4, 64 * kMiB));
  CHECK(std::string(b->Name()) == "mock");
  CHECK(b->DeviceCount() == 4);
  DeviceInfo info = b->GetDeviceInfo(2);
  CHECK(info.ordinal == 2 && info.name == "Mock Device 2" && info.pci_bus_id == "mock:2");
  CHECK(info.total_bytes == 64 * kMiB && info.free_bytes == 64 * kMiB);
  CHECK(info.cc_major == 0 && info.cc_minor == 0 && info.multiprocessors == 4);
  CHECK(b->CanAccessPeer(0, 3) && b->CanAccessPeer(3, 0) && !b->CanAccessPeer(1, 1));
  EXPECT_ERROR(b->GetDeviceInfo(4), ErrorKind::kInvalidArgument, "", "", "device");
  EXPECT_ERROR(b->GetDeviceInfo(-1), ErrorKind::kInvalidArgument, "", "", "device");
  EXPECT_ERROR(b->CanAccessPeer(0, 9), ErrorKind::kInvalidArgument, "", "", "peer");
  CHECK(b->Granularity(3) == kGran);
  EXPECT_ERROR(b->Granularity(7), ErrorKind::kInvalidArgument, "", "", "device");
}

void TestReservations() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  EXPECT_ERROR(b->ReserveRange(0, 0), ErrorKind::kInvalidArgument, "", "", "size");
  EXPECT_ERROR(b->ReserveRange(3 * kMiB, 0), ErrorKind::kInvalidArgument, "", "", "size");
  EXPECT_ERROR(b->ReserveRange(kGran, 3 * kMiB), ErrorKind::kInvalidArgument, "", "", "alignment");
  EXPECT_ERROR(b->ReserveRange(kGran, kMiB), ErrorKind::kInvalidArgument, "", "", "alignment");
  DevicePtr r = b->ReserveRange(8 * kMiB, 0);
  CHECK(r != 0 && r % kGran == 0);
  DevicePtr big = b->ReserveRange(4 * kMiB, 1ull << 30);
  CHECK(big % (1ull << 30) == 0);
  EXPECT_ERROR(b->FreeRange(r, 4 * kMiB), ErrorKind::kInvalidArgument, "", "", "base");
  EXPECT_ERROR(b->FreeRange(r + kGran, 6 * kMiB), ErrorKind::kInvalidArgument, "", "", "base");
  ChunkId c = b->CreateChunk(0, 2 * kMiB, false);
  b->Map(r + 4 * kMiB, 2 * kMiB, c);
  EXPECT_ERROR(b->FreeRange(r, 8 * kMiB), ErrorKind::kInvalidArgument, "", "Unmap", "base");
  b->Unmap(r + 4 * kMiB, 2 * kMiB);
  b->ReleaseChunk(c);
  b->FreeRange(r, 8 * kMiB);
  EXPECT_ERROR(b->FreeRange(r, 8 * kMiB), ErrorKind::kInvalidArgument, "", "", "base");
  b->FreeRange(big, 4 * kMiB);
}

void TestChunksAndCapacity() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  EXPECT_ERROR(b->CreateChunk(0, kMiB, false), ErrorKind::kInvalidArgument, "", "", "size");
  EXPECT_ERROR(b->CreateChunk(0, 0, false), ErrorKind::kInvalidArgument, "", "", "size");
  EXPECT_ERROR(b->CreateChunk(2, kGran, false), ErrorKind::kInvalidArgument, "", "", "device");
  ChunkId a = b->CreateChunk(0, 48 * kMiB, false);
  CHECK(b->ChunkSize(a) == 48 * kMiB && b->ChunkDevice(a) == 0);
  CHECK(b->GetDeviceInfo(0).free_bytes == 16 * kMiB);
  CHECK(b->GetDeviceInfo(1).free_bytes == 64 * kMiB);
  Status s = EXPECT_ERROR(b->CreateChunk(0, 32 * kMiB, false), ErrorKind::kOutOfMemory,
                          "MOCK_ERROR_OUT_OF_MEMORY", "device 0");
  CHECK(Contains(s.message, std::to_string(32 * kMiB)) && Contains(s.message, std::to_string(16 * kMiB)));
  ChunkId c1 = b->CreateChunk(1, 64 * kMiB, false);  // other device: its own capacity
  b->ReleaseChunk(a);
  CHECK(b->GetDeviceInfo(0).free_bytes == 64 * kMiB);
  s = EXPECT_ERROR(b->ReleaseChunk(a), ErrorKind::kInvalidHandle, "", "unknown chunk handle " + std::to_string(a));
  EXPECT_ERROR(b->ChunkSize(a), ErrorKind::kInvalidHandle, "", "unknown chunk handle");
  EXPECT_ERROR(b->ChunkDevice(999999), ErrorKind::kInvalidHandle, "", "unknown chunk handle 999999");
  b->ReleaseChunk(c1);
}

void TestMapRules() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  DevicePtr r = b->ReserveRange(16 * kMiB, 0);
  ChunkId c = b->CreateChunk(0, 4 * kMiB, false);
  ChunkId d = b->CreateChunk(0, 4 * kMiB, false);
  EXPECT_ERROR(b->Map(r, 2 * kMiB, c), ErrorKind::kNotSupported, "MOCK_ERROR_NOT_SUPPORTED", "only whole chunks map");
  EXPECT_ERROR(b->Map(r, 8 * kMiB, c), ErrorKind::kNotSupported, "MOCK_ERROR_NOT_SUPPORTED");
  EXPECT_ERROR(b->Map(r + 4096, 4 * kMiB, c), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->Map(r + 14 * kMiB, 4 * kMiB, c), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->Map(r - 4 * kMiB, 4 * kMiB, c), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->Map(r, 4 * kMiB, 424242), ErrorKind::kInvalidHandle, "", "unknown chunk handle 424242");
  b->Map(r + 2 * kMiB, 4 * kMiB, c);
  EXPECT_ERROR(b->Map(r, 4 * kMiB, d), ErrorKind::kInvalidArgument, "", "overlaps", "address");
  EXPECT_ERROR(b->Map(r + 4 * kMiB, 4 * kMiB, d), ErrorKind::kInvalidArgument, "", "overlaps", "address");
  b->Map(r + 6 * kMiB, 4 * kMiB, d);  // adjacent is fine
  EXPECT_ERROR(b->Unmap(r + 2 * kMiB, 2 * kMiB), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->Unmap(r + 2 * kMiB, 8 * kMiB), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->Unmap(r + 4 * kMiB, 4 * kMiB), ErrorKind::kInvalidArgument, "", "", "address");
  // SetAccess needs whole consecutive mappings.
  EXPECT_ERROR(b->SetAccess(r + 2 * kMiB, 2 * kMiB, {0}), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->SetAccess(r, 6 * kMiB, {0}), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->SetAccess(r + 2 * kMiB, 10 * kMiB, {0}), ErrorKind::kInvalidArgument, "", "", "address");
  EXPECT_ERROR(b->SetAccess(r + 2 * kMiB, 4 * kMiB, {0, 2}), ErrorKind::kInvalidArgument, "", "", "devices");
  b->SetAccess(r + 2 * kMiB, 8 * kMiB, {1, 0, 1});  // two mappings at once; duplicates are fine
  // The real host VA is writable after SetAccess (what copies and twins rely on).
  std::memset(reinterpret_cast<void*>(r + 2 * kMiB), 0x5a, 8 * kMiB);
  b->Unmap(r + 2 * kMiB, 4 * kMiB);
  b->Map(r + 2 * kMiB, 4 * kMiB, c);  // remap: the reservation survived the unmap
  b->Unmap(r + 2 * kMiB, 4 * kMiB);
  b->Unmap(r + 6 * kMiB, 4 * kMiB);
  b->ReleaseChunk(c);
  b->ReleaseChunk(d);
  b->FreeRange(r, 16 * kMiB);
  CHECK(b->GetDeviceInfo(0).free_bytes == 64 * kMiB);
}

void TestCopiesAccessAndPoison() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  StreamId s0 = b->CreateStream(0);
  StreamId s1 = b->CreateStream(1);
  DevicePtr r = b->ReserveRange(16 * kMiB, 0);
  ChunkId c = b->CreateChunk(0, 4 * kMiB, false);
  b->Map(r, 4 * kMiB, c);
  std::vector<uint8_t> host(4 * kMiB), back(4 * kMiB);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<uint8_t>(i * 7 + 3);

  // A fresh mapping has no access: the copy fails when it executes, and poisons device 0.
  b->CopyHostToDevice(r, host.data(), 4096, s0);
  Status s = EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kIllegalAddress,
                          "MOCK_ERROR_ILLEGAL_ADDRESS", "has no access");
  CHECK(s.api == "SynchronizeStream" && Contains(s.message, "CopyHostToDevice") && Contains(s.message, "device 0"));
  EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kIllegalAddress, "MOCK_ERROR_ILLEGAL_ADDRESS",
               "device 0 is poisoned by an earlier illegal address; call ResetDevice(0)");
  EXPECT_ERROR(b->CopyHostToDevice(r, host.data(), 16, s0), ErrorKind::kIllegalAddress, "", "poisoned");
  EXPECT_ERROR(b->MemsetD8(r, 0, 16, s0), ErrorKind::kIllegalAddress, "", "poisoned");
  EXPECT_ERROR(b->CreateChunk(0, kGran, false), ErrorKind::kIllegalAddress, "", "poisoned");
  ModuleSource src;
  EXPECT_ERROR(b->LoadModule(0, src, nullptr), ErrorKind::kIllegalAddress, "", "poisoned");
  b->SynchronizeStream(s1);  // device 1 is unaffected
  ChunkId other = b->CreateChunk(1, kGran, false);
  b->ReleaseChunk(other);
  b->ResetDevice(0);
  b->SynchronizeStream(s0);

  // With access, data round-trips; memset and device-to-device copies work.
  b->SetAccess(r, 4 * kMiB, {0});
  b->CopyHostToDevice(r, host.data(), host.size(), s0);
  b->MemsetD8(r + 100, 0xee, 50, s0);
  b->CopyDeviceToDevice(r + kMiB, r, 4096, s0);
  b->CopyDeviceToHost(back.data(), r, back.size(), s0);
  b->SynchronizeStream(s0);
  for (size_t i = 0; i < host.size(); ++i) {
    uint8_t want = (i >= 100 && i < 150) ? 0xee : host[i];
    if (i >= kMiB && i < kMiB + 4096) want = (i - kMiB >= 100 && i - kMiB < 150) ? 0xee : host[i - kMiB];
    if (back[i] != want) {
      std::fprintf(stderr, "byte %zu: %u != %u\n", i, back[i], want);
      CHECK(false);
    }
  }

  // Aliasing: the same chunk at a second address shows the same bytes.
  b->Map(r + 8 * kMiB, 4 * kMiB, c);
  b->SetAccess(r + 8 * kMiB, 4 * kMiB, {0});
  std::vector<uint8_t> alias(4096);
  b->CopyDeviceToHost(alias.data(), r + 8 * kMiB + 200, 4096, s0);
  b->SynchronizeStream(s0);
  CHECK(std::memcmp(alias.data(), back.data() + 200, 4096) == 0);

  // A copy that runs past the mapping into unmapped reservation space: illegal, does nothing.
  uint8_t sentinel = reinterpret_cast<uint8_t*>(r)[4 * kMiB - 1];
  std::vector<uint8_t> ones(8192, 1);
  b->CopyHostToDevice(r + 4 * kMiB - 4096, ones.data(), 8192, s0);
  EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kIllegalAddress, "", "is not mapped");
  CHECK(reinterpret_cast<uint8_t*>(r)[4 * kMiB - 1] == sentinel);
  b->ResetDevice(0);

  // Peer copies need access to both sides for the stream's device.
  DevicePtr r1 = b->ReserveRange(4 * kMiB, 0);
  ChunkId c1 = b->CreateChunk(1, 4 * kMiB, false);
  b->Map(r1, 4 * kMiB, c1);
  b->SetAccess(r1, 4 * kMiB, {1});
  b->CopyDeviceToDevice(r1, r, 4096, s0);  // device 0 cannot touch r1
  EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kIllegalAddress, "", "destination");
  b->ResetDevice(0);
  b->CopyDeviceToDevice(r1, r, 4096, s1);  // device 1 cannot touch r
  EXPECT_ERROR(b->SynchronizeStream(s1), ErrorKind::kIllegalAddress, "", "source");
  b->ResetDevice(1);
  b->SetAccess(r1, 4 * kMiB, {0, 1});
  b->CopyDeviceToDevice(r1, r, 4096, s0);
  std::vector<uint8_t> peer(4096);
  b->SynchronizeStream(s0);
  b->CopyDeviceToHost(peer.data(), r1, 4096, s1);
  b->SynchronizeStream(s1);
  CHECK(std::memcmp(peer.data(), back.data(), 4096) == 0);

  // An empty access list takes access away again (and the pages back to PROT_NONE).
  b->SetAccess(r1, 4 * kMiB, {});
  b->CopyDeviceToHost(peer.data(), r1, 16, s1);
  EXPECT_ERROR(b->SynchronizeStream(s1), ErrorKind::kIllegalAddress, "", "no device");
  b->ResetDevice(1);

  // After an error, queued work on the poisoned device does nothing until reset.
  // The gate holds the stream so that both copies are queued before the first runs.
  ModuleId gm = b->LoadModule(0, src, nullptr);
  CloseGate();
  b->Launch(b->GetFunction(gm, "test_gate_wait"), LaunchConfig{}, s0, {});
  std::vector<uint8_t> untouched(16, 0xab);
  b->CopyDeviceToHost(untouched.data(), r + 12 * kMiB, 16, s0);  // unmapped: poisons
  b->CopyDeviceToHost(untouched.data(), r, 16, s0);              // skipped
  OpenGate();
  EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kIllegalAddress, "", "not mapped");
  CHECK(untouched[0] == 0xab);
  b->ResetDevice(0);
  b->CopyDeviceToHost(untouched.data(), r, 0, s0);  // empty copies are accepted
  b->SynchronizeStream(s0);
  EXPECT_ERROR(b->CopyDeviceToHost(nullptr, r, 16, s0), ErrorKind::kInvalidArgument, "", "", "dst");
  EXPECT_ERROR(b->CopyHostToDevice(r, nullptr, 16, s0), ErrorKind::kInvalidArgument, "", "", "src");
  EXPECT_ERROR(b->MemsetD8(r, 0, 16, 777777), ErrorKind::kInvalidHandle, "", "unknown stream handle 777777");

  b->Unmap(r1, 4 * kMiB);
  b->ReleaseChunk(c1);
  b->FreeRange(r1, 4 * kMiB);
  b->Unmap(r, 4 * kMiB);
  b->Unmap(r + 8 * kMiB, 4 * kMiB);
  b->ReleaseChunk(c);
  b->FreeRange(r, 16 * kMiB);
  b->DestroyStream(s0);
  b->DestroyStream(s1);
  EXPECT_ERROR(b->SynchronizeStream(s0), ErrorKind::kInvalidHandle, "", "unknown stream handle");
  CHECK(b->GetDeviceInfo(0).free_bytes == 64 * kMiB && b->GetDeviceInfo(1).free_bytes == 64 * kMiB);
}

void TestReleaseWhileMapped() {
  auto b = CreateMockBackend(Options(3, 64 * kMiB));
  StreamId s = b->CreateStream(2);
  Buffer buf = MakeBuffer(*b, 2, 8 * kMiB, {2});
  DevicePtr alias = b->ReserveRange(8 * kMiB, 0);
  b->Map(alias, 8 * kMiB, buf.chunk);
  b->SetAccess(alias, 8 * kMiB, {2});
  b->ReleaseChunk(buf.chunk);
  EXPECT_ERROR(b->ChunkSize(buf.chunk), ErrorKind::kInvalidHandle, "", "unknown chunk handle");
  EXPECT_ERROR(b->Map(alias, 8 * kMiB, buf.chunk), ErrorKind::kInvalidHandle);
  CHECK(b->GetDeviceInfo(2).free_bytes == 56 * kMiB);  // still mapped: still counted
  uint32_t v = 0xfeedbeef, out = 0;
  b->CopyHostToDevice(buf.base + 64, &v, 4, s);
  b->CopyDeviceToHost(&out, alias + 64, 4, s);
  b->SynchronizeStream(s);
  CHECK(out == v);
  b->Unmap(buf.base, 8 * kMiB);
  CHECK(b->GetDeviceInfo(2).free_bytes == 56 * kMiB);  // one mapping left
  b->Unmap(alias, 8 * kMiB);
  CHECK(b->GetDeviceInfo(2).free_bytes == 64 * kMiB);  // freed at the last unmap
  b->FreeRange(buf.base, 8 * kMiB);
  b->FreeRange(alias, 8 * kMiB);
}

std::string g_self = "/proc/self/exe";  // argv[0] when it is a path (valgrind owns /proc/self/exe)

std::vector<uint32_t> SharedPattern() {
  std::vector<uint32_t> pattern(kMiB);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint32_t>(i * 2654435761u);
  return pattern;
}

// The importing process of TestSharing: `fd` is the exported chunk (device 3, 4 MiB).
int ImportChild(int fd) {
  try {
    auto cb = CreateMockBackend(Options(4, 64 * kMiB));
    ChunkId ic = cb->ImportChunk(fd, 3, 4 * kMiB);
    close(fd);
    DevicePtr r = cb->ReserveRange(4 * kMiB, 0);
    cb->Map(r, 4 * kMiB, ic);
    cb->SetAccess(r, 4 * kMiB, {3});
    StreamId cs = cb->CreateStream(3);
    std::vector<uint32_t> seen(kMiB);
    cb->CopyDeviceToHost(seen.data(), r, 4 * kMiB, cs);
    uint32_t mark = 0xc0ffee;
    cb->CopyHostToDevice(r + 4 * kMiB - 4, &mark, 4, cs);
    cb->SynchronizeStream(cs);
    if (seen != SharedPattern()) {
      std::fprintf(stderr, "import child: bytes differ from the exporter's\n");
      return 2;
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "import child: %s\n", e.what());
    return 3;
  }
}

void TestSharing() {
  auto b = CreateMockBackend(Options(4, 64 * kMiB));
  StreamId s = b->CreateStream(3);
  ChunkId plain = b->CreateChunk(3, kGran, false);
  EXPECT_ERROR(b->ExportChunk(plain), ErrorKind::kNotSupported, "MOCK_ERROR_NOT_SUPPORTED", "exportable");
  b->ReleaseChunk(plain);

  Buffer src = MakeBuffer(*b, 3, 4 * kMiB, {3}, true);
  std::vector<uint32_t> pattern = SharedPattern();
  b->CopyHostToDevice(src.base, pattern.data(), 4 * kMiB, s);
  b->SynchronizeStream(s);

  int fd = static_cast<int>(b->ExportChunk(src.chunk));
  CHECK(fd >= 0 && (fcntl(fd, F_GETFD) & FD_CLOEXEC));
  EXPECT_ERROR(b->ImportChunk(fd, 2, 4 * kMiB), ErrorKind::kInvalidArgument, "", "", "device");
  EXPECT_ERROR(b->ImportChunk(fd, 3, 8 * kMiB), ErrorKind::kInvalidArgument, "", "", "size");
  EXPECT_ERROR(b->ImportChunk(fd, 9, 4 * kMiB), ErrorKind::kInvalidArgument, "", "", "device");
  int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  EXPECT_ERROR(b->ImportChunk(devnull, 3, 4 * kMiB), ErrorKind::kInvalidArgument, "", "", "shareable");
  close(devnull);
  EXPECT_ERROR(b->ImportChunk(100000, 3, 4 * kMiB), ErrorKind::kInvalidArgument, "", "not open", "shareable");
  b->AllowImport(fd, {1234});
  CHECK(b->ImportPid() == getpid());

  ChunkId imported = b->ImportChunk(fd, 3, 4 * kMiB);
  CHECK(b->ChunkSize(imported) == 4 * kMiB && b->ChunkDevice(imported) == 3);
  CHECK(b->GetDeviceInfo(3).free_bytes == 60 * kMiB);  // imports do not count here

  // Another process (a fresh one: spawned, not forked) imports the same fd into its
  // own backend, checks the bytes and writes a mark.
  int inheritable = fcntl(fd, F_DUPFD, 0);  // without FD_CLOEXEC, for the child only
  std::string fd_arg = std::to_string(inheritable);
  char* child_argv[] = {const_cast<char*>("mock_native_test"), const_cast<char*>("--import-child"),
                        const_cast<char*>(fd_arg.c_str()), nullptr};
  pid_t child = 0;
  CHECK(posix_spawn(&child, g_self.c_str(), nullptr, nullptr, child_argv, environ) == 0);
  close(inheritable);
  int status = 0;
  CHECK(waitpid(child, &status, 0) == child);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  close(fd);  // the importer dup()ed its own

  // The exporter releases and unmaps; the import keeps the bytes alive.
  FreeBuffer(*b, src);
  CHECK(b->GetDeviceInfo(3).free_bytes == 64 * kMiB);
  DevicePtr r = b->ReserveRange(4 * kMiB, 0);
  b->Map(r, 4 * kMiB, imported);
  b->SetAccess(r, 4 * kMiB, {3});
  std::vector<uint32_t> seen(kMiB);
  b->CopyDeviceToHost(seen.data(), r, 4 * kMiB, s);
  b->SynchronizeStream(s);
  CHECK(seen.back() == 0xc0ffee);
  seen.back() = pattern.back();
  CHECK(std::memcmp(seen.data(), pattern.data(), 4 * kMiB) == 0);
  // An import can be exported again.
  int again = static_cast<int>(b->ExportChunk(imported));
  close(again);
  b->Unmap(r, 4 * kMiB);
  b->ReleaseChunk(imported);
  b->FreeRange(r, 4 * kMiB);
}

void TestHostMemory() {
  auto b = CreateMockBackend(Options(1, 64 * kMiB));
  EXPECT_ERROR(b->HostAlloc(0), ErrorKind::kInvalidArgument, "", "", "size");
  void* p = b->HostAlloc(100);
  CHECK(p != nullptr && reinterpret_cast<uintptr_t>(p) % 4096 == 0);
  std::memset(p, 1, 100);
  int local = 0;
  EXPECT_ERROR(b->HostFree(&local), ErrorKind::kInvalidArgument, "", "", "ptr");
  b->HostFree(p);
  EXPECT_ERROR(b->HostFree(p), ErrorKind::kInvalidArgument, "", "", "ptr");
  b->HostAlloc(3 * kMiB);  // left for the destructor
}

void TestStreamsAndEvents() {
  auto b = CreateMockBackend(Options(2, 256 * kMiB));
  Buffer big = MakeBuffer(*b, 0, 64 * kMiB, {0, 1});
  StreamId a = b->CreateStream(0);
  StreamId c = b->CreateStream(0);
  StreamId peer = b->CreateStream(1);
  EventId e = b->CreateEvent(0, false);

  // A wait on a never-recorded event is a no-op, as is synchronizing it.
  b->StreamWaitEvent(c, e);
  b->SynchronizeEvent(e);

  // Cross-stream ordering: c (and a stream of another device) see a's writes only
  // through the event. Slow memsets first make a race likely if the wait were broken.
  for (uint32_t round = 1; round <= 20; ++round) {
    b->MemsetD8(big.base + kMiB, static_cast<uint8_t>(round), 48 * kMiB, a);
    b->CopyHostToDevice(big.base, &round, 4, a);
    b->RecordEvent(e, a);
    b->StreamWaitEvent(c, e);
    b->StreamWaitEvent(peer, e);
    uint32_t seen_c = 0, seen_peer = 0;
    b->CopyDeviceToHost(&seen_c, big.base, 4, c);
    b->CopyDeviceToHost(&seen_peer, big.base, 4, peer);
    b->SynchronizeStream(c);
    b->SynchronizeStream(peer);
    CHECK(seen_c == round && seen_peer == round);
  }
  b->SynchronizeStream(a);

  // Timing events.
  EventId t0 = b->CreateEvent(0, true), t1 = b->CreateEvent(0, true);
  EXPECT_ERROR(b->ElapsedMs(t0, t1), ErrorKind::kInvalidArgument, "MOCK_ERROR_NOT_READY", "never been recorded", "start");
  b->RecordEvent(t0, a);
  b->MemsetD8(big.base, 0, 64 * kMiB, a);
  b->RecordEvent(t1, a);
  b->SynchronizeEvent(t1);
  float ms = b->ElapsedMs(t0, t1);
  CHECK(ms >= 0.0f && ms < 60000.0f);
  EXPECT_ERROR(b->ElapsedMs(e, t1), ErrorKind::kNotSupported, "", "without timing");
  EXPECT_ERROR(b->RecordEvent(t0, peer), ErrorKind::kInvalidArgument, "", "", "stream");

  // A blocked stream: NOT_READY, in-order execution, and the waits that must hold.
  ModuleSource src;
  ModuleId m = b->LoadModule(0, src, nullptr);
  FunctionId gate = b->GetFunction(m, "test_gate_wait");
  CloseGate();
  b->Launch(gate, LaunchConfig{}, a, {});
  b->RecordEvent(t1, a);
  EXPECT_ERROR(b->ElapsedMs(t0, t1), ErrorKind::kInvalidArgument, "MOCK_ERROR_NOT_READY", "not completed", "end");
  std::atomic<bool> synced{false};
  std::thread waiter([&] {
    b->SynchronizeEvent(t1);
    synced = true;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK(!synced);
  OpenGate();
  waiter.join();
  CHECK(synced);
  b->ElapsedMs(t0, t1);

  // DestroyStream waits for queued work.
  StreamId doomed = b->CreateStream(0);
  uint32_t late = 0x12345678;
  CloseGate();
  b->Launch(gate, LaunchConfig{}, doomed, {});
  b->CopyHostToDevice(big.base + 32, &late, 4, doomed);
  std::thread opener([] {
    std::this_thread::sleep_for(std::chrono::milliseconds(30));
    OpenGate();
  });
  b->DestroyStream(doomed);
  opener.join();
  CHECK(*reinterpret_cast<uint32_t*>(big.base + 32) == late);
  EXPECT_ERROR(b->DestroyStream(doomed), ErrorKind::kInvalidHandle, "", "unknown stream handle");

  // Destroying an event with queued records is safe; later use is an invalid handle.
  CloseGate();
  b->Launch(gate, LaunchConfig{}, a, {});
  b->RecordEvent(e, a);
  b->DestroyEvent(e);
  EXPECT_ERROR(b->SynchronizeEvent(e), ErrorKind::kInvalidHandle, "", "unknown event handle");
  OpenGate();
  b->SynchronizeStream(a);
  b->UnloadModule(m);
  b->DestroyEvent(t0);
  b->DestroyEvent(t1);
  b->DestroyStream(a);
  b->DestroyStream(c);
  b->DestroyStream(peer);
  FreeBuffer(*b, big);
}

uint64_t Checksum(const std::vector<uint32_t>& v) {
  uint64_t sum = 0;
  for (size_t i = 0; i < v.size(); ++i) sum += static_cast<uint64_t>(v[i]) * (i + 1);
  return sum;
}

void TestKernels() {
  auto names = MockKernelNames();
  for (const char* want : {"emoe_fill_u32", "emoe_vector_add_f32", "emoe_scale_f32", "emoe_checksum_u32", "test_gate_wait"}) {
    CHECK(std::find(names.begin(), names.end(), want) != names.end());
  }
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  StreamId s = b->CreateStream(0);
  StreamId s1 = b->CreateStream(1);
  ModuleSource src;
  src.format = ModuleFormat::kPtx;
  src.data = ".version 8.0";
  src.name = "tests.ptx";
  std::string log;
  ModuleId m = b->LoadModule(0, src, &log);
  CHECK(!log.empty());
  EXPECT_ERROR(b->LoadModule(5, src, &log), ErrorKind::kInvalidArgument, "", "", "device");
  EXPECT_ERROR(b->GetFunction(m, "no_such_kernel"), ErrorKind::kNotFound, "",
               "no CPU twin is registered for kernel 'no_such_kernel' in the mock backend");
  EXPECT_ERROR(b->GetFunction(m + 1000, "emoe_fill_u32"), ErrorKind::kInvalidHandle, "", "unknown module handle");
  FunctionId fill = b->GetFunction(m, "emoe_fill_u32");
  FunctionId add = b->GetFunction(m, "emoe_vector_add_f32");
  FunctionId scale = b->GetFunction(m, "emoe_scale_f32");
  FunctionId sum = b->GetFunction(m, "emoe_checksum_u32");

  constexpr uint64_t n = 100000;
  Buffer buf = MakeBuffer(*b, 0, 4 * kMiB, {0});
  DevicePtr x = buf.base, y = buf.base + kMiB, z = buf.base + 2 * kMiB, out = buf.base + 3 * kMiB;
  LaunchConfig cfg;
  cfg.grid[0] = 391;
  cfg.block[0] = 256;

  b->Launch(fill, cfg, s, {Ptr(x), U32(0xabcd1234u), U64(n)});
  std::vector<uint32_t> words(n);
  b->CopyDeviceToHost(words.data(), x, n * 4, s);
  b->SynchronizeStream(s);
  for (uint32_t w : words) CHECK(w == 0xabcd1234u);

  std::vector<float> fa(n), fb(n), fo(n);
  for (uint64_t i = 0; i < n; ++i) {
    fa[i] = 0.5f * static_cast<float>(i);
    fb[i] = 3.0f - static_cast<float>(i % 17);
  }
  b->CopyHostToDevice(x, fa.data(), n * 4, s);
  b->CopyHostToDevice(y, fb.data(), n * 4, s);
  b->Launch(add, cfg, s, {Ptr(z), Ptr(x), Ptr(y), U64(n)});
  b->Launch(scale, cfg, s, {Ptr(z), F32(-2.0f), U64(n)});
  b->CopyDeviceToHost(fo.data(), z, n * 4, s);
  b->SynchronizeStream(s);
  for (uint64_t i = 0; i < n; ++i) CHECK(fo[i] == (fa[i] + fb[i]) * -2.0f);

  std::vector<uint32_t> data(n);
  for (uint64_t i = 0; i < n; ++i) data[i] = static_cast<uint32_t>(i * 2654435761u + 12345u);
  b->CopyHostToDevice(x, data.data(), n * 4, s);
  b->Launch(sum, cfg, s, {Ptr(out), Ptr(x), U64(n)});
  uint64_t got = 0;
  b->CopyDeviceToHost(&got, out, 8, s);
  b->SynchronizeStream(s);
  CHECK(got == Checksum(data));
  std::swap(data[10], data[11]);  // position-sensitive
  CHECK(got != Checksum(data));

  // Argument errors surface at synchronize (the twin's reads define the list).
  b->Launch(fill, cfg, s, {Ptr(x), U32(1)});
  EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kInvalidArgument, "", "at least 3", "args");
  b->Launch(fill, cfg, s, {Ptr(x), U64(1), U64(n)});
  EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kInvalidArgument, "", "u32", "args");
  b->SynchronizeStream(s);  // argument errors do not poison

  // A twin touching memory out of bounds is an illegal address, like a copy.
  b->Launch(fill, cfg, s, {Ptr(z), U32(7), U64(kMiB)});  // runs past the mapping
  EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kIllegalAddress, "MOCK_ERROR_ILLEGAL_ADDRESS", "emoe_fill_u32");
  EXPECT_ERROR(b->Launch(fill, cfg, s, {Ptr(x), U32(1), U64(1)}), ErrorKind::kIllegalAddress, "", "poisoned");
  b->ResetDevice(0);
  b->Launch(fill, cfg, s, {Ptr(x + 2), U32(7), U64(1)});
  EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kIllegalAddress, "MOCK_ERROR_MISALIGNED_ADDRESS");
  b->ResetDevice(0);

  // A function belongs to its module's device; functions die with their module.
  EXPECT_ERROR(b->Launch(fill, cfg, s1, {Ptr(x), U32(1), U64(1)}), ErrorKind::kInvalidArgument, "", "", "stream");
  b->UnloadModule(m);
  EXPECT_ERROR(b->Launch(fill, cfg, s, {Ptr(x), U32(1), U64(1)}), ErrorKind::kInvalidHandle, "", "unknown function handle");
  EXPECT_ERROR(b->UnloadModule(m), ErrorKind::kInvalidHandle, "", "unknown module handle");
  FreeBuffer(*b, buf);
}

void TestFaultInjection() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  EXPECT_ERROR(b->InjectFault("Bogus", 1, ErrorKind::kInternal), ErrorKind::kInvalidArgument, "", "", "op");
  EXPECT_ERROR(b->InjectFault("Map", 0, ErrorKind::kInternal), ErrorKind::kInvalidArgument, "", "", "nth");

  b->InjectFault("CreateChunk", 2, ErrorKind::kOutOfMemory);
  ChunkId c1 = b->CreateChunk(0, kGran, false);
  Status s = EXPECT_ERROR(b->CreateChunk(0, kGran, false), ErrorKind::kOutOfMemory, "MOCK_FAULT_INJECTED",
                          "injected fault: CreateChunk call #2");
  CHECK(s.api == "CreateChunk");
  ChunkId c2 = b->CreateChunk(0, kGran, false);  // fired once
  CHECK(b->GetDeviceInfo(0).free_bytes == 60 * kMiB);

  // Several armed at once; each fires once, at call time (not on the worker).
  StreamId st = b->CreateStream(0);
  DevicePtr r = b->ReserveRange(4 * kMiB, 0);
  b->InjectFault("Map", 1, ErrorKind::kInternal);
  b->InjectFault("CopyHostToDevice", 1, ErrorKind::kIllegalAddress);
  b->InjectFault("SynchronizeStream", 2, ErrorKind::kInternal);
  b->InjectFault("Launch", 1, ErrorKind::kNotFound);
  EXPECT_ERROR(b->Map(r, kGran, c1), ErrorKind::kInternal, "MOCK_FAULT_INJECTED", "injected fault: Map call #1");
  b->Map(r, kGran, c1);
  b->SetAccess(r, kGran, {0});
  uint32_t v = 5;
  EXPECT_ERROR(b->CopyHostToDevice(r, &v, 4, st), ErrorKind::kIllegalAddress, "MOCK_FAULT_INJECTED");
  b->SynchronizeStream(st);  // injected faults do not poison
  EXPECT_ERROR(b->SynchronizeStream(st), ErrorKind::kInternal, "MOCK_FAULT_INJECTED", "SynchronizeStream call #2");
  EXPECT_ERROR(b->Launch(12345, LaunchConfig{}, st, {}), ErrorKind::kNotFound, "MOCK_FAULT_INJECTED");
  b->CopyHostToDevice(r, &v, 4, st);
  b->SynchronizeStream(st);

  b->InjectFault("Unmap", 1, ErrorKind::kInternal);
  b->InjectFault("ReserveRange", 1, ErrorKind::kOutOfMemory);
  b->ClearFaults();
  b->Unmap(r, kGran);
  b->FreeRange(r, 4 * kMiB);
  b->ReleaseChunk(c1);
  b->ReleaseChunk(c2);
  for (const char* op : {"ExportChunk", "ImportChunk", "CopyDeviceToDevice", "CopyDeviceToHost", "MemsetD8",
                         "CreateStream", "LoadModule", "HostAlloc", "SetAccess"}) {
    b->InjectFault(op, 3, ErrorKind::kInternal);
  }
  b->ClearFaults();
}

// ---------------------------------------------------------------------------
// Stream capture and graphs

// Runs the sequence the graph tests capture: out = 2 * (in + fill), staged
// through `scratch`, then downloaded. Queued on `s` (capturing or not).
void QueueStep(Backend& b, StreamId s, FunctionId fill, FunctionId add, FunctionId scale,
               DevicePtr in, DevicePtr tmp, DevicePtr out, const float* host_in, float* host_out,
               uint64_t n) {
  LaunchConfig cfg;
  b.CopyHostToDevice(in, host_in, n * 4, s);
  b.Launch(fill, cfg, s, {Ptr(tmp), U32(0x3f800000u), U64(n)});  // 1.0f
  b.Launch(add, cfg, s, {Ptr(out), Ptr(in), Ptr(tmp), U64(n)});
  b.MemsetD8(tmp, 0, n * 4, s);
  b.CopyDeviceToDevice(tmp, out, n * 4, s);
  b.Launch(scale, cfg, s, {Ptr(tmp), F32(2.0f), U64(n)});
  b.CopyDeviceToHost(host_out, tmp, n * 4, s);
}

void TestGraphCaptureAndReplay() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  ModuleSource src;
  ModuleId m = b->LoadModule(0, src, nullptr);
  FunctionId fill = b->GetFunction(m, "emoe_fill_u32");
  FunctionId add = b->GetFunction(m, "emoe_vector_add_f32");
  FunctionId scale = b->GetFunction(m, "emoe_scale_f32");
  StreamId s = b->CreateStream(0);
  constexpr uint64_t n = 4096;
  Buffer buf = MakeBuffer(*b, 0, 2 * kMiB, {0});
  DevicePtr in = buf.base, tmp = buf.base + kMiB / 2, out = buf.base + kMiB;
  auto* host_in = static_cast<float*>(b->HostAlloc(n * 4));
  auto* host_out = static_cast<float*>(b->HostAlloc(n * 4));
  for (uint64_t i = 0; i < n; ++i) host_in[i] = static_cast<float>(i);

  // Directly, for reference.
  QueueStep(*b, s, fill, add, scale, in, tmp, out, host_in, host_out, n);
  b->SynchronizeStream(s);
  std::vector<float> direct(host_out, host_out + n);
  CHECK(direct[3] == 8.0f);

  // Captured: nothing runs until the graph is launched.
  std::memset(host_out, 0, n * 4);
  b->MemsetD8(buf.base, 0, 2 * kMiB, s);
  b->SynchronizeStream(s);
  b->BeginCapture(s);
  QueueStep(*b, s, fill, add, scale, in, tmp, out, host_in, host_out, n);
  GraphId g = b->EndCapture(s);
  CHECK(g != 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  CHECK(host_out[3] == 0.0f && *reinterpret_cast<float*>(out + 12) == 0.0f);
  b->LaunchGraph(g, s);
  b->SynchronizeStream(s);
  CHECK(std::memcmp(host_out, direct.data(), n * 4) == 0);

  // A replay reads the host input as it is then, and writes the host output again.
  for (uint64_t i = 0; i < n; ++i) host_in[i] = 100.0f;
  std::memset(host_out, 0, n * 4);
  b->LaunchGraph(g, s);
  b->LaunchGraph(g, s);  // twice in a row: same result
  b->SynchronizeStream(s);
  for (uint64_t i = 0; i < n; ++i) CHECK(host_out[i] == 202.0f);

  // ... and device memory as it is then: a step that consumes device state.
  GraphId bump;
  {
    b->BeginCapture(s);
    b->Launch(scale, LaunchConfig{}, s, {Ptr(out), F32(3.0f), U64(1)});
    bump = b->EndCapture(s);
  }
  *reinterpret_cast<float*>(out) = 1.0f;
  for (int i = 0; i < 4; ++i) b->LaunchGraph(bump, s);
  b->SynchronizeStream(s);
  CHECK(*reinterpret_cast<float*>(out) == 81.0f);

  // An empty capture is a graph that does nothing; a graph can be launched into a capture.
  b->BeginCapture(s);
  GraphId empty = b->EndCapture(s);
  b->BeginCapture(s);
  b->LaunchGraph(bump, s);
  b->LaunchGraph(empty, s);
  b->LaunchGraph(bump, s);
  GraphId outer = b->EndCapture(s);
  b->LaunchGraph(outer, s);
  b->SynchronizeStream(s);
  CHECK(*reinterpret_cast<float*>(out) == 729.0f);

  // A deferred end: the graph launches only once instantiated (on any thread), once.
  b->BeginCapture(s);
  b->Launch(scale, LaunchConfig{}, s, {Ptr(out), F32(2.0f), U64(1)});
  GraphId later = b->EndCaptureDeferred(s);
  EXPECT_ERROR(b->LaunchGraph(later, s), ErrorKind::kInvalidArgument, "", "InstantiateGraph first", "graph");
  std::thread([&] { b->InstantiateGraph(later); }).join();
  EXPECT_ERROR(b->InstantiateGraph(later), ErrorKind::kInvalidArgument, "", "not instantiated yet", "graph");
  b->LaunchGraph(later, s);
  b->SynchronizeStream(s);
  CHECK(*reinterpret_cast<float*>(out) == 1458.0f);
  b->DestroyGraph(later);
  *reinterpret_cast<float*>(out) = 729.0f;  // as it was, for what follows
  // One never instantiated is destroyed as well; a failed instantiation leaves it so.
  b->BeginCapture(s);
  GraphId never = b->EndCaptureDeferred(s);
  b->InjectFault("InstantiateGraph", 1, ErrorKind::kOutOfMemory);
  EXPECT_ERROR(b->InstantiateGraph(never), ErrorKind::kOutOfMemory, "", "");
  EXPECT_ERROR(b->LaunchGraph(never, s), ErrorKind::kInvalidArgument, "", "InstantiateGraph first", "graph");
  b->DestroyGraph(never);
  EXPECT_ERROR(b->InstantiateGraph(never), ErrorKind::kInvalidHandle, "", "unknown graph handle");

  // Destroying a graph with launches still queued is safe; later use is an invalid handle.
  FunctionId gate = b->GetFunction(m, "test_gate_wait");
  CloseGate();
  b->Launch(gate, LaunchConfig{}, s, {});
  b->LaunchGraph(bump, s);
  b->DestroyGraph(bump);
  OpenGate();
  b->SynchronizeStream(s);
  CHECK(*reinterpret_cast<float*>(out) == 2187.0f);
  EXPECT_ERROR(b->LaunchGraph(bump, s), ErrorKind::kInvalidHandle, "", "unknown graph handle");
  EXPECT_ERROR(b->DestroyGraph(bump), ErrorKind::kInvalidHandle, "", "unknown graph handle");
  b->LaunchGraph(outer, s);  // its inner graph lives on inside it
  b->SynchronizeStream(s);
  CHECK(*reinterpret_cast<float*>(out) == 2187.0f * 9.0f);

  // Access rules hold at replay: a graph touching memory the device lost access
  // to fails like the copy itself would (illegal address, device poisoned).
  b->SetAccess(buf.base, 2 * kMiB, {1});
  b->LaunchGraph(g, s);
  Status st = EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kIllegalAddress,
                           "MOCK_ERROR_ILLEGAL_ADDRESS", "has no access");
  CHECK(Contains(st.message, "graph " + std::to_string(g)) && Contains(st.message, "CopyHostToDevice"));
  EXPECT_ERROR(b->LaunchGraph(g, s), ErrorKind::kIllegalAddress, "", "poisoned");
  b->ResetDevice(0);
  b->SetAccess(buf.base, 2 * kMiB, {0});

  // A host buffer freed after capture fails the replay instead of touching freed memory.
  b->HostFree(host_in);
  b->LaunchGraph(g, s);
  EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kIllegalAddress, "", "was freed after it was captured");
  b->ResetDevice(0);

  b->DestroyGraph(g);
  b->DestroyGraph(empty);
  b->DestroyGraph(outer);
  b->HostFree(host_out);
  FreeBuffer(*b, buf);
  b->DestroyStream(s);
}

void TestGraphForkJoin() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  ModuleSource src;
  FunctionId fill0 = b->GetFunction(b->LoadModule(0, src, nullptr), "emoe_fill_u32");
  FunctionId fill1 = b->GetFunction(b->LoadModule(1, src, nullptr), "emoe_fill_u32");
  FunctionId add1 = b->GetFunction(b->LoadModule(1, src, nullptr), "emoe_vector_add_f32");
  StreamId a = b->CreateStream(0), side = b->CreateStream(1), other = b->CreateStream(0);
  EventId fork = b->CreateEvent(0, false), join = b->CreateEvent(1, false);
  constexpr uint64_t n = 1024;
  Buffer x = MakeBuffer(*b, 0, 2 * kMiB, {0, 1});  // written on device 0, read on device 1
  Buffer y = MakeBuffer(*b, 1, 2 * kMiB, {0, 1});  // written on device 1, read on device 0
  auto* host = static_cast<float*>(b->HostAlloc(n * 4));

  // a: x = 1.0 | fork -> side (device 1): y = x + x | join -> a: download y.
  b->BeginCapture(a);
  b->Launch(fill0, LaunchConfig{}, a, {Ptr(x.base), U32(0x3f800000u), U64(n)});
  b->RecordEvent(fork, a);
  b->StreamWaitEvent(side, fork);  // side joins the capture
  b->Launch(add1, LaunchConfig{}, side, {Ptr(y.base), Ptr(x.base), Ptr(x.base), U64(n)});
  b->RecordEvent(join, side);
  EXPECT_ERROR(b->EndCapture(side), ErrorKind::kInvalidArgument, "MOCK_ERROR_STREAM_CAPTURE_UNMATCHED",
               "end the capture on stream " + std::to_string(a), "stream");
  EXPECT_ERROR(b->BeginCapture(side), ErrorKind::kInvalidArgument, "", "is part of", "stream");
  b->StreamWaitEvent(a, join);  // joined back
  b->CopyDeviceToHost(host, y.base, n * 4, a);
  GraphId g = b->EndCapture(a);
  CHECK(host[0] == 0.0f && *reinterpret_cast<float*>(y.base) == 0.0f);
  // Both streams left capture mode: they run work again.
  b->SynchronizeStream(side);
  b->Launch(fill1, LaunchConfig{}, side, {Ptr(y.base + kMiB), U32(7), U64(1)});
  b->SynchronizeStream(side);
  CHECK(*reinterpret_cast<uint32_t*>(y.base + kMiB) == 7);
  // The graph may be launched on any stream; its nodes keep their devices.
  b->LaunchGraph(g, other);
  b->SynchronizeStream(other);
  for (uint64_t i = 0; i < n; ++i) CHECK(host[i] == 2.0f);
  // Events recorded during the capture are not recorded by a replay.
  EXPECT_ERROR(b->SynchronizeEvent(join), ErrorKind::kInvalidArgument, "MOCK_ERROR_CAPTURED_EVENT", "captured");
  b->RecordEvent(join, side);  // recorded outside capture again: usable
  b->SynchronizeEvent(join);

  // A forked stream that is not joined back fails EndCapture; both streams are
  // out of capture mode afterwards.
  b->BeginCapture(a);
  b->RecordEvent(fork, a);
  b->StreamWaitEvent(side, fork);
  b->Launch(fill1, LaunchConfig{}, side, {Ptr(y.base), U32(1), U64(n)});
  Status st = EXPECT_ERROR(b->EndCapture(a), ErrorKind::kInvalidArgument, "MOCK_ERROR_STREAM_CAPTURE_UNJOINED",
                           "were not joined back", "stream");
  CHECK(Contains(st.message, std::to_string(side)));
  b->SynchronizeStream(a);
  b->SynchronizeStream(side);
  EXPECT_ERROR(b->EndCapture(a), ErrorKind::kInvalidArgument, "MOCK_ERROR_ILLEGAL_STATE", "not capturing", "stream");
  // A fork with no work of its own needs no join.
  b->BeginCapture(a);
  b->RecordEvent(fork, a);
  b->StreamWaitEvent(side, fork);
  b->DestroyGraph(b->EndCapture(a));

  // Replays run independent branches in the reverse of their capture order, so
  // an order the capture only happened to give is not kept: here the copy on a
  // does not wait for side's fill (the join comes after it).
  *reinterpret_cast<uint32_t*>(x.base) = 5;
  b->BeginCapture(a);
  b->RecordEvent(fork, a);
  b->StreamWaitEvent(side, fork);
  b->Launch(fill1, LaunchConfig{}, side, {Ptr(x.base), U32(9), U64(1)});
  b->RecordEvent(join, side);
  b->CopyDeviceToDevice(y.base, x.base, 4, a);  // races with the fill
  b->StreamWaitEvent(a, join);
  GraphId racy = b->EndCapture(a);
  b->LaunchGraph(racy, a);
  b->SynchronizeStream(a);
  CHECK(*reinterpret_cast<uint32_t*>(x.base) == 9 && *reinterpret_cast<uint32_t*>(y.base) == 5);
  b->DestroyGraph(racy);

  // Two captures cannot merge.
  b->BeginCapture(a);
  b->BeginCapture(side);
  b->RecordEvent(fork, a);
  EXPECT_ERROR(b->StreamWaitEvent(side, fork), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_MERGE");
  EXPECT_ERROR(b->EndCapture(side), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED");
  EXPECT_ERROR(b->EndCapture(a), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED");

  // Destroying a joined stream invalidates the capture; destroying the origin abandons it.
  StreamId doomed = b->CreateStream(1);
  b->BeginCapture(a);
  b->RecordEvent(fork, a);
  b->StreamWaitEvent(doomed, fork);
  EXPECT_ERROR(b->DestroyStream(doomed), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED");
  EXPECT_ERROR(b->EndCapture(a), ErrorKind::kNotSupported, "", "it is destroyed");
  StreamId origin = b->CreateStream(0);
  b->BeginCapture(origin);
  b->RecordEvent(fork, origin);
  b->StreamWaitEvent(side, fork);
  b->DestroyStream(origin);
  b->SynchronizeStream(side);  // no longer capturing
  EXPECT_ERROR(b->StreamWaitEvent(a, fork), ErrorKind::kInvalidArgument, "MOCK_ERROR_CAPTURED_EVENT", "has ended");

  b->DestroyGraph(g);
  b->HostFree(host);
  FreeBuffer(*b, x);
  FreeBuffer(*b, y);
  b->DestroyEvent(fork);
  b->DestroyEvent(join);
  b->DestroyStream(a);
  b->DestroyStream(side);
  b->DestroyStream(other);
}

void TestGraphIllegalDuringCapture() {
  auto b = CreateMockBackend(Options(2, 64 * kMiB));
  StreamId s = b->CreateStream(0), t = b->CreateStream(0);
  Buffer buf = MakeBuffer(*b, 0, 2 * kMiB, {0});
  auto* pinned = static_cast<uint32_t*>(b->HostAlloc(4096));
  EventId outside = b->CreateEvent(0, true), inside = b->CreateEvent(0, true);

  EXPECT_ERROR(b->BeginCapture(424242), ErrorKind::kInvalidHandle, "", "unknown stream handle");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kInvalidArgument, "MOCK_ERROR_ILLEGAL_STATE", "BeginCapture first", "stream");
  b->BeginCapture(s);
  EXPECT_ERROR(b->BeginCapture(s), ErrorKind::kInvalidArgument, "MOCK_ERROR_ILLEGAL_STATE", "capturing already", "stream");
  // Pageable host memory is refused at once; the capture stays valid.
  std::vector<uint32_t> pageable(16);
  EXPECT_ERROR(b->CopyHostToDevice(buf.base, pageable.data(), 64, s), ErrorKind::kNotSupported,
               "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED", "not pinned memory from HostAlloc");
  EXPECT_ERROR(b->CopyDeviceToHost(pinned + 1020, buf.base, 64, s), ErrorKind::kNotSupported,
               "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED", "dst");  // runs past the buffer
  b->CopyHostToDevice(buf.base, pinned, 64, s);
  b->DestroyGraph(b->EndCapture(s));

  // Synchronizing a capturing stream fails at once (no hang) and invalidates the capture.
  b->BeginCapture(s);
  b->MemsetD8(buf.base, 1, 16, s);
  Status st = EXPECT_ERROR(b->SynchronizeStream(s), ErrorKind::kNotSupported,
                           "MOCK_ERROR_STREAM_CAPTURE_UNSUPPORTED", "is invalidated");
  CHECK(st.api == "SynchronizeStream");
  EXPECT_ERROR(b->MemsetD8(buf.base, 1, 16, s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED",
               "SynchronizeStream");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED",
               "capture again");
  b->SynchronizeStream(s);  // out of capture mode
  CHECK(reinterpret_cast<uint8_t*>(buf.base)[0] != 1);  // the captured memset never ran

  // Waiting on an event recorded outside the capture crosses its boundary.
  b->RecordEvent(outside, t);
  b->BeginCapture(s);
  EXPECT_ERROR(b->StreamWaitEvent(s, outside), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_ISOLATION",
               "before BeginCapture");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED");
  EventId never = b->CreateEvent(0, false);
  b->BeginCapture(s);
  b->StreamWaitEvent(s, never);  // never recorded: a no-op, as in CUDA
  // Synchronizing or timing an event recorded during the capture is illegal.
  b->RecordEvent(inside, s);
  EXPECT_ERROR(b->SynchronizeEvent(inside), ErrorKind::kNotSupported, "MOCK_ERROR_CAPTURED_EVENT",
               "is invalidated");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED");
  b->BeginCapture(s);
  b->RecordEvent(outside, s);
  EXPECT_ERROR(b->ElapsedMs(inside, outside), ErrorKind::kInvalidArgument, "MOCK_ERROR_CAPTURED_EVENT", "(start)");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED");
  // Other streams are unaffected by a capture.
  b->BeginCapture(s);
  b->MemsetD8(buf.base + 64, 2, 16, t);
  b->SynchronizeStream(t);
  CHECK(reinterpret_cast<uint8_t*>(buf.base)[64] == 2);
  b->DestroyGraph(b->EndCapture(s));

  b->DestroyEvent(outside);
  b->DestroyEvent(inside);
  b->DestroyEvent(never);
  b->HostFree(pinned);
  FreeBuffer(*b, buf);
  b->DestroyStream(s);
  b->DestroyStream(t);
}

void TestGraphFaultInjection() {
  auto b = CreateMockBackend(Options(1, 64 * kMiB));
  StreamId s = b->CreateStream(0);
  Buffer buf = MakeBuffer(*b, 0, 2 * kMiB, {0});
  b->InjectFault("BeginCapture", 1, ErrorKind::kInternal);
  EXPECT_ERROR(b->BeginCapture(s), ErrorKind::kInternal, "MOCK_FAULT_INJECTED", "BeginCapture call #1");
  b->SynchronizeStream(s);  // not capturing
  // An EndCapture fault (a failed instantiation) still ends the capture.
  b->BeginCapture(s);
  b->MemsetD8(buf.base, 3, 16, s);
  b->InjectFault("EndCapture", 1, ErrorKind::kOutOfMemory);
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kOutOfMemory, "MOCK_FAULT_INJECTED", "EndCapture call #1");
  b->SynchronizeStream(s);
  CHECK(reinterpret_cast<uint8_t*>(buf.base)[0] == 0);
  // A fault in an operation queued during capture invalidates the capture.
  b->BeginCapture(s);
  b->InjectFault("MemsetD8", 1, ErrorKind::kInternal);
  EXPECT_ERROR(b->MemsetD8(buf.base, 3, 16, s), ErrorKind::kInternal, "MOCK_FAULT_INJECTED");
  EXPECT_ERROR(b->EndCapture(s), ErrorKind::kNotSupported, "MOCK_ERROR_STREAM_CAPTURE_INVALIDATED", "injected fault");
  b->BeginCapture(s);
  b->MemsetD8(buf.base, 4, 16, s);
  GraphId g = b->EndCapture(s);
  b->InjectFault("LaunchGraph", 2, ErrorKind::kIllegalAddress);
  b->LaunchGraph(g, s);
  EXPECT_ERROR(b->LaunchGraph(g, s), ErrorKind::kIllegalAddress, "MOCK_FAULT_INJECTED", "LaunchGraph call #2");
  b->SynchronizeStream(s);  // injected faults do not poison
  CHECK(reinterpret_cast<uint8_t*>(buf.base)[15] == 4);
  b->InjectFault("DestroyGraph", 1, ErrorKind::kInternal);
  EXPECT_ERROR(b->DestroyGraph(g), ErrorKind::kInternal, "MOCK_FAULT_INJECTED");
  b->DestroyGraph(g);
  // The destructor cleans up a capture left open and graphs left behind.
  b->BeginCapture(s);
  b->MemsetD8(buf.base, 5, 16, s);
  b->BeginCapture(b->CreateStream(0));
  b->EndCapture(s);
}

// Streams on every device copying and running kernels while another thread maps,
// sets access and unmaps elsewhere, and others create and release chunks.
void TestConcurrency() {
  auto b = CreateMockBackend(Options(4, 256 * kMiB));
  ModuleSource src;
  std::vector<FunctionId> sums;
  for (int d = 0; d < 4; ++d) sums.push_back(b->GetFunction(b->LoadModule(d, src, nullptr), "emoe_checksum_u32"));
  std::atomic<bool> failed{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      try {
        StreamId s = b->CreateStream(t);
        Buffer buf = MakeBuffer(*b, t, 4 * kMiB, {0, 1, 2, 3});
        std::vector<uint32_t> data(4096), back(4096);
        for (int iter = 0; iter < 200; ++iter) {
          for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint32_t>(t * 1000003 + iter * 31 + i);
          b->CopyHostToDevice(buf.base, data.data(), data.size() * 4, s);
          b->CopyDeviceToDevice(buf.base + kMiB, buf.base, data.size() * 4, s);
          b->MemsetD8(buf.base + 2 * kMiB, 0, 8, s);  // the checksum accumulates into its output
          b->Launch(sums[t], LaunchConfig{}, s, {Ptr(buf.base + 2 * kMiB), Ptr(buf.base + kMiB), U64(data.size())});
          uint64_t got = 0;
          b->CopyDeviceToHost(back.data(), buf.base + kMiB, data.size() * 4, s);
          b->CopyDeviceToHost(&got, buf.base + 2 * kMiB, 8, s);
          b->SynchronizeStream(s);
          if (back != data || got != Checksum(data)) failed = true;
          ChunkId extra = b->CreateChunk(t, kGran, iter % 2 == 0);
          b->ReleaseChunk(extra);
        }
        FreeBuffer(*b, buf);
        b->DestroyStream(s);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "worker %d: %s\n", t, e.what());
        failed = true;
      }
    });
  }
  threads.emplace_back([&] {
    try {
      DevicePtr r = b->ReserveRange(16 * kMiB, 0);
      for (int iter = 0; iter < 300; ++iter) {
        ChunkId c = b->CreateChunk(iter % 4, 8 * kMiB, false);
        b->Map(r + 8 * kMiB * (iter % 2), 8 * kMiB, c);
        b->SetAccess(r + 8 * kMiB * (iter % 2), 8 * kMiB, {iter % 4});
        b->ReleaseChunk(c);
        b->Unmap(r + 8 * kMiB * (iter % 2), 8 * kMiB);
      }
      b->FreeRange(r, 16 * kMiB);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "mapper: %s\n", e.what());
      failed = true;
    }
  });
  for (auto& th : threads) th.join();
  CHECK(!failed);
  for (int d = 0; d < 4; ++d) CHECK(b->GetDeviceInfo(d).free_bytes == 256 * kMiB);
}

// The destructor joins workers and frees everything the user left behind.
void TestDestructorCleansUp() {
  int fds_before = CountOpenFds();
  {
    auto b = CreateMockBackend(Options(2, 64 * kMiB));
    Buffer buf = MakeBuffer(*b, 0, 8 * kMiB, {0, 1}, true);
    b->CreateChunk(1, 4 * kMiB, true);
    int fd = static_cast<int>(b->ExportChunk(buf.chunk));
    b->ImportChunk(fd, 0, 8 * kMiB);
    close(fd);
    b->ReserveRange(64 * kMiB, 0);
    b->HostAlloc(kMiB);
    StreamId s = b->CreateStream(0);
    b->CreateStream(1);
    EventId e = b->CreateEvent(0, true);
    ModuleSource src;
    FunctionId f = b->GetFunction(b->LoadModule(0, src, nullptr), "emoe_fill_u32");
    for (int i = 0; i < 50; ++i) {
      b->MemsetD8(buf.base, static_cast<uint8_t>(i), 8 * kMiB, s);
      b->Launch(f, LaunchConfig{}, s, {Ptr(buf.base), U32(i), U64(kMiB)});
    }
    b->RecordEvent(e, s);
  }
  CHECK(CountOpenFds() == fds_before);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::string(argv[1]) == "--import-child") return ImportChild(std::atoi(argv[2]));
  if (std::strchr(argv[0], '/') != nullptr) g_self = argv[0];
  struct {
    const char* name;
    void (*fn)();
  } tests[] = {
      {"factory and probe", TestFactoryAndProbe},
      {"devices", TestDevices},
      {"reservations", TestReservations},
      {"chunks and capacity", TestChunksAndCapacity},
      {"map rules", TestMapRules},
      {"copies, access and poison", TestCopiesAccessAndPoison},
      {"release while mapped", TestReleaseWhileMapped},
      {"sharing", TestSharing},
      {"host memory", TestHostMemory},
      {"streams and events", TestStreamsAndEvents},
      {"kernels", TestKernels},
      {"fault injection", TestFaultInjection},
      {"graph capture and replay", TestGraphCaptureAndReplay},
      {"graph fork and join", TestGraphForkJoin},
      {"graph illegal during capture", TestGraphIllegalDuringCapture},
      {"graph fault injection", TestGraphFaultInjection},
      {"concurrency", TestConcurrency},
      {"destructor cleans up", TestDestructorCleansUp},
  };
  for (const auto& t : tests) {
    auto start = std::chrono::steady_clock::now();
    try {
      t.fn();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "FAILED %s: unexpected exception: %s\n", t.name, e.what());
      return 1;
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("ok  %-28s %8.1f ms\n", t.name, ms);
  }
  std::printf("all mock native tests passed\n");
  return 0;
}

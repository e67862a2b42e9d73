// Native test of the acl backend against test/fixtures/fake_ascendcl.c (no NPU):
// library loading, probe, argument checks and error mapping. Build and run:
//   gcc -shared -fPIC test/fixtures/fake_ascendcl.c -o /tmp/fake/libascendcl.so && g++ -std=c++17 -Inative native/core/status.cc native/core/dynlib.cc native/core/backend.cc native/backends/acl/*.cc native/test/acl_native_test.cc -ldl -pthread -o /tmp/acl_native_test && /tmp/acl_native_test /tmp/fake/libascendcl.so
// (registry.cc is left out on purpose so this links the acl backend alone.)
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <thread>

#include "backends/acl/acl_backend.h"

using namespace emoe;

namespace {

int failures = 0;

#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

bool Contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// Runs `f`, expects an emoe::Error of `kind`, and returns its status for further checks.
Status ExpectError(const char* what, ErrorKind kind, const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    if (e.status().kind != kind) {
      std::fprintf(stderr, "%s: expected %s, got %s: %s\n", what, ErrorKindName(kind),
                   ErrorKindName(e.status().kind), e.what());
      ++failures;
    }
    return e.status();
  }
  std::fprintf(stderr, "%s: expected %s, nothing thrown\n", what, ErrorKindName(kind));
  ++failures;
  return Status();
}

constexpr uint64_t MiB = 1ull << 20;

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s /path/to/fake/libascendcl.so\n", argv[0]);
    return 2;
  }
  const std::string fake = argv[1];
  ::unsetenv("ASCEND_HOME_PATH");
  ::unsetenv("ASCEND_TOOLKIT_HOME");

  // Library absent: an explicit path is the only candidate; its dlerror is reported.
  {
    BackendOptions o;
    o.acl_library = "/nonexistent/ascend/libascendcl.so";
    ProbeResult p = ProbeAcl(o);
    EXPECT(!p.available);
    EXPECT(Contains(p.reason, "/nonexistent/ascend/libascendcl.so"));
    EXPECT(Contains(p.reason, "cannot open shared object file"));
    Status s = ExpectError("create absent", ErrorKind::kBackendUnavailable,
                           [&] { CreateAclBackend(o); });
    EXPECT(s.backend == "acl");
    EXPECT(Contains(s.message, "/nonexistent/ascend/libascendcl.so"));
  }
  // Default search list: every path tried is named (none exists on this machine).
  {
    ProbeResult p = ProbeAcl(BackendOptions());
    if (!p.available) {
      EXPECT(Contains(p.reason, "libascendcl.so:"));
      EXPECT(Contains(p.reason, "/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so"));
    }
  }

  BackendOptions options;
  options.acl_library = fake;  // the override under test
  {
    ProbeResult p = ProbeAcl(options);
    EXPECT(p.available);
    EXPECT(p.device_count == 2);
    EXPECT(p.library == fake);
  }

  void* lib = dlopen(fake.c_str(), RTLD_NOW | RTLD_NOLOAD);
  EXPECT(lib != nullptr);
  auto stats_fn = reinterpret_cast<void (*)(long*)>(lib ? dlsym(lib, "fake_acl_stats") : nullptr);
  long stats[9] = {0};
  auto stats_now = [&] {
    if (stats_fn) stats_fn(stats);
  };

  {
    std::shared_ptr<Backend> b = CreateAclBackend(options);
    EXPECT(std::string(b->Name()) == "acl");
    EXPECT(b->DeviceCount() == 2);
    DeviceInfo info = b->GetDeviceInfo(1);
    EXPECT(info.name == "Ascend NPU 1");  // the fake has no aclrtGetSocName
    EXPECT(info.total_bytes == 64ull << 30);
    EXPECT(info.free_bytes == 60ull << 30);
    EXPECT(info.cc_major == 0 && info.cc_minor == 0);
    EXPECT(b->Granularity(0) == 2 * MiB);  // the fake also checks the prop layout
    EXPECT(b->CanAccessPeer(0, 0));

    // Out of memory keeps ACL's code, its name and the recent error message.
    Status s = ExpectError("oom", ErrorKind::kOutOfMemory, [&] { b->CreateChunk(0, 2048 * MiB, false); });
    EXPECT(s.code == 207001);
    EXPECT(s.code_name == "ACL_ERROR_RT_MEMORY_ALLOCATION");
    EXPECT(s.api == "aclrtMallocPhysical");
    EXPECT(Contains(s.message, "fake HBM exhausted"));

    // Argument checks name the argument.
    s = ExpectError("bad device", ErrorKind::kInvalidArgument, [&] { b->CreateChunk(2, 2 * MiB, false); });
    EXPECT(s.argument == "device");
    s = ExpectError("negative device", ErrorKind::kInvalidArgument, [&] { b->GetDeviceInfo(-1); });
    EXPECT(s.argument == "device");
    s = ExpectError("bad size", ErrorKind::kInvalidArgument, [&] { b->CreateChunk(0, 3 * MiB, false); });
    EXPECT(s.argument == "size");
    s = ExpectError("range size", ErrorKind::kInvalidArgument, [&] { b->ReserveRange(3 * MiB, 0); });
    EXPECT(s.argument == "size");
    s = ExpectError("alignment", ErrorKind::kInvalidArgument, [&] { b->ReserveRange(4 * MiB, 4096); });
    EXPECT(s.argument == "alignment");

    // Map / SetAccess / Unmap rules.
    const DevicePtr base = b->ReserveRange(8 * MiB, 2 * MiB);
    const ChunkId c = b->CreateChunk(0, 4 * MiB, true);
    EXPECT(b->ChunkSize(c) == 4 * MiB && b->ChunkDevice(c) == 0);
    ExpectError("partial map", ErrorKind::kNotSupported, [&] { b->Map(base, 2 * MiB, c); });
    s = ExpectError("map outside", ErrorKind::kInvalidArgument, [&] { b->Map(base + 6 * MiB, 4 * MiB, c); });
    EXPECT(s.argument == "address");
    b->Map(base, 4 * MiB, c);
    s = ExpectError("overlap", ErrorKind::kInvalidArgument, [&] { b->Map(base + 2 * MiB, 4 * MiB, c); });
    EXPECT(s.argument == "address");
    const ChunkId other = b->CreateChunk(1, 4 * MiB, false);
    ExpectError("mixed devices", ErrorKind::kNotSupported, [&] { b->Map(base + 4 * MiB, 4 * MiB, other); });
    b->SetAccess(base, 4 * MiB, {0});  // the owner only: already granted by the map
    s = ExpectError("peer access without symbol", ErrorKind::kNotSupported,
                    [&] { b->SetAccess(base, 4 * MiB, {0, 1}); });
    EXPECT(s.api == "aclrtMemSetAccess");
    EXPECT(Contains(s.message, "CANN 8.5"));
    EXPECT(Contains(s.message, fake));
    s = ExpectError("gap", ErrorKind::kInvalidArgument, [&] { b->SetAccess(base, 8 * MiB, {0}); });
    EXPECT(s.argument == "address");
    s = ExpectError("access device", ErrorKind::kInvalidArgument, [&] { b->SetAccess(base, 4 * MiB, {5}); });
    EXPECT(s.argument == "devices");
    s = ExpectError("partial unmap", ErrorKind::kInvalidArgument, [&] { b->Unmap(base, 2 * MiB); });
    EXPECT(s.argument == "size");
    ExpectError("free mapped range", ErrorKind::kInvalidArgument, [&] { b->FreeRange(base, 8 * MiB); });
    stats_now();
    const long live_before = stats[5];
    b->ReleaseChunk(c);  // mapped: freed at the unmap, as on CUDA
    ExpectError("released chunk", ErrorKind::kInvalidHandle, [&] { b->ChunkSize(c); });
    stats_now();
    EXPECT(stats[5] == live_before);
    b->Unmap(base, 4 * MiB);
    stats_now();
    EXPECT(stats[5] == live_before - 1);
    b->FreeRange(base, 8 * MiB);
    ExpectError("double free range", ErrorKind::kInvalidArgument, [&] { b->FreeRange(base, 8 * MiB); });

    // Missing optional symbols: kNotSupported naming the symbol.
    const StreamId stream = b->CreateStream(0);
    s = ExpectError("memset", ErrorKind::kNotSupported, [&] { b->MemsetD8(0x1000, 1, 16, stream); });
    EXPECT(s.api == "aclrtMemsetAsync");
    EXPECT(s.code_name == "ACL_SYMBOL_NOT_FOUND");
    ModuleSource src;
    src.format = ModuleFormat::kCudaSource;
    src.data = "__global__ void k() {}";
    s = ExpectError("cuda source", ErrorKind::kNotSupported, [&] { b->LoadModule(0, src, nullptr); });
    EXPECT(Contains(s.message, "CUDA source/PTX cannot run on Ascend"));
    src.format = ModuleFormat::kAscendBinary;
    src.data = "/tmp/does-not-matter.o";
    s = ExpectError("binary load", ErrorKind::kNotSupported, [&] { b->LoadModule(0, src, nullptr); });
    EXPECT(s.api == "aclrtBinaryLoadFromFile");
    EXPECT(Contains(s.message, "CANN 8.2"));
    s = ExpectError("can access peer", ErrorKind::kNotSupported, [&] { b->CanAccessPeer(0, 1); });
    EXPECT(s.api == "aclrtDeviceCanAccessPeer");
    EXPECT(b->ImportPid() == static_cast<int32_t>(getpid()));  // no aclrtDeviceGetBareTgid
    // Stream capture is not implemented on ACL (untested without hardware): a clear refusal.
    s = ExpectError("begin capture", ErrorKind::kNotSupported, [&] { b->BeginCapture(stream); });
    EXPECT(s.backend == "acl" && s.api == "BeginCapture");
    EXPECT(Contains(s.message, "not implemented on the acl backend"));
    ExpectError("end capture", ErrorKind::kNotSupported, [&] { b->EndCapture(stream); });
    s = ExpectError("end capture deferred", ErrorKind::kNotSupported, [&] { b->EndCaptureDeferred(stream); });
    EXPECT(s.api == "EndCapture");
    s = ExpectError("instantiate graph", ErrorKind::kNotSupported, [&] { b->InstantiateGraph(1); });
    EXPECT(s.api == "InstantiateGraph");
    ExpectError("launch graph", ErrorKind::kNotSupported, [&] { b->LaunchGraph(1, stream); });
    ExpectError("destroy graph", ErrorKind::kNotSupported, [&] { b->DestroyGraph(1); });

    // Sharing: ACL refuses a second export, so the backend hands back the first.
    const uint64_t h1 = b->ExportChunk(other);
    EXPECT(b->ExportChunk(other) == h1);
    ExpectError("same-process import", ErrorKind::kNotSupported, [&] { b->ImportChunk(h1, 0, 4 * MiB); });

    // Host memory: async copies accept only pinned memory from HostAlloc.
    void* pinned = b->HostAlloc(4096);
    char unpinned[64];
    s = ExpectError("unpinned copy", ErrorKind::kInvalidArgument,
                    [&] { b->CopyHostToDevice(0x1000, unpinned, sizeof unpinned, stream); });
    EXPECT(s.argument == "src");
    b->HostFree(pinned);
    ExpectError("host double free", ErrorKind::kInvalidHandle, [&] { b->HostFree(pinned); });

    // Handles.
    ExpectError("unknown stream", ErrorKind::kInvalidHandle, [&] { b->SynchronizeStream(999999); });
    ExpectError("chunk id as stream", ErrorKind::kInvalidHandle, [&] { b->SynchronizeStream(other); });
    b->SynchronizeStream(stream);
    b->DestroyStream(stream);
    ExpectError("destroyed stream", ErrorKind::kInvalidHandle, [&] { b->DestroyStream(stream); });

    // ACL's current device is per thread: a worker thread must work too (the fake
    // refuses context calls on a thread that never set a device).
    bool worker_ok = false;
    std::thread worker([&] {
      try {
        const StreamId ws = b->CreateStream(1);
        const ChunkId wc = b->CreateChunk(1, 2 * MiB, false);
        const DevicePtr wr = b->ReserveRange(2 * MiB, 0);
        b->Map(wr, 2 * MiB, wc);
        b->Unmap(wr, 2 * MiB);
        b->FreeRange(wr, 2 * MiB);
        b->ReleaseChunk(wc);
        // Exported there too (createMappedChunks with exportNow: the HMM's chunks once a daemon listens).
        const ChunkId we = b->CreateChunk(1, 2 * MiB, true);
        const uint64_t handle = b->ExportChunk(we);
        if (handle == 0 || b->ExportChunk(we) != handle) throw Error(Status{});
        b->ReleaseChunk(we);
        b->DestroyStream(ws);
        worker_ok = true;
      } catch (const Error& e) {
        std::fprintf(stderr, "worker: %s\n", e.what());
      }
    });
    worker.join();
    EXPECT(worker_ok);

    // Leave a stream, a mapping and a reservation for the destructor to clean up.
    b->CreateStream(1);
    const DevicePtr left = b->ReserveRange(4 * MiB, 0);
    b->Map(left, 4 * MiB, other);
  }
  // Destruction balances every aclrtSetDevice, frees what was left, and
  // finalizes because this process's ACL init was ours.
  stats_now();
  EXPECT(stats[0] == stats[2]);
  EXPECT(stats[1] == stats[3]);
  EXPECT(stats[4] == 1);
  EXPECT(stats[5] == 0);
  EXPECT(stats[6] == 0);
  EXPECT(stats[7] == 0);

  // ResetDevice: resources on the device become invalid handles; counts stay balanced.
  {
    std::shared_ptr<Backend> b = CreateAclBackend(options);
    stats_now();
    EXPECT(stats[8] == 2);  // re-initialised after the finalize above
    const StreamId s0 = b->CreateStream(0);
    const StreamId s1 = b->CreateStream(1);
    b->ResetDevice(0);
    ExpectError("stream after reset", ErrorKind::kInvalidHandle, [&] { b->SynchronizeStream(s0); });
    b->SynchronizeStream(s1);
    b->DestroyStream(s1);
    EXPECT(b->CreateStream(0) != 0);
  }
  stats_now();
  EXPECT(stats[0] == stats[2]);
  EXPECT(stats[1] == stats[3]);
  EXPECT(stats[4] == 2);

  // $ASCEND_HOME_PATH/lib64 is searched when no override is given.
  {
    const std::string home = "/tmp/acl_native_test_home." + std::to_string(getpid());
    ::mkdir(home.c_str(), 0755);
    ::mkdir((home + "/lib64").c_str(), 0755);
    const std::string link = home + "/lib64/libascendcl.so";
    ::unlink(link.c_str());
    char resolved[4096];
    EXPECT(::realpath(fake.c_str(), resolved) != nullptr);
    EXPECT(::symlink(resolved, link.c_str()) == 0);
    ::setenv("ASCEND_HOME_PATH", home.c_str(), 1);
    ProbeResult p = ProbeAcl(BackendOptions());
    EXPECT(p.available);
    EXPECT(p.library == link);
    EXPECT(p.device_count == 2);
    ::unlink(link.c_str());
    ::rmdir((home + "/lib64").c_str());
    ::rmdir(home.c_str());
  }

  if (failures != 0) {
    std::fprintf(stderr, "acl_native_test: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("acl_native_test: all checks passed\n");
  return 0;
}

// Build: g++ -O2 -std=c++17 -pthread scripts/native/attach_ref.cc -ldl -o attach_ref
// Run:   ./attach_ref > attach.jsonl
//
// The floor of "a fresh process attaches weights another process owns", in plain
// C++ against the CUDA driver (no addon, no JavaScript, no protocol): what the
// HMM's attach (scripts/bench-hmm-attach.mjs) could reach at best, by chunk size
// and by the number of threads that import and map.
//
// For each chunk size (BENCH_ATTACH_CHUNKS_MIB, default 10,64,512,4096,32768 MiB;
// 10 MiB is one Qwen3-30B-A3B expert padded to the 2 MiB granularity) the parent
// creates BENCH_ATTACH_BYTES (default 32 GiB) on GPU 0 as exportable chunks,
// fills them with a byte pattern and exports one POSIX fd per chunk. A child
// process (this program re-executed, with its CUDA context created before the
// clock starts, as a standby executor's would be) receives the fds over a Unix
// socket (SCM_RIGHTS) and then, timed: imports every fd, reserves one range,
// maps every chunk into it and sets access once over the whole range; with
// BENCH_ATTACH_THREADS threads (default "1,4") sharing the imports and maps.
// It then reads the first and last bytes through its mapping and checks the
// pattern. The same run measures the pinned-host reload of the same bytes (a
// 1 GiB pinned buffer, cuMemcpyHtoDAsync) as the baseline of the HMM issue.
// Output: one JSON object per line on stdout; a failure prints
// {"source":"ref","error":...} and exits 1.
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <thread>
#include <vector>

#include "cu_min.h"

namespace {
using namespace ref;

constexpr uint64_t kMiB = 1ull << 20;
constexpr unsigned char kPattern = 0x5a;
constexpr size_t kFdsPerMessage = 200;  // below SCM_MAX_FD (253)

CUcontext ctx0 = nullptr;
size_t granularity = 0;

CUmemAllocationProp Prop(bool exportable) {
  CUmemAllocationProp p{};
  p.type = kAllocPinned;
  p.location.type = kLocationDevice;
  p.location.id = 0;
  if (exportable) p.requestedHandleTypes = kHandlePosixFd;
  return p;
}

void InitGpu0() {
  LoadDriver();
  Check(cu.Init(0), "cuInit");
  CUdevice dev = 0;
  Check(cu.DeviceGet(&dev, 0), "cuDeviceGet");
  Check(cu.PrimaryCtxRetain(&ctx0, dev), "cuDevicePrimaryCtxRetain");
  Check(cu.CtxSetCurrent(ctx0), "cuCtxSetCurrent");
  CUmemAllocationProp prop = Prop(true);
  Check(cu.GetGranularity(&granularity, &prop, kGranularityMinimum), "cuMemGetAllocationGranularity");
}

std::vector<uint64_t> EnvList(const char* name, const char* fallback) {
  const char* v = std::getenv(name);
  std::stringstream in(v != nullptr && *v != '\0' ? v : fallback);
  std::vector<uint64_t> out;
  std::string item;
  while (std::getline(in, item, ',')) out.push_back(std::strtoull(item.c_str(), nullptr, 10));
  return out;
}

// Runs fn(i) for i in [0, n) on `threads` threads (contiguous slices), each with
// GPU 0's context current.
template <typename Fn>
void Parallel(size_t n, int threads, Fn fn) {
  std::vector<std::thread> pool;
  const size_t per = (n + threads - 1) / threads;
  for (int t = 0; t < threads; ++t) {
    const size_t lo = t * per, hi = std::min(n, lo + per);
    if (lo >= hi) break;
    pool.emplace_back([lo, hi, &fn] {
      Check(cu.CtxSetCurrent(ctx0), "cuCtxSetCurrent");
      for (size_t i = lo; i < hi; ++i) fn(i);
    });
  }
  for (auto& t : pool) t.join();
}

void SendAll(int sock, const void* data, size_t bytes) {
  const char* p = static_cast<const char*>(data);
  while (bytes > 0) {
    const ssize_t w = send(sock, p, bytes, 0);
    if (w <= 0) Die("send failed");
    p += w;
    bytes -= static_cast<size_t>(w);
  }
}

void RecvAll(int sock, void* data, size_t bytes) {
  char* p = static_cast<char*>(data);
  while (bytes > 0) {
    const ssize_t r = recv(sock, p, bytes, 0);
    if (r <= 0) Die("recv failed");
    p += r;
    bytes -= static_cast<size_t>(r);
  }
}

// One message: a count (u32) and that many fds as ancillary data.
void SendFds(int sock, const int* fds, uint32_t count) {
  std::vector<char> control(CMSG_SPACE(sizeof(int) * count));
  iovec iov{&count, sizeof count};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * count);
  std::memcpy(CMSG_DATA(c), fds, sizeof(int) * count);
  if (sendmsg(sock, &msg, 0) != static_cast<ssize_t>(sizeof count)) Die("sendmsg failed");
}

std::vector<int> RecvFds(int sock) {
  uint32_t count = 0;
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kFdsPerMessage));
  iovec iov{&count, sizeof count};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control.data();
  msg.msg_controllen = control.size();
  if (recvmsg(sock, &msg, MSG_WAITALL) != static_cast<ssize_t>(sizeof count)) Die("recvmsg failed");
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  if (c == nullptr || c->cmsg_type != SCM_RIGHTS || c->cmsg_len != CMSG_LEN(sizeof(int) * count)) {
    Die("message without the announced fds");
  }
  std::vector<int> fds(count);
  std::memcpy(fds.data(), CMSG_DATA(c), sizeof(int) * count);
  return fds;
}

struct Header {
  uint64_t chunks;
  uint64_t chunk_bytes;
  int32_t threads;
};

// The fresh process: context first (untimed), then attach everything, timed by phase.
int Child(int sock) {
  g_program = "attach_ref child";
  const double ctx_t = NowMs();
  InitGpu0();
  const double ctx_ms = NowMs() - ctx_t;
  Header h{};
  const char ready = 'r';
  SendAll(sock, &ready, 1);
  RecvAll(sock, &h, sizeof h);
  const double t0 = NowMs();
  std::vector<int> fds;
  while (fds.size() < h.chunks) {
    std::vector<int> part = RecvFds(sock);
    fds.insert(fds.end(), part.begin(), part.end());
  }
  const double t_recv = NowMs();
  std::vector<CUhandle> handles(h.chunks);
  Parallel(h.chunks, h.threads, [&](size_t i) {
    Check(cu.ImportFromShareableHandle(&handles[i], reinterpret_cast<void*>(static_cast<uintptr_t>(fds[i])),
                                       kHandlePosixFd),
          "cuMemImportFromShareableHandle");
    close(fds[i]);
  });
  const double t_import = NowMs();
  const uint64_t total = h.chunks * h.chunk_bytes;
  CUdeviceptr base = 0;
  Check(cu.AddressReserve(&base, total, granularity, 0, 0), "cuMemAddressReserve");
  const double t_reserve = NowMs();
  Parallel(h.chunks, h.threads, [&](size_t i) {
    Check(cu.Map(base + i * h.chunk_bytes, h.chunk_bytes, 0, handles[i], 0), "cuMemMap");
  });
  const double t_map = NowMs();
  CUmemAccessDesc desc{{kLocationDevice, 0}, kProtReadWrite};
  Check(cu.SetAccess(base, total, &desc, 1), "cuMemSetAccess");
  const double t_access = NowMs();
  unsigned char head = 0, tail = 0;
  Check(cu.MemcpyDtoH(&head, base, 1), "cuMemcpyDtoH");
  Check(cu.MemcpyDtoH(&tail, base + total - 1, 1), "cuMemcpyDtoH");
  const bool ok = head == kPattern && tail == kPattern;
  std::printf("{\"source\":\"ref\",\"bench\":\"attach\",\"chunks\":%llu,\"chunk_bytes\":%llu,\"total_bytes\":%llu,"
              "\"threads\":%d,\"context_ms\":%.2f,\"recv_fds_ms\":%.3f,\"import_ms\":%.3f,\"reserve_ms\":%.3f,"
              "\"map_ms\":%.3f,\"set_access_ms\":%.3f,\"attach_ms\":%.3f,\"us_per_chunk\":%.2f,\"ok\":%s}\n",
              static_cast<unsigned long long>(h.chunks), static_cast<unsigned long long>(h.chunk_bytes),
              static_cast<unsigned long long>(total), h.threads, ctx_ms, t_recv - t0, t_import - t_recv,
              t_reserve - t_import, t_map - t_reserve, t_access - t_map, t_access - t0,
              (t_access - t0) * 1e3 / static_cast<double>(h.chunks), ok ? "true" : "false");
  std::fflush(stdout);
  for (size_t i = 0; i < h.chunks; ++i) Check(cu.Unmap(base + i * h.chunk_bytes, h.chunk_bytes), "cuMemUnmap");
  Check(cu.AddressFree(base, total), "cuMemAddressFree");
  for (CUhandle hd : handles) Check(cu.Release(hd), "cuMemRelease");
  SendAll(sock, &ready, 1);
  return ok ? 0 : 1;
}

// Copies `total` bytes from a 1 GiB pinned host buffer into `base`, as the HMM
// issue's baseline (reloading weights kept in pinned host memory). Best of 2.
double PinnedReloadMs(CUdeviceptr base, uint64_t total) {
  const uint64_t piece = std::min<uint64_t>(total, 1024 * kMiB);
  void* host = nullptr;
  Check(cu.MemHostAlloc(&host, piece, 0), "cuMemHostAlloc");
  std::memset(host, kPattern, piece);
  CUstream s = nullptr;
  Check(cu.StreamCreate(&s, 1), "cuStreamCreate");
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {  // the first is a warm-up
    const double t = NowMs();
    for (uint64_t off = 0; off < total; off += piece) {
      Check(cu.MemcpyHtoDAsync(base + off, host, std::min(piece, total - off), s), "cuMemcpyHtoDAsync");
    }
    Check(cu.StreamSynchronize(s), "cuStreamSynchronize");
    if (rep > 0) best = std::min(best, NowMs() - t);
  }
  Check(cu.MemFreeHost(host), "cuMemFreeHost");
  return best;
}

void RunSize(uint64_t total, uint64_t chunk_bytes, const std::vector<uint64_t>& threads) {
  const uint64_t n = total / chunk_bytes;
  if (n == 0) return;
  total = n * chunk_bytes;
  std::vector<CUhandle> handles(n);
  CUmemAllocationProp prop = Prop(true);
  double t = NowMs();
  for (auto& h : handles) Check(cu.Create(&h, chunk_bytes, &prop, 0), "cuMemCreate");
  const double create_ms = NowMs() - t;
  // The owner's own mapping: fill the pattern, and the pinned reload target.
  CUdeviceptr base = 0;
  Check(cu.AddressReserve(&base, total, granularity, 0, 0), "cuMemAddressReserve");
  for (uint64_t i = 0; i < n; ++i) Check(cu.Map(base + i * chunk_bytes, chunk_bytes, 0, handles[i], 0), "cuMemMap");
  CUmemAccessDesc desc{{kLocationDevice, 0}, kProtReadWrite};
  Check(cu.SetAccess(base, total, &desc, 1), "cuMemSetAccess");
  const double reload_ms = PinnedReloadMs(base, total);  // leaves the pattern everywhere
  std::printf("{\"source\":\"ref\",\"bench\":\"owner\",\"chunks\":%llu,\"chunk_bytes\":%llu,\"total_bytes\":%llu,"
              "\"create_ms\":%.3f,\"pinned_reload_ms\":%.3f,\"pinned_reload_gbps\":%.2f}\n",
              static_cast<unsigned long long>(n), static_cast<unsigned long long>(chunk_bytes),
              static_cast<unsigned long long>(total), create_ms, reload_ms,
              static_cast<double>(total) / (reload_ms / 1e3) / 1e9);
  std::fflush(stdout);

  for (uint64_t th : threads) {
    std::vector<int> fds(n);
    for (uint64_t i = 0; i < n; ++i) {
      Check(cu.ExportToShareableHandle(&fds[i], handles[i], kHandlePosixFd, 0), "cuMemExportToShareableHandle");
    }
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0) Die("socketpair failed");
    const pid_t pid = fork();
    if (pid < 0) Die("fork failed");
    if (pid == 0) {
      close(sv[0]);
      const std::string fd = std::to_string(sv[1]);
      execl("/proc/self/exe", "attach_ref", "--child", fd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    close(sv[1]);
    char ready = 0;
    RecvAll(sv[0], &ready, 1);
    Header h{n, chunk_bytes, static_cast<int32_t>(std::max<uint64_t>(1, th))};
    SendAll(sv[0], &h, sizeof h);
    for (uint64_t i = 0; i < n; i += kFdsPerMessage) {
      SendFds(sv[0], fds.data() + i, static_cast<uint32_t>(std::min<uint64_t>(kFdsPerMessage, n - i)));
    }
    RecvAll(sv[0], &ready, 1);
    int status = 0;
    waitpid(pid, &status, 0);
    close(sv[0]);
    for (int fd : fds) close(fd);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) Die("the attaching child failed");
  }
  for (uint64_t i = 0; i < n; ++i) Check(cu.Unmap(base + i * chunk_bytes, chunk_bytes), "cuMemUnmap");
  Check(cu.AddressFree(base, total), "cuMemAddressFree");
  for (CUhandle h : handles) Check(cu.Release(h), "cuMemRelease");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 3 && std::strcmp(argv[1], "--child") == 0) return Child(std::atoi(argv[2]));
  g_program = "attach_ref";
  InitGpu0();
  const uint64_t total = EnvBytes("BENCH_ATTACH_BYTES", 32768 * kMiB);
  const std::vector<uint64_t> threads = EnvList("BENCH_ATTACH_THREADS", "1,4");
  std::printf("{\"source\":\"ref\",\"bench\":\"attach_info\",\"granularity\":%zu,\"total_bytes\":%llu}\n", granularity,
              static_cast<unsigned long long>(total));
  std::fflush(stdout);
  for (uint64_t mib : EnvList("BENCH_ATTACH_CHUNKS_MIB", "10,64,512,4096,32768")) {
    const uint64_t chunk = (mib * kMiB + granularity - 1) / granularity * granularity;
    RunSize(total, chunk, threads);
  }
  return 0;
}

// Build: g++ -O2 -std=c++17 scripts/native/p2p_ref.cc -ldl -o p2p_ref
// Run:   ./p2p_ref > ref.jsonl      (then: node scripts/compare-p2p.mjs addon.jsonl ref.jsonl)
//
// Reference measurements in plain C++ against the CUDA driver API, to set the
// addon's numbers (scripts/bench-p2p.mjs) against. Independent of the addon on
// purpose: it loads libcuda.so.1 itself and shares no code with native/.
//
//  - P2P copy bandwidth by size (2 MiB .. 1 GiB), GPU 0 -> GPU 1 ("p2p") and
//    back ("p2p_rev"): one VMM chunk per GPU (cuMemCreate, cuMemAddressReserve,
//    cuMemMap, cuMemSetAccess granting both GPUs), cuMemcpyDtoDAsync on a stream
//    of the source GPU, each copy timed by an event pair; 3 warm-up copies, then
//    BENCH_REPS (20) timed ones; best and median GB/s (1 GB = 1e9 bytes).
//  - VMM cost by chunk count on GPU 0: for each total (256 MiB .. 2 GiB) as
//    2 MiB or 64 MiB chunks, wall time of create, map, one set-access over the
//    whole range (GPUs 0 and 1), unmap and release of the batch. The total equal
//    to BENCH_VMM_BYTES (2 GiB) is "vmm" (compared with the addon), others "vmm_scan".
// Output: one JSON object per line on stdout. A failure prints
// {"source":"ref","error":...} and exits 1. Same environment knobs as
// bench-p2p.mjs: BENCH_MAX_BYTES, BENCH_REPS, BENCH_VMM_BYTES.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cu_min.h"

namespace {
using namespace ref;

struct Gpu {
  CUdevice dev = 0;
  CUcontext ctx = nullptr;
  size_t granularity = 0;
  std::string name;
};
std::vector<Gpu> gpus;

void Use(int g) { Check(cu.CtxSetCurrent(gpus[g].ctx), "cuCtxSetCurrent"); }

CUmemAllocationProp PinnedOn(int g) {
  CUmemAllocationProp p{};
  p.type = kAllocPinned;
  p.location.type = kLocationDevice;
  p.location.id = gpus[g].dev;
  return p;
}

uint64_t RoundUp(uint64_t v, uint64_t to) { return (v + to - 1) / to * to; }

// One chunk of `size` on GPU g, mapped into its own reservation, with access
// for every GPU in `access`.
struct Buffer {
  CUdeviceptr ptr = 0;
  CUhandle handle = 0;
  size_t size = 0;
};

Buffer MapBuffer(int g, size_t size, const std::vector<int>& access) {
  Use(g);
  Buffer b;
  b.size = size;
  CUmemAllocationProp prop = PinnedOn(g);
  Check(cu.Create(&b.handle, size, &prop, 0), "cuMemCreate");
  Check(cu.AddressReserve(&b.ptr, size, gpus[g].granularity, 0, 0), "cuMemAddressReserve");
  Check(cu.Map(b.ptr, size, 0, b.handle, 0), "cuMemMap");
  std::vector<CUmemAccessDesc> desc;
  for (int a : access) {
    desc.push_back(CUmemAccessDesc{{kLocationDevice, gpus[a].dev}, kProtReadWrite});
  }
  Check(cu.SetAccess(b.ptr, size, desc.data(), desc.size()), "cuMemSetAccess");
  return b;
}

void FreeBuffer(const Buffer& b) {
  Check(cu.Unmap(b.ptr, b.size), "cuMemUnmap");
  Check(cu.AddressFree(b.ptr, b.size), "cuMemAddressFree");
  Check(cu.Release(b.handle), "cuMemRelease");
}

// Copies src (on GPU `from`) to dst by size, timing each copy on a stream of `from`.
void Bandwidth(const char* bench, int from, int to, const Buffer& src, const Buffer& dst,
               uint64_t max, int reps) {
  Use(from);
  CUstream s = nullptr;
  CUevent t0 = nullptr, t1 = nullptr;
  Check(cu.StreamCreate(&s, 1 /* NON_BLOCKING */), "cuStreamCreate");
  Check(cu.EventCreate(&t0, 0), "cuEventCreate");
  Check(cu.EventCreate(&t1, 0), "cuEventCreate");
  Check(cu.MemsetD8Async(src.ptr, 7, max, s), "cuMemsetD8Async");
  Check(cu.StreamSynchronize(s), "cuStreamSynchronize");
  const uint64_t kMiB = 1ull << 20;
  for (uint64_t mib : {2, 8, 32, 64, 128, 256, 512, 1024}) {
    const uint64_t size = mib * kMiB;
    if (size > max) continue;
    for (int i = 0; i < 3; ++i) {
      Check(cu.MemcpyDtoDAsync(dst.ptr, src.ptr, size, s), "cuMemcpyDtoDAsync");
    }
    std::vector<double> gbps;
    for (int i = 0; i < reps; ++i) {
      Check(cu.EventRecord(t0, s), "cuEventRecord");
      Check(cu.MemcpyDtoDAsync(dst.ptr, src.ptr, size, s), "cuMemcpyDtoDAsync");
      Check(cu.EventRecord(t1, s), "cuEventRecord");
      Check(cu.EventSynchronize(t1), "cuEventSynchronize");
      float ms = 0;
      Check(cu.EventElapsedTime(&ms, t0, t1), "cuEventElapsedTime");
      gbps.push_back(static_cast<double>(size) / (ms / 1e3) / 1e9);
    }
    std::sort(gbps.begin(), gbps.end());
    // Median as bench-p2p.mjs takes it: the element at floor(n / 2).
    std::printf("{\"source\":\"ref\",\"bench\":\"%s\",\"src\":%d,\"dst\":%d,\"bytes\":%llu,"
                "\"reps\":%d,\"best_gbps\":%.2f,\"median_gbps\":%.2f}\n",
                bench, from, to, static_cast<unsigned long long>(size), reps, gbps.back(),
                gbps[gbps.size() / 2]);
    std::fflush(stdout);
  }
  // The data really arrives: one whole-buffer copy, then both ends hold the 7s.
  Check(cu.MemcpyDtoDAsync(dst.ptr, src.ptr, max, s), "cuMemcpyDtoDAsync");
  Check(cu.StreamSynchronize(s), "cuStreamSynchronize");
  unsigned char head[64] = {}, tail[64] = {};
  Check(cu.MemcpyDtoH(head, dst.ptr, sizeof head), "cuMemcpyDtoH");
  Check(cu.MemcpyDtoH(tail, dst.ptr + max - sizeof tail, sizeof tail), "cuMemcpyDtoH");
  bool ok = true;
  for (size_t i = 0; i < sizeof head; ++i) ok = ok && head[i] == 7 && tail[i] == 7;
  std::printf("{\"source\":\"ref\",\"bench\":\"%s_check\",\"src\":%d,\"dst\":%d,\"bytes\":%llu,\"ok\":%s}\n",
              bench, from, to, static_cast<unsigned long long>(max), ok ? "true" : "false");
  if (!ok) Die(std::string(bench) + ": copied data differs from the source");
}

void VmmCost(uint64_t total, uint64_t chunk, const std::vector<int>& access, bool compared) {
  Use(0);
  const size_t n = total / chunk;
  CUdeviceptr base = 0;
  Check(cu.AddressReserve(&base, total, gpus[0].granularity, 0, 0), "cuMemAddressReserve");
  std::vector<CUhandle> handles(n);
  CUmemAllocationProp prop = PinnedOn(0);

  double t = NowMs();
  for (auto& h : handles) Check(cu.Create(&h, chunk, &prop, 0), "cuMemCreate");
  const double create = NowMs() - t;
  t = NowMs();
  for (size_t i = 0; i < n; ++i) {
    Check(cu.Map(base + i * chunk, chunk, 0, handles[i], 0), "cuMemMap");
  }
  const double map = NowMs() - t;
  std::vector<CUmemAccessDesc> desc;
  for (int a : access) {
    desc.push_back(CUmemAccessDesc{{kLocationDevice, gpus[a].dev}, kProtReadWrite});
  }
  t = NowMs();
  Check(cu.SetAccess(base, total, desc.data(), desc.size()), "cuMemSetAccess");
  const double set_access = NowMs() - t;
  t = NowMs();
  for (size_t i = 0; i < n; ++i) Check(cu.Unmap(base + i * chunk, chunk), "cuMemUnmap");
  const double unmap = NowMs() - t;
  t = NowMs();
  for (auto h : handles) Check(cu.Release(h), "cuMemRelease");
  const double release = NowMs() - t;
  Check(cu.AddressFree(base, total), "cuMemAddressFree");

  std::printf("{\"source\":\"ref\",\"bench\":\"%s\",\"total_bytes\":%llu,\"chunk_bytes\":%llu,"
              "\"chunks\":%zu,\"access_devices\":%zu,\"create_ms\":%.3f,\"map_ms\":%.3f,"
              "\"set_access_ms\":%.3f,\"unmap_ms\":%.3f,\"release_ms\":%.3f}\n",
              compared ? "vmm" : "vmm_scan", static_cast<unsigned long long>(total),
              static_cast<unsigned long long>(chunk), n, access.size(), create, map, set_access,
              unmap, release);
  std::fflush(stdout);
}

}  // namespace

int main() {
  g_program = "p2p_ref";
  LoadDriver();
  Check(cu.Init(0), "cuInit");
  int version = 0, count = 0;
  Check(cu.DriverGetVersion(&version), "cuDriverGetVersion");
  Check(cu.DeviceGetCount(&count), "cuDeviceGetCount");
  if (count < 1) Die("no CUDA device");
  const int used = std::min(count, 2);
  for (int i = 0; i < used; ++i) {
    Gpu g;
    Check(cu.DeviceGet(&g.dev, i), "cuDeviceGet");
    char name[256] = {};
    Check(cu.DeviceGetName(name, sizeof name, g.dev), "cuDeviceGetName");
    g.name = name;
    Check(cu.PrimaryCtxRetain(&g.ctx, g.dev), "cuDevicePrimaryCtxRetain");
    gpus.push_back(g);
    Use(i);
    CUmemAllocationProp prop = PinnedOn(i);
    Check(cu.GetGranularity(&gpus[i].granularity, &prop, kGranularityMinimum),
          "cuMemGetAllocationGranularity");
  }
  int peer01 = 0, peer10 = 0;
  if (used == 2) {
    Check(cu.DeviceCanAccessPeer(&peer01, gpus[0].dev, gpus[1].dev), "cuDeviceCanAccessPeer");
    Check(cu.DeviceCanAccessPeer(&peer10, gpus[1].dev, gpus[0].dev), "cuDeviceCanAccessPeer");
  }
  std::printf("{\"source\":\"ref\",\"bench\":\"info\",\"driver_version\":%d,\"devices\":%d,"
              "\"gpu0\":\"%s\",\"gpu1\":\"%s\",\"granularity\":%zu,\"peer_0_1\":%d,\"peer_1_0\":%d}\n",
              version, count, gpus[0].name.c_str(), used == 2 ? gpus[1].name.c_str() : "",
              gpus[0].granularity, peer01, peer10);
  std::fflush(stdout);

  const uint64_t max = RoundUp(EnvBytes("BENCH_MAX_BYTES", 1ull << 30), gpus[0].granularity);
  const int reps = std::max<int>(1, static_cast<int>(EnvBytes("BENCH_REPS", 20)));
  if (used == 2) {
    const Buffer a = MapBuffer(0, max, {0, 1});
    const Buffer b = MapBuffer(1, max, {0, 1});
    Bandwidth("p2p", 0, 1, a, b, max, reps);
    Bandwidth("p2p_rev", 1, 0, b, a, max, reps);
    FreeBuffer(a);
    FreeBuffer(b);
  } else {
    std::printf("{\"source\":\"ref\",\"bench\":\"p2p\",\"skipped\":\"needs 2 GPUs, found %d\"}\n", count);
  }

  const uint64_t kMiB = 1ull << 20;
  const uint64_t compared = EnvBytes("BENCH_VMM_BYTES", 2048 * kMiB);
  std::vector<int> access = {0};
  if (used == 2) access.push_back(1);
  std::vector<uint64_t> totals = {256 * kMiB, 512 * kMiB, 1024 * kMiB, 2048 * kMiB};
  if (std::find(totals.begin(), totals.end(), compared) == totals.end()) totals.push_back(compared);
  for (uint64_t chunk : {2 * kMiB, 64 * kMiB}) {
    for (uint64_t total : totals) {
      if (total % chunk != 0 || chunk % gpus[0].granularity != 0) continue;
      VmmCost(total, chunk, access, total == compared);
    }
  }
  return 0;
}

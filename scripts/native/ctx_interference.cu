// Does one process's driver work stall another process's kernels on the same GPU?
// (Executor processes: the serving process's steps stalled 300-650 ms, one step at a time,
// while another process of the deployment did its own work: docs/benchmarks.md, eleventh session.)
//
//   ctx_interference serve DEV SECONDS KERNEL_US
//     launches a kernel that spins KERNEL_US microseconds, waits for it, again, for SECONDS;
//     prints one JSON line per iteration slower than 3x the median, then a summary.
//   ctx_interference work DEV CHUNKS CHUNK_MIB CUBIN [ops...]
//     runs each op in turn, 700 ms apart, printing {"op", "t0", "t1"} (CLOCK_MONOTONIC ms):
//     ctx (primary context made), module (CUBIN loaded), make (CHUNKS chunks created, mapped,
//     access set), free (unmapped, released), alloc (cuMemAlloc+cuMemFree of 1 GiB),
//     graph (200 launches captured, instantiated, uploaded, launched once), exit (chunks made,
//     then the process exits holding them: "t0" is just before exit).
// Both print times on one clock, so the stalls of one line up with the ops of the other.
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <string>
#include <thread>
#include <unistd.h>
#include <vector>

static double now_ms() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

#define CK(x)                                                              \
  do {                                                                     \
    CUresult r_ = (x);                                                     \
    if (r_ != CUDA_SUCCESS) {                                              \
      const char* s_ = nullptr;                                            \
      cuGetErrorString(r_, &s_);                                           \
      fprintf(stderr, "%s:%d %s -> %d %s\n", __FILE__, __LINE__, #x, r_, s_ ? s_ : "?"); \
      exit(1);                                                             \
    }                                                                      \
  } while (0)

__global__ void spin(long long cycles) {
  long long start = clock64();
  while (clock64() - start < cycles) {
  }
}

static int serve(int dev, double seconds, double kernel_us) {
  cudaSetDevice(dev);
  int khz = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, dev);
  long long cycles = (long long)(kernel_us * khz / 1e3);
  cudaStream_t s;
  cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  spin<<<1, 1, 0, s>>>(cycles);
  cudaStreamSynchronize(s);
  std::vector<double> t0s, lat;
  double end = now_ms() + seconds * 1e3;
  while (now_ms() < end) {
    double a = now_ms();
    spin<<<132, 32, 0, s>>>(cycles);
    if (cudaStreamSynchronize(s) != cudaSuccess) return 1;
    t0s.push_back(a);
    lat.push_back(now_ms() - a);
  }
  std::vector<double> sorted = lat;
  std::sort(sorted.begin(), sorted.end());
  double med = sorted[sorted.size() / 2];
  double lost = 0;
  for (size_t i = 0; i < lat.size(); i++) {
    if (lat[i] > 3 * med) {
      printf("{\"role\":\"serve\",\"dev\":%d,\"t0\":%.3f,\"ms\":%.3f}\n", dev, t0s[i], lat[i]);
    }
    lost += lat[i] - med;
  }
  printf("{\"role\":\"serve-summary\",\"dev\":%d,\"iterations\":%zu,\"medianMs\":%.4f,\"maxMs\":%.3f,\"p99Ms\":%.3f,\"lostMs\":%.1f}\n", dev,
         lat.size(), med, sorted.back(), sorted[sorted.size() * 99 / 100], lost);
  return 0;
}

struct Chunks {
  CUdeviceptr base = 0;
  size_t size = 0;
  std::vector<CUmemGenericAllocationHandle> handles;
};

static Chunks make(int dev, int n, size_t bytes) {
  Chunks c;
  c.size = bytes;
  CUmemAllocationProp prop = {};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = dev;
  prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  CK(cuMemAddressReserve(&c.base, bytes * n, 0, 0, 0));
  CUmemAccessDesc acc = {};
  acc.location = prop.location;
  acc.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  for (int i = 0; i < n; i++) {
    CUmemGenericAllocationHandle h;
    CK(cuMemCreate(&h, bytes, &prop, 0));
    CK(cuMemMap(c.base + i * bytes, bytes, 0, h, 0));
    CK(cuMemSetAccess(c.base + i * bytes, bytes, &acc, 1));
    c.handles.push_back(h);
  }
  return c;
}

static void release(Chunks& c) {
  for (size_t i = 0; i < c.handles.size(); i++) {
    CK(cuMemUnmap(c.base + i * c.size, c.size));
    CK(cuMemRelease(c.handles[i]));
  }
  CK(cuMemAddressFree(c.base, c.size * c.handles.size()));
  c.handles.clear();
}

static int work(int dev, int n, size_t mib, const char* cubin, int nops, char** ops) {
  auto mark = [](const char* op, double t0, double t1, const char* extra = "") {
    printf("{\"role\":\"work\",\"op\":\"%s\",\"t0\":%.3f,\"t1\":%.3f,\"ms\":%.3f%s}\n", op, t0, t1, t1 - t0, extra);
    fflush(stdout);
  };
  CUcontext ctx = nullptr;
  Chunks chunks;
  for (int i = 0; i < nops; i++) {
    std::this_thread::sleep_for(std::chrono::milliseconds(700));
    std::string op = ops[i];
    double t0 = now_ms();
    if (op == "ctx") {
      CK(cuInit(0));
      CUdevice d;
      CK(cuDeviceGet(&d, dev));
      CK(cuDevicePrimaryCtxRetain(&ctx, d));
      CK(cuCtxSetCurrent(ctx));
      CUdeviceptr p;
      CK(cuMemAlloc(&p, 1 << 20));
      CK(cuMemFree(p));
    } else if (op == "module") {
      CUmodule m;
      CK(cuModuleLoad(&m, cubin));
    } else if (op == "make") {
      chunks = make(dev, n, mib << 20);
    } else if (op == "free") {
      release(chunks);
    } else if (op == "alloc") {
      CUdeviceptr p;
      CK(cuMemAlloc(&p, 1ull << 30));
      CK(cuMemFree(p));
    } else if (op == "graph") {
      CUstream s;
      CK(cuStreamCreate(&s, CU_STREAM_NON_BLOCKING));
      cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal);
      for (int k = 0; k < 200; k++) spin<<<1, 32, 0, s>>>(10);
      cudaGraph_t g;
      cudaStreamEndCapture(s, &g);
      cudaGraphExec_t ge;
      if (cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) return 1;
      cudaGraphUpload(ge, s);
      cudaGraphLaunch(ge, s);
      cudaStreamSynchronize(s);
    } else if (op == "exit") {
      chunks = make(dev, n, mib << 20);
      double t1 = now_ms();
      mark("exit-made", t0, t1);
      mark("exit", t1, t1);
      _exit(0);
    } else {
      fprintf(stderr, "unknown op %s\n", op.c_str());
      return 2;
    }
    mark(op.c_str(), t0, now_ms());
  }
  return 0;
}

int main(int argc, char** argv) {
  if (argc >= 5 && !strcmp(argv[1], "serve")) return serve(atoi(argv[2]), atof(argv[3]), atof(argv[4]));
  if (argc >= 6 && !strcmp(argv[1], "work")) return work(atoi(argv[2]), atoi(argv[3]), atoll(argv[4]), argv[5], argc - 6, argv + 6);
  fprintf(stderr, "usage: ctx_interference serve DEV SECONDS KERNEL_US | work DEV CHUNKS CHUNK_MIB CUBIN ops...\n");
  return 2;
}

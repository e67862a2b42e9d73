#include "napi/backend_wrap.h"

#include <unistd.h>

#include <cstring>
#include <string>
#include <unordered_set>
#include <utility>
#include <vector>

#include "napi/chunk_wrap.h"
#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/event_wrap.h"
#include "napi/host_buffer_wrap.h"
#include "napi/module_wrap.h"
#include "napi/promise_worker.h"
#include "napi/range_wrap.h"
#include "napi/stream_wrap.h"
#include "napi/wrap.h"

namespace emoe::napi {
namespace {

ModuleFormat ToModuleFormat(const Napi::Value& value) {
  std::string format = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  if (format == "ptx") return ModuleFormat::kPtx;
  if (format == "cubin") return ModuleFormat::kCubin;
  if (format == "cuda") return ModuleFormat::kCudaSource;
  if (format == "ascend") return ModuleFormat::kAscendBinary;
  ThrowArgument("format", "one of 'ptx', 'cubin', 'cuda', 'ascend'");
}

ErrorKind ToErrorKind(const Napi::Value& value) {
  std::string name = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  for (int k = static_cast<int>(ErrorKind::kInvalidArgument);
       k <= static_cast<int>(ErrorKind::kInternal); ++k) {
    if (name == ErrorKindName(static_cast<ErrorKind>(k))) return static_cast<ErrorKind>(k);
  }
  ThrowArgument("kind", "an error kind such as 'OUT_OF_MEMORY' or 'ILLEGAL_ADDRESS'");
}

// Loads (and for CUDA source, compiles) a module off the main thread.
class LoadModuleWorker : public PromiseWorker {
 public:
  LoadModuleWorker(const Napi::Object& owner, std::shared_ptr<Backend> backend, int device,
                   ModuleSource source)
      : PromiseWorker(owner, "NativeBackend.loadModule"),
        backend_(std::move(backend)),
        device_(device),
        source_(std::move(source)) {}

 private:
  void Run() override { id_ = backend_->LoadModule(device_, source_, &log_); }

  Napi::Value Result(Napi::Env env) override {
    // Owned from here: unloaded if making the object fails.
    auto state = std::make_shared<ModuleState>(backend_, id_, std::move(log_));
    return NativeModule::New(env, std::move(state));
  }

  std::shared_ptr<Backend> backend_;
  int device_;
  ModuleSource source_;
  ModuleId id_ = 0;
  std::string log_;
};

// Creates one chunk per range, maps it over the whole range and grants `access`, off the
// main thread (each chunk is a create, a map and a set-access: 0.1-0.2 ms of driver time for
// 12 MiB on H100/H200, ~1,100-2,800 of them in a scale-down), and with `export_now` exports
// each too (what an HMM daemon would otherwise do on its main thread at the first attach).
// All or nothing: a failure unmaps and releases what this call made (closing what it
// exported), and the ranges are left empty as they came.
class CreateMappedWorker : public PromiseWorker {
 public:
  CreateMappedWorker(const Napi::Object& owner, std::shared_ptr<Backend> backend, int device,
                     uint64_t size, bool exportable, bool export_now,
                     std::vector<std::shared_ptr<RangeState>> ranges, std::vector<int> access)
      : PromiseWorker(owner, "NativeBackend.createMappedChunks"),
        backend_(std::move(backend)),
        device_(device),
        size_(size),
        exportable_(exportable),
        export_now_(export_now),
        ranges_(std::move(ranges)),
        access_(std::move(access)) {
    for (auto& r : ranges_) r->busy = true;
  }

 private:
  void Run() override {
    ids_.reserve(ranges_.size());
    size_t mapped = 0;
    try {
      // One set-access per chunk: one per run of side-by-side ranges was no faster on H100
      // (2,784 chunks of 12 MiB: 50 against 49 us a chunk; scripts/bench-chunk-alloc.mjs).
      for (const auto& r : ranges_) {
        ids_.push_back(backend_->CreateChunk(device_, size_, exportable_));
        backend_->Map(r->base, size_, ids_.back());
        ++mapped;
        backend_->SetAccess(r->base, size_, access_);
        if (export_now_) exported_.push_back(backend_->ExportChunk(ids_.back()));
      }
    } catch (...) {
      // Best effort: the first failure is the one reported.
      if (std::strcmp(backend_->Name(), "acl") != 0) {
        for (uint64_t fd : exported_) close(static_cast<int>(fd));
      }
      exported_.clear();
      for (size_t i = 0; i < mapped; ++i) {
        try { backend_->Unmap(ranges_[i]->base, size_); } catch (...) {}
      }
      for (ChunkId id : ids_) {
        try { backend_->ReleaseChunk(id); } catch (...) {}
      }
      ids_.clear();
      throw;
    }
  }

  // The ranges are usable again, and own what was mapped into them.
  void Settling() override {
    for (auto& r : ranges_) r->busy = false;
    for (size_t i = 0; i < ids_.size(); ++i) {
      chunks_.push_back(std::make_shared<ChunkState>(backend_, ids_[i], device_, size_));
      if (i < exported_.size()) chunks_.back()->pre_exported = exported_[i];
      ranges_[i]->mappings[0] = RangeState::Mapping{size_, chunks_.back()};
    }
  }

  Napi::Value Result(Napi::Env env) override {
    Napi::Array out = Napi::Array::New(env, chunks_.size());
    for (size_t i = 0; i < chunks_.size(); ++i) out[i] = NativeChunk::New(env, chunks_[i]);
    return out;
  }

  std::shared_ptr<Backend> backend_;
  int device_;
  uint64_t size_;
  bool exportable_;
  bool export_now_;
  std::vector<std::shared_ptr<RangeState>> ranges_;
  std::vector<int> access_;
  std::vector<ChunkId> ids_;
  std::vector<uint64_t> exported_;
  std::vector<std::shared_ptr<ChunkState>> chunks_;
};

}  // namespace

void NativeBackend::Init(Napi::Env env, AddonData& data) {
  using W = NativeBackend;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetName>("name"),
      Method<W, &W::DeviceCount>("deviceCount"),
      Method<W, &W::DeviceInfo>("deviceInfo"),
      Method<W, &W::CanAccessPeer>("canAccessPeer"),
      Method<W, &W::Granularity>("granularity"),
      Method<W, &W::ReserveRange>("reserveRange"),
      Method<W, &W::ReserveRanges>("reserveRanges"),
      Method<W, &W::CreateChunk>("createChunk"),
      Method<W, &W::CreateMappedChunks>("createMappedChunks"),
      Method<W, &W::ImportChunk>("importChunk"),
      Method<W, &W::AllowImport>("allowImport"),
      Method<W, &W::ImportPid>("importPid"),
      Method<W, &W::HostAlloc>("hostAlloc"),
      Method<W, &W::CreateStream>("createStream"),
      Method<W, &W::CreateEvent>("createEvent"),
      Method<W, &W::LoadModule>("loadModule"),
      Method<W, &W::ResetDevice>("resetDevice"),
      Method<W, &W::InjectFault>("injectFault"),
      Method<W, &W::ClearFaults>("clearFaults"),
  };
  data.backend_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeBackend::New(Napi::Env env, std::shared_ptr<Backend> backend) {
  return Construct<NativeBackend>(GetAddonData(env).backend_ctor, backend);
}

NativeBackend::NativeBackend(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeBackend>(info) {
  backend_ = ConstructorInit<NativeBackend, std::shared_ptr<Backend>>(info);
}

Napi::Value NativeBackend::GetName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), backend_->Name());
}

Napi::Value NativeBackend::DeviceCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), backend_->DeviceCount());
}

Napi::Value NativeBackend::DeviceInfo(const Napi::CallbackInfo& info) {
  emoe::DeviceInfo d = backend_->GetDeviceInfo(ToDevice(info[0], "device"));
  Napi::Object result = Napi::Object::New(info.Env());
  result.Set("ordinal", d.ordinal);
  result.Set("name", d.name);
  result.Set("totalBytes", FromSize(info.Env(), d.total_bytes));
  result.Set("freeBytes", FromSize(info.Env(), d.free_bytes));
  result.Set("ccMajor", d.cc_major);
  result.Set("ccMinor", d.cc_minor);
  result.Set("multiprocessors", d.multiprocessors);
  result.Set("pciBusId", d.pci_bus_id);
  return result;
}

Napi::Value NativeBackend::CanAccessPeer(const Napi::CallbackInfo& info) {
  int device = ToDevice(info[0], "device");
  int peer = ToDevice(info[1], "peer");
  return Napi::Boolean::New(info.Env(), backend_->CanAccessPeer(device, peer));
}

Napi::Value NativeBackend::Granularity(const Napi::CallbackInfo& info) {
  return FromSize(info.Env(), backend_->Granularity(ToDevice(info[0], "device")));
}

// reserveRange(size, alignment = 0)
Napi::Value NativeBackend::ReserveRange(const Napi::CallbackInfo& info) {
  uint64_t size = ToSize(info[0], "size");
  uint64_t alignment = info[1].IsUndefined() ? 0 : ToSize(info[1], "alignment");
  DevicePtr base = backend_->ReserveRange(size, alignment);
  // Owned from here: freed if making the object fails.
  auto state = std::make_shared<RangeState>(backend_, base, size);
  return NativeRange::New(info.Env(), std::move(state));
}

// reserveRanges(count, size): `count` ranges of `size` bytes cut from one reservation (one
// driver call instead of `count`: on H100 one reservation cost 222-241 us with 8,000 others in
// the process); the reservation is freed with the last of them.
Napi::Value NativeBackend::ReserveRanges(const Napi::CallbackInfo& info) {
  uint64_t count = ToSize(info[0], "count");
  uint64_t size = ToSize(info[1], "size");
  if (count == 0 || count > (1u << 20)) ThrowArgument("count", "in [1, 1048576]");
  if (size == 0 || size > UINT64_MAX / count) ThrowArgument("size", "positive, with count x size in 64 bits");
  DevicePtr base = backend_->ReserveRange(count * size, 0);
  // Owned from here: freed if making the objects fails (the last range, or this reference, frees it).
  auto reservation = std::make_shared<Reservation>(backend_, base, count * size);
  Napi::Array out = Napi::Array::New(info.Env(), count);
  for (uint64_t i = 0; i < count; ++i) {
    auto state = std::make_shared<RangeState>(reservation, base + i * size, size);
    out[static_cast<uint32_t>(i)] = NativeRange::New(info.Env(), std::move(state));
  }
  return out;
}

// createChunk(device, size, exportable = false)
Napi::Value NativeBackend::CreateChunk(const Napi::CallbackInfo& info) {
  int device = ToDevice(info[0], "device");
  uint64_t size = ToSize(info[1], "size");
  bool exportable = info[2].IsUndefined() ? false : ToBool(info[2], "exportable");
  ChunkId id = backend_->CreateChunk(device, size, exportable);
  auto state = std::make_shared<ChunkState>(backend_, id, device, size);
  return NativeChunk::New(info.Env(), std::move(state));
}

// createMappedChunks(device, size, exportable, ranges, access, exportNow = false)
//   -> Promise<NativeChunk[]>: each range (exactly `size` bytes, nothing mapped in it) gets a new
// chunk of `device` mapped over it with read/write for the `access` devices, on a worker thread;
// with exportNow (exportable only) each is exported there too, its handle kept for its first export().
Napi::Value NativeBackend::CreateMappedChunks(const Napi::CallbackInfo& info) {
  return PromiseOrReject(info.Env(), "NativeBackend.createMappedChunks", [&]() -> Napi::Value {
    int device = ToDevice(info[0], "device");
    uint64_t size = ToSize(info[1], "size");
    bool exportable = ToBool(info[2], "exportable");
    if (!info[3].IsArray()) ThrowArgument("ranges", "an array of NativeRange");
    Napi::Array list = info[3].As<Napi::Array>();
    std::vector<int64_t> access = ToIntegerList(info[4], "access", 1024, 0, INT32_MAX);
    if (access.empty()) ThrowArgument("access", "at least one device");
    bool export_now = info.Length() > 5 && !info[5].IsUndefined() && ToBool(info[5], "exportNow");
    if (export_now && !exportable) ThrowArgument("exportNow", "false unless exportable is true");
    std::vector<std::shared_ptr<RangeState>> ranges;
    ranges.reserve(list.Length());
    std::unordered_set<const RangeState*> seen;
    for (uint32_t i = 0; i < list.Length(); ++i) {
      const std::string name = "ranges[" + std::to_string(i) + "]";
      NativeRange* range = UnwrapArg<NativeRange>(list.Get(i), name);
      const std::shared_ptr<RangeState>& r = range->state();
      if (r->backend != backend_) ThrowArgument(name, "a NativeRange of this backend");
      if (r->freed) ThrowInvalidHandle(name + " was freed");
      range->CheckIdle();
      if (r->size != size) {
        ThrowArgument(name, "a range of exactly " + std::to_string(size) + " bytes (got " +
                                std::to_string(r->size) + ")");
      }
      if (!r->mappings.empty()) ThrowArgument(name, "a range with nothing mapped in it");
      if (!seen.insert(r.get()).second) ThrowArgument(name, "a range not listed twice");
      ranges.push_back(r);
    }
    auto* worker = new CreateMappedWorker(info.This().As<Napi::Object>(), backend_, device, size,
                                          exportable, export_now, std::move(ranges),
                                          std::vector<int>(access.begin(), access.end()));
    return worker->Start();
  });
}

// importChunk(shareable, device, size): the caller still owns an fd shareable.
Napi::Value NativeBackend::ImportChunk(const Napi::CallbackInfo& info) {
  uint64_t shareable = ToU64(info[0], "shareable");
  int device = ToDevice(info[1], "device");
  uint64_t size = ToSize(info[2], "size");
  ChunkId id = backend_->ImportChunk(shareable, device, size);
  auto state = std::make_shared<ChunkState>(backend_, id, device, size);
  return NativeChunk::New(info.Env(), std::move(state));
}

Napi::Value NativeBackend::AllowImport(const Napi::CallbackInfo& info) {
  uint64_t shareable = ToU64(info[0], "shareable");
  std::vector<int64_t> list = ToIntegerList(info[1], "pids", 65536, 0, INT32_MAX);
  backend_->AllowImport(shareable, std::vector<int32_t>(list.begin(), list.end()));
  return info.Env().Undefined();
}

Napi::Value NativeBackend::ImportPid(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), backend_->ImportPid());
}

Napi::Value NativeBackend::HostAlloc(const Napi::CallbackInfo& info) {
  uint64_t size = ToSize(info[0], "size");
  if (size == 0) ThrowArgument("size", "a positive integer");
  void* ptr = backend_->HostAlloc(size);
  auto memory = std::make_shared<HostMemory>(backend_, ptr, size);
  return NativeHostBuffer::New(info.Env(), std::move(memory));
}

Napi::Value NativeBackend::CreateStream(const Napi::CallbackInfo& info) {
  int device = ToDevice(info[0], "device");
  StreamId id = backend_->CreateStream(device);
  auto state = std::make_shared<StreamState>(backend_, id, device);
  return NativeStream::New(info.Env(), std::move(state));
}

// createEvent(device, timing = false)
Napi::Value NativeBackend::CreateEvent(const Napi::CallbackInfo& info) {
  int device = ToDevice(info[0], "device");
  bool timing = info[1].IsUndefined() ? false : ToBool(info[1], "timing");
  EventId id = backend_->CreateEvent(device, timing);
  auto state = std::make_shared<EventState>(backend_, id, device);
  return NativeEvent::New(info.Env(), std::move(state));
}

// loadModule(device, format, data, name, options): compiles and loads off the main thread.
Napi::Value NativeBackend::LoadModule(const Napi::CallbackInfo& info) {
  return PromiseOrReject(info.Env(), "NativeBackend.loadModule", [&] {
    int device = ToDevice(info[0], "device");
    ModuleSource source;
    source.format = ToModuleFormat(info[1]);
    source.data = ToBytes(info[2], "data");
    if (!info[3].IsUndefined()) source.name = ToString(info[3], "name");
    if (!info[4].IsUndefined()) source.options = ToStringList(info[4], "options", 1024);
    auto* worker = new LoadModuleWorker(Value(), backend_, device, std::move(source));
    return worker->Start();
  });
}

Napi::Value NativeBackend::ResetDevice(const Napi::CallbackInfo& info) {
  backend_->ResetDevice(ToDevice(info[0], "device"));
  return info.Env().Undefined();
}

// injectFault(op, nth, kind): mock only.
Napi::Value NativeBackend::InjectFault(const Napi::CallbackInfo& info) {
  std::string op = ToString(info[0], "op");
  uint64_t nth = ToSize(info[1], "nth");
  ErrorKind kind = ToErrorKind(info[2]);
  backend_->InjectFault(op, nth, kind);
  return info.Env().Undefined();
}

Napi::Value NativeBackend::ClearFaults(const Napi::CallbackInfo& info) {
  backend_->ClearFaults();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

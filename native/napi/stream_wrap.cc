#include "napi/stream_wrap.h"

#include <climits>
#include <cstring>
#include <string>
#include <vector>

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/event_wrap.h"
#include "napi/graph_wrap.h"
#include "napi/host_buffer_wrap.h"
#include "napi/module_wrap.h"
#include "napi/promise_worker.h"
#include "napi/range_wrap.h"
#include "napi/wrap.h"

namespace emoe::napi {
namespace {

constexpr size_t kMaxKernelArgs = 4096;

// A live range of `backend`, given as argument `name`.
NativeRange* RangeArg(const Napi::Value& value, const std::string& name,
                      const std::shared_ptr<Backend>& backend) {
  NativeRange* range = UnwrapArg<NativeRange>(value, name);
  if (range->backend() != backend) ThrowArgument(name, "a NativeRange of the stream's backend");
  return range;
}

}  // namespace

StreamState::~StreamState() {
  try {
    Destroy();
  } catch (...) {
    // A finalizer never throws.
  }
}

void StreamState::Destroy() {
  if (destroyed) return;
  destroyed = true;
  backend->DestroyStream(id);
}

void NativeStream::Init(Napi::Env env, AddonData& data) {
  using W = NativeStream;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetDevice>("device"),
      Getter<W, &W::GetDestroyed>("destroyed"),
      Method<W, &W::Copy>("copy"),
      Method<W, &W::CopyHostToDevice>("copyHostToDevice"),
      Method<W, &W::CopyDeviceToHost>("copyDeviceToHost"),
      Method<W, &W::Memset>("memset"),
      Method<W, &W::LaunchPacked>("launchPacked"),
      Method<W, &W::WaitEvent>("waitEvent"),
      Method<W, &W::BeginCapture>("beginCapture"),
      Method<W, &W::EndCapture>("endCapture"),
      Method<W, &W::EndCaptureAsync>("endCaptureAsync"),
      Method<W, &W::Synchronize>("synchronize"),
      Method<W, &W::SynchronizeSync>("synchronizeSync"),
      Method<W, &W::Destroy>("destroy"),
  };
  data.stream_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeStream::New(Napi::Env env, std::shared_ptr<StreamState> state) {
  return Construct<NativeStream>(GetAddonData(env).stream_ctor, state);
}

NativeStream::NativeStream(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeStream>(info) {
  state_ = ConstructorInit<NativeStream, std::shared_ptr<StreamState>>(info);
}

const StreamState& NativeStream::Live() const {
  if (state_->destroyed) ThrowInvalidHandle("stream was destroyed");
  return *state_;
}

const StreamState& NativeStream::Checked(const std::shared_ptr<Backend>& backend,
                                         const char* argument) const {
  if (state_->backend != backend) ThrowArgument(argument, "a NativeStream of the same backend");
  return Live();
}

Napi::Value NativeStream::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), state_->device);
}

Napi::Value NativeStream::GetDestroyed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), state_->destroyed);
}

// copy(dst, dstOffset, src, srcOffset, bytes)
Napi::Value NativeStream::Copy(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  NativeRange* dst = RangeArg(info[0], "dst", s.backend);
  uint64_t dst_offset = ToSize(info[1], "dstOffset");
  NativeRange* src = RangeArg(info[2], "src", s.backend);
  uint64_t src_offset = ToSize(info[3], "srcOffset");
  uint64_t bytes = ToSize(info[4], "bytes");
  DevicePtr to = dst->Span(dst_offset, bytes, "dstOffset", "bytes");
  DevicePtr from = src->Span(src_offset, bytes, "srcOffset", "bytes");
  s.backend->CopyDeviceToDevice(to, from, bytes, s.id);
  return info.Env().Undefined();
}

// copyHostToDevice(dst, dstOffset, src, srcOffset, bytes)
Napi::Value NativeStream::CopyHostToDevice(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  NativeRange* dst = RangeArg(info[0], "dst", s.backend);
  uint64_t dst_offset = ToSize(info[1], "dstOffset");
  NativeHostBuffer* src = UnwrapArg<NativeHostBuffer>(info[2], "src");
  uint64_t src_offset = ToSize(info[3], "srcOffset");
  uint64_t bytes = ToSize(info[4], "bytes");
  DevicePtr to = dst->Span(dst_offset, bytes, "dstOffset", "bytes");
  const uint8_t* from = src->Span(src_offset, bytes, "srcOffset", "bytes");
  s.backend->CopyHostToDevice(to, from, bytes, s.id);
  return info.Env().Undefined();
}

// copyDeviceToHost(dst, dstOffset, src, srcOffset, bytes)
Napi::Value NativeStream::CopyDeviceToHost(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  NativeHostBuffer* dst = UnwrapArg<NativeHostBuffer>(info[0], "dst");
  uint64_t dst_offset = ToSize(info[1], "dstOffset");
  NativeRange* src = RangeArg(info[2], "src", s.backend);
  uint64_t src_offset = ToSize(info[3], "srcOffset");
  uint64_t bytes = ToSize(info[4], "bytes");
  uint8_t* to = dst->Span(dst_offset, bytes, "dstOffset", "bytes");
  DevicePtr from = src->Span(src_offset, bytes, "srcOffset", "bytes");
  s.backend->CopyDeviceToHost(to, from, bytes, s.id);
  return info.Env().Undefined();
}

// memset(dst, dstOffset, value, bytes)
Napi::Value NativeStream::Memset(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  NativeRange* dst = RangeArg(info[0], "dst", s.backend);
  uint64_t dst_offset = ToSize(info[1], "dstOffset");
  auto value = static_cast<uint8_t>(ToInteger(info[2], "value", 0, 255));
  uint64_t bytes = ToSize(info[3], "bytes");
  DevicePtr to = dst->Span(dst_offset, bytes, "dstOffset", "bytes");
  s.backend->MemsetD8(to, value, bytes, s.id);
  return info.Env().Undefined();
}

// launchPacked(fn, words, ranges): launch() with its configuration and arguments packed
// into a Uint32Array by the TypeScript layer (Stream.launch), which costs a fraction of
// reading an object per argument (a step queues thousands of launches):
//   words[0..2] grid, words[3..5] block, words[6] sharedBytes, words[7] the argument count n,
//   then 4 words per argument: type code (0 ptr, 1 i32, 2 u32, 3 i64, 4 u64, 5 f32, 6 f64),
//   range index (ptr: into `ranges`), the value's low and high 32 bits (ptr: the offset).
// Every value is checked as launch() checks it; names are built only for the error.
Napi::Value NativeStream::LaunchPacked(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  FunctionId fn = UnwrapArg<NativeFunction>(info[0], "fn")->Checked(s.backend, "fn");
  if (!info[1].IsTypedArray() ||
      info[1].As<Napi::TypedArray>().TypedArrayType() != napi_uint32_array) {
    ThrowArgument("words", "a Uint32Array");
  }
  Napi::Uint32Array packed = info[1].As<Napi::Uint32Array>();
  const size_t length = packed.ElementLength();
  const uint32_t* w = packed.Data();
  if (length < 8) ThrowArgument("words", "at least 8 words (grid, block, sharedBytes, count)");
  LaunchConfig config;
  for (int i = 0; i < 3; ++i) {
    config.grid[i] = w[i];
    config.block[i] = w[3 + i];
    if (w[i] < 1 || w[i] > INT32_MAX) ThrowArgument("grid", "positive integers below 2^31");
    if (w[3 + i] < 1 || w[3 + i] > INT32_MAX) ThrowArgument("block", "positive integers below 2^31");
  }
  config.shared_bytes = w[6];
  const size_t count = w[7];
  if (count > kMaxKernelArgs || length < 8 + 4 * count) {
    ThrowArgument("words", "a count of at most " + std::to_string(kMaxKernelArgs) +
                               " arguments, 4 words each after the first 8");
  }
  if (!info[2].IsArray()) ThrowArgument("ranges", "an array of NativeRange");
  Napi::Array ranges = info[2].As<Napi::Array>();
  const uint32_t range_count = ranges.Length();
  auto name = [](size_t i, const char* field) {
    return "args[" + std::to_string(i) + "]" + field;
  };
  std::vector<KernelArg> args(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t* a = w + 8 + 4 * i;
    const uint64_t bits = static_cast<uint64_t>(a[2]) | (static_cast<uint64_t>(a[3]) << 32);
    KernelArg& arg = args[i];
    switch (a[0]) {
      case 0: {
        arg.type = ArgType::kPtr;
        if (a[1] >= range_count) ThrowArgument(name(i, ".range"), "an index into ranges");
        NativeRange* range = UnwrapAs<NativeRange>(ranges.Get(a[1]));
        if (range == nullptr || range->backend() != s.backend) {
          RangeArg(ranges.Get(a[1]), name(i, ".range"), s.backend);  // throws the named error
        }
        if (!range->TryPointer(bits, &arg.u64)) range->Pointer(bits, name(i, ".offset"));
        break;
      }
      case 1: arg.type = ArgType::kI32; arg.i32 = static_cast<int32_t>(a[2]); break;
      case 2: arg.type = ArgType::kU32; arg.u32 = a[2]; break;
      case 3: arg.type = ArgType::kI64; arg.i64 = static_cast<int64_t>(bits); break;
      case 4: arg.type = ArgType::kU64; arg.u64 = bits; break;
      case 5: arg.type = ArgType::kF32; std::memcpy(&arg.f32, &a[2], sizeof(float)); break;
      case 6: arg.type = ArgType::kF64; std::memcpy(&arg.f64, &bits, sizeof(double)); break;
      default:
        ThrowArgument(name(i, ".type"), "a type code from 0 (ptr) to 6 (f64)");
    }
  }
  s.backend->Launch(fn, config, s.id, args);
  return info.Env().Undefined();
}

Napi::Value NativeStream::WaitEvent(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  const EventState& event = UnwrapArg<NativeEvent>(info[0], "event")->Checked(s.backend, "event");
  s.backend->StreamWaitEvent(s.id, event.id);
  return info.Env().Undefined();
}

Napi::Value NativeStream::BeginCapture(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  s.backend->BeginCapture(s.id);
  return info.Env().Undefined();
}

// endCapture(): the instantiated graph. Synchronous: instantiation is host work
// (milliseconds for a thousand nodes), done once per capture.
Napi::Value NativeStream::EndCapture(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  GraphId id = s.backend->EndCapture(s.id);
  // Owned from here: destroyed if making the object fails.
  auto state = std::make_shared<GraphState>(s.backend, id);
  return NativeGraph::New(info.Env(), std::move(state));
}

namespace {

// Instantiates a graph off the main thread; resolves with the NativeGraph.
class InstantiateWorker : public PromiseWorker {
 public:
  InstantiateWorker(const Napi::Object& owner, std::shared_ptr<GraphState> graph)
      : PromiseWorker(owner, "NativeStream.endCaptureAsync"), graph_(std::move(graph)) {}

 private:
  void Run() override { graph_->backend->InstantiateGraph(graph_->id); }
  Napi::Value Result(Napi::Env env) override { return NativeGraph::New(env, graph_); }

  // Owns the graph until the promise settles: a failed instantiation destroys it.
  std::shared_ptr<GraphState> graph_;
};

}  // namespace

// endCaptureAsync(): ends the capture here (errors as endCapture's, as a rejection) and
// instantiates the graph on the thread pool, so that the thread keeps queueing work.
Napi::Value NativeStream::EndCaptureAsync(const Napi::CallbackInfo& info) {
  return PromiseOrReject(info.Env(), "NativeStream.endCaptureAsync", [&] {
    const StreamState& s = Live();
    GraphId id = s.backend->EndCaptureDeferred(s.id);
    auto state = std::make_shared<GraphState>(s.backend, id);
    return (new InstantiateWorker(Value(), std::move(state)))->Start();
  });
}

Napi::Value NativeStream::Synchronize(const Napi::CallbackInfo& info) {
  return PromiseOrReject(info.Env(), "NativeStream.synchronize", [&] {
    const StreamState& s = Live();
    auto* worker =
        new CallWorker(Value(), "NativeStream.synchronize",
                       [backend = s.backend, id = s.id] { backend->SynchronizeStream(id); });
    return worker->Start();
  });
}

Napi::Value NativeStream::SynchronizeSync(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  s.backend->SynchronizeStream(s.id);
  return info.Env().Undefined();
}

Napi::Value NativeStream::Destroy(const Napi::CallbackInfo& info) {
  state_->Destroy();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

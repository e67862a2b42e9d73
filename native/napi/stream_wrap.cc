#include "napi/stream_wrap.h"

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

// [x, y, z], each in [1, 2^31).
void ToDim3(const Napi::Value& value, const std::string& name, uint32_t out[3]) {
  if (!value.IsArray() || value.As<Napi::Array>().Length() != 3) {
    ThrowArgument(name, "an array of 3 positive integers");
  }
  Napi::Array array = value.As<Napi::Array>();
  for (uint32_t i = 0; i < 3; ++i) {
    out[i] = static_cast<uint32_t>(
        ToInteger(array.Get(i), name + "[" + std::to_string(i) + "]", 1, INT32_MAX));
  }
}

// One element of launch()'s args: {type: 'ptr', range, offset} or {type, value}.
KernelArg ToKernelArg(const Napi::Value& value, const std::string& name,
                      const std::shared_ptr<Backend>& backend) {
  if (!value.IsObject()) ThrowArgument(name, "an object {type, ...}");
  Napi::Object object = value.As<Napi::Object>();
  Napi::Value type_value = object.Get("type");
  std::string type = type_value.IsString() ? type_value.As<Napi::String>().Utf8Value() : "";
  Napi::Value v = object.Get("value");
  std::string value_name = name + ".value";
  KernelArg arg;
  if (type == "ptr") {
    arg.type = ArgType::kPtr;
    NativeRange* range = RangeArg(object.Get("range"), name + ".range", backend);
    uint64_t offset = ToSize(object.Get("offset"), name + ".offset");
    arg.u64 = range->Pointer(offset, name + ".offset");
  } else if (type == "i32") {
    arg.type = ArgType::kI32;
    arg.i32 = static_cast<int32_t>(ToInteger(v, value_name, INT32_MIN, INT32_MAX));
  } else if (type == "u32") {
    arg.type = ArgType::kU32;
    arg.u32 = static_cast<uint32_t>(ToInteger(v, value_name, 0, UINT32_MAX));
  } else if (type == "i64") {
    arg.type = ArgType::kI64;
    arg.i64 = ToI64(v, value_name);
  } else if (type == "u64") {
    arg.type = ArgType::kU64;
    arg.u64 = ToU64(v, value_name);
  } else if (type == "f32") {
    arg.type = ArgType::kF32;
    arg.f32 = static_cast<float>(ToNumber(v, value_name));
  } else if (type == "f64") {
    arg.type = ArgType::kF64;
    arg.f64 = ToNumber(v, value_name);
  } else {
    ThrowArgument(name + ".type", "one of 'ptr', 'i32', 'u32', 'i64', 'u64', 'f32', 'f64'");
  }
  return arg;
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
      Method<W, &W::Launch>("launch"),
      Method<W, &W::WaitEvent>("waitEvent"),
      Method<W, &W::BeginCapture>("beginCapture"),
      Method<W, &W::EndCapture>("endCapture"),
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

// launch(fn, grid, block, sharedBytes, args)
Napi::Value NativeStream::Launch(const Napi::CallbackInfo& info) {
  const StreamState& s = Live();
  FunctionId fn = UnwrapArg<NativeFunction>(info[0], "fn")->Checked(s.backend, "fn");
  LaunchConfig config;
  ToDim3(info[1], "grid", config.grid);
  ToDim3(info[2], "block", config.block);
  config.shared_bytes = static_cast<uint32_t>(ToInteger(info[3], "sharedBytes", 0, UINT32_MAX));
  if (!info[4].IsArray() || info[4].As<Napi::Array>().Length() > kMaxKernelArgs) {
    ThrowArgument("args",
                  "an array of at most " + std::to_string(kMaxKernelArgs) + " kernel arguments");
  }
  Napi::Array list = info[4].As<Napi::Array>();
  std::vector<KernelArg> args;
  for (uint32_t i = 0; i < list.Length(); ++i) {
    args.push_back(ToKernelArg(list.Get(i), "args[" + std::to_string(i) + "]", s.backend));
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

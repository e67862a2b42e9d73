#include "napi/event_wrap.h"

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/promise_worker.h"
#include "napi/stream_wrap.h"
#include "napi/wrap.h"

namespace emoe::napi {

EventState::~EventState() {
  try {
    Destroy();
  } catch (...) {
    // A finalizer never throws.
  }
}

void EventState::Destroy() {
  if (destroyed) return;
  destroyed = true;
  backend->DestroyEvent(id);
}

void NativeEvent::Init(Napi::Env env, AddonData& data) {
  using W = NativeEvent;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetDevice>("device"),
      Getter<W, &W::GetDestroyed>("destroyed"),
      Method<W, &W::Record>("record"),
      Method<W, &W::Synchronize>("synchronize"),
      Method<W, &W::SynchronizeSync>("synchronizeSync"),
      Method<W, &W::ElapsedSince>("elapsedSince"),
      Method<W, &W::Destroy>("destroy"),
  };
  data.event_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeEvent::New(Napi::Env env, std::shared_ptr<EventState> state) {
  return Construct<NativeEvent>(GetAddonData(env).event_ctor, state);
}

NativeEvent::NativeEvent(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeEvent>(info) {
  state_ = ConstructorInit<NativeEvent, std::shared_ptr<EventState>>(info);
}

const EventState& NativeEvent::Live() const {
  if (state_->destroyed) ThrowInvalidHandle("event was destroyed");
  return *state_;
}

const EventState& NativeEvent::Checked(const std::shared_ptr<Backend>& backend,
                                       const char* argument) const {
  if (state_->backend != backend) ThrowArgument(argument, "a NativeEvent of the same backend");
  return Live();
}

Napi::Value NativeEvent::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), state_->device);
}

Napi::Value NativeEvent::GetDestroyed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), state_->destroyed);
}

Napi::Value NativeEvent::Record(const Napi::CallbackInfo& info) {
  const EventState& e = Live();
  const StreamState& stream =
      UnwrapArg<NativeStream>(info[0], "stream")->Checked(e.backend, "stream");
  e.backend->RecordEvent(e.id, stream.id);
  return info.Env().Undefined();
}

Napi::Value NativeEvent::Synchronize(const Napi::CallbackInfo& info) {
  return PromiseOrReject(info.Env(), "NativeEvent.synchronize", [&] {
    const EventState& e = Live();
    auto* worker =
        new CallWorker(Value(), "NativeEvent.synchronize",
                       [backend = e.backend, id = e.id] { backend->SynchronizeEvent(id); });
    return worker->Start();
  });
}

Napi::Value NativeEvent::SynchronizeSync(const Napi::CallbackInfo& info) {
  const EventState& e = Live();
  e.backend->SynchronizeEvent(e.id);
  return info.Env().Undefined();
}

// this.elapsedSince(start): milliseconds from `start` to this event.
Napi::Value NativeEvent::ElapsedSince(const Napi::CallbackInfo& info) {
  const EventState& e = Live();
  const EventState& start = UnwrapArg<NativeEvent>(info[0], "start")->Checked(e.backend, "start");
  return Napi::Number::New(info.Env(), e.backend->ElapsedMs(start.id, e.id));
}

Napi::Value NativeEvent::Destroy(const Napi::CallbackInfo& info) {
  state_->Destroy();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

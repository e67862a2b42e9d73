// NativeEvent: a marker recorded on a stream, for ordering and timing.
#pragma once

#include <napi.h>

#include <memory>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Main thread only; workers copy the backend and id.
struct EventState {
  std::shared_ptr<Backend> backend;
  EventId id = 0;
  int device = 0;
  bool destroyed = false;

  EventState(std::shared_ptr<Backend> b, EventId i, int d)
      : backend(std::move(b)), id(i), device(d) {}
  ~EventState();
  void Destroy();  // idempotent
};

class NativeEvent : public Napi::ObjectWrap<NativeEvent> {
 public:
  static constexpr const char* kClassName = "NativeEvent";
  static constexpr napi_type_tag kTypeTag = {0x05da9bb775430346ull, 0x717f9be492d7bc34ull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<EventState> state);

  explicit NativeEvent(const Napi::CallbackInfo& info);

  // The state of a live event of `backend` (INVALID_HANDLE / INVALID_ARGUMENT naming `argument`).
  const EventState& Checked(const std::shared_ptr<Backend>& backend, const char* argument) const;

 private:
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetDestroyed(const Napi::CallbackInfo& info);
  Napi::Value Record(const Napi::CallbackInfo& info);
  Napi::Value Synchronize(const Napi::CallbackInfo& info);
  Napi::Value SynchronizeSync(const Napi::CallbackInfo& info);
  Napi::Value ElapsedSince(const Napi::CallbackInfo& info);
  Napi::Value Destroy(const Napi::CallbackInfo& info);

  const EventState& Live() const;

  std::shared_ptr<EventState> state_;
};

}  // namespace emoe::napi

// NativeStream: an in-order queue of copies, fills and launches on one device.
#pragma once

#include <napi.h>

#include <memory>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Main thread only; workers copy the backend and id.
struct StreamState {
  std::shared_ptr<Backend> backend;
  StreamId id = 0;
  int device = 0;
  bool destroyed = false;

  StreamState(std::shared_ptr<Backend> b, StreamId i, int d)
      : backend(std::move(b)), id(i), device(d) {}
  ~StreamState();
  void Destroy();  // idempotent; the backend waits for queued work
};

class NativeStream : public Napi::ObjectWrap<NativeStream> {
 public:
  static constexpr const char* kClassName = "NativeStream";
  static constexpr napi_type_tag kTypeTag = {0xe8aae1e0b9f7fc0dull, 0x650b5217c4ce2421ull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<StreamState> state);

  explicit NativeStream(const Napi::CallbackInfo& info);

  // The state of a live stream of `backend` (INVALID_HANDLE / INVALID_ARGUMENT naming `argument`).
  const StreamState& Checked(const std::shared_ptr<Backend>& backend, const char* argument) const;

 private:
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetDestroyed(const Napi::CallbackInfo& info);
  Napi::Value Copy(const Napi::CallbackInfo& info);
  Napi::Value CopyHostToDevice(const Napi::CallbackInfo& info);
  Napi::Value CopyDeviceToHost(const Napi::CallbackInfo& info);
  Napi::Value Memset(const Napi::CallbackInfo& info);
  Napi::Value LaunchPacked(const Napi::CallbackInfo& info);
  Napi::Value WaitEvent(const Napi::CallbackInfo& info);
  Napi::Value BeginCapture(const Napi::CallbackInfo& info);
  Napi::Value EndCapture(const Napi::CallbackInfo& info);
  Napi::Value EndCaptureAsync(const Napi::CallbackInfo& info);
  Napi::Value Synchronize(const Napi::CallbackInfo& info);
  Napi::Value SynchronizeSync(const Napi::CallbackInfo& info);
  Napi::Value Destroy(const Napi::CallbackInfo& info);

  const StreamState& Live() const;

  std::shared_ptr<StreamState> state_;
};

}  // namespace emoe::napi

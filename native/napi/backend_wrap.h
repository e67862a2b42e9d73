// NativeBackend: one opened backend (cuda, acl or mock). Every object it creates holds
// the backend's shared_ptr, so the backend lives until its last object is gone.
#pragma once

#include <napi.h>

#include <memory>
#include <string>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

class NativeBackend : public Napi::ObjectWrap<NativeBackend> {
 public:
  static constexpr const char* kClassName = "NativeBackend";
  static constexpr napi_type_tag kTypeTag = {0x01f640f648b022ffull, 0x6bac09fe571e7d81ull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<Backend> backend);

  explicit NativeBackend(const Napi::CallbackInfo& info);

 private:
  Napi::Value GetName(const Napi::CallbackInfo& info);
  Napi::Value DeviceCount(const Napi::CallbackInfo& info);
  Napi::Value DeviceInfo(const Napi::CallbackInfo& info);
  Napi::Value CanAccessPeer(const Napi::CallbackInfo& info);
  Napi::Value Granularity(const Napi::CallbackInfo& info);
  Napi::Value ReserveRange(const Napi::CallbackInfo& info);
  Napi::Value ReserveRanges(const Napi::CallbackInfo& info);
  Napi::Value CreateChunk(const Napi::CallbackInfo& info);
  Napi::Value CreateMappedChunks(const Napi::CallbackInfo& info);
  Napi::Value ImportChunk(const Napi::CallbackInfo& info);
  Napi::Value AllowImport(const Napi::CallbackInfo& info);
  Napi::Value ImportPid(const Napi::CallbackInfo& info);
  Napi::Value HostAlloc(const Napi::CallbackInfo& info);
  Napi::Value CreateStream(const Napi::CallbackInfo& info);
  Napi::Value CreateEvent(const Napi::CallbackInfo& info);
  Napi::Value LoadModule(const Napi::CallbackInfo& info);
  Napi::Value ResetDevice(const Napi::CallbackInfo& info);
  Napi::Value InjectFault(const Napi::CallbackInfo& info);
  Napi::Value ClearFaults(const Napi::CallbackInfo& info);

  std::shared_ptr<Backend> backend_;
};

}  // namespace emoe::napi

// NativeModule (a loaded kernel module) and NativeFunction (a kernel in it).
#pragma once

#include <napi.h>

#include <memory>
#include <string>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Shared by the module and its functions: a function keeps the module loaded even
// if the NativeModule is collected. Main thread only.
struct ModuleState {
  std::shared_ptr<Backend> backend;
  ModuleId id = 0;
  std::string log;
  bool unloaded = false;

  ModuleState(std::shared_ptr<Backend> b, ModuleId i, std::string l)
      : backend(std::move(b)), id(i), log(std::move(l)) {}
  ~ModuleState();
  void Unload();  // idempotent
};

class NativeModule : public Napi::ObjectWrap<NativeModule> {
 public:
  static constexpr const char* kClassName = "NativeModule";
  static constexpr napi_type_tag kTypeTag = {0xf6642268b4f784c2ull, 0x706e3f9e3d1ad906ull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<ModuleState> state);

  explicit NativeModule(const Napi::CallbackInfo& info);

 private:
  Napi::Value GetLog(const Napi::CallbackInfo& info);
  Napi::Value GetFunction(const Napi::CallbackInfo& info);
  Napi::Value Unload(const Napi::CallbackInfo& info);

  std::shared_ptr<ModuleState> state_;
};

class NativeFunction : public Napi::ObjectWrap<NativeFunction> {
 public:
  static constexpr const char* kClassName = "NativeFunction";
  static constexpr napi_type_tag kTypeTag = {0xfb15c49c41453decull, 0x726d284f7ee7ef80ull};

  struct Handle {
    std::shared_ptr<ModuleState> module;
    FunctionId id = 0;
    std::string name;
  };

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, Handle handle);

  explicit NativeFunction(const Napi::CallbackInfo& info);

  // The function id, if its module is loaded and belongs to `backend`.
  FunctionId Checked(const std::shared_ptr<Backend>& backend, const char* argument) const;

 private:
  Napi::Value GetName(const Napi::CallbackInfo& info);

  Handle handle_;
};

}  // namespace emoe::napi

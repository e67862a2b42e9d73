#include "napi/module_wrap.h"

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {

ModuleState::~ModuleState() {
  try {
    Unload();
  } catch (...) {
    // A finalizer never throws.
  }
}

void ModuleState::Unload() {
  if (unloaded) return;
  unloaded = true;
  backend->UnloadModule(id);
}

void NativeModule::Init(Napi::Env env, AddonData& data) {
  using W = NativeModule;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetLog>("log"),
      Method<W, &W::GetFunction>("getFunction"),
      Method<W, &W::Unload>("unload"),
  };
  data.module_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeModule::New(Napi::Env env, std::shared_ptr<ModuleState> state) {
  return Construct<NativeModule>(GetAddonData(env).module_ctor, state);
}

NativeModule::NativeModule(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModule>(info) {
  state_ = ConstructorInit<NativeModule, std::shared_ptr<ModuleState>>(info);
}

Napi::Value NativeModule::GetLog(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), state_->log);
}

Napi::Value NativeModule::GetFunction(const Napi::CallbackInfo& info) {
  std::string name = ToString(info[0], "name");
  if (state_->unloaded) ThrowInvalidHandle("module was unloaded");
  FunctionId id = state_->backend->GetFunction(state_->id, name);
  return NativeFunction::New(info.Env(), NativeFunction::Handle{state_, id, name});
}

Napi::Value NativeModule::Unload(const Napi::CallbackInfo& info) {
  state_->Unload();
  return info.Env().Undefined();
}

void NativeFunction::Init(Napi::Env env, AddonData& data) {
  using W = NativeFunction;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetName>("name"),
  };
  data.function_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeFunction::New(Napi::Env env, Handle handle) {
  return Construct<NativeFunction>(GetAddonData(env).function_ctor, handle);
}

NativeFunction::NativeFunction(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeFunction>(info) {
  handle_ = ConstructorInit<NativeFunction, Handle>(info);
}

FunctionId NativeFunction::Checked(const std::shared_ptr<Backend>& backend,
                                   const char* argument) const {
  if (handle_.module->backend != backend)
    ThrowArgument(argument, "a NativeFunction of the same backend");
  if (handle_.module->unloaded) ThrowInvalidHandle("module was unloaded");
  return handle_.id;
}

Napi::Value NativeFunction::GetName(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), handle_.name);
}

}  // namespace emoe::napi

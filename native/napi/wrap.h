// How every wrapped class is wired.
//  - Each class has a unique napi_type_tag (kTypeTag) set on its instances. Methods
//    and getters are registered through MethodThunk, which checks the receiver's tag
//    *before* unwrapping: calling a method on the wrong object is a TypeError, never
//    a reinterpretation of another class's native pointer.
//  - Instances are made only from native code (Construct): the constructor takes an
//    External tagged with the class's tag, so `new chunk.constructor()` from JS is a
//    TypeError.
//  - Every C++ exception leaving a method becomes a JS error (CallGuarded).
#pragma once

#include <napi.h>

#include <string>
#include <vector>

#include "napi/errors.h"

namespace emoe::napi {

template <typename T>
using MethodPtr = Napi::Value (T::*)(const Napi::CallbackInfo&);

// The T behind `value`, or nullptr when `value` is not a T.
template <typename T>
T* UnwrapAs(const Napi::Value& value) {
  if (!value.IsObject()) return nullptr;
  Napi::Object object = value.As<Napi::Object>();
  if (!object.CheckTypeTag(&T::kTypeTag)) return nullptr;
  return T::Unwrap(object);
}

// An argument that must be a T: INVALID_ARGUMENT naming it otherwise.
template <typename T>
T* UnwrapArg(const Napi::Value& value, const std::string& argument) {
  T* wrapped = UnwrapAs<T>(value);
  if (wrapped == nullptr) ThrowArgument(argument, std::string("a ") + T::kClassName);
  return wrapped;
}

template <typename T, MethodPtr<T> M>
napi_value MethodThunk(napi_env env, napi_callback_info cbinfo) {
  void* data = nullptr;
  napi_get_cb_info(env, cbinfo, nullptr, nullptr, nullptr, &data);
  const char* name = static_cast<const char*>(data);
  return CallGuarded(env, T::kClassName, name, [&]() -> napi_value {
    Napi::CallbackInfo info(env, cbinfo);
    T* self = UnwrapAs<T>(info.This());
    if (self == nullptr) {
      throw Napi::TypeError::New(env, std::string(T::kClassName) + "." + name +
                                          " called on an object that is not a " + T::kClassName);
    }
    return (self->*M)(info);
  });
}

// A prototype method; `name` (a string literal) is also the thunk's data.
template <typename T, MethodPtr<T> M>
Napi::ClassPropertyDescriptor<T> Method(const char* name) {
  napi_property_descriptor d{};
  d.utf8name = name;
  d.method = &MethodThunk<T, M>;
  d.attributes = napi_default_method;
  d.data = const_cast<char*>(name);
  return d;
}

// A read-only prototype accessor.
template <typename T, MethodPtr<T> M>
Napi::ClassPropertyDescriptor<T> Getter(const char* name) {
  napi_property_descriptor d{};
  d.utf8name = name;
  d.getter = &MethodThunk<T, M>;
  d.attributes = napi_configurable;
  d.data = const_cast<char*>(name);
  return d;
}

// Creates a T from native code; T's constructor reads `init` through ConstructorInit.
template <typename T, typename Init>
Napi::Object Construct(Napi::FunctionReference& ctor, Init& init) {
  Napi::External<Init> token = Napi::External<Init>::New(ctor.Env(), &init);
  token.TypeTag(&T::kTypeTag);
  return ctor.New({token});
}

// In T's constructor: the init passed by Construct; tags the new instance.
template <typename T, typename Init>
Init& ConstructorInit(const Napi::CallbackInfo& info) {
  if (info.Length() != 1 || !info[0].IsExternal() ||
      !info[0].As<Napi::External<Init>>().CheckTypeTag(&T::kTypeTag)) {
    throw Napi::TypeError::New(
        info.Env(), std::string(T::kClassName) + " cannot be constructed from JavaScript");
  }
  info.This().As<Napi::Object>().TypeTag(&T::kTypeTag);
  return *info[0].As<Napi::External<Init>>().Data();
}

}  // namespace emoe::napi

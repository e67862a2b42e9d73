// Native failures -> JavaScript errors, and the binding's own failures.
//
// Every status reaches JS through the factory handed in by setErrorFactory (so
// native code throws the library's own error classes), or, before one is set, as
// a plain Error with the status fields attached.
#pragma once

#include <napi.h>

#include <string>

#include "core/status.h"

namespace emoe::napi {

// The binding's own failures carry backend "core" and an empty api; CallGuarded
// fills the api in with the JS name of the call ("NativeRange.map").
// "Invalid argument: <argument> must be <expectation>"
[[noreturn]] void ThrowArgument(const std::string& argument, const std::string& expectation);
// e.g. "chunk was released"
[[noreturn]] void ThrowInvalidHandle(const std::string& message);
// A failed system call; the kind follows errno (ENOENT -> NOT_FOUND, ...).
Status ErrnoStatus(const std::string& api, int err, const std::string& message);
[[noreturn]] void ThrowErrno(const std::string& api, int err, const std::string& message);

// The status of the exception being handled; call only inside a catch block.
// Pure C++, so AsyncWorker::Execute may use it on a worker thread.
Status CurrentExceptionStatus();

// The JS error for `status` (factory or plain Error). Main thread only; never throws.
Napi::Value StatusError(Napi::Env env, const Status& status);

// Makes the exception being handled the pending JS exception; `owner` and `name`
// ("NativeRange", "map") name the api where the status has none. Call inside a catch block.
void ThrowCurrentAsJs(napi_env env, const char* owner, const char* name) noexcept;

// Runs `body` (which returns a napi_value); any C++ exception becomes a JS exception.
template <typename Body>
napi_value CallGuarded(napi_env env, const char* owner, const char* name, Body&& body) noexcept {
  try {
    return body();
  } catch (...) {
    ThrowCurrentAsJs(env, owner, name);
    return nullptr;
  }
}

}  // namespace emoe::napi

#include "napi/errors.h"

#include <cerrno>
#include <cstring>
#include <new>
#include <utility>

#include "napi/addon.h"

namespace emoe::napi {
namespace {

const char* ErrnoName(int err) {
  switch (err) {
    case EPERM:
      return "EPERM";
    case ENOENT:
      return "ENOENT";
    case EINTR:
      return "EINTR";
    case EBADF:
      return "EBADF";
    case EAGAIN:
      return "EAGAIN";
    case ENOMEM:
      return "ENOMEM";
    case EACCES:
      return "EACCES";
    case EEXIST:
      return "EEXIST";
    case ENOTDIR:
      return "ENOTDIR";
    case EINVAL:
      return "EINVAL";
    case ENFILE:
      return "ENFILE";
    case EMFILE:
      return "EMFILE";
    case EROFS:
      return "EROFS";
    case EPIPE:
      return "EPIPE";
    case ENAMETOOLONG:
      return "ENAMETOOLONG";
    case ELOOP:
      return "ELOOP";
    case ENOTSOCK:
      return "ENOTSOCK";
    case EMSGSIZE:
      return "EMSGSIZE";
    case EPROTOTYPE:
      return "EPROTOTYPE";
    case EADDRINUSE:
      return "EADDRINUSE";
    case ENOBUFS:
      return "ENOBUFS";
    case ENOTCONN:
      return "ENOTCONN";
    case ECONNRESET:
      return "ECONNRESET";
    case ECONNREFUSED:
      return "ECONNREFUSED";
    case ETIMEDOUT:
      return "ETIMEDOUT";
    default:
      return "ERRNO";
  }
}

ErrorKind ErrnoKind(int err) {
  switch (err) {
    case ENOENT:
    case ECONNREFUSED:
      return ErrorKind::kNotFound;
    case ENOMEM:
    case ENOBUFS:
      return ErrorKind::kOutOfMemory;
    case EBADF:
      return ErrorKind::kInvalidHandle;
    default:
      return ErrorKind::kInternal;
  }
}

Status CoreStatus(ErrorKind kind, const std::string& code_name, const std::string& message) {
  Status s;
  s.kind = kind;
  s.backend = "core";
  s.code_name = code_name;
  s.message = message;
  return s;
}

std::string ApiName(const char* owner, const char* name) {
  std::string api = owner ? owner : "";
  if (name) api += (api.empty() ? "" : ".") + std::string(name);
  return api;
}

}  // namespace

void ThrowArgument(const std::string& argument, const std::string& expectation) {
  emoe::ThrowInvalidArgument("core", "", argument, expectation);
}

void ThrowInvalidHandle(const std::string& message) {
  throw Error(CoreStatus(ErrorKind::kInvalidHandle, "INVALID_HANDLE", message));
}

Status ErrnoStatus(const std::string& api, int err, const std::string& message) {
  Status s = CoreStatus(ErrnoKind(err), ErrnoName(err), message + ": " + std::strerror(err));
  s.api = api;
  s.code = err;
  return s;
}

void ThrowErrno(const std::string& api, int err, const std::string& message) {
  throw Error(ErrnoStatus(api, err, message));
}

Status CurrentExceptionStatus() {
  try {
    throw;
  } catch (const Error& e) {
    return e.status();
  } catch (const std::bad_alloc&) {
    return CoreStatus(ErrorKind::kOutOfMemory, "ENOMEM", "host memory exhausted (std::bad_alloc)");
  } catch (const std::exception& e) {
    return CoreStatus(ErrorKind::kInternal, "INTERNAL", e.what());
  } catch (...) {
    return CoreStatus(ErrorKind::kInternal, "INTERNAL", "unknown native exception");
  }
}

Napi::Value StatusError(Napi::Env env, const Status& status) {
  try {
    auto set_fields = [&](Napi::Object target) {
      target.Set("kind", ErrorKindName(status.kind));
      target.Set("backend", status.backend);
      target.Set("api", status.api);
      target.Set("code", static_cast<double>(status.code));
      target.Set("codeName", status.code_name);
      target.Set("argument", status.argument);
    };
    AddonData* data = env.GetInstanceData<AddonData>();
    if (data != nullptr && !data->error_factory.IsEmpty()) {
      Napi::Object fields = Napi::Object::New(env);
      set_fields(fields);
      fields.Set("message", status.message);
      try {
        Napi::Value error = data->error_factory.Call({fields});
        if (error.IsObject()) return error;
      } catch (const Napi::Error&) {
        // A throwing factory must not hide the native failure: fall back below.
      }
    }
    Napi::Error error = Napi::Error::New(env, Error(status).what());
    set_fields(error.Value());
    return error.Value();
  } catch (...) {
    // N-API itself failed (e.g. the environment is shutting down).
    return env.Undefined();
  }
}

void ThrowCurrentAsJs(napi_env env, const char* owner, const char* name) noexcept {
  try {
    try {
      throw;
    } catch (const Napi::Error& e) {
      e.ThrowAsJavaScriptException();
    } catch (...) {
      Status status = CurrentExceptionStatus();
      if (status.api.empty()) status.api = ApiName(owner, name);
      napi_throw(env, StatusError(Napi::Env(env), status));
    }
  } catch (...) {
    // Converting failed; whatever exception N-API left pending stands.
  }
}

}  // namespace emoe::napi

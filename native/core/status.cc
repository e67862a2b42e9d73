#include "core/status.h"

#include <utility>

namespace emoe {

const char* ErrorKindName(ErrorKind kind) {
  switch (kind) {
    case ErrorKind::kInvalidArgument: return "INVALID_ARGUMENT";
    case ErrorKind::kOutOfMemory: return "OUT_OF_MEMORY";
    case ErrorKind::kBackendUnavailable: return "BACKEND_UNAVAILABLE";
    case ErrorKind::kInvalidHandle: return "INVALID_HANDLE";
    case ErrorKind::kIllegalAddress: return "ILLEGAL_ADDRESS";
    case ErrorKind::kNotSupported: return "NOT_SUPPORTED";
    case ErrorKind::kPeerAccess: return "PEER_ACCESS";
    case ErrorKind::kNotFound: return "NOT_FOUND";
    case ErrorKind::kCompile: return "COMPILE";
    case ErrorKind::kFaultInjected: return "FAULT_INJECTED";
    case ErrorKind::kInternal: return "INTERNAL";
  }
  return "INTERNAL";
}

Error::Error(Status status) : status_(std::move(status)) {
  what_ = status_.backend + ": " + status_.api + " failed";
  if (!status_.code_name.empty()) what_ += " (" + status_.code_name + ")";
  if (!status_.message.empty()) what_ += ": " + status_.message;
}

void ThrowError(ErrorKind kind, const std::string& backend, const std::string& api, int64_t code,
                const std::string& code_name, const std::string& message) {
  Status s;
  s.kind = kind;
  s.backend = backend;
  s.api = api;
  s.code = code;
  s.code_name = code_name;
  s.message = message;
  throw Error(std::move(s));
}

void ThrowInvalidArgument(const std::string& backend, const std::string& api,
                          const std::string& argument, const std::string& expectation) {
  Status s;
  s.kind = ErrorKind::kInvalidArgument;
  s.backend = backend;
  s.api = api;
  s.code_name = "INVALID_ARGUMENT";
  s.argument = argument;
  s.message = "Invalid argument: " + argument + " must be " + expectation;
  throw Error(std::move(s));
}

}  // namespace emoe

// Status and error type shared by every backend. Pure C++ (no napi.h).
#pragma once

#include <cstdint>
#include <exception>
#include <string>

namespace emoe {

// The kind of failure, independent of backend. The N-API layer maps each kind to
// a typed JavaScript error class (OutOfMemoryError, IllegalAddressError, ...).
enum class ErrorKind {
  kInvalidArgument,     // a caller passed a bad value; `argument` names it
  kOutOfMemory,         // device or host memory exhausted
  kBackendUnavailable,  // library missing, no device, init failed
  kInvalidHandle,       // a chunk/range/stream/event/module that is unknown or released
  kIllegalAddress,      // a copy or launch touched unmapped or inaccessible memory (sticky)
  kNotSupported,        // the backend or device cannot do this
  kPeerAccess,          // devices cannot reach each other
  kNotFound,            // kernel or symbol not found
  kCompile,             // kernel source failed to compile; message holds the log
  kFaultInjected,       // the mock's fault-injection switch fired
  kInternal,            // anything else the backend reported
};

const char* ErrorKindName(ErrorKind kind);

struct Status {
  ErrorKind kind = ErrorKind::kInternal;
  std::string backend;    // "cuda" | "acl" | "mock" | "core"
  std::string api;        // native call that failed, e.g. "cuMemMap"
  int64_t code = 0;       // backend numeric code (CUresult, aclError, errno, ...)
  std::string code_name;  // e.g. "CUDA_ERROR_OUT_OF_MEMORY"
  std::string message;    // human text, says what to do where it can
  std::string argument;   // for kInvalidArgument: the argument's name
};

// Every backend call reports failure by throwing Error; the N-API layer catches
// it (also inside AsyncWorker::Execute) and converts it to a JS error.
class Error : public std::exception {
 public:
  explicit Error(Status status);
  const Status& status() const { return status_; }
  const char* what() const noexcept override { return what_.c_str(); }

 private:
  Status status_;
  std::string what_;
};

[[noreturn]] void ThrowError(ErrorKind kind, const std::string& backend, const std::string& api,
                             int64_t code, const std::string& code_name,
                             const std::string& message);

// "Invalid argument: <name> must be <expectation>"
[[noreturn]] void ThrowInvalidArgument(const std::string& backend, const std::string& api,
                                       const std::string& argument,
                                       const std::string& expectation);

}  // namespace emoe

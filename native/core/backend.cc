#include "core/backend.h"

#include "backends/acl/acl_backend.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/mock/mock_backend.h"

namespace emoe {

void Backend::InjectFault(const std::string&, uint64_t, ErrorKind) {
  ThrowError(ErrorKind::kNotSupported, Name(), "InjectFault", 0, "NOT_SUPPORTED",
             "fault injection exists only in the mock backend");
}

void Backend::ClearFaults() {
  ThrowError(ErrorKind::kNotSupported, Name(), "ClearFaults", 0, "NOT_SUPPORTED",
             "fault injection exists only in the mock backend");
}

std::vector<std::string> CompiledBackends() { return {"cuda", "acl", "mock"}; }

ProbeResult ProbeBackend(const std::string& name, const BackendOptions& options) {
  try {
    if (name == "cuda") return ProbeCuda(options);
    if (name == "acl") return ProbeAcl(options);
    if (name == "mock") return ProbeMock(options);
  } catch (const Error& e) {
    ProbeResult r;
    r.reason = e.what();
    return r;
  } catch (const std::exception& e) {
    ProbeResult r;
    r.reason = e.what();
    return r;
  }
  ProbeResult r;
  r.reason = "unknown backend '" + name + "' (expected cuda, acl or mock)";
  return r;
}

std::shared_ptr<Backend> CreateBackend(const std::string& name, const BackendOptions& options) {
  if (name == "cuda") return CreateCudaBackend(options);
  if (name == "acl") return CreateAclBackend(options);
  if (name == "mock") return CreateMockBackend(options);
  ThrowInvalidArgument("core", "CreateBackend", "backend", "one of cuda, acl, mock");
}

}  // namespace emoe

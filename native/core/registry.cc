// Backend registry: names to factories and probes. Kept apart from backend.cc
// so a native test can link one backend alone.
#include "backends/acl/acl_backend.h"
#include "backends/cuda/cuda_backend.h"
#include "backends/mock/mock_backend.h"
#include "core/backend.h"

namespace emoe {

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

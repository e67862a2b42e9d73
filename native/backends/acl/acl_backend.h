// Factory and probe for the acl backend. The implementation lives in acl_backend.cc.
#pragma once

#include <memory>

#include "core/backend.h"

namespace emoe {

ProbeResult ProbeAcl(const BackendOptions& options);
std::shared_ptr<Backend> CreateAclBackend(const BackendOptions& options);

}  // namespace emoe

// Factory and probe for the mock backend. The implementation lives in mock_backend.cc.
#pragma once

#include <memory>

#include "core/backend.h"

namespace emoe {

ProbeResult ProbeMock(const BackendOptions& options);
std::shared_ptr<Backend> CreateMockBackend(const BackendOptions& options);

}  // namespace emoe

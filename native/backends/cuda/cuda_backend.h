// Factory and probe for the cuda backend. The implementation lives in cuda_backend.cc.
#pragma once

#include <memory>

#include "core/backend.h"

namespace emoe {

ProbeResult ProbeCuda(const BackendOptions& options);
std::shared_ptr<Backend> CreateCudaBackend(const BackendOptions& options);

}  // namespace emoe

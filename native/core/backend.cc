#include "core/backend.h"


namespace emoe {

void Backend::InjectFault(const std::string&, uint64_t, ErrorKind) {
  ThrowError(ErrorKind::kNotSupported, Name(), "InjectFault", 0, "NOT_SUPPORTED",
             "fault injection exists only in the mock backend");
}

void Backend::ClearFaults() {
  ThrowError(ErrorKind::kNotSupported, Name(), "ClearFaults", 0, "NOT_SUPPORTED",
             "fault injection exists only in the mock backend");
}

}  // namespace emoe

// Per-environment state of the addon. Kept in napi instance data, never in globals,
// so every worker_thread that loads the addon gets its own.
#pragma once

#include <napi.h>

namespace emoe::napi {

struct AddonData {
  Napi::FunctionReference error_factory;  // set by setErrorFactory; empty: plain Error
  // Constructors of the wrapped classes; instances are made only from native code.
  Napi::FunctionReference backend_ctor;
  Napi::FunctionReference chunk_ctor;
  Napi::FunctionReference range_ctor;
  Napi::FunctionReference host_buffer_ctor;
  Napi::FunctionReference stream_ctor;
  Napi::FunctionReference event_ctor;
  Napi::FunctionReference graph_ctor;
  Napi::FunctionReference module_ctor;
  Napi::FunctionReference function_ctor;
  Napi::FunctionReference channel_ctor;
  Napi::FunctionReference listener_ctor;
};

AddonData& GetAddonData(Napi::Env env);

}  // namespace emoe::napi

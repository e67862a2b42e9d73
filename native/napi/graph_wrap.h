// NativeGraph: a captured, instantiated graph (Stream.endCapture) that replays
// its recorded work with one launch.
#pragma once

#include <napi.h>

#include <memory>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Main thread only; the backend keeps a graph alive while launches of it are queued.
struct GraphState {
  std::shared_ptr<Backend> backend;
  GraphId id = 0;
  bool destroyed = false;

  GraphState(std::shared_ptr<Backend> b, GraphId i) : backend(std::move(b)), id(i) {}
  ~GraphState();
  void Destroy();  // idempotent
};

class NativeGraph : public Napi::ObjectWrap<NativeGraph> {
 public:
  static constexpr const char* kClassName = "NativeGraph";
  static constexpr napi_type_tag kTypeTag = {0xfbf22039fe06b9a9ull, 0x1eaa9a1b1d4c6a67ull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<GraphState> state);

  explicit NativeGraph(const Napi::CallbackInfo& info);

 private:
  Napi::Value GetDestroyed(const Napi::CallbackInfo& info);
  Napi::Value Launch(const Napi::CallbackInfo& info);
  Napi::Value Destroy(const Napi::CallbackInfo& info);

  std::shared_ptr<GraphState> state_;
};

}  // namespace emoe::napi

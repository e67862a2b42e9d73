#include "napi/graph_wrap.h"

#include "napi/errors.h"
#include "napi/stream_wrap.h"
#include "napi/wrap.h"

namespace emoe::napi {

GraphState::~GraphState() {
  try {
    Destroy();
  } catch (...) {
    // A finalizer never throws.
  }
}

void GraphState::Destroy() {
  if (destroyed) return;
  destroyed = true;
  backend->DestroyGraph(id);
}

void NativeGraph::Init(Napi::Env env, AddonData& data) {
  using W = NativeGraph;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetDestroyed>("destroyed"),
      Method<W, &W::Launch>("launch"),
      Method<W, &W::Destroy>("destroy"),
  };
  data.graph_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeGraph::New(Napi::Env env, std::shared_ptr<GraphState> state) {
  return Construct<NativeGraph>(GetAddonData(env).graph_ctor, state);
}

NativeGraph::NativeGraph(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeGraph>(info) {
  state_ = ConstructorInit<NativeGraph, std::shared_ptr<GraphState>>(info);
}

Napi::Value NativeGraph::GetDestroyed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), state_->destroyed);
}

// launch(stream): queues one replay of the whole graph on `stream`.
Napi::Value NativeGraph::Launch(const Napi::CallbackInfo& info) {
  if (state_->destroyed) ThrowInvalidHandle("graph was destroyed");
  const StreamState& stream =
      UnwrapArg<NativeStream>(info[0], "stream")->Checked(state_->backend, "stream");
  state_->backend->LaunchGraph(state_->id, stream.id);
  return info.Env().Undefined();
}

Napi::Value NativeGraph::Destroy(const Napi::CallbackInfo& info) {
  state_->Destroy();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

// Module registration: the NativeBinding object of src/runtime/native-types.ts.
#include "napi/addon.h"

#include <napi.h>

#include <string>
#include <vector>

#include "core/backend.h"
#include "napi/backend_wrap.h"
#include "napi/channel_wrap.h"
#include "napi/chunk_wrap.h"
#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/event_wrap.h"
#include "napi/graph_wrap.h"
#include "napi/host_buffer_wrap.h"
#include "napi/listener_wrap.h"
#include "napi/module_wrap.h"
#include "napi/range_wrap.h"
#include "napi/stream_wrap.h"

namespace emoe::napi {

AddonData& GetAddonData(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

namespace {

using FunctionPtr = Napi::Value (*)(const Napi::CallbackInfo&);

template <FunctionPtr F>
napi_value FunctionThunk(napi_env env, napi_callback_info cbinfo) {
  void* data = nullptr;
  napi_get_cb_info(env, cbinfo, nullptr, nullptr, nullptr, &data);
  const char* name = static_cast<const char*>(data);
  return CallGuarded(env, nullptr, name, [&]() -> napi_value {
    Napi::CallbackInfo info(env, cbinfo);
    return F(info);
  });
}

template <FunctionPtr F>
napi_property_descriptor Export(const char* name) {
  napi_property_descriptor d{};
  d.utf8name = name;
  d.method = &FunctionThunk<F>;
  d.attributes = napi_enumerable;
  d.data = const_cast<char*>(name);
  return d;
}

bool IsBackendName(const std::string& name) {
  return name == "cuda" || name == "acl" || name == "mock";
}

std::string ToBackendName(const Napi::Value& value) {
  std::string name = value.IsString() ? value.As<Napi::String>().Utf8Value() : "";
  if (!IsBackendName(name)) ThrowArgument("name", "one of 'cuda', 'acl', 'mock'");
  return name;
}

// setErrorFactory(factory | null)
Napi::Value SetErrorFactory(const Napi::CallbackInfo& info) {
  AddonData& data = GetAddonData(info.Env());
  if (info[0].IsNull() || info[0].IsUndefined()) {
    data.error_factory.Reset();
  } else if (info[0].IsFunction()) {
    data.error_factory = Napi::Persistent(info[0].As<Napi::Function>());
  } else {
    ThrowArgument("factory", "a function");
  }
  return info.Env().Undefined();
}

Napi::Value CompiledBackends(const Napi::CallbackInfo& info) {
  std::vector<std::string> names = emoe::CompiledBackends();
  Napi::Array result = Napi::Array::New(info.Env(), names.size());
  for (uint32_t i = 0; i < names.size(); ++i) result.Set(i, names[i]);
  return result;
}

// probe(name, options): never throws for an unavailable backend; the reason says why.
Napi::Value Probe(const Napi::CallbackInfo& info) {
  std::string name = ToBackendName(info[0]);
  ProbeResult probe = ProbeBackend(name, ToBackendOptions(info[1], "options"));
  Napi::Object result = Napi::Object::New(info.Env());
  result.Set("available", probe.available);
  result.Set("deviceCount", probe.device_count);
  result.Set("reason", probe.reason);
  result.Set("library", probe.library);
  result.Set("version", probe.version);
  return result;
}

Napi::Value OpenBackend(const Napi::CallbackInfo& info) {
  std::string name = ToBackendName(info[0]);
  std::shared_ptr<Backend> backend = CreateBackend(name, ToBackendOptions(info[1], "options"));
  return NativeBackend::New(info.Env(), std::move(backend));
}

// listenUnix(path, mode, onConnection)
Napi::Value ListenUnix(const Napi::CallbackInfo& info) {
  std::string path = ToString(info[0], "path");
  double mode = info[1].IsNumber() ? info[1].As<Napi::Number>().DoubleValue() : -1;
  if (!(mode >= 0 && mode <= 0777 && mode == static_cast<uint32_t>(mode))) {
    ThrowArgument("mode", "a permission mode between 0 and 0o777");
  }
  if (!info[2].IsFunction()) ThrowArgument("onConnection", "a function");
  return NativeListener::Listen(info.Env(), path, static_cast<uint32_t>(mode),
                                info[2].As<Napi::Function>());
}

Napi::Value ConnectUnix(const Napi::CallbackInfo& info) {
  return NativeChannel::Connect(info.Env(), ToString(info[0], "path"));
}

Napi::Value ChannelFromFd(const Napi::CallbackInfo& info) {
  return NativeChannel::Adopt(info.Env(), static_cast<int>(ToInteger(info[0], "fd", 0, INT32_MAX)));
}

Napi::Value SocketPair(const Napi::CallbackInfo& info) { return NativeChannel::Pair(info.Env()); }

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  env.SetInstanceData(data);  // deleted at environment teardown
  NativeBackend::Init(env, *data);
  NativeChunk::Init(env, *data);
  NativeRange::Init(env, *data);
  NativeHostBuffer::Init(env, *data);
  NativeStream::Init(env, *data);
  NativeEvent::Init(env, *data);
  NativeGraph::Init(env, *data);
  NativeModule::Init(env, *data);
  NativeFunction::Init(env, *data);
  NativeChannel::Init(env, *data);
  NativeListener::Init(env, *data);

  napi_value version = Napi::Number::New(env, NAPI_VERSION);
  napi_property_descriptor properties[] = {
      {"napiVersion", nullptr, nullptr, nullptr, nullptr, version, napi_enumerable, nullptr},
      Export<SetErrorFactory>("setErrorFactory"),
      Export<CompiledBackends>("compiledBackends"),
      Export<Probe>("probe"),
      Export<OpenBackend>("openBackend"),
      Export<ListenUnix>("listenUnix"),
      Export<ConnectUnix>("connectUnix"),
      Export<ChannelFromFd>("channelFromFd"),
      Export<SocketPair>("socketPair"),
  };
  napi_status status =
      napi_define_properties(env, exports, sizeof(properties) / sizeof(properties[0]), properties);
  if (status != napi_ok) throw Napi::Error::New(env, "elasticmoe: could not define the exports");
  return exports;
}

}  // namespace
}  // namespace emoe::napi

static Napi::Object InitElasticMoe(Napi::Env env, Napi::Object exports) {
  return emoe::napi::Init(env, exports);
}

NODE_API_MODULE(elasticmoe, InitElasticMoe)

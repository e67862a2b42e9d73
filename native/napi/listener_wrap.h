// NativeListener: a listening AF_UNIX SOCK_SEQPACKET socket that hands each accepted
// connection to onConnection as a NativeChannel.
//
// Lifetime as for NativeChannel: while open it holds a strong reference to itself
// (it may still accept); close() drops it. close() and the finalizer also remove the
// socket file, if it is still the one this listener created.
#pragma once

#include <napi.h>
#include <sys/types.h>

#include <memory>
#include <string>

#include "napi/addon.h"
#include "napi/poll_handle.h"

namespace emoe::napi {

class NativeListener : public Napi::ObjectWrap<NativeListener>, private PollOwner {
 public:
  static constexpr const char* kClassName = "NativeListener";
  static constexpr napi_type_tag kTypeTag = {0x1ac0d931c915f8c0ull, 0x6f78214ad1380e9full};

  static void Init(Napi::Env env, AddonData& data);
  // Creates the socket file with `mode`, listens, and starts accepting.
  static Napi::Object Listen(Napi::Env env, const std::string& path, uint32_t mode,
                             const Napi::Function& on_connection);

  explicit NativeListener(const Napi::CallbackInfo& info);
  ~NativeListener() override;

 private:
  struct Socket {
    int fd = -1;
    std::string path;
    dev_t dev = 0;  // identity of the socket file this listener created
    ino_t ino = 0;
  };

  Napi::Value GetPath(const Napi::CallbackInfo& info);
  Napi::Value RefLoop(const Napi::CallbackInfo& info);
  Napi::Value UnrefLoop(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  void Start(const Napi::Function& on_connection);
  void OnPollEvent(int status, int events) override;
  void OnPollTeardown() override { CloseNative(); }
  void CloseNative();  // poll handle, socket, socket file; calls no JS
  void ReleaseJs();

  Socket socket_;
  bool closed_ = false;
  bool self_ref_ = false;
  PollHandle* poll_ = nullptr;
  Napi::FunctionReference on_connection_;
  std::unique_ptr<Napi::AsyncContext> context_;
};

}  // namespace emoe::napi

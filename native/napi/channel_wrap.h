// NativeChannel: a connected AF_UNIX SOCK_SEQPACKET socket carrying messages with
// file descriptors (SCM_RIGHTS). The HMM uses it to hand chunk fds to executors.
//
// Framing: a message is split into records of at most kMaxRecord bytes, each
// starting with a 1-byte header (1 = more records follow, 0 = last); the fds ride on
// the first record. Records arrive in order and a message's records unmixed with another's
// as long as only this process's main thread sends on the socket and, when it sends a
// message a part at a time (send from an offset), sends nothing else until it is done.
//
// Lifetime: while started (polling) and not closed, the object holds a strong
// reference to itself, so GC cannot collect a channel that may still deliver
// messages; EOF, an error or close() drops it. The finalizer closes the fd (and the
// poll handle, at environment teardown) without calling JS.
#pragma once

#include <napi.h>
#include <sys/un.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "core/status.h"
#include "napi/addon.h"
#include "napi/poll_handle.h"

namespace emoe::napi {

// Checks `path` fits sockaddr_un (INVALID_ARGUMENT naming `argument` otherwise).
sockaddr_un UnixAddress(const std::string& path, const char* argument);

class NativeChannel : public Napi::ObjectWrap<NativeChannel>, private PollOwner {
 public:
  static constexpr const char* kClassName = "NativeChannel";
  static constexpr napi_type_tag kTypeTag = {0x7bf2729323c84e2bull, 0x6032366ef05e22e2ull};
  static constexpr size_t kMaxRecord = 32 * 1024;  // header byte included
  static constexpr size_t kMaxFds = 253;           // SCM_MAX_FD

  static void Init(Napi::Env env, AddonData& data);
  // Wraps a connected SOCK_SEQPACKET socket; the channel owns `fd` (closed on failure too).
  static Napi::Object New(Napi::Env env, int fd);
  static Napi::Object Connect(Napi::Env env, const std::string& path);
  // Takes an inherited fd after checking it is a connected AF_UNIX SOCK_SEQPACKET socket.
  static Napi::Object Adopt(Napi::Env env, int fd);
  static Napi::Array Pair(Napi::Env env);

  explicit NativeChannel(const Napi::CallbackInfo& info);
  ~NativeChannel() override;

 private:
  Napi::Value GetFd(const Napi::CallbackInfo& info);
  Napi::Value Send(const Napi::CallbackInfo& info);
  Napi::Value StartReading(const Napi::CallbackInfo& info);
  Napi::Value PeerCredentials(const Napi::CallbackInfo& info);
  Napi::Value RefLoop(const Napi::CallbackInfo& info);
  Napi::Value UnrefLoop(const Napi::CallbackInfo& info);
  Napi::Value Close(const Napi::CallbackInfo& info);

  void OnPollEvent(int status, int events) override;
  void OnPollTeardown() override { CloseNative(); }
  // Sends one record; `first`: nothing of this message was sent yet. With `give_up_if_full`,
  // returns false without waiting when the socket is full.
  bool SendRecord(uint8_t header, const uint8_t* data, size_t size, const std::vector<int>& fds,
                  bool first, std::chrono::steady_clock::time_point deadline,
                  bool give_up_if_full = false);
  void ReadRecords();
  void Deliver();
  // Closes after EOF or an error and tells onClose (with the error, if any).
  void Shutdown(std::optional<Status> error);
  // The native half of every close: poll handle, socket, unread fds. Calls no JS.
  void CloseNative();
  // The JS half: callbacks, async context, the self-reference.
  void ReleaseJs();

  int fd_ = -1;
  bool closed_ = false;
  bool started_ = false;
  bool loop_ref_ = true;   // ref()/unref() state, applied to the poll handle
  bool self_ref_ = false;  // holds ObjectWrap::Ref() while started
  PollHandle* poll_ = nullptr;
  Napi::FunctionReference on_message_;
  Napi::FunctionReference on_close_;
  std::unique_ptr<Napi::AsyncContext> context_;
  std::vector<uint8_t> record_;   // one received record
  std::vector<uint8_t> message_;  // the message being reassembled
  size_t max_message_ = 0;        // 0: no limit; else a larger message closes the channel
  std::vector<int> fds_;          // its fds, owned until delivered
  bool partial_ = false;          // a record with "more follows" was received
};

}  // namespace emoe::napi

// A uv_poll_t for the fd channel and listener, and calling JS from its callbacks.
//
// Lifetime: the handle memory is freed only in uv_close's callback. The handle also
// registers an async cleanup hook, so environment teardown (a worker_thread exiting)
// closes it and waits for the close callback before the loop is closed. The owner
// (the wrapped object) may be collected first: Close() forgets it, and no callback
// reaches it afterwards.
#pragma once

#include <napi.h>
#include <uv.h>

#include <vector>

namespace emoe::napi {

class PollOwner {
 public:
  virtual void OnPollEvent(int status, int events) = 0;
  // Environment teardown: close everything native; call no JS.
  virtual void OnPollTeardown() = 0;

 protected:
  ~PollOwner() = default;
};

class PollHandle {
 public:
  // Starts polling `fd` for readability on env's loop. Throws emoe::Error on failure.
  static PollHandle* Start(Napi::Env env, int fd, PollOwner* owner);
  // Stops polling; the memory is freed by the close callback. Call once per handle.
  static void Close(PollHandle* handle);

  void Ref();
  void Unref();
  // Polls again after libuv stopped the handle on POLLERR (reported as UV_EBADF).
  void Resume();

 private:
  PollHandle() = default;
  static void OnPoll(uv_poll_t* poll, int status, int events);
  static void OnClosed(uv_handle_t* handle);
  static void OnTeardown(napi_async_cleanup_hook_handle hook, void* arg);

  uv_poll_t poll_;  // poll_.data points back to this
  PollOwner* owner_ = nullptr;
  napi_async_cleanup_hook_handle hook_ = nullptr;
  bool closing_ = false;
};

// Calls `fn` from a libuv callback (the caller holds a HandleScope), inside `context`
// so async hooks see it and the microtask/tick queues run afterwards. An exception
// thrown by `fn` is reported as uncaught (process 'uncaughtException').
void CallFromLoop(Napi::Env env, const Napi::Function& fn, const Napi::Object& receiver,
                  const std::vector<napi_value>& args, const Napi::AsyncContext& context);

}  // namespace emoe::napi

#include "napi/poll_handle.h"

#include "core/status.h"

namespace emoe::napi {

PollHandle* PollHandle::Start(Napi::Env env, int fd, PollOwner* owner) {
  uv_loop_t* loop = nullptr;
  if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop == nullptr) {
    ThrowError(ErrorKind::kInternal, "core", "napi_get_uv_event_loop", 0, "INTERNAL",
               "no event loop for this environment");
  }
  auto* handle = new PollHandle();
  int rc = uv_poll_init(loop, &handle->poll_, fd);
  if (rc != 0) {
    delete handle;  // never initialised: no uv_close needed
    ThrowError(ErrorKind::kInternal, "core", "uv_poll_init", rc, uv_err_name(rc), uv_strerror(rc));
  }
  handle->poll_.data = handle;
  handle->owner_ = owner;
  rc = uv_poll_start(&handle->poll_, UV_READABLE, &PollHandle::OnPoll);
  if (rc == 0 && napi_add_async_cleanup_hook(env, &PollHandle::OnTeardown, handle,
                                             &handle->hook_) != napi_ok) {
    rc = UV_ENOMEM;
  }
  if (rc != 0) {
    Close(handle);
    ThrowError(ErrorKind::kInternal, "core", "uv_poll_start", rc, uv_err_name(rc), uv_strerror(rc));
  }
  return handle;
}

void PollHandle::Close(PollHandle* handle) {
  if (handle->closing_) return;
  handle->closing_ = true;
  handle->owner_ = nullptr;
  uv_poll_stop(&handle->poll_);
  uv_close(reinterpret_cast<uv_handle_t*>(&handle->poll_), &PollHandle::OnClosed);
}

void PollHandle::Ref() { uv_ref(reinterpret_cast<uv_handle_t*>(&poll_)); }

void PollHandle::Unref() { uv_unref(reinterpret_cast<uv_handle_t*>(&poll_)); }

void PollHandle::Resume() {
  if (!closing_) uv_poll_start(&poll_, UV_READABLE, &PollHandle::OnPoll);
}

void PollHandle::OnPoll(uv_poll_t* poll, int status, int events) {
  auto* handle = static_cast<PollHandle*>(poll->data);
  if (handle->owner_ != nullptr) handle->owner_->OnPollEvent(status, events);
}

void PollHandle::OnClosed(uv_handle_t* uv_handle) {
  auto* handle = static_cast<PollHandle*>(uv_handle->data);
  // Removing the hook here (not at Close) keeps teardown waiting for this callback.
  if (handle->hook_ != nullptr) napi_remove_async_cleanup_hook(handle->hook_);
  delete handle;
}

void PollHandle::OnTeardown(napi_async_cleanup_hook_handle, void* arg) {
  auto* handle = static_cast<PollHandle*>(arg);
  if (handle->owner_ != nullptr) handle->owner_->OnPollTeardown();  // calls Close
  Close(handle);  // no-op if the owner closed it; OnClosed removes the hook
}

void CallFromLoop(Napi::Env env, const Napi::Function& fn, const Napi::Object& receiver,
                  const std::vector<napi_value>& args, const Napi::AsyncContext& context) {
  try {
    fn.MakeCallback(receiver, args, context);
  } catch (const Napi::Error& e) {
    napi_fatal_exception(env, e.Value());
  }
}

}  // namespace emoe::napi

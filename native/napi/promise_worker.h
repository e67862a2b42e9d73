// An AsyncWorker that settles a Promise. Execute catches everything (emoe::Error,
// std::exception, ...) into a Status; the rejection is made from it by the error
// factory on the main thread.
#pragma once

#include <napi.h>

#include <functional>
#include <string>
#include <utility>

#include "napi/errors.h"

namespace emoe::napi {

class PromiseWorker : public Napi::AsyncWorker {
 public:
  // `owner` (the wrapped object whose method started the work) stays referenced until
  // the promise settles, so its finalizer cannot release the resource in use. `api`
  // names the call in statuses that have none; it must be a string literal.
  PromiseWorker(const Napi::Object& owner, const char* api)
      : Napi::AsyncWorker(owner.Env(), api, owner),
        owner_(Napi::Persistent(owner)),
        deferred_(Napi::Promise::Deferred::New(owner.Env())),
        api_(api) {}

  // Queues the work; the worker deletes itself once the promise is settled.
  Napi::Promise Start() {
    Napi::Promise promise = deferred_.Promise();
    Queue();
    return promise;
  }

 protected:
  virtual void Run() = 0;                                                // worker thread
  virtual Napi::Value Result(Napi::Env env) { return env.Undefined(); }  // main thread
  virtual void Settling() {}  // main thread, first thing when the work is over (either way)

 private:
  void Execute() final {
    try {
      Run();
    } catch (...) {
      status_ = CurrentExceptionStatus();
      if (status_.api.empty()) status_.api = api_;
      SetError(status_.message.empty() ? "failed" : status_.message);
    }
  }

  void OnOK() final {
    Settling();
    try {
      deferred_.Resolve(Result(Env()));
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (...) {
      Status status = CurrentExceptionStatus();
      if (status.api.empty()) status.api = api_;
      deferred_.Reject(StatusError(Env(), status));
    }
  }

  void OnError(const Napi::Error&) final {
    Settling();
    deferred_.Reject(StatusError(Env(), status_));
  }

  Napi::ObjectReference owner_;
  Napi::Promise::Deferred deferred_;
  const char* api_;
  Status status_;
};

// Runs `work` on the thread pool; resolves with undefined.
class CallWorker : public PromiseWorker {
 public:
  CallWorker(const Napi::Object& owner, const char* api, std::function<void()> work)
      : PromiseWorker(owner, api), work_(std::move(work)) {}

 private:
  void Run() override { work_(); }
  std::function<void()> work_;
};

// For methods that return a promise: a failure before the work is queued (a bad
// argument, a destroyed object) rejects the promise instead of throwing.
template <typename Body>
Napi::Value PromiseOrReject(Napi::Env env, const char* api, Body&& body) {
  try {
    return body();
  } catch (...) {
    Napi::Promise::Deferred deferred = Napi::Promise::Deferred::New(env);
    try {
      throw;
    } catch (const Napi::Error& e) {
      deferred.Reject(e.Value());
    } catch (...) {
      Status status = CurrentExceptionStatus();
      if (status.api.empty()) status.api = api;
      deferred.Reject(StatusError(env, status));
    }
    return deferred.Promise();
  }
}

}  // namespace emoe::napi

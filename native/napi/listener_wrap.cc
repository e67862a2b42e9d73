#include "napi/listener_wrap.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>

#include "napi/channel_wrap.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {
namespace {

constexpr int kAcceptsPerWakeup = 64;

// A socket file at `path` is stale when nothing accepts connections on it.
bool IsStaleSocket(const sockaddr_un& address) {
  int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (probe < 0) return false;
  int rc = connect(probe, reinterpret_cast<const sockaddr*>(&address), sizeof(address));
  int err = errno;
  ::close(probe);
  return rc != 0 && err == ECONNREFUSED;
}

// Binds `fd` so that the socket file never has more permissions than `mode`.
// Linux creates the file with the socket inode's mode minus the umask, so setting
// the inode's mode first (fchmod) does it without touching the process-wide umask
// (which would race with files other threads create). Where fchmod on a socket
// fails, the umask is narrowed around bind instead.
int BindWithMode(int fd, const sockaddr_un& address, uint32_t mode) {
  const sockaddr* a = reinterpret_cast<const sockaddr*>(&address);
  if (fchmod(fd, mode) == 0) return bind(fd, a, sizeof(address));
  mode_t previous = umask(~mode & 0777);
  int rc = bind(fd, a, sizeof(address));
  int err = errno;
  umask(previous);
  errno = err;
  return rc;
}

}  // namespace

void NativeListener::Init(Napi::Env env, AddonData& data) {
  using W = NativeListener;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetPath>("path"),
      Method<W, &W::RefLoop>("ref"),
      Method<W, &W::UnrefLoop>("unref"),
      Method<W, &W::Close>("close"),
  };
  data.listener_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeListener::Listen(Napi::Env env, const std::string& path, uint32_t mode,
                                    const Napi::Function& on_connection) {
  sockaddr_un address = UnixAddress(path, "path");
  struct stat st{};
  if (lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      ThrowErrno("bind", EEXIST, "'" + path + "' exists and is not a socket; not replacing it");
    }
    if (!IsStaleSocket(address)) {
      ThrowErrno("bind", EADDRINUSE, "another process is listening at '" + path + "'");
    }
    unlink(path.c_str());
  }

  Socket s;
  s.path = path;
  s.fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (s.fd < 0) ThrowErrno("socket", errno, "could not create a socket");
  auto fail = [&](const char* api, const std::string& message) {
    int err = errno;
    ::close(s.fd);
    ThrowErrno(api, err, message);
  };
  if (BindWithMode(s.fd, address, mode) != 0) fail("bind", "could not bind '" + path + "'");
  if (chmod(path.c_str(), mode) != 0 || stat(path.c_str(), &st) != 0) {
    int err = errno;
    unlink(path.c_str());
    errno = err;
    fail("chmod", "could not set the mode of '" + path + "'");
  }
  s.dev = st.st_dev;
  s.ino = st.st_ino;
  if (listen(s.fd, SOMAXCONN) != 0) {
    int err = errno;
    unlink(path.c_str());
    errno = err;
    fail("listen", "could not listen on '" + path + "'");
  }

  // From here the listener owns the socket and the file (its finalizer removes them).
  Napi::Object object;
  try {
    object = Construct<NativeListener>(GetAddonData(env).listener_ctor, s);
  } catch (...) {
    if (s.fd >= 0) {  // the constructor did not take it
      ::close(s.fd);
      unlink(path.c_str());
    }
    throw;
  }
  NativeListener* listener = Unwrap(object);
  try {
    listener->Start(on_connection);
  } catch (...) {
    listener->CloseNative();
    throw;
  }
  return object;
}

NativeListener::NativeListener(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeListener>(info) {
  Socket& s = ConstructorInit<NativeListener, Socket>(info);
  socket_ = s;
  s.fd = -1;
}

NativeListener::~NativeListener() { CloseNative(); }

void NativeListener::Start(const Napi::Function& on_connection) {
  Napi::Env env = Env();
  auto context = std::make_unique<Napi::AsyncContext>(env, "emoe:NativeListener", Value());
  poll_ = PollHandle::Start(env, socket_.fd, this);
  context_ = std::move(context);
  on_connection_ = Napi::Persistent(on_connection);
  Ref();  // see listener_wrap.h
  self_ref_ = true;
}

Napi::Value NativeListener::GetPath(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), socket_.path);
}

Napi::Value NativeListener::RefLoop(const Napi::CallbackInfo& info) {
  if (poll_ != nullptr) poll_->Ref();
  return info.Env().Undefined();
}

Napi::Value NativeListener::UnrefLoop(const Napi::CallbackInfo& info) {
  if (poll_ != nullptr) poll_->Unref();
  return info.Env().Undefined();
}

Napi::Value NativeListener::Close(const Napi::CallbackInfo& info) {
  CloseNative();
  ReleaseJs();
  return info.Env().Undefined();
}

void NativeListener::OnPollEvent(int status, int) {
  if (closed_) return;
  // libuv stops the handle on POLLERR; a listening socket has no error to report
  // (there is no error callback either), so keep accepting.
  if (status < 0) poll_->Resume();
  Napi::Env env = Env();
  for (int i = 0; i < kAcceptsPerWakeup && !closed_; ++i) {
    int fd = accept4(socket_.fd, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      return;  // EAGAIN: all accepted; EMFILE and the like: retried on the next turn
    }
    Napi::HandleScope scope(env);
    Napi::Object channel;
    try {
      channel = NativeChannel::New(env, fd);  // closes fd on failure
    } catch (const Napi::Error& e) {
      napi_fatal_exception(env, e.Value());
      return;
    }
    CallFromLoop(env, on_connection_.Value(), Value(), {channel}, *context_);
  }
}

void NativeListener::CloseNative() {
  if (closed_) return;
  closed_ = true;
  if (poll_ != nullptr) {
    PollHandle::Close(poll_);
    poll_ = nullptr;
  }
  if (socket_.fd >= 0) ::close(socket_.fd);
  socket_.fd = -1;
  // Remove the socket file only if it is still ours, not one a successor created.
  struct stat st{};
  if (lstat(socket_.path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == socket_.dev &&
      st.st_ino == socket_.ino) {
    unlink(socket_.path.c_str());
  }
}

void NativeListener::ReleaseJs() {
  on_connection_.Reset();
  context_.reset();
  if (self_ref_) {
    self_ref_ = false;
    Unref();
  }
}

}  // namespace emoe::napi

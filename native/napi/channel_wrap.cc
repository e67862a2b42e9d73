#include "napi/channel_wrap.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {
namespace {

using Clock = std::chrono::steady_clock;

// send() blocks the main thread at most this long for a peer that does not read.
constexpr auto kSendTimeout = std::chrono::seconds(10);
// Records handled per readiness callback, so one busy channel cannot starve the loop.
constexpr int kRecordsPerWakeup = 64;

// Waits for POLLOUT; false once the deadline has passed.
bool WaitWritable(int fd, Clock::time_point deadline) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - Clock::now());
    if (left.count() <= 0) return false;
    pollfd p{fd, POLLOUT, 0};
    int rc = poll(&p, 1, static_cast<int>(left.count()));
    if (rc > 0) return true;  // writable, or an error that sendmsg will report
    if (rc == 0) return false;
    if (errno != EINTR) return true;
  }
}

Status ChannelStatus(ErrorKind kind, const char* api, const char* code_name,
                     const std::string& message) {
  Status s;
  s.kind = kind;
  s.backend = "core";
  s.api = api;
  s.code_name = code_name;
  s.message = message;
  return s;
}

}  // namespace

sockaddr_un UnixAddress(const std::string& path, const char* argument) {
  sockaddr_un address{};
  if (path.empty() || path.size() >= sizeof(address.sun_path) ||
      path.find('\0') != std::string::npos) {
    ThrowArgument(argument, "a socket path of 1 to " +
                                std::to_string(sizeof(address.sun_path) - 1) + " bytes");
  }
  address.sun_family = AF_UNIX;
  std::memcpy(address.sun_path, path.c_str(), path.size() + 1);
  return address;
}

void NativeChannel::Init(Napi::Env env, AddonData& data) {
  using W = NativeChannel;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetFd>("fd"),           Method<W, &W::Send>("send"),
      Method<W, &W::StartReading>("start"), Method<W, &W::PeerCredentials>("peerCredentials"),
      Method<W, &W::RefLoop>("ref"),        Method<W, &W::UnrefLoop>("unref"),
      Method<W, &W::Close>("close"),
  };
  data.channel_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeChannel::New(Napi::Env env, int fd) {
  int owned = fd;  // the constructor takes it (sets it to -1)
  try {
    return Construct<NativeChannel>(GetAddonData(env).channel_ctor, owned);
  } catch (...) {
    if (owned >= 0) ::close(owned);
    throw;
  }
}

Napi::Object NativeChannel::Connect(Napi::Env env, const std::string& path) {
  sockaddr_un address = UnixAddress(path, "path");
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) ThrowErrno("socket", errno, "could not create a socket");
  // connect() to a local socket is immediate unless the listener's backlog is full;
  // bound that wait (reported as EAGAIN). Sends use MSG_DONTWAIT, so this is all it affects.
  timeval timeout{10, 0};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
  int rc;
  do {
    rc = connect(fd, reinterpret_cast<sockaddr*>(&address), sizeof(address));
  } while (rc != 0 && errno == EINTR);
  if (rc != 0) {
    int err = errno;
    ::close(fd);
    if (err == ENOENT)
      ThrowErrno("connect", err, "no socket at '" + path + "' (is the listener running?)");
    if (err == ECONNREFUSED) {
      ThrowErrno("connect", err, "nothing is listening at '" + path + "' (a stale socket file?)");
    }
    ThrowErrno("connect", err, "could not connect to '" + path + "'");
  }
  return New(env, fd);
}

Napi::Object NativeChannel::Adopt(Napi::Env env, int fd) {
  int type = 0;
  int domain = 0;
  socklen_t length = sizeof(int);
  sockaddr_un peer{};
  socklen_t peer_length = sizeof(peer);
  if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) != 0 || type != SOCK_SEQPACKET ||
      getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) != 0 || domain != AF_UNIX ||
      getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_length) != 0) {
    ThrowArgument("fd", "a connected AF_UNIX SOCK_SEQPACKET socket");
  }
  fcntl(fd, F_SETFD, FD_CLOEXEC);  // owned by the channel now: not for child processes
  return New(env, fd);
}

Napi::Array NativeChannel::Pair(Napi::Env env) {
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0) {
    ThrowErrno("socketpair", errno, "could not create a socket pair");
  }
  Napi::Object first;
  try {
    first = New(env, fds[0]);
  } catch (...) {
    ::close(fds[1]);
    throw;
  }
  Napi::Object second = New(env, fds[1]);
  Napi::Array pair = Napi::Array::New(env, 2);
  pair.Set(0u, first);
  pair.Set(1u, second);
  return pair;
}

NativeChannel::NativeChannel(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeChannel>(info) {
  int& fd = ConstructorInit<NativeChannel, int>(info);
  fd_ = fd;
  fd = -1;
}

NativeChannel::~NativeChannel() { CloseNative(); }

Napi::Value NativeChannel::GetFd(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), fd_);
}

// send(data, fds) -> undefined: the whole message, waiting (this thread) for room, up to the timeout.
// send(data, fds, offset) -> the offset reached, or -1: the records from byte `offset` on (a multiple
// of a record's payload; 0 starts the message and carries the fds), as many as the socket has room
// for now, never waiting; -1 when it had room for none. The caller sends the rest later from the
// offset returned (nothing else may be sent on the channel meanwhile): its thread stays free while
// a slow peer reads. The peer sees the message once its last record arrives.
Napi::Value NativeChannel::Send(const Napi::CallbackInfo& info) {
  if (closed_) ThrowInvalidHandle("channel was closed");
  if (!info[0].IsTypedArray() ||
      info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    ThrowArgument("data", "a Uint8Array");
  }
  Napi::Uint8Array data = info[0].As<Napi::Uint8Array>();
  const uint8_t* bytes = data.Data();
  size_t size = data.ByteLength();
  constexpr size_t kPayload = kMaxRecord - 1;
  bool partial = info.Length() > 2 && !info[2].IsUndefined();
  size_t offset = 0;
  if (partial) {
    int64_t at = ToInteger(info[2], "offset", 0, static_cast<int64_t>(size));
    if (at % static_cast<int64_t>(kPayload) != 0 && at != static_cast<int64_t>(size)) {
      ThrowArgument("offset", "a record boundary (a multiple of " + std::to_string(kPayload) +
                                  ") returned by the previous call");
    }
    offset = static_cast<size_t>(at);
  }
  std::vector<int> fds;
  if (!info[1].IsUndefined() && offset == 0) {
    std::vector<int64_t> list = ToIntegerList(info[1], "fds", kMaxFds, 0, INT32_MAX);
    for (size_t i = 0; i < list.size(); ++i) {
      if (fcntl(static_cast<int>(list[i]), F_GETFD) < 0) {
        ThrowArgument("fds[" + std::to_string(i) + "]", "an open file descriptor");
      }
      fds.push_back(static_cast<int>(list[i]));
    }
  }
  Clock::time_point deadline = Clock::now() + kSendTimeout;
  const size_t start = offset;
  do {
    size_t n = std::min(size - offset, kPayload);
    uint8_t header = offset + n < size ? 1 : 0;
    bool first = offset == 0;
    if (!SendRecord(header, bytes + offset, n, first ? fds : std::vector<int>(), first, deadline,
                    partial)) {
      return Napi::Number::New(info.Env(), offset == start ? -1.0 : static_cast<double>(offset));
    }
    offset += n;
  } while (offset < size);
  if (partial) return Napi::Number::New(info.Env(), static_cast<double>(size));
  return info.Env().Undefined();
}

bool NativeChannel::SendRecord(uint8_t header, const uint8_t* data, size_t size,
                               const std::vector<int>& fds, bool first,
                               Clock::time_point deadline, bool give_up_if_full) {
  iovec iov[2] = {{&header, 1}, {const_cast<uint8_t*>(data), size}};
  msghdr msg{};
  msg.msg_iov = iov;
  msg.msg_iovlen = size > 0 ? 2 : 1;
  std::vector<char> control;
  if (!fds.empty()) {
    control.resize(CMSG_SPACE(sizeof(int) * fds.size()));
    msg.msg_control = control.data();
    msg.msg_controllen = control.size();
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  for (;;) {
    // A SEQPACKET record is sent whole or not at all.
    if (sendmsg(fd_, &msg, MSG_NOSIGNAL | MSG_DONTWAIT) >= 0) return true;
    int err = errno;
    if (err == EINTR) continue;
    if (err == EAGAIN || err == EWOULDBLOCK) {
      if (give_up_if_full) return false;
      if (WaitWritable(fd_, deadline)) continue;
      err = ETIMEDOUT;
    }
    if (first) ThrowErrno("sendmsg", err, "sending on the channel failed");
    // The peer holds the first records of a message that will never be completed:
    // end the stream so it sees EOF rather than a corrupt message.
    shutdown(fd_, SHUT_WR);
    ThrowErrno("sendmsg", err,
               "sending on the channel failed mid-message; the channel was shut down");
  }
}

// start(onMessage, onClose)
Napi::Value NativeChannel::StartReading(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (closed_) ThrowInvalidHandle("channel was closed");
  if (started_) {
    ThrowError(ErrorKind::kNotSupported, "core", "", 0, "ALREADY_STARTED",
               "the channel is already started; start() may be called once");
  }
  if (!info[0].IsFunction()) ThrowArgument("onMessage", "a function");
  if (!info[1].IsFunction()) ThrowArgument("onClose", "a function");
  // Optional cap on a reassembled message, so a peer cannot make this process buffer without bound.
  if (info.Length() > 2 && !info[2].IsUndefined()) max_message_ = ToSize(info[2], "maxMessageBytes");
  auto context = std::make_unique<Napi::AsyncContext>(env, "emoe:NativeChannel", Value());
  record_.resize(kMaxRecord);
  poll_ = PollHandle::Start(env, fd_, this);
  if (!loop_ref_) poll_->Unref();
  started_ = true;
  context_ = std::move(context);
  on_message_ = Napi::Persistent(info[0].As<Napi::Function>());
  on_close_ = Napi::Persistent(info[1].As<Napi::Function>());
  Ref();  // see channel_wrap.h: alive while it may still deliver
  self_ref_ = true;
  return env.Undefined();
}

Napi::Value NativeChannel::PeerCredentials(const Napi::CallbackInfo& info) {
  if (closed_) ThrowInvalidHandle("channel was closed");
  ucred credentials{};
  socklen_t length = sizeof(credentials);
  if (getsockopt(fd_, SOL_SOCKET, SO_PEERCRED, &credentials, &length) != 0) {
    ThrowErrno("getsockopt", errno, "could not read the peer's credentials");
  }
  Napi::Object result = Napi::Object::New(info.Env());
  result.Set("pid", static_cast<double>(credentials.pid));
  result.Set("uid", static_cast<double>(credentials.uid));
  result.Set("gid", static_cast<double>(credentials.gid));
  return result;
}

Napi::Value NativeChannel::RefLoop(const Napi::CallbackInfo& info) {
  loop_ref_ = true;
  if (poll_ != nullptr) poll_->Ref();
  return info.Env().Undefined();
}

Napi::Value NativeChannel::UnrefLoop(const Napi::CallbackInfo& info) {
  loop_ref_ = false;
  if (poll_ != nullptr) poll_->Unref();
  return info.Env().Undefined();
}

Napi::Value NativeChannel::Close(const Napi::CallbackInfo& info) {
  CloseNative();
  ReleaseJs();
  return info.Env().Undefined();
}

void NativeChannel::OnPollEvent(int status, int) {
  if (closed_) return;
  if (status >= 0) {
    ReadRecords();
    return;
  }
  // libuv reports POLLERR as EBADF and stops the handle. Reading first surfaces the
  // socket's own error (ECONNRESET when the peer closed with messages unread) or EOF.
  ReadRecords();
  if (closed_) return;
  Status error =
      ChannelStatus(ErrorKind::kInternal, "uv_poll", uv_err_name(status), uv_strerror(status));
  error.code = status;
  Shutdown(error);
}

void NativeChannel::ReadRecords() {
  for (int i = 0; i < kRecordsPerWakeup && !closed_; ++i) {
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)];
    iovec iov{record_.data(), record_.size()};
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
    ssize_t n = recvmsg(fd_, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return;
      Shutdown(ErrnoStatus("recvmsg", errno, "receiving on the channel failed"));
      return;
    }
    // Take ownership of any fds first, so every path below closes or delivers them.
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t k = 0; k < count; ++k) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + k * sizeof(int), sizeof(int));
        fds_.push_back(fd);
      }
    }
    if (msg.msg_flags & MSG_CTRUNC) {
      Shutdown(ChannelStatus(ErrorKind::kInternal, "recvmsg", "MSG_CTRUNC",
                             "file descriptors sent on the channel were lost (control message "
                             "truncated: the process may be out of file descriptors); the "
                             "channel was closed"));
      return;
    }
    if (n == 0) {  // EOF: every record carries at least its header byte
      if (partial_ || !fds_.empty()) {
        Shutdown(ChannelStatus(ErrorKind::kInternal, "recvmsg", "EOF",
                               "the peer closed the channel in the middle of a message"));
      } else {
        Shutdown(std::nullopt);
      }
      return;
    }
    if ((msg.msg_flags & MSG_TRUNC) || record_[0] > 1) {
      Shutdown(ChannelStatus(ErrorKind::kInternal, "recvmsg", "PROTOCOL",
                             "the peer sent a record that is not of this channel's framing "
                             "(over 32 KiB or a bad header); the channel was closed"));
      return;
    }
    message_.insert(message_.end(), record_.begin() + 1, record_.begin() + n);
    if (max_message_ != 0 && message_.size() > max_message_) {
      Shutdown(ChannelStatus(ErrorKind::kInvalidArgument, "recvmsg", "TOO_LARGE",
                             "the peer sent a message over " + std::to_string(max_message_) +
                                 " bytes; the channel was closed"));
      return;
    }
    partial_ = record_[0] == 1;
    if (!partial_) Deliver();
  }
}

void NativeChannel::Deliver() {
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  std::vector<uint8_t> data;
  std::vector<int> fds;
  data.swap(message_);
  fds.swap(fds_);
  Napi::Object self = Value();
  Napi::Value buffer;
  Napi::Array fd_list;
  try {
    buffer = Napi::Buffer<uint8_t>::Copy(env, data.data(), data.size());
    fd_list = Napi::Array::New(env, fds.size());
    for (uint32_t i = 0; i < fds.size(); ++i) fd_list.Set(i, fds[i]);
  } catch (const Napi::Error&) {
    for (int fd : fds) ::close(fd);
    Shutdown(ChannelStatus(ErrorKind::kOutOfMemory, "recvmsg", "ENOMEM",
                           "no Buffer for a message of " + std::to_string(data.size()) +
                               " bytes; the channel was closed"));
    return;
  }
  // From here the fds belong to the callee.
  CallFromLoop(env, on_message_.Value(), self, {buffer, fd_list}, *context_);
}

void NativeChannel::Shutdown(std::optional<Status> error) {
  if (closed_) return;
  Napi::Env env = Env();
  Napi::HandleScope scope(env);
  Napi::Object self = Value();
  Napi::Function on_close = on_close_.IsEmpty() ? Napi::Function() : on_close_.Value();
  std::unique_ptr<Napi::AsyncContext> context = std::move(context_);
  CloseNative();
  ReleaseJs();
  if (on_close.IsEmpty() || !context) return;
  std::vector<napi_value> args;
  if (error) args.push_back(StatusError(env, *error));
  CallFromLoop(env, on_close, self, args, *context);
}

void NativeChannel::CloseNative() {
  if (closed_) return;
  closed_ = true;
  if (poll_ != nullptr) {
    PollHandle::Close(poll_);  // before close(fd): never close an fd libuv still polls
    poll_ = nullptr;
  }
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  for (int fd : fds_) ::close(fd);
  fds_.clear();
  message_.clear();
  partial_ = false;
}

void NativeChannel::ReleaseJs() {
  on_message_.Reset();
  on_close_.Reset();
  context_.reset();
  if (self_ref_) {
    self_ref_ = false;
    Unref();
  }
}

}  // namespace emoe::napi

// NativeRange: a reservation of virtual address space (ReserveRange) into which
// chunks are mapped. Offsets are validated against the range before the backend sees
// them; device pointers are computed here as base + offset.
#pragma once

#include <napi.h>

#include <map>
#include <memory>
#include <string>

#include "core/backend.h"
#include "napi/addon.h"
#include "napi/chunk_wrap.h"

namespace emoe::napi {

// One ReserveRange call, shared by the ranges cut from it (reserveRanges): freed by the last of
// them. Main thread only.
struct Reservation {
  std::shared_ptr<Backend> backend;
  DevicePtr base = 0;
  uint64_t size = 0;
  bool freed = false;

  Reservation(std::shared_ptr<Backend> b, DevicePtr base_, uint64_t size_)
      : backend(std::move(b)), base(base_), size(size_) {}
  ~Reservation();
  void Free();  // idempotent; throws the backend's failure
};

// Main thread only.
struct RangeState {
  struct Mapping {
    uint64_t size = 0;
    std::shared_ptr<ChunkState> chunk;  // keeps the chunk handle while mapped
  };

  std::shared_ptr<Backend> backend;
  DevicePtr base = 0;
  uint64_t size = 0;
  bool freed = false;
  // A createMappedChunks call is mapping a chunk into it on a worker thread: map, unmap,
  // setAccess and free are refused (INVALID_HANDLE) until its promise settles.
  bool busy = false;
  std::map<uint64_t, Mapping> mappings;  // offset -> what Map put there

  // The reservation this range lies in (its own, or one shared with the other ranges cut from
  // it); released at Free, and freed with the last range holding it.
  std::shared_ptr<Reservation> reservation;

  // A range with a reservation of its own.
  RangeState(std::shared_ptr<Backend> b, DevicePtr base_, uint64_t size_)
      : backend(b), base(base_), size(size_),
        reservation(std::make_shared<Reservation>(std::move(b), base_, size_)) {}
  // [base_, base_ + size_) of a shared reservation.
  RangeState(std::shared_ptr<Reservation> r, DevicePtr base_, uint64_t size_)
      : backend(r->backend), base(base_), size(size_), reservation(std::move(r)) {}
  ~RangeState();
  // Unmaps what is still mapped, then frees the reservation. Idempotent; throws the
  // first failure after trying everything.
  void Free();
};

class NativeRange : public Napi::ObjectWrap<NativeRange> {
 public:
  static constexpr const char* kClassName = "NativeRange";
  static constexpr napi_type_tag kTypeTag = {0x4846a2f505b3a993ull, 0x8c53a9dbb4b538adull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<RangeState> state);

  explicit NativeRange(const Napi::CallbackInfo& info);

  // The address of [offset, offset + bytes) after checking the range is live and the
  // span lies inside it (INVALID_HANDLE / INVALID_ARGUMENT naming the arguments).
  DevicePtr Span(uint64_t offset, uint64_t bytes, const std::string& offset_name,
                 const std::string& bytes_name) const;
  // The device pointer of a kernel argument: offset strictly inside the range.
  DevicePtr Pointer(uint64_t offset, const std::string& offset_name) const;
  // INVALID_HANDLE while a createMappedChunks call is mapping into the range.
  void CheckIdle() const;
  // Pointer() without building an argument name: false (nothing thrown) when the range
  // was freed or the offset lies outside it; call Pointer() then for the error.
  bool TryPointer(uint64_t offset, DevicePtr* out) const {
    if (state_->freed || offset >= state_->size) return false;
    *out = state_->base + offset;
    return true;
  }
  const std::shared_ptr<Backend>& backend() const { return state_->backend; }
  const std::shared_ptr<RangeState>& state() const { return state_; }

 private:
  Napi::Value GetBase(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetFreed(const Napi::CallbackInfo& info);
  Napi::Value Map(const Napi::CallbackInfo& info);
  Napi::Value Unmap(const Napi::CallbackInfo& info);
  Napi::Value SetAccess(const Napi::CallbackInfo& info);
  Napi::Value Free(const Napi::CallbackInfo& info);

  std::shared_ptr<RangeState> state_;
};

}  // namespace emoe::napi

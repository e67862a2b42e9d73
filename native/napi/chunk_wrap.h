// NativeChunk: a physical allocation on one device (backend ChunkId).
#pragma once

#include <napi.h>

#include <memory>
#include <optional>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Shared by the NativeChunk and every range mapping it, so the handle outlives both.
// Main thread only.
struct ChunkState {
  std::shared_ptr<Backend> backend;
  ChunkId id = 0;
  int device = 0;
  uint64_t size = 0;
  bool released = false;
  // A shareable handle exported when the chunk was made (createMappedChunks with exportNow), handed
  // out by the first export(); closed at release if nobody took it (an fd: cuda, mock).
  std::optional<uint64_t> pre_exported;

  ChunkState(std::shared_ptr<Backend> b, ChunkId i, int d, uint64_t s)
      : backend(std::move(b)), id(i), device(d), size(s) {}
  ~ChunkState();
  // Idempotent. The backend frees the memory at the last unmap (as in CUDA).
  void Release();
  // Closes a pre-exported handle nobody took (an fd; ACL handles need no closing).
  void DropPreExported();
};

class NativeChunk : public Napi::ObjectWrap<NativeChunk> {
 public:
  static constexpr const char* kClassName = "NativeChunk";
  static constexpr napi_type_tag kTypeTag = {0xf0b9c19f0fc77b93ull, 0x778acb55935145ecull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<ChunkState> state);

  explicit NativeChunk(const Napi::CallbackInfo& info);

  // The state of a chunk that is not released (INVALID_HANDLE otherwise).
  const std::shared_ptr<ChunkState>& Checked() const;

 private:
  Napi::Value GetDevice(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value GetReleased(const Napi::CallbackInfo& info);
  Napi::Value Export(const Napi::CallbackInfo& info);
  Napi::Value Release(const Napi::CallbackInfo& info);

  // Released by ~ChunkState once the last mapping is gone too.
  std::shared_ptr<ChunkState> state_;
};

}  // namespace emoe::napi

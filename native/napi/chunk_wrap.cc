#include "napi/chunk_wrap.h"

#include <unistd.h>

#include <cstring>

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {

ChunkState::~ChunkState() {
  try {
    Release();
  } catch (...) {
    // A finalizer never throws; the backend may have reset the device already.
  }
}

void ChunkState::Release() {
  if (released) return;
  DropPreExported();
  // Marked released once the backend has released it: a release it refuses is tried again by the
  // next release() or the finalizer, instead of leaving the memory held for good.
  backend->ReleaseChunk(id);
  released = true;
}

void ChunkState::DropPreExported() {
  if (!pre_exported) return;
  if (std::strcmp(backend->Name(), "acl") != 0) close(static_cast<int>(*pre_exported));
  pre_exported.reset();
}

void NativeChunk::Init(Napi::Env env, AddonData& data) {
  using W = NativeChunk;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetDevice>("device"),     Getter<W, &W::GetSize>("size"),
      Getter<W, &W::GetReleased>("released"), Method<W, &W::Export>("export"),
      Method<W, &W::Release>("release"),
  };
  data.chunk_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeChunk::New(Napi::Env env, std::shared_ptr<ChunkState> state) {
  return Construct<NativeChunk>(GetAddonData(env).chunk_ctor, state);
}

NativeChunk::NativeChunk(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeChunk>(info) {
  state_ = ConstructorInit<NativeChunk, std::shared_ptr<ChunkState>>(info);
}

const std::shared_ptr<ChunkState>& NativeChunk::Checked() const {
  if (state_->released) ThrowInvalidHandle("chunk was released");
  return state_;
}

Napi::Value NativeChunk::GetDevice(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), state_->device);
}

Napi::Value NativeChunk::GetSize(const Napi::CallbackInfo& info) {
  return FromSize(info.Env(), state_->size);
}

Napi::Value NativeChunk::GetReleased(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), state_->released);
}

Napi::Value NativeChunk::Export(const Napi::CallbackInfo& info) {
  ChunkState& chunk = *Checked();
  uint64_t shareable;
  if (chunk.pre_exported) {
    shareable = *chunk.pre_exported;  // now the caller's
    chunk.pre_exported.reset();
  } else {
    shareable = chunk.backend->ExportChunk(chunk.id);
  }
  // acl hands out a 64-bit shareable handle; cuda and mock a POSIX fd.
  if (std::strcmp(chunk.backend->Name(), "acl") == 0)
    return Napi::BigInt::New(info.Env(), shareable);
  return FromSize(info.Env(), shareable);
}

Napi::Value NativeChunk::Release(const Napi::CallbackInfo& info) {
  state_->Release();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

// NativeHostBuffer: pinned host memory (HostAlloc) exposed as an external ArrayBuffer.
#pragma once

#include <napi.h>

#include <memory>
#include <string>

#include "core/backend.h"
#include "napi/addon.h"

namespace emoe::napi {

// Owned jointly by the NativeHostBuffer and the ArrayBuffer's finalizer: JS may keep
// `buffer` after dropping the NativeHostBuffer, so the memory lives until both are
// gone, or until free() (which detaches the ArrayBuffer first). Main thread only.
struct HostMemory {
  std::shared_ptr<Backend> backend;
  void* ptr = nullptr;  // null once freed
  uint64_t size = 0;

  HostMemory(std::shared_ptr<Backend> b, void* p, uint64_t s)
      : backend(std::move(b)), ptr(p), size(s) {}
  ~HostMemory();
  void Free();
};

class NativeHostBuffer : public Napi::ObjectWrap<NativeHostBuffer> {
 public:
  static constexpr const char* kClassName = "NativeHostBuffer";
  static constexpr napi_type_tag kTypeTag = {0x1d1d1d453c1946dcull, 0x77abe08ef2081f8dull};

  static void Init(Napi::Env env, AddonData& data);
  static Napi::Object New(Napi::Env env, std::shared_ptr<HostMemory> memory);

  explicit NativeHostBuffer(const Napi::CallbackInfo& info);

  // The host address of [offset, offset + bytes), checked like NativeRange::Span.
  uint8_t* Span(uint64_t offset, uint64_t bytes, const std::string& offset_name,
                const std::string& bytes_name) const;

 private:
  Napi::Value GetBuffer(const Napi::CallbackInfo& info);
  Napi::Value GetSize(const Napi::CallbackInfo& info);
  Napi::Value Free(const Napi::CallbackInfo& info);

  std::shared_ptr<HostMemory> memory_;
  uint64_t size_ = 0;
  Napi::Reference<Napi::ArrayBuffer> buffer_;  // strong while this object lives
};

}  // namespace emoe::napi

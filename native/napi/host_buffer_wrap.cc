#include "napi/host_buffer_wrap.h"

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {

HostMemory::~HostMemory() {
  try {
    Free();
  } catch (...) {
    // A finalizer never throws.
  }
}

void HostMemory::Free() {
  if (ptr == nullptr) return;
  void* p = ptr;
  ptr = nullptr;
  backend->HostFree(p);
}

void NativeHostBuffer::Init(Napi::Env env, AddonData& data) {
  using W = NativeHostBuffer;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetBuffer>("buffer"),
      Getter<W, &W::GetSize>("size"),
      Method<W, &W::Free>("free"),
  };
  data.host_buffer_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeHostBuffer::New(Napi::Env env, std::shared_ptr<HostMemory> memory) {
  return Construct<NativeHostBuffer>(GetAddonData(env).host_buffer_ctor, memory);
}

NativeHostBuffer::NativeHostBuffer(const Napi::CallbackInfo& info)
    : Napi::ObjectWrap<NativeHostBuffer>(info) {
  memory_ = ConstructorInit<NativeHostBuffer, std::shared_ptr<HostMemory>>(info);
  size_ = memory_->size;
  // The ArrayBuffer's finalizer drops its share of the memory; it calls no JS.
  auto share = std::make_unique<std::shared_ptr<HostMemory>>(memory_);
  Napi::ArrayBuffer buffer = Napi::ArrayBuffer::New(
      info.Env(), memory_->ptr, memory_->size,
      [](Napi::Env, void*, std::shared_ptr<HostMemory>* hint) { delete hint; }, share.get());
  share.release();
  buffer_ = Napi::Persistent(buffer);
}

uint8_t* NativeHostBuffer::Span(uint64_t offset, uint64_t bytes, const std::string& offset_name,
                                const std::string& bytes_name) const {
  if (memory_->ptr == nullptr) ThrowInvalidHandle("host buffer was freed");
  CheckSpan(offset, bytes, memory_->size, offset_name, bytes_name);
  return static_cast<uint8_t*>(memory_->ptr) + offset;
}

Napi::Value NativeHostBuffer::GetBuffer(const Napi::CallbackInfo&) { return buffer_.Value(); }

Napi::Value NativeHostBuffer::GetSize(const Napi::CallbackInfo& info) {
  return FromSize(info.Env(), size_);
}

Napi::Value NativeHostBuffer::Free(const Napi::CallbackInfo& info) {
  if (memory_->ptr == nullptr) return info.Env().Undefined();
  // Detach first: after this no JS view can reach the memory being freed.
  Napi::ArrayBuffer buffer = buffer_.Value();
  if (!buffer.IsDetached()) buffer.Detach();
  memory_->Free();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

#include "napi/range_wrap.h"

#include <exception>
#include <vector>

#include "napi/convert.h"
#include "napi/errors.h"
#include "napi/wrap.h"

namespace emoe::napi {

RangeState::~RangeState() {
  try {
    Free();
  } catch (...) {
    // A finalizer never throws.
  }
}

Reservation::~Reservation() {
  try {
    Free();
  } catch (...) {
    // A finalizer never throws.
  }
}

void Reservation::Free() {
  if (freed) return;
  backend->FreeRange(base, size);  // refused: not freed, tried again by the next Free (or the destructor)
  freed = true;
}

// Freed only once everything is: a mapping the backend refuses to unmap stays listed (and the
// reservation kept) so that the next free() or the finalizer tries again, instead of the chunk's
// memory staying mapped for good.
void RangeState::Free() {
  if (freed) return;
  std::exception_ptr first_error;
  for (auto it = mappings.begin(); it != mappings.end();) {
    try {
      backend->Unmap(base + it->first, it->second.size);
      it = mappings.erase(it);
    } catch (...) {
      if (!first_error) first_error = std::current_exception();
      ++it;
    }
  }
  if (first_error) std::rethrow_exception(first_error);
  // The last range of a reservation frees it (and reports a failure, keeping it for a retry); the others let go.
  if (reservation && reservation.use_count() == 1) reservation->Free();
  reservation.reset();
  freed = true;
}

void NativeRange::Init(Napi::Env env, AddonData& data) {
  using W = NativeRange;
  std::vector<Napi::ClassPropertyDescriptor<W>> properties = {
      Getter<W, &W::GetBase>("base"),   Getter<W, &W::GetSize>("size"),
      Getter<W, &W::GetFreed>("freed"), Method<W, &W::Map>("map"),
      Method<W, &W::Unmap>("unmap"),    Method<W, &W::SetAccess>("setAccess"),
      Method<W, &W::Free>("free"),
  };
  data.range_ctor = Napi::Persistent(DefineClass(env, kClassName, properties));
}

Napi::Object NativeRange::New(Napi::Env env, std::shared_ptr<RangeState> state) {
  return Construct<NativeRange>(GetAddonData(env).range_ctor, state);
}

NativeRange::NativeRange(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeRange>(info) {
  state_ = ConstructorInit<NativeRange, std::shared_ptr<RangeState>>(info);
}

DevicePtr NativeRange::Span(uint64_t offset, uint64_t bytes, const std::string& offset_name,
                            const std::string& bytes_name) const {
  if (state_->freed) ThrowInvalidHandle("range was freed");
  CheckSpan(offset, bytes, state_->size, offset_name, bytes_name);
  return state_->base + offset;
}

void NativeRange::CheckIdle() const {
  if (state_->busy) {
    ThrowInvalidHandle("range is being mapped by createMappedChunks; await its promise first");
  }
}

DevicePtr NativeRange::Pointer(uint64_t offset, const std::string& offset_name) const {
  if (state_->freed) ThrowInvalidHandle("range was freed");
  if (offset >= state_->size) {
    ThrowArgument(offset_name, "less than the range size " + std::to_string(state_->size));
  }
  return state_->base + offset;
}

Napi::Value NativeRange::GetBase(const Napi::CallbackInfo& info) {
  return Napi::BigInt::New(info.Env(), static_cast<uint64_t>(state_->base));
}

Napi::Value NativeRange::GetSize(const Napi::CallbackInfo& info) {
  return FromSize(info.Env(), state_->size);
}

Napi::Value NativeRange::GetFreed(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), state_->freed);
}

// map(offset, chunk, size = chunk.size)
Napi::Value NativeRange::Map(const Napi::CallbackInfo& info) {
  uint64_t offset = ToSize(info[0], "offset");
  NativeChunk* chunk_wrap = UnwrapArg<NativeChunk>(info[1], "chunk");
  const std::shared_ptr<ChunkState>& chunk = chunk_wrap->Checked();
  if (chunk->backend != state_->backend)
    ThrowArgument("chunk", "a NativeChunk of the range's backend");
  uint64_t size = info[2].IsUndefined() ? chunk->size : ToSize(info[2], "size");
  DevicePtr address = Span(offset, size, "offset", "size");
  CheckIdle();
  state_->backend->Map(address, size, chunk->id);
  state_->mappings[offset] = RangeState::Mapping{size, chunk};
  return info.Env().Undefined();
}

Napi::Value NativeRange::Unmap(const Napi::CallbackInfo& info) {
  uint64_t offset = ToSize(info[0], "offset");
  uint64_t size = ToSize(info[1], "size");
  DevicePtr address = Span(offset, size, "offset", "size");
  CheckIdle();
  state_->backend->Unmap(address, size);
  auto& mappings = state_->mappings;
  mappings.erase(mappings.lower_bound(offset), mappings.lower_bound(offset + size));
  return info.Env().Undefined();
}

Napi::Value NativeRange::SetAccess(const Napi::CallbackInfo& info) {
  uint64_t offset = ToSize(info[0], "offset");
  uint64_t size = ToSize(info[1], "size");
  std::vector<int64_t> list = ToIntegerList(info[2], "devices", 1024, 0, INT32_MAX);
  DevicePtr address = Span(offset, size, "offset", "size");
  CheckIdle();
  state_->backend->SetAccess(address, size, std::vector<int>(list.begin(), list.end()));
  return info.Env().Undefined();
}

Napi::Value NativeRange::Free(const Napi::CallbackInfo& info) {
  CheckIdle();
  state_->Free();
  return info.Env().Undefined();
}

}  // namespace emoe::napi

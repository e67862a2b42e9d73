#include "napi/convert.h"

#include <cmath>

#include "napi/errors.h"

namespace emoe::napi {
namespace {

constexpr double kMaxSafeInteger = 9007199254740991.0;  // 2^53 - 1

std::string Item(const std::string& name, size_t index) {
  return name + "[" + std::to_string(index) + "]";
}

bool IsAbsent(const Napi::Value& value) { return value.IsUndefined() || value.IsNull(); }

}  // namespace

uint64_t ToSize(const Napi::Value& value, const std::string& name) {
  if (value.IsNumber()) {
    double d = value.As<Napi::Number>().DoubleValue();
    if (d >= 0 && d <= kMaxSafeInteger && std::floor(d) == d) return static_cast<uint64_t>(d);
  }
  ThrowArgument(name, "a non-negative safe integer");
}

int64_t ToInteger(const Napi::Value& value, const std::string& name, int64_t min, int64_t max) {
  if (value.IsNumber()) {
    double d = value.As<Napi::Number>().DoubleValue();
    if (std::floor(d) == d && d >= static_cast<double>(min) && d <= static_cast<double>(max)) {
      return static_cast<int64_t>(d);
    }
  }
  ThrowArgument(name, "an integer between " + std::to_string(min) + " and " + std::to_string(max));
}

int ToDevice(const Napi::Value& value, const std::string& name) {
  if (value.IsNumber()) {
    double d = value.As<Napi::Number>().DoubleValue();
    if (std::floor(d) == d && d >= 0 && d <= INT32_MAX) return static_cast<int>(d);
  }
  ThrowArgument(name, "a device ordinal (a non-negative integer)");
}

double ToNumber(const Napi::Value& value, const std::string& name) {
  if (!value.IsNumber()) ThrowArgument(name, "a number");
  return value.As<Napi::Number>().DoubleValue();
}

bool ToBool(const Napi::Value& value, const std::string& name) {
  if (!value.IsBoolean()) ThrowArgument(name, "a boolean");
  return value.As<Napi::Boolean>().Value();
}

std::string ToString(const Napi::Value& value, const std::string& name) {
  if (!value.IsString()) ThrowArgument(name, "a string");
  return value.As<Napi::String>().Utf8Value();
}

uint64_t ToU64(const Napi::Value& value, const std::string& name) {
  if (value.IsBigInt()) {
    bool lossless = false;
    uint64_t v = value.As<Napi::BigInt>().Uint64Value(&lossless);
    if (lossless) return v;
    ThrowArgument(name, "a bigint in [0, 2^64)");
  }
  if (value.IsNumber()) return ToSize(value, name);
  ThrowArgument(name, "a bigint or a non-negative safe integer");
}

int64_t ToI64(const Napi::Value& value, const std::string& name) {
  if (value.IsBigInt()) {
    bool lossless = false;
    int64_t v = value.As<Napi::BigInt>().Int64Value(&lossless);
    if (lossless) return v;
    ThrowArgument(name, "a bigint in [-2^63, 2^63)");
  }
  if (value.IsNumber()) {
    return ToInteger(value, name, -static_cast<int64_t>(kMaxSafeInteger),
                     static_cast<int64_t>(kMaxSafeInteger));
  }
  ThrowArgument(name, "a bigint or a safe integer");
}

std::vector<int64_t> ToIntegerList(const Napi::Value& value, const std::string& name, size_t max,
                                   int64_t min, int64_t max_value) {
  if (!value.IsArray() || value.As<Napi::Array>().Length() > max) {
    ThrowArgument(name, "an array of at most " + std::to_string(max) + " integers");
  }
  Napi::Array array = value.As<Napi::Array>();
  std::vector<int64_t> result;
  for (uint32_t i = 0; i < array.Length(); ++i) {
    result.push_back(ToInteger(array.Get(i), Item(name, i), min, max_value));
  }
  return result;
}

std::vector<std::string> ToStringList(const Napi::Value& value, const std::string& name,
                                      size_t max) {
  if (!value.IsArray() || value.As<Napi::Array>().Length() > max) {
    ThrowArgument(name, "an array of at most " + std::to_string(max) + " strings");
  }
  Napi::Array array = value.As<Napi::Array>();
  std::vector<std::string> result;
  for (uint32_t i = 0; i < array.Length(); ++i)
    result.push_back(ToString(array.Get(i), Item(name, i)));
  return result;
}

std::string ToBytes(const Napi::Value& value, const std::string& name) {
  if (value.IsString()) return value.As<Napi::String>().Utf8Value();
  if (value.IsTypedArray() && value.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array) {
    Napi::Uint8Array bytes = value.As<Napi::Uint8Array>();
    return std::string(reinterpret_cast<const char*>(bytes.Data()), bytes.ByteLength());
  }
  ThrowArgument(name, "a string or a Uint8Array");
}

BackendOptions ToBackendOptions(const Napi::Value& value, const std::string& name) {
  BackendOptions options;
  if (IsAbsent(value)) return options;
  if (!value.IsObject()) ThrowArgument(name, "an object");
  Napi::Object object = value.As<Napi::Object>();
  auto field = [&](const char* key, auto apply) {
    Napi::Value v = object.Get(key);
    if (!IsAbsent(v)) apply(v, name + "." + key);
  };
  field("mockDevices", [&](const Napi::Value& v, const std::string& n) {
    options.mock_devices = static_cast<int>(ToInteger(v, n, 1, 64));
  });
  field("mockCapacity",
        [&](const Napi::Value& v, const std::string& n) { options.mock_capacity = ToSize(v, n); });
  field("cudaLibrary",
        [&](const Napi::Value& v, const std::string& n) { options.cuda_library = ToString(v, n); });
  field("nvrtcLibrary", [&](const Napi::Value& v, const std::string& n) {
    options.nvrtc_library = ToString(v, n);
  });
  field("aclLibrary",
        [&](const Napi::Value& v, const std::string& n) { options.acl_library = ToString(v, n); });
  return options;
}

void CheckSpan(uint64_t offset, uint64_t bytes, uint64_t size, const std::string& offset_name,
               const std::string& bytes_name) {
  if (offset > size) ThrowArgument(offset_name, "at most " + std::to_string(size));
  if (bytes > size - offset) {
    ThrowArgument(bytes_name, "at most " + std::to_string(size - offset) + " (the bytes after " +
                                  offset_name + " " + std::to_string(offset) + ")");
  }
}

Napi::Number FromSize(Napi::Env env, uint64_t value) {
  return Napi::Number::New(env, static_cast<double>(value));
}

}  // namespace emoe::napi

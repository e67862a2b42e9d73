// JS values -> native values, validated. Every failure is INVALID_ARGUMENT naming the
// argument ("Invalid argument: offset must be a non-negative safe integer").
#pragma once

#include <napi.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/backend.h"

namespace emoe::napi {

// A size or offset: a JS number that is a safe non-negative integer.
uint64_t ToSize(const Napi::Value& value, const std::string& name);
// An integer number in [min, max].
int64_t ToInteger(const Napi::Value& value, const std::string& name, int64_t min, int64_t max);
// A device ordinal: integer in [0, 2^31).
int ToDevice(const Napi::Value& value, const std::string& name);
double ToNumber(const Napi::Value& value, const std::string& name);
bool ToBool(const Napi::Value& value, const std::string& name);
std::string ToString(const Napi::Value& value, const std::string& name);
// A bigint (lossless) or a safe integer number.
uint64_t ToU64(const Napi::Value& value, const std::string& name);
int64_t ToI64(const Napi::Value& value, const std::string& name);
// An array of at most `max` integers in [min, max_value], each named name[i].
std::vector<int64_t> ToIntegerList(const Napi::Value& value, const std::string& name, size_t max,
                                   int64_t min, int64_t max_value);
std::vector<std::string> ToStringList(const Napi::Value& value, const std::string& name,
                                      size_t max);
// A Uint8Array (Buffer included) or a string (UTF-8).
std::string ToBytes(const Napi::Value& value, const std::string& name);
// undefined/null -> defaults; unknown keys are ignored.
BackendOptions ToBackendOptions(const Napi::Value& value, const std::string& name);

// Checks that [offset, offset + bytes) lies within [0, size).
void CheckSpan(uint64_t offset, uint64_t bytes, uint64_t size, const std::string& offset_name,
               const std::string& bytes_name);

// uint64 sizes and counts travel to JS as numbers.
Napi::Number FromSize(Napi::Env env, uint64_t value);

}  // namespace emoe::napi

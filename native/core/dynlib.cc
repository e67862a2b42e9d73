#include "core/dynlib.h"

#include <dlfcn.h>

namespace emoe {

DynLib::~DynLib() {
  // Deliberately never dlclose: driver libraries register atexit handlers and
  // unloading them while threads still run is a classic crash at exit.
}

bool DynLib::Open(const std::vector<std::string>& candidates) {
  error_.clear();
  for (const auto& name : candidates) {
    void* h = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (h != nullptr) {
      handle_ = h;
      path_ = name;
      return true;
    }
    const char* e = dlerror();
    if (!error_.empty()) error_ += "; ";
    error_ += e != nullptr ? e : (name + ": unknown dlopen error");
  }
  return false;
}

void* DynLib::Symbol(const char* name) const {
  if (handle_ == nullptr) return nullptr;
  return dlsym(handle_, name);
}

}  // namespace emoe

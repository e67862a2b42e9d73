// Run-time library loading: the addon never links libcuda, libnvrtc or libascendcl.
#pragma once

#include <string>
#include <vector>

namespace emoe {

class DynLib {
 public:
  DynLib() = default;
  ~DynLib();
  DynLib(const DynLib&) = delete;
  DynLib& operator=(const DynLib&) = delete;

  // Tries each candidate in order; returns false and fills error() with every
  // attempt's dlerror() text when none loads.
  bool Open(const std::vector<std::string>& candidates);
  bool is_open() const { return handle_ != nullptr; }
  const std::string& path() const { return path_; }
  const std::string& error() const { return error_; }

  // Returns nullptr when the symbol is absent (every symbol is optional here).
  void* Symbol(const char* name) const;

  template <typename Fn>
  bool Resolve(Fn*& out, const char* name) const {
    out = reinterpret_cast<Fn*>(Symbol(name));
    return out != nullptr;
  }

 private:
  void* handle_ = nullptr;
  std::string path_;
  std::string error_;
};

}  // namespace emoe

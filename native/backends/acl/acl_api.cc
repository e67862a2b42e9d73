#include "backends/acl/acl_api.h"

#include <cstdlib>
#include <cstring>
#include <map>

namespace emoe {
namespace acl {

std::vector<std::string> LibraryCandidates(const std::string& override_path) {
  // An explicit path is what the user asked for: trying others behind their back
  // could load a different CANN than the one they meant.
  if (!override_path.empty()) return {override_path};

  std::vector<std::string> out;
  auto add = [&out](const std::string& path) {
    for (const auto& p : out)
      if (p == path) return;
    out.push_back(path);
  };
  // Bare name first: honours LD_LIBRARY_PATH as set by CANN's set_env.sh.
  add("libascendcl.so");
  for (const char* var : {"ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME"}) {
    const char* home = std::getenv(var);
    if (home != nullptr && home[0] != '\0') add(std::string(home) + "/lib64/libascendcl.so");
  }
  add("/usr/local/Ascend/ascend-toolkit/latest/lib64/libascendcl.so");
  return out;
}

std::shared_ptr<Api> LoadApi(const std::vector<std::string>& candidates, std::string* error) {
  // Cached per candidate list so the dlsym pass happens once; failures are not
  // cached, so installing CANN (or fixing LD_LIBRARY_PATH for a child) and trying
  // again works.
  static std::mutex mu;
  static std::map<std::vector<std::string>, std::shared_ptr<Api>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(candidates);
  if (it != cache.end()) return it->second;

  auto api = std::make_shared<Api>();
  // One candidate at a time so each path is reported next to its own dlerror.
  std::string tried;
  for (const auto& path : candidates) {
    if (api->lib.Open({path})) break;
    // dlerror usually starts with the path already; don't print it twice.
    const std::string& why = api->lib.error();
    tried += "\n  - " + (why.compare(0, path.size(), path) == 0 ? why : path + ": " + why);
  }
  if (!api->lib.is_open()) {
    if (error != nullptr) {
      *error = "libascendcl.so (CANN ACL runtime) could not be loaded; tried:" + tried +
               "\nPossible solutions:\n"
               "  - install the CANN toolkit and source its set_env.sh (it sets "
               "ASCEND_HOME_PATH and LD_LIBRARY_PATH)\n"
               "  - pass options.acl_library with the full path of libascendcl.so";
    }
    return nullptr;
  }

#define EMOE_ACL_RESOLVE(name, since, ret, params) api->lib.Resolve(api->name, #name);
  EMOE_ACL_FUNCTIONS(EMOE_ACL_RESOLVE)
#undef EMOE_ACL_RESOLVE

  cache.emplace(candidates, api);
  return api;
}

const char* IntroducedIn(const char* symbol) {
#define EMOE_ACL_SINCE(name, since, ret, params) \
  if (std::strcmp(symbol, #name) == 0) return since;
  EMOE_ACL_FUNCTIONS(EMOE_ACL_SINCE)
#undef EMOE_ACL_SINCE
  return "";
}

std::string CodeName(aclError code) {
  switch (code) {
    case ACL_SUCCESS: return "ACL_SUCCESS";
    case ACL_ERROR_INVALID_PARAM: return "ACL_ERROR_INVALID_PARAM";
    case ACL_ERROR_UNINITIALIZE: return "ACL_ERROR_UNINITIALIZE";
    case ACL_ERROR_REPEAT_INITIALIZE: return "ACL_ERROR_REPEAT_INITIALIZE";
    case ACL_ERROR_RT_PARAM_INVALID: return "ACL_ERROR_RT_PARAM_INVALID";
    case ACL_ERROR_RT_INVALID_DEVICEID: return "ACL_ERROR_RT_INVALID_DEVICEID";
    case ACL_ERROR_RT_CONTEXT_NULL: return "ACL_ERROR_RT_CONTEXT_NULL";
    case ACL_ERROR_BAD_ALLOC: return "ACL_ERROR_BAD_ALLOC";
    case ACL_ERROR_RT_FEATURE_NOT_SUPPORT: return "ACL_ERROR_RT_FEATURE_NOT_SUPPORT";
    case ACL_ERROR_RT_MEMORY_ALLOCATION: return "ACL_ERROR_RT_MEMORY_ALLOCATION";
    case ACL_ERROR_RT_NO_DEVICE: return "ACL_ERROR_RT_NO_DEVICE";
    case ACL_ERROR_RT_NO_PERMISSION: return "ACL_ERROR_RT_NO_PERMISSION";
  }
  return "ACL_ERROR_" + std::to_string(code);
}

}  // namespace acl
}  // namespace emoe

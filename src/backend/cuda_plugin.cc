// cuda_plugin.cc: loads the CUDA backend plugin (libkeel_cuda_backend.so, backend/cuda/plugin_entry.cc) the first
// time a caller asks for MakeBackend("cuda"), so that nothing else pays for loading the CUDA libraries.
// Where it looks: $KEEL_CUDA_PLUGIN (a path) if set, else beside the running executable, then in its parent
// directory (the build tree's tests/ finds the one in build/), then ../lib/keel/. The handle is never closed:
// backends it made may live until exit. Thread-safe (the first load happens once).
#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "backend/backend.h"

namespace keel {

#ifdef KEEL_CUDA_PLUGIN_FILE
namespace {

using EntryFn = void (*)(Result<std::unique_ptr<Backend>>*);

std::vector<std::string> Candidates() {
  std::vector<std::string> out;
  if (const char* p = std::getenv("KEEL_CUDA_PLUGIN"); p && *p) {
    out.push_back(p);
    return out;
  }
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return out;
  const std::filesystem::path dir = exe.parent_path();
  for (const auto& d : {dir, dir.parent_path(), dir.parent_path() / "lib" / "keel"})
    out.push_back((d / KEEL_CUDA_PLUGIN_FILE).string());
  return out;
}

// The entry point, or an error naming what was tried.
Result<EntryFn> LoadEntry() {
  const std::vector<std::string> where = Candidates();
  for (const std::string& path : where) {
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) continue;
    void* h = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      const char* e = ::dlerror();
      return Unavailable("--device cuda: cannot load the CUDA backend plugin " + path + ": " + (e ? e : "dlopen failed"));
    }
    auto fn = reinterpret_cast<EntryFn>(::dlsym(h, "keel_make_cuda_backend_v2"));
    if (!fn)
      return Unavailable("--device cuda: " + path + " is not a CUDA backend plugin of this keel build "
                         "(no keel_make_cuda_backend_v2)");
    return fn;
  }
  std::string tried;
  for (const auto& p : where) tried += (tried.empty() ? "" : ", ") + p;
  return Unavailable(std::string("--device cuda: the CUDA backend plugin ") + KEEL_CUDA_PLUGIN_FILE +
                     " was not found (looked for " + (tried.empty() ? std::string("nothing") : tried) +
                     "; set KEEL_CUDA_PLUGIN to its path)");
}

}  // namespace

Result<std::unique_ptr<Backend>> LoadCudaBackend() {
  static std::once_flag once;
  static Result<EntryFn> entry = Unavailable("not loaded");
  std::call_once(once, [] { entry = LoadEntry(); });
  if (!entry.ok()) return entry.status();
  Result<std::unique_ptr<Backend>> out = Unavailable("cuda: the plugin returned nothing");
  entry.value()(&out);
  return out;
}
#else
Result<std::unique_ptr<Backend>> LoadCudaBackend() {
  return Unavailable("--device cuda: this keel was built without CUDA support");
}
#endif

}  // namespace keel

// plugin_entry.cc: the one symbol of the CUDA backend plugin (libkeel_cuda_backend.so), which keel's
// MakeBackend("cuda") loads with dlopen (backend/cuda_plugin.cc). keel links no CUDA library itself: cuBLAS and
// cuBLASLt alone take ~0.4 s and ~200 MB to load and initialise, which every command and every restarted worker
// paid before, GPU or not. The entry's name carries an ABI version: a plugin from another keel build with a
// different Backend interface is refused instead of called (v2: the packed products take a WeightDtype;
// StoreHalf and AttentionDecodeHalfKv added).
#include "backend/cuda/cuda_backend.h"

extern "C" __attribute__((visibility("default"))) void keel_make_cuda_backend_v2(
    keel::Result<std::unique_ptr<keel::Backend>>* out) {
  *out = keel::MakeCudaBackend();
}

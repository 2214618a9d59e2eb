// gguf_fuzz.cc: libFuzzer target for the GGUF reader (export/gguf.h): any bytes must parse or fail with a
// Status, and every tensor and metadata value of a file that parses must be readable within its bounds.
#include <cstddef>
#include <cstdint>
#include <string>

#include "export/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = keel::GgufFile::FromBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!f.ok()) return 0;
  for (const auto& [key, v] : f->metadata()) {
    if (f->FindKey(key) == nullptr) __builtin_trap();
    (void)v.AsUint();
    (void)v.AsFloat();
    (void)v.AsString();
    (void)v.AsBool();
    (void)v.AsF32Array();
    (void)v.AsI32Array();
    (void)v.AsStringArray();
    (void)v.AsU8Array();
  }
  for (const auto& t : f->tensors()) {
    if (f->FindTensor(t.name) == nullptr) __builtin_trap();
    if (t.nelements <= (1u << 20)) (void)f->ReadF32(t.name);
  }
  return 0;
}

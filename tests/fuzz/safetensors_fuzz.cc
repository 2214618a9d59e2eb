// safetensors_fuzz.cc: libFuzzer target for the safetensors reader (formats/safetensors.h): any bytes must
// parse or fail with a Status, and every tensor of a file that parses must be readable within its bounds.
#include <cstddef>
#include <cstdint>
#include <string>

#include "formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto f = keel::SafetensorsFile::FromBytes(std::string(reinterpret_cast<const char*>(data), size));
  if (!f.ok()) return 0;
  for (const auto& name : f->names()) {
    if (!f->Find(name)) __builtin_trap();
    auto v = f->ReadF32(name);  // F32/F16/BF16 convert; other dtypes fail cleanly
    (void)v;
  }
  (void)f->metadata().size();
  return 0;
}

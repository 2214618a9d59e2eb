// cmd_export.cc: `keel export CKPT --format gguf|safetensors --out PATH [--dtype f32|f16|q8_0]` — write a model
// for llama.cpp (GGUF) or Hugging Face transformers (GPT-2 safetensors directory). CKPT is a run directory,
// a checkpoint directory, or an earlier export (so exports convert between formats).
#include <cstdio>

#include "core/env.h"
#include "export/export.h"
#include "export/gguf.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"

namespace keel::cli {

int RunExport(int argc, char** argv) {
  std::string ckpt, out, dtype = "f32";
  ExportOptions o;
  CLI::App app("Export a model to GGUF (llama.cpp) or Hugging Face GPT-2 safetensors.", "export");
  app.add_option("ckpt", ckpt, "run directory (newest valid checkpoint), checkpoint directory, or an export")
      ->required();
  app.add_option("--format", o.format, "gguf (one file) or safetensors (a Hugging Face directory)")
      ->capture_default_str();
  app.add_option("--out,-o", out, "output file (gguf) or directory (safetensors)")->required();
  app.add_option("--dtype", dtype, "f32, f16 or q8_0 (q8_0: gguf only)")->capture_default_str();
  app.add_option("--name", o.name, "general.name in the GGUF metadata (default keel-gpt2)");
  if (int rc = Parse(app, argc, argv); rc >= 0) return rc;
  // An empty --name would silently write the default name.
  if (Status s = CheckNotEmpty(app, {"--name"}); !s.ok()) return Fail("export", s);
  auto d = ParseExportDtype(dtype);
  if (!d.ok()) return Fail("export", d.status());
  o.dtype = d.value();
  if (o.format != "gguf" && o.format != "safetensors")
    return Fail("export", InvalidArgument("--format \"" + o.format + "\" is not one of gguf, safetensors"));
  // The default format is gguf; an --out that names another (x.safetensors, a directory) without --format would
  // get a GGUF file under that name.
  const bool looks_hf = (out.size() > 12 && out.compare(out.size() - 12, 12, ".safetensors") == 0) ||
                        (!out.empty() && out.back() == '/') || DefaultEnv()->IsDir(out);
  if (app.get_option("--format")->count() == 0 && looks_hf)
    return Fail("export", InvalidArgument("--out " + out + " looks like a Hugging Face export (a directory or "
                                          ".safetensors) but the format is gguf: pass --format safetensors (or "
                                          "--format gguf for a GGUF file)"));

  std::vector<std::string> warnings;
  auto snap = LoadModelForInference(ckpt, &warnings);
  for (const auto& w : warnings) std::fprintf(stderr, "warning: %s\n", w.c_str());
  if (!snap.ok()) return Fail("export", snap.status());
  if (Status s = ExportModel(*snap, out, o); !s.ok()) return Fail("export", s);
  std::printf("wrote %s (%s, %s, %s, %.2fM parameters)\n", out.c_str(), o.format.c_str(), ExportDtypeName(o.dtype),
              snap->config.ToJson().dump().c_str(), NumParams(snap->config) / 1e6);
  // Q8_0 blocks are 32 values of a row: a matrix whose rows are not a multiple of 32 values is written as F16
  // (gguf_model.cc). The file is labelled q8_0 (llama.cpp's "mostly Q8_0"), so say how many fell back, counted
  // in the file just written.
  if (o.dtype == ExportDtype::kQ8_0) {
    if (auto f = GgufFile::Open(out); f.ok()) {
      int q8 = 0, f16 = 0;
      for (const auto& t : f->tensors()) {
        q8 += t.type == GgmlType::kQ8_0;
        f16 += t.type == GgmlType::kF16;
      }
      if (f16 > 0)
        std::printf("note: %d of %d matrices are stored as F16, not Q8_0: their rows are not a multiple of 32 values\n",
                    f16, q8 + f16);
    }
  }
  return 0;
}

}  // namespace keel::cli

// gpt_config.cc: config validation, JSON (de)serialisation, and the parameter layout.
#include "model/gpt_config.h"

#include <climits>
#include <tuple>

namespace keel {

Status GptConfig::Validate(const GptConfigNames& names) const {
  auto positive = [](const char* name, int v) -> Status {
    if (v <= 0) return InvalidArgument(std::string(name) + " must be positive (got " + std::to_string(v) + ")");
    return Status::Ok();
  };
  KEEL_RETURN_IF_ERROR(positive(names.layers, layers));
  KEEL_RETURN_IF_ERROR(positive(names.heads, heads));
  KEEL_RETURN_IF_ERROR(positive(names.dim, dim));
  KEEL_RETURN_IF_ERROR(positive(names.ctx, ctx));
  KEEL_RETURN_IF_ERROR(positive(names.vocab, vocab));
  if (dim % heads != 0)
    return InvalidArgument(std::string(names.dim) + " " + std::to_string(dim) + " is not divisible by " + names.heads +
                           " " + std::to_string(heads));
  for (auto [name, v, most] : {std::tuple{names.layers, layers, 1024}, {names.dim, dim, 65536},
                                {names.ctx, ctx, 1 << 20}, {names.vocab, vocab, 1 << 24}})
    if (v > most)
      return InvalidArgument(std::string(name) + " " + std::to_string(v) + " is implausibly large (at most " +
                             std::to_string(most) + ")");
  return Status::Ok();
}

nlohmann::json GptConfig::ToJson() const {
  return {{"layers", layers}, {"heads", heads}, {"dim", dim}, {"ctx", ctx}, {"vocab", vocab}};
}

Result<GptConfig> GptConfig::FromJson(const nlohmann::json& j) {
  GptConfig c;
  if (!j.is_object()) return InvalidArgument("model config is not a JSON object");
  for (auto [key, field] : {std::pair{"layers", &c.layers}, {"heads", &c.heads}, {"dim", &c.dim}, {"ctx", &c.ctx},
                            {"vocab", &c.vocab}}) {
    if (!j.contains(key) || !j[key].is_number_integer())
      return InvalidArgument(std::string("model config: missing or non-integer field '") + key + "'");
    // Range-check before narrowing: get<int>() would silently truncate 4294967298 to 2.
    const nlohmann::json& v = j[key];
    const bool fits = v.is_number_unsigned() ? v.get<uint64_t>() <= static_cast<uint64_t>(INT_MAX)
                                             : v.get<int64_t>() >= INT_MIN && v.get<int64_t>() <= INT_MAX;
    if (!fits)
      return InvalidArgument(std::string("model config: field '") + key + "' is out of range (" + v.dump() + ")");
    *field = v.get<int>();
  }
  // A file's config: its own keys, not the flags (which the user may never have passed).
  KEEL_RETURN_IF_ERROR(c.Validate(kGptConfigJsonNames).Wrap("model config"));
  return c;
}

std::vector<ParamTensor> ParamLayout(const GptConfig& c) {
  std::vector<ParamTensor> t;
  size_t off = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape, bool decay, int group) {
    size_t n = 1;
    for (auto d : shape) n *= static_cast<size_t>(d);
    t.push_back({std::move(name), std::move(shape), off, n, decay, group});
    off += n;
  };
  const int64_t C = c.dim;
  add("wte", {c.vocab, C}, true, 0);
  add("wpe", {c.ctx, C}, true, 0);
  for (int l = 0; l < c.layers; ++l) {
    std::string p = "h." + std::to_string(l) + ".";
    add(p + "ln1.weight", {C}, false, 1 + l);
    add(p + "ln1.bias", {C}, false, 1 + l);
    add(p + "attn.qkv.weight", {3 * C, C}, true, 1 + l);
    add(p + "attn.qkv.bias", {3 * C}, false, 1 + l);
    add(p + "attn.proj.weight", {C, C}, true, 1 + l);
    add(p + "attn.proj.bias", {C}, false, 1 + l);
    add(p + "ln2.weight", {C}, false, 1 + l);
    add(p + "ln2.bias", {C}, false, 1 + l);
    add(p + "mlp.fc.weight", {4 * C, C}, true, 1 + l);
    add(p + "mlp.fc.bias", {4 * C}, false, 1 + l);
    add(p + "mlp.proj.weight", {C, 4 * C}, true, 1 + l);
    add(p + "mlp.proj.bias", {C}, false, 1 + l);
  }
  add("lnf.weight", {C}, false, c.layers + 1);
  add("lnf.bias", {C}, false, c.layers + 1);
  return t;
}

size_t NumParams(const GptConfig& c) {
  auto t = ParamLayout(c);
  return t.back().offset + t.back().size;
}

double TrainFlopsPerToken(const GptConfig& c, int T) {
  double n = static_cast<double>(NumParams(c)) - static_cast<double>(c.ctx) * c.dim;
  return 6.0 * n + 6.0 * c.layers * c.dim * static_cast<double>(T);
}

}  // namespace keel

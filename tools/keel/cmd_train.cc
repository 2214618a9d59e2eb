// cmd_train.cc: `keel train` — flags (and an optional JSON config whose fields the flags override) to
// TrainOptions, then the trainer (in this process, or in --nproc/--rdzv workers: cli_launch.h). Ctrl-C/SIGTERM
// stop at a step boundary with a checkpoint.
#include <cstring>
#include <thread>

#include "dist/communicator.h"
#include "tools/keel/cli_launch.h"
#include "tools/keel/cli_util.h"
#include "tools/keel/commands.h"
#include "train/trainer.h"

namespace keel::cli {

namespace {

// A config field, checked against the flags once they are declared (CheckConfigFields).
struct ConfigField {
  std::string path, key, flag;
  bool boolean = false;
  std::string value;  // the flag's value (not for booleans)
};

// Turns {"grad_accum": 4, "resume": true, ...} into ["--grad-accum", "4", "--resume"].
Result<std::vector<std::string>> ConfigArgs(const std::string& path, std::vector<ConfigField>* fields) {
  KEEL_ASSIGN_OR_RETURN(nlohmann::json j, ReadJsonFile(path));
  std::vector<std::string> args;
  for (auto& [key, value] : j.items()) {
    std::string flag = "--" + key;
    for (auto& ch : flag)
      if (ch == '_') ch = '-';
    if (flag == "--config") return InvalidArgument(path + ": a config file cannot name another config");
    if (value.is_boolean()) {
      fields->push_back({path, key, flag, true, ""});
      if (value.get<bool>()) args.push_back(flag);
    } else if (value.is_number() || value.is_string()) {
      fields->push_back({path, key, flag, false, value.is_string() ? value.get<std::string>() : value.dump()});
      args.push_back(flag);
      args.push_back(fields->back().value);
    } else {
      return InvalidArgument(path + ": field '" + key + "' must be a number, string or boolean");
    }
  }
  return args;
}

// Unknown fields, fields of the wrong kind and values the flag refuses, named with the config file (CLI11 would
// report the first as stray command-line arguments, and a bad value as if it had been typed on the command line).
Status CheckConfigFields(CLI::App& app, const std::vector<ConfigField>& fields) {
  for (const ConfigField& f : fields) {
    const std::string& path = f.path;
    CLI::Option* opt = app.get_option_no_throw(f.flag);
    if (!opt) return InvalidArgument("--config " + path + ": unknown field '" + f.key + "' (no flag " + f.flag + ")");
    const bool is_flag = opt->get_items_expected_max() == 0;
    if (is_flag && !f.boolean)
      return InvalidArgument("--config " + path + ": field '" + f.key + "' must be true or false");
    if (!is_flag && f.boolean)
      return InvalidArgument("--config " + path + ": field '" + f.key + "' takes a value, not true/false");
    if (is_flag) continue;
    // The value alone through the flag's validators and conversion (it lands in the flag's variable, as the full
    // parse will put it there again); then the option is reset, so the full parse sees each value once.
    try {
      opt->add_result(f.value);
      opt->run_callback();
    } catch (const CLI::ParseError& e) {
      opt->clear();
      return InvalidArgument("--config " + path + ": " + DescribeParseError(e));
    }
    opt->clear();
  }
  return Status::Ok();
}

// An option error whose flag got its value from a --config file (and from no flag on the command line after
// the configs) names that file: "--heads must be positive" blamed a flag the user never typed.
Status NameConfigSource(const Status& s, const std::vector<std::string>& args, size_t config_end,
                        const std::vector<ConfigField>& fields) {
  const std::string& m = s.message();
  if (m.rfind("--", 0) != 0) return s;
  const std::string flag = m.substr(0, m.find_first_of(" :=/,"));
  for (size_t i = config_end; i < args.size(); ++i)
    if (args[i] == flag || args[i].rfind(flag + "=", 0) == 0) return s;
  for (auto f = fields.rbegin(); f != fields.rend(); ++f)  // the last config to give it wins
    if (f->flag == flag) return s.Wrap("--config " + f->path);
  return s;
}

}  // namespace

int RunTrain(int argc, char** argv) {
  // A JSON --config supplies defaults: its fields go first, so flags given later win (TakeLast); of several
  // configs, a later one wins over an earlier one.
  std::vector<std::string> args;
  std::vector<ConfigField> config_fields;
  size_t config_end = 0;  // where the configs' arguments end in args
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    std::string path;
    if (a == "--config" && i + 1 < argc) path = argv[++i];
    else if (a.rfind("--config=", 0) == 0) path = a.substr(9);
    else {
      args.push_back(a);
      continue;
    }
    auto cfg = ConfigArgs(path, &config_fields);
    if (!cfg.ok()) return Fail("train", InvalidArgument("--config " + cfg.status().message()));
    args.insert(args.begin() + static_cast<std::ptrdiff_t>(config_end), cfg->begin(), cfg->end());
    config_end += cfg->size();
  }
  std::vector<char*> av = {argv[0]};
  for (auto& a : args) av.push_back(a.data());

  TrainOptions o;
  CLI::App app("Train a GPT model on a prepared data directory.", "train");
  app.option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
  std::string config_unused;
  app.add_option("--config", config_unused, "JSON file with any of these fields (flags override it; --inject adds to its inject)");
  app.add_option("--data", o.data_dir, "data directory from `keel prepare`")->required();
  app.add_option("--out", o.out_dir, "run directory (checkpoints, metrics.jsonl)")->required();
  app.add_option("--device", o.device, "cpu or cuda")->capture_default_str();
  app.add_option("--layers", o.model.layers)->capture_default_str();
  app.add_option("--heads", o.model.heads)->capture_default_str();
  app.add_option("--dim", o.model.dim, "embedding width")->capture_default_str();
  app.add_option("--ctx", o.model.ctx, "context length")->capture_default_str();
  app.add_option("--vocab", o.model.vocab, "model vocabulary (default: the tokenizer's; larger pads it)");
  app.add_option("--batch", o.batch, "sequences per micro-batch")->capture_default_str();
  app.add_option("--grad-accum", o.grad_accum, "micro-batches per step (the global batch)")->capture_default_str();
  app.add_option("--steps", o.steps, "total optimizer steps")->capture_default_str();
  app.add_option("--lr", o.optim.lr, "peak learning rate")->capture_default_str();
  app.add_option("--min-lr-frac", o.optim.min_lr_frac, "final LR as a fraction of --lr")->capture_default_str();
  app.add_option("--warmup", o.optim.warmup, "linear warmup steps")->capture_default_str();
  app.add_option("--weight-decay", o.optim.weight_decay)->capture_default_str();
  app.add_option("--grad-clip", o.optim.grad_clip, "global gradient-norm clip (0: off)")->capture_default_str();
  app.add_option("--seed", o.seed)->check(SeedValidator())->capture_default_str();
  app.add_option("--threads", o.threads, "CPU threads per worker (0: all cores, divided among this machine's workers)")->capture_default_str();
  app.add_option("--peak-gflops", o.peak_gflops,
                 "GEMM peak per worker for the MFU shown (0: measure the backend's own GEMM at start; e.g. 989000 "
                 "for an H100's bf16 datasheet peak)")
      ->capture_default_str();
  app.add_option("--eval-every", o.eval_every, "validation every N steps (0: only at the end)")->capture_default_str();
  app.add_option("--eval-batches", o.eval_batches)->capture_default_str();
  app.add_option("--checkpoint-every", o.checkpoint_every)->capture_default_str();
  app.add_option("--keep", o.keep, "checkpoints to keep (0: all)")->capture_default_str();
  app.add_option("--stop-after", o.stop_after, "stop with a checkpoint after N steps of this invocation");
  app.add_flag("--resume", o.resume, "continue the run in --out from its newest valid checkpoint");
  bool fast = false;
  app.add_flag("--fast", fast, "trade bit-exact reproducibility across worker counts for speed");
  bool deterministic_flag = false;
  app.add_flag("--deterministic", deterministic_flag, "bit-exact across worker counts and resumes (default)");
  bool no_progress = false;  // a plain flag: a callback flag let "--no-progress=x" throw out of CLI11
  app.add_flag("--no-progress", no_progress, "no live progress line");
  app.add_option("--check-every", o.check_every,
                 "every K steps compare a hash of the whole training state across workers and keep an in-memory "
                 "snapshot for rollbacks (parameters are compared every step; 0: never)")
      ->capture_default_str();
  app.add_option("--verify-fraction", o.verify_fraction,
                 "deterministic mode: fraction of micro-batches (at most 8 per step) recomputed by a second worker, "
                 "gradients compared bit for bit; a mismatch is recomputed on three workers and the odd one struck")
      ->capture_default_str();
  app.add_option("--spike-factor", o.spike_factor,
                 "loss above running mean + F x running deviation: roll back to the snapshot and skip that data "
                 "(0: off)")
      ->capture_default_str();
  app.add_option("--quarantine-after", o.quarantine_after,
                 "faults of one kind (non-finite results; corrupted state) on one worker within 100 steps (diloco: 100 "
                 "outer rounds) before it is quarantined")
      ->capture_default_str();
  app.add_option("--quarantine-floor", o.quarantine_floor,
                 "never quarantine a worker when fewer than this many would be left (one worker alone cannot "
                 "detect silent corruption; a faulty one kept has each fault caught and recomputed)")
      ->capture_default_str();
  app.add_flag("--even-shares", o.even_shares,
               "split each step's micro-batches evenly whatever the workers' measured speeds (diloco results then "
               "do not depend on timing; slower workers are waited for)");
  app.add_option("--straggler-evict", o.straggler_evict,
                 "elastic: a worker slower than this multiple of the median for 5 steps leaves (0: never; slower "
                 "workers always get fewer micro-batches)")
      ->capture_default_str();
  std::vector<std::string> injects;  // every --inject adds its faults (the last one does not replace the others)
  app.add_option("--inject", injects,
                 "fault injection for testing, e.g. 'crash:rank=1,step=5;nan:rank=2,step=8', or a slow link "
                 "'link:rank=3,mbit=100,latency_ms=20' (needs KEEL_ALLOW_FAULT_INJECTION=1; see docs/step-protocol.md); "
                 "may be repeated")
      ->multi_option_policy(CLI::MultiOptionPolicy::TakeAll);
  app.add_option("--sync", o.sync,
                 "ddp: gradients reduced every step; diloco: each worker takes --inner-steps local steps, then the "
                 "pseudo-gradients are averaged and an outer Nesterov SGD step applied (docs/diloco.md)")
      ->capture_default_str();
  app.add_option("--inner-steps", o.inner_steps, "diloco: inner steps per outer round (H)")->capture_default_str();
  app.add_option("--outer-lr", o.outer_lr, "diloco: outer learning rate")->capture_default_str();
  app.add_option("--outer-momentum", o.outer_momentum, "diloco: outer Nesterov momentum")->capture_default_str();
  app.add_option("--optimizer", o.optimizer, "adamw or sgd (ddp's optimizer, diloco's inner one; sgd: CPU only)")->capture_default_str();
  app.add_option("--compress", o.compress,
                 "none, bf16 or int8 (per-256-value scales, error feedback): gradients (ddp) / pseudo-gradients "
                 "(diloco) on the wire")
      ->capture_default_str();
  DistFlags dist;
  dist.AddTo(app);
  SetUpOptions(app);  // the config's values go through the same checks as typed ones
  if (Status s = CheckConfigFields(app, config_fields); !s.ok()) return Fail("train", s);
  if (int rc = Parse(app, static_cast<int>(av.size()), av.data()); rc >= 0) return rc;
  // Empty means "not given" for these (a single process; the hostname): an explicit "" is a mistake.
  if (Status s = CheckNotEmpty(app, {"--rdzv", "--nnodes", "--host", "--iface"}); !s.ok()) return Fail("train", s);
  for (const auto& spec : injects) o.inject += (o.inject.empty() ? "" : ";") + spec;
  if (fast && deterministic_flag) {
    // One from a --config file and the other typed after it: the command line wins, as for every flag.
    auto typed = [&](const std::string& flag) {
      for (size_t i = config_end; i < args.size(); ++i)
        if (args[i] == flag || args[i].rfind(flag + "=", 0) == 0) return true;
      return false;
    };
    const bool typed_fast = typed("--fast"), typed_deterministic = typed("--deterministic");
    if (typed_fast == typed_deterministic)
      return Fail("train", InvalidArgument("--fast and --deterministic exclude each other"));
    fast = typed_fast;
  }
  o.deterministic = !fast;
  // DiLoCo's settings under ddp would be ignored without a word (a --sync typo, a config from a diloco run).
  if (o.sync != "diloco")
    for (const char* flag : {"--inner-steps", "--outer-lr", "--outer-momentum"})
      if (app.count(flag) > 0)
        return Fail("train", NameConfigSource(InvalidArgument(std::string(flag) + " applies only with --sync diloco"),
                                              args, config_end, config_fields));
  if (no_progress) o.progress = false;
  if (o.eval_every == 0) o.eval_every = o.steps;
  if (Status s = ValidateTrainOptions(o); !s.ok())
    return Fail("train", NameConfigSource(s, args, config_end, config_fields));

  // One process, a launcher of workers, or one worker of a job (cli_launch.h); workers re-run these arguments.
  return RunTrainAnyMode(o, dist, std::vector<std::string>(argv, argv + argc));
}

}  // namespace keel::cli

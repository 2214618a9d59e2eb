// cli_launch.cc: `keel train` as one process, as the launcher of local workers, or as one worker of a job.
#include "tools/keel/cli_launch.h"

#include <net/if.h>
#include <sys/sysinfo.h>
#include <unistd.h>

#include <climits>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <thread>

#include "core/env.h"
#include "data/dataset.h"
#include "dist/rendezvous.h"
#include "formats/checkpoint.h"
#include "tools/keel/cli_util.h"
#include "elastic/events.h"
#include "elastic/fault_inject.h"
#include "elastic/membership.h"
#include "model/gpt.h"
#include "train/launcher.h"

namespace keel::cli {

void DistFlags::AddTo(CLI::App& app) {
  app.add_option("--nproc", nproc, "worker processes on this machine (data-parallel; default 1)")
      ->each([this](const std::string&) { nproc_given = true; });
  app.add_option("--nproc-per-node", nproc_per_node, "same as --nproc, for multi-machine jobs")
      ->each([this](const std::string&) { nproc_per_node_given = true; });
  app.add_option("--rdzv", rdzv,
                 "rendezvous store: redis://[:PASSWORD@]HOST:PORT/JOB_ID (many machines; or the password in "
                 "$KEEL_RDZV_PASSWORD) or file:///DIR (a directory every worker sees); one job id per run");
  app.add_option("--nnodes", nnodes, "machines in the job: N, or MIN:MAX (start with MIN..MAX; needs --rdzv)");
  app.add_option("--host", host, "address other workers use to reach this machine (default: its hostname; "
                                  "127.0.0.1 for one machine)");
  app.add_option("--iface", iface, "network interface whose address other workers use (instead of --host)");
  app.add_option("--rdzv-timeout", rdzv_timeout_s, "seconds to wait for the other workers/machines to join")
      ->capture_default_str();
  app.add_option("--comm-timeout", comm_timeout_s,
                 "seconds without progress after which a collective (or connecting the group) fails: a dead or "
                 "hung worker is reported within this time (static jobs; elastic jobs use --hang-timeout)")
      ->capture_default_str()
      ->each([this](const std::string&) { comm_timeout_given = true; });
  app.add_flag("--elastic", elastic,
               "fault-tolerant training: survivors of a crashed, hung or corrupting worker re-form and redo the step "
               "(implied by --min-workers/--max-workers/--max-restarts)");
  app.add_option("--min-workers", min_workers, "elastic: quorum floor; with fewer live workers the job waits");
  app.add_option("--max-workers", max_workers, "elastic: most workers in a group (more wait as spares)");
  app.add_option("--max-restarts", max_restarts, "elastic: restarts of failed workers allowed (per machine)");
  app.add_option("--hang-timeout", hang_timeout_s,
                 "elastic: the one timeout: a worker silent this long has been declared hung and evicted (after 0.75x "
                 "of it; heartbeats every 1/10 of it); also bounds forming a group; collectives are backstopped at 30x")
      ->capture_default_str();
}

namespace {

// Parses --rdzv; a Redis password may also come from $KEEL_RDZV_PASSWORD (kept off command lines, which
// every user of the machine can read with ps).
Result<StoreUrl> RdzvUrl(const std::string& text) {
  KEEL_ASSIGN_OR_RETURN(StoreUrl u, ParseStoreUrl(text));
  const char* pw = std::getenv("KEEL_RDZV_PASSWORD");
  if (u.kind == StoreUrl::kRedis && u.password.empty() && pw && *pw) u.password = pw;
  return u;
}

void PrintDone(const TrainResult& r) {
  if (r.steps_this_run == 0 && !r.stopped_early) {  // e.g. a --resume of a finished run: no loss to report
    std::fprintf(stderr, "done: at step %lld; this run trained no steps itself (a finished run resumed? raise "
                 "--steps to go on)\n", static_cast<long long>(r.final_step));
    return;
  }
  // wire: bytes this worker sent in collectives during this invocation (dist/link_emulation.h).
  std::fprintf(stderr, "done: %lld steps, loss %.4f%s, wire %.3f MB sent\n", static_cast<long long>(r.final_step),
               r.last_loss, r.last_val_loss >= 0 ? (", val loss " + std::to_string(r.last_val_loss)).c_str() : "",
               static_cast<double>(r.wire_bytes) / 1e6);
}

int RunSingle(const TrainOptions& o) {
  InstallStopHandlers();
  auto comm = MakeLocalCommunicator();
  auto r = Train(o, comm.get(), &StopFlag());
  if (!r.ok()) return Fail("train", r.status());
  PrintDone(*r);
  return 0;
}

// What must be identical on every worker of a job (rank 0's copy is the job's).
Result<nlohmann::json> Descriptor(const TrainOptions& o) {
  KEEL_ASSIGN_OR_RETURN(Dataset data, Dataset::Open(o.data_dir));
  nlohmann::json model = {{"layers", o.model.layers}, {"heads", o.model.heads}, {"dim", o.model.dim},
                          {"ctx", o.model.ctx}, {"vocab", o.model.vocab}};
  nlohmann::json training = {{"device", o.device},
                             {"batch", o.batch},
                             {"grad_accum", o.grad_accum},
                             {"steps", o.steps},
                             {"seed", o.seed},
                             {"lr", o.optim.lr},
                             {"min_lr_frac", o.optim.min_lr_frac},
                             {"warmup", o.optim.warmup},
                             {"total_steps", o.optim.total_steps},
                             {"weight_decay", o.optim.weight_decay},
                             {"grad_clip", o.optim.grad_clip},
                             {"deterministic", o.deterministic},
                             {"eval_every", o.eval_every},
                             {"eval_batches", o.eval_batches},
                             {"stop_after", o.stop_after},
                             // The step protocol's options: members that differ here would issue different
                             // collectives, split micro-batches differently, or vote on different checks, and the
                             // steps would fail forever instead of the joiner being refused.
                             {"optimizer", o.optimizer},
                             {"sync", o.sync},
                             {"inner_steps", o.inner_steps},
                             {"outer_lr", o.outer_lr},
                             {"outer_momentum", o.outer_momentum},
                             {"compress", o.compress},
                             {"even_shares", o.even_shares},
                             {"check_every", o.check_every},
                             {"verify_fraction", o.verify_fraction},
                             {"spike_factor", o.spike_factor},
                             {"quarantine_after", o.quarantine_after},
                             {"quarantine_floor", o.quarantine_floor},
                             {"straggler_evict", o.straggler_evict}};
  int64_t resume_step = 0;
  if (o.resume) {
    auto ckpts = ListCheckpoints(o.out_dir);
    if (ckpts.ok() && !ckpts->empty()) resume_step = ckpts->front().step;
  }
  return nlohmann::json{{"keel_version", KEEL_VERSION},
                        {"model", model},
                        {"data_fingerprint", data.fingerprint()},
                        {"training", training},
                        {"resume", {{"resume", o.resume}, {"newest_checkpoint_step", resume_step}}}};
}

// One worker of an elastic job: it joins the job's membership (a new uid), then trains in whatever generation
// it is admitted to; a restarted or late worker gets the state from a live peer.
int RunElasticWorker(TrainOptions o, const DistFlags& d, const WorkerPlacement& p, const std::string& url_text) {
  if (d.comm_timeout_given)
    return Fail("train", InvalidArgument("--comm-timeout does not apply to elastic jobs: --hang-timeout is their one "
                                         "timeout (collectives are backstopped at 30x it)"));
  if (!(d.hang_timeout_s > 0)) return Fail("train", InvalidArgument("--hang-timeout must be positive"));
  if (o.inject.empty())
    if (const char* v = std::getenv("KEEL_INJECT")) o.inject = v;
  auto desc = Descriptor(o);
  if (!desc.ok()) return Fail("train", desc.status());
  desc->erase("resume");  // a restarted worker sees newer checkpoints than the job started from
  // The quarantine floor is never below --min-workers (trainer_step.cc): members must agree on it.
  (*desc)["training"]["min_workers"] = std::max(1, d.min_workers);
  auto url = RdzvUrl(url_text);
  if (!url.ok()) return Fail("train", url.status());
  auto store = OpenStore(*url, std::min(5.0, d.rdzv_timeout_s));
  if (!store.ok()) return Fail("train", store.status());
  auto hb_store = OpenStore(*url, std::min(5.0, d.rdzv_timeout_s));  // the heartbeat thread's own connection
  if (!hb_store.ok()) return Fail("train", hb_store.status());
  ElasticOptions eo;
  eo.t = ElasticTimeouts::From(d.hang_timeout_s, d.rdzv_timeout_s);
  eo.min_workers = std::max(1, d.min_workers);
  eo.max_workers = d.max_workers > 0 ? d.max_workers : (1 << 20);
  eo.expected_initial = p.world;
  eo.rank = p.rank;
  eo.host = !d.host.empty() ? d.host : p.host;
  eo.iface = !d.iface.empty() ? d.iface : p.iface;
  EventLog events;
  auto log = [](const std::string& line) { std::fprintf(stderr, "%s\n", line.c_str()); };
  auto group = ElasticGroup::Join(*store, *hb_store, eo, *desc, &events, log);
  if (!group.ok()) return Fail("train", group.status());
  o.launch_rank = p.rank;
  o.launch_world = p.world;
  o.progress = true;  // whoever leads the current generation prints progress
  auto r = TrainElastic(o, group->get(), &StopFlag(), log);
  if (!r.ok()) {
    if (r.status().code() == Code::kAborted && r.status().message().rfind("quarantined", 0) == 0) {
      std::fprintf(stderr, "keel train: %s\n", r.status().message().c_str());
      return kExitQuarantined;
    }
    return Fail("train", r.status());
  }
  if (r->final_step > 0 || o.steps == 0) PrintDone(*r);
  else
    std::fprintf(stderr, "the job finished before this worker could take part (a rerun with the same --rdzv job id "
                         "trains nothing: use a new id)\n");
  return 0;
}

int RunWorker(TrainOptions o, const DistFlags& d, const WorkerPlacement& p) {
  InstallStopHandlers();
  std::signal(SIGPIPE, SIG_IGN);  // a launcher that died: keep going to the checkpoint, don't die on a log line
  const bool from_keel = p.source == "KEEL_RANK";
  if (!from_keel && (d.nproc > 1 || d.nproc_per_node > 1 || !d.nnodes.empty()))
    return Fail("train", InvalidArgument(p.source + " is set: this process is one worker started by another "
                                         "launcher; --nproc/--nproc-per-node/--nnodes do not apply"));
  if (p.world == 1 && !(from_keel && d.Elastic())) return RunSingle(o);
  std::string url_text = from_keel && !p.rdzv.empty() ? p.rdzv : d.rdzv;
  if (url_text.empty()) {
    std::string why = p.source + "=" + std::to_string(p.rank) + " makes this process one of " +
                      std::to_string(p.world) + " workers, which need a store to find each other: pass --rdzv "
                      "redis://HOST:PORT/JOB_ID or --rdzv file:///DIR (a directory every worker sees)";
    if (p.has_master_addr) why += " (MASTER_ADDR/MASTER_PORT alone are not enough: keel does not host a store)";
    return Fail("train", InvalidArgument(why));
  }
  if (o.threads == 0) {
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    o.threads = std::max(1, static_cast<int>(hw) / std::max(1, p.local_world));
  }
  auto status = ValidateTrainOptions(o);
  if (!status.ok()) return Fail("train", status);
  if (d.Elastic()) return RunElasticWorker(std::move(o), d, p, url_text);
  if (p.rank != 0) o.progress = false;
  auto desc = Descriptor(o);
  if (!desc.ok()) return Fail("train", desc.status());
  auto url = RdzvUrl(url_text);
  if (!url.ok()) return Fail("train", url.status());
  RendezvousOptions ro;
  ro.rdzv_timeout_s = d.rdzv_timeout_s;
  ro.comm_timeout_s = d.comm_timeout_s;
  ro.host = !d.host.empty() ? d.host : p.host;
  ro.iface = !d.iface.empty() ? d.iface : p.iface;
  auto store = OpenStore(*url, std::min(5.0, d.rdzv_timeout_s));
  if (!store.ok()) return Fail("train", store.status());
  auto group = WorkerGroup::Join(*store, url->job, p.rank, p.world, *desc, ro, &StopFlag());
  if (!group.ok()) return Fail("train", group.status());
  std::vector<int> all(static_cast<size_t>(p.world));
  for (int r = 0; r < p.world; ++r) all[static_cast<size_t>(r)] = r;
  auto comm = (*group)->CreateCommunicator(0, all, &StopFlag());
  if (!comm.ok()) return Fail("train", comm.status());
  auto r = Train(o, comm->get(), &StopFlag());
  if (!r.ok()) return Fail("train", r.status());
  // Everyone is done with the store once this barrier passes; rank 0 then removes the job's keys.
  Status b = (*comm)->Barrier();
  if (b.ok() && p.rank == 0) (void)(*group)->ClearJob();
  if (p.rank == 0) PrintDone(*r);
  return 0;
}

Result<std::pair<int, int>> ParseNnodes(const std::string& s) {
  if (s.empty()) return std::make_pair(1, 1);
  size_t colon = s.find(':');
  auto num = [&](const std::string& t) -> int {
    char* end = nullptr;
    long v = std::strtol(t.c_str(), &end, 10);
    return (t.empty() || *end != 0 || v < 1 || v > 100000) ? -1 : static_cast<int>(v);
  };
  int lo = num(s.substr(0, colon)), hi = colon == std::string::npos ? lo : num(s.substr(colon + 1));
  if (lo < 1 || hi < lo) return InvalidArgument("--nnodes " + s + ": expected N or MIN:MAX with 1 <= MIN <= MAX");
  return std::make_pair(lo, hi);
}

// The launch flags' own ranges, checked in every mode (a single worker ignores most of them, but a value it
// ignores is still a mistake to report).
Status ValidateDistFlags(const DistFlags& d) {
  if (d.nproc < 0 || d.nproc_per_node < 0 || (d.nproc_given && d.nproc == 0) ||
      (d.nproc_per_node_given && d.nproc_per_node == 0))
    return InvalidArgument("--nproc/--nproc-per-node must be >= 1");
  if (d.nproc > 0 && d.nproc_per_node > 0 && d.nproc != d.nproc_per_node)
    return InvalidArgument("--nproc and --nproc-per-node differ");
  if (std::max(d.nproc, d.nproc_per_node) > 1024)
    return InvalidArgument("--nproc " + std::to_string(std::max(d.nproc, d.nproc_per_node)) + " is too many");
  // At most a week: the timeouts become integer milliseconds and steady-clock deadlines (30x for the collective
  // backstop), which a value like 1e16 would overflow.
  constexpr double kMaxTimeoutS = 7 * 24 * 3600;
  auto seconds = [](double s) { return s > 0 && s <= kMaxTimeoutS; };
  const std::string range = " must be a positive number of seconds, at most 604800 (a week)";
  if (!seconds(d.rdzv_timeout_s)) return InvalidArgument("--rdzv-timeout" + range);
  if (!seconds(d.comm_timeout_s)) return InvalidArgument("--comm-timeout" + range);
  if (!seconds(d.hang_timeout_s)) return InvalidArgument("--hang-timeout" + range);
  // Gloo takes whole milliseconds, and 0 ms is its "no timeout": a value below 1 ms would turn the fail-fast
  // off (and a heartbeat every microsecond would flood the store).
  if (d.comm_timeout_s < 0.01) return InvalidArgument("--comm-timeout must be at least 0.01 s");
  if (d.hang_timeout_s < 0.1) return InvalidArgument("--hang-timeout must be at least 0.1 s");
  if (d.Elastic() && d.comm_timeout_given)
    return InvalidArgument("--comm-timeout does not apply to elastic jobs: --hang-timeout is their one "
                           "timeout (collectives are backstopped at 30x it)");
  if (d.max_restarts < 0 || d.min_workers < 0 || d.max_workers < 0)
    return InvalidArgument("--min-workers/--max-workers/--max-restarts must be >= 0");
  if (d.max_workers > 0 && d.min_workers > d.max_workers)
    return InvalidArgument("--min-workers " + std::to_string(d.min_workers) + " is above --max-workers " +
                           std::to_string(d.max_workers));
  // Without --rdzv the store is this launcher's own: no other machine can ever join, so the job would wait for
  // ever below its minimum.
  const int local = std::max({1, d.nproc, d.nproc_per_node});
  if (d.rdzv.empty() && d.nnodes.empty() && d.min_workers > local)
    return InvalidArgument("--min-workers " + std::to_string(d.min_workers) + " exceeds --nproc " +
                           std::to_string(local) + " (without --rdzv no other machine can join)");
  // A misspelt interface used to be ignored by one process and to fail every worker of a job at its first
  // connection, in words of Gloo's ("ifa != nullptr. Unable to find address for: ...").
  if (!d.iface.empty() && if_nametoindex(d.iface.c_str()) == 0)
    return InvalidArgument("--iface " + d.iface + ": no such network interface on this machine");
  // Syntax before anything is opened (a typo used to surface only after the data directory was read).
  KEEL_RETURN_IF_ERROR(ParseNnodes(d.nnodes).status());
  if (!d.rdzv.empty()) {
    auto url = ParseStoreUrl(d.rdzv);
    if (!url.ok()) return url.status();  // names --rdzv itself
  }
  return Status::Ok();
}

std::string Gigabytes(double bytes) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "%.1f GB", bytes / 1e9);
  return buf;
}

// A --batch whose micro-batch cannot fit in this machine's memory is refused before anything is allocated (it
// used to end in "cpu: out of memory allocating N bytes", naming neither --batch nor the size). The estimate is
// a lower bound (one micro-batch's activations, without parameters, optimizer state or workspaces; without the
// logits when the vocabulary is the data's, not yet known here), compared with RAM + swap, so a step that fits
// is never refused. CPU only: another device's activations live in its own memory, and GptModel::Create names
// --batch when they do not fit there.
Status CheckMicroBatchMemory(const TrainOptions& o) {
  if (o.device != "cpu" || o.batch <= 0 || o.model.ctx <= 0) return Status::Ok();
  GptConfig c = o.model;
  c.vocab = std::max(c.vocab, 0);
  const double need = GptModel::ActivationBytes(c, o.batch, o.model.ctx);
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages <= 0 || page <= 0) return Status::Ok();  // unknown: nothing to compare with
  double have = static_cast<double>(pages) * static_cast<double>(page);
  struct sysinfo si {};
  if (sysinfo(&si) == 0) have += static_cast<double>(si.totalswap) * si.mem_unit;
  // Parameters, gradients and AdamW's two moments: 16 bytes a parameter, whatever the batch.
  const double state = 16.0 * static_cast<double>(NumParams(c));
  if (state > have)
    return InvalidArgument("--layers " + std::to_string(c.layers) + " --dim " + std::to_string(c.dim) + " --vocab " +
                           std::to_string(c.vocab) + ": the model's parameters, gradients and optimizer state need " +
                           Gigabytes(state) + ", more than this machine's " + Gigabytes(have) + " (RAM + swap)");
  if (need + state <= have) return Status::Ok();
  return InvalidArgument("--batch " + std::to_string(o.batch) + " x --ctx " + std::to_string(o.model.ctx) +
                         ": one micro-batch needs at least " + Gigabytes(need) + " of activation memory (besides " +
                         Gigabytes(state) + " of parameters and optimizer state), more than this machine's " +
                         Gigabytes(have) + " (RAM + swap): lower --batch (a larger --grad-accum keeps the global "
                         "batch) or --ctx");
}

// Checks made once before any worker starts: the options' own ranges first, then what they ask of this machine
// and of the run being resumed.
Status Preflight(const TrainOptions& o, const DistFlags& d, bool launching) {
  KEEL_RETURN_IF_ERROR(ValidateTrainOptions(o));
  KEEL_RETURN_IF_ERROR(CheckMicroBatchMemory(o));
  if (!launching) return Status::Ok();  // one process: the trainer checks --data and --out itself, at once
  // --data and --out once, here: otherwise every worker prints its own copy of the error (and an elastic launcher
  // restarts workers that fail on it). An elastic worker may be joining a running job, whose --out holds the run:
  // the workers judge that themselves.
  KEEL_RETURN_IF_ERROR(Dataset::Open(o.data_dir).status());
  if (!d.Elastic()) KEEL_RETURN_IF_ERROR(CheckOutDirForNewOrResumedRun(DefaultEnv(), o.out_dir, o.resume));
  return Status::Ok();
}

int RunLauncher(const TrainOptions& o, const DistFlags& d, const std::vector<std::string>& args) {
  const int nproc = std::max({1, d.nproc, d.nproc_per_node});
  const bool elastic = d.Elastic();
  {
    std::string spec = o.inject;
    if (spec.empty())
      if (const char* v = std::getenv("KEEL_INJECT")) spec = v;
    auto inj = FaultInjector::Create(spec, 0, 1);
    if (!inj.ok()) return Fail("train", inj.status());
    if (*inj) {  // (the same refusal as the trainer's, before any worker starts)
      const auto specs = ParseFaultSpec(spec);  // (named: a range-for over the temporary's value() would dangle)
      for (const FaultSpec& f : specs.value())
        if (f.kind == FaultSpec::kDeviceFail)
          return Fail("train", InvalidArgument("--inject: device-fail is a keel serve fault; training does not inject it"));
    }
  }
  auto nn = ParseNnodes(d.nnodes);
  if (!nn.ok()) return Fail("train", nn.status());
  auto status = ValidateTrainOptions(o);
  if (!status.ok()) return Fail("train", status);
  InstallStopHandlers();  // Ctrl-C while waiting for the other machines aborts the wait
  // `keel train ... | head` must not kill the launcher (and with it, through the death signal, every worker) when
  // the reader goes away: lost output is not a training failure.
  std::signal(SIGPIPE, SIG_IGN);

  LaunchOptions lo;
  lo.nproc = nproc;
  std::string rdzv = d.rdzv, temp_dir;
  if (!rdzv.empty()) {
    auto url = RdzvUrl(rdzv);
    if (!url.ok()) return Fail("train", url.status());
    auto store = OpenStore(*url, std::min(5.0, d.rdzv_timeout_s));
    if (!store.ok()) return Fail("train", store.status());
    if (elastic) {
      // Elastic machines do not wait for each other: each takes the next node index and starts its workers,
      // which join the job's membership (a late machine's workers join the running job).
      auto k = (*store)->Increment("elastic_nodes");
      if (!k.ok()) return Fail("train", k.status());
      lo.node_rank = static_cast<int>(*k - 1);
      lo.nnodes = std::max(nn->first, lo.node_rank + 1);
    } else {
      RendezvousOptions ro;
      ro.rdzv_timeout_s = d.rdzv_timeout_s;
      auto node = JoinAsNode(**store, url->job, nn->first, nn->second, nproc, ro, &StopFlag());
      if (!node.ok()) return Fail("train", node.status());
      lo.node_rank = node->node_rank;
      lo.nnodes = node->nnodes;
    }
  } else {
    if (nn->second > 1)
      return Fail("train", InvalidArgument("--nnodes " + d.nnodes + " needs --rdzv redis://HOST:PORT/JOB_ID (or "
                                           "file:///DIR on a shared filesystem) for the machines to meet"));
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/keel-rdzv-XXXXXX";
    if (!mkdtemp(tmpl.data()))
      return Fail("train", IoError("cannot create a rendezvous directory " + tmpl + ": " + std::strerror(errno)));
    temp_dir = tmpl;
    rdzv = "file://" + temp_dir;
  }
  if (StopFlag().load()) return Fail("train", Aborted("stopped before the workers started"));
  lo.env.emplace_back("KEEL_RDZV", rdzv);
  // Loopback is enough only when no other machine can take part: the launcher's private store, a static job of
  // one machine, or an elastic one whose --nnodes says at most one. An elastic job with a shared --rdzv admits
  // machines that arrive later (this first one has nnodes 1 now), so it advertises its hostname.
  const bool one_machine =
      d.rdzv.empty() || (!elastic && lo.nnodes == 1) || (elastic && !d.nnodes.empty() && nn->second == 1);
  std::string host = d.host;
  if (host.empty() && d.iface.empty() && one_machine) host = "127.0.0.1";
  if (!host.empty()) lo.env.emplace_back("KEEL_HOST", host);
  if (!d.iface.empty()) lo.env.emplace_back("KEEL_IFACE", d.iface);
  char self[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return Fail("train", IoError("cannot find keel's own binary (/proc/self/exe)"));
  lo.exe.assign(self, static_cast<size_t>(n));
  lo.args = args;
  EventLog events;
  if (elastic) {
    lo.elastic = true;
    lo.max_restarts = d.max_restarts;
    // The time origin of random fault schedules (the same for restarted workers).
    if (!std::getenv("KEEL_INJECT_T0")) lo.env.emplace_back("KEEL_INJECT_T0", std::to_string(EventLog::Now()));
    const std::string events_path = JoinPath(o.out_dir, "events.jsonl");
    lo.on_restart = [&events, events_path, node = lo.node_rank](int rank, int pid, int restart, const std::string& why) {
      if (!events.is_open()) events.Open(events_path);
      events.Emit("restart", {{"rank", rank}, {"pid", pid}, {"restart", restart}, {"node", node}, {"why", why}});
    };
    lo.on_exit = [&events, events_path](int rank, int pid, int status) {
      if (!events.is_open()) events.Open(events_path);
      events.Emit("worker_exit", {{"rank", rank}, {"pid", pid}, {"status", status}});
    };
  }
  auto res = LaunchWorkers(lo);
  if (!temp_dir.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_dir, ec);
  }
  if (!res.ok()) return Fail("train", res.status());
  if (res->exit_code != 0) return Fail("train", Unavailable(res->message + "; training failed"));
  return 0;
}

}  // namespace

int RunTrainAnyMode(TrainOptions o, const DistFlags& d, const std::vector<std::string>& args) {
  if (o.inject.empty())
    if (const char* v = std::getenv("KEEL_INJECT")) o.inject = v;  // workers started by other launchers
  auto placement = PlacementFromEnv();
  if (!placement.ok()) return Fail("train", placement.status());
  if (Status s = ValidateDistFlags(d); !s.ok()) return Fail("train", s);
  // Workers started by keel's own launcher skip what their launcher checked (each would re-read the checkpoint).
  const bool keel_worker = placement->has_value() && (*placement)->source == "KEEL_RANK";
  // Elastic flags with one process (--max-restarts 5 alone): the launcher restarts it, and it resumes.
  const bool launching = !placement->has_value() && (d.nproc > 1 || d.nproc_per_node > 1 || !d.rdzv.empty() ||
                                                     !d.nnodes.empty() || d.Elastic());
  if (!keel_worker)
    if (Status s = Preflight(o, d, launching); !s.ok()) return Fail("train", s);
  if (placement->has_value()) return RunWorker(std::move(o), d, **placement);
  if (launching) return RunLauncher(o, d, args);
  return RunSingle(o);
}

}  // namespace keel::cli

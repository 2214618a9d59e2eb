// rendezvous.cc: node and worker registration, descriptor checks, and groups per generation.
#include "dist/rendezvous.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <thread>

namespace keel {
namespace {

using Clock = std::chrono::steady_clock;

std::string Seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%gs", s);
  return buf;
}

std::string Hostname() {
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) != 0) return "?";
  return host;
}

Result<int> EnvInt(const char* name, bool required, int fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) {
    if (required) return InvalidArgument(std::string(name) + " is not set");
    return fallback;
  }
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  if (*end != 0 || x < 0 || x > 1000000) return InvalidArgument(std::string(name) + "=" + v + " is not a valid number");
  return static_cast<int>(x);
}

// JSON text that never throws (invalid UTF-8 is replaced): store contents come from other processes.
std::string Dump(const nlohmann::json& j) { return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace); }

std::string ValueText(const nlohmann::json& j) { return j.is_string() ? j.get<std::string>() : Dump(j); }

// A field of an object as text / as an int, with a fallback when absent or of another type.
std::string StrField(const nlohmann::json& j, const char* key, const std::string& fallback) {
  if (!j.is_object() || !j.contains(key)) return fallback;
  return ValueText(j[key]);
}
int IntField(const nlohmann::json& j, const char* key, int fallback) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number_integer()) return fallback;
  return j[key].get<int>();
}

// "dim: job has 32, this worker has 64; heads: ..." for two objects (or the values when not objects).
std::string FieldDiff(const nlohmann::json& a, const nlohmann::json& b) {
  if (!a.is_object() || !b.is_object()) return "job has " + ValueText(a) + ", this worker has " + ValueText(b);
  std::vector<std::string> parts;
  std::vector<std::string> keys;
  for (auto& [k, v] : a.items()) keys.push_back(k);
  for (auto& [k, v] : b.items())
    if (!a.contains(k)) keys.push_back(k);
  for (const auto& k : keys) {
    nlohmann::json x = a.contains(k) ? a[k] : nlohmann::json("(none)");
    nlohmann::json y = b.contains(k) ? b[k] : nlohmann::json("(none)");
    if (x != y) parts.push_back(k + ": job has " + ValueText(x) + ", this worker has " + ValueText(y));
  }
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? "; " : "") + parts[i];
  return out;
}

}  // namespace

Result<std::optional<WorkerPlacement>> PlacementFromEnv() {
  struct Scheme {
    const char *rank, *world, *local_rank, *local_world;
  };
  const Scheme schemes[] = {
      {"KEEL_RANK", "KEEL_WORLD_SIZE", "KEEL_LOCAL_RANK", "KEEL_LOCAL_WORLD_SIZE"},
      {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"},
      {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"},
      {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"},
  };
  for (const auto& s : schemes) {
    const char* r = std::getenv(s.rank);
    if (!r || !*r) continue;
    WorkerPlacement p;
    p.source = s.rank;
    KEEL_ASSIGN_OR_RETURN(p.rank, EnvInt(s.rank, true, 0));
    KEEL_ASSIGN_OR_RETURN(p.world, EnvInt(s.world, true, 1));
    KEEL_ASSIGN_OR_RETURN(p.local_rank, EnvInt(s.local_rank, false, 0));
    // SLURM_NTASKS_PER_NODE may read "2(x3)"; only its leading number matters here (threads per worker).
    if (std::string(s.local_world) == "SLURM_NTASKS_PER_NODE") {
      const char* v = std::getenv(s.local_world);
      p.local_world = v ? std::max(1, std::atoi(v)) : 1;
    } else {
      KEEL_ASSIGN_OR_RETURN(p.local_world, EnvInt(s.local_world, false, 1));
    }
    if (p.world < 1 || p.rank >= p.world)
      return InvalidArgument(std::string(s.rank) + "=" + std::to_string(p.rank) + " is not below " + s.world + "=" +
                             std::to_string(p.world));
    if (const char* v = std::getenv("KEEL_RDZV")) p.rdzv = v;
    if (const char* v = std::getenv("KEEL_HOST")) p.host = v;
    if (const char* v = std::getenv("KEEL_IFACE")) p.iface = v;
    p.has_master_addr = std::getenv("MASTER_ADDR") && std::getenv("MASTER_PORT");
    return std::optional<WorkerPlacement>(p);
  }
  return std::optional<WorkerPlacement>();
}

Result<NodeAssignment> JoinAsNode(Store& job, const std::string& job_id, int min_nodes, int max_nodes,
                                  int nproc_per_node, const RendezvousOptions& o, const std::atomic<bool>* abort) {
  if (min_nodes < 1 || max_nodes < min_nodes)
    return InvalidArgument("--nnodes " + std::to_string(min_nodes) + ":" + std::to_string(max_nodes) +
                           ": expected 1 <= MIN <= MAX");
  const std::string refused = "refused by job " + job_id + ": ";
  const auto start = Clock::now();
  const auto deadline = start + std::chrono::duration<double>(o.rdzv_timeout_s);
  // A closed job admits nobody: say so before counting this node in.
  KEEL_ASSIGN_OR_RETURN(auto closed_early, job.TryGet("nodes_closed"));
  if (closed_early)
    return InvalidArgument(refused + "it already started with " + *closed_early +
                           " (a job id is single-use: pick a new JOB_ID, or join before the job starts)");
  KEEL_ASSIGN_OR_RETURN(int64_t k, job.Increment("nodes"));
  const int node = static_cast<int>(k - 1);
  if (node >= max_nodes)
    return InvalidArgument(refused + "it already has its " + std::to_string(max_nodes) +
                           " node(s) (--nnodes MAX); is the job id in use by another run?");
  nlohmann::json me = {{"host", Hostname()}, {"pid", static_cast<int64_t>(getpid())}, {"nproc_per_node", nproc_per_node}};
  KEEL_RETURN_IF_ERROR(job.Set("node/" + std::to_string(node), Dump(me)));

  if (node == 0) {
    // The first node decides when the job starts: MIN nodes present, then MAX or the last-call window.
    auto min_reached = Clock::time_point::max();
    double sleep_s = 0.01;
    int count = 1;
    for (;;) {
      KEEL_ASSIGN_OR_RETURN(int64_t c, job.Counter("nodes"));
      count = static_cast<int>(std::max<int64_t>(1, c));
      const auto now = Clock::now();
      if (count >= min_nodes && min_reached == Clock::time_point::max()) min_reached = now;
      if (count >= max_nodes) break;
      if (count >= min_nodes && now - min_reached >= std::chrono::duration<double>(o.last_call_s)) break;
      if (abort && abort->load()) return Aborted("aborted while waiting for nodes to join job " + job_id);
      if (now >= deadline)
        return Timeout("timed out after " + Seconds(o.rdzv_timeout_s) + " waiting for nodes to join job " + job_id +
                       ": " + std::to_string(count) + " of " + std::to_string(min_nodes) + " (--nnodes MIN) joined (" +
                       job.Describe() + ")");
      std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
      sleep_s = std::min(sleep_s * 1.5, 0.1);
    }
    count = std::min(count, max_nodes);
    nlohmann::json closed = {{"nnodes", count}, {"nproc_per_node", nproc_per_node}};
    KEEL_ASSIGN_OR_RETURN(bool won, job.SetIfAbsent("nodes_closed", Dump(closed)));
    if (!won) return InvalidArgument(refused + "it was started by another node 0 (is the job id in use by another run?)");
    return NodeAssignment{0, count};
  }
  const double left = std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count());
  KEEL_ASSIGN_OR_RETURN(std::string closed_text,
                        WaitGet(job, "nodes_closed", left + o.last_call_s,
                                "node 0 of job " + job_id + " to start the job (" + std::to_string(min_nodes) +
                                    " node(s) needed)", abort));
  auto closed = nlohmann::json::parse(closed_text, nullptr, false);
  const int nnodes = IntField(closed, "nnodes", -1), job_nproc = IntField(closed, "nproc_per_node", -1);
  if (closed.is_discarded() || nnodes < 1 || job_nproc < 1)
    return Corrupt("job " + job_id + ": malformed nodes_closed record in " + job.Describe());
  if (node >= nnodes)
    return InvalidArgument(refused + "it started with " + std::to_string(nnodes) + " node(s) before this one joined");
  if (job_nproc != nproc_per_node)
    return InvalidArgument(refused + "--nproc-per-node differs: job has " + std::to_string(job_nproc) +
                           ", this node has " + std::to_string(nproc_per_node));
  return NodeAssignment{node, nnodes};
}

std::string DescriptorDifference(const nlohmann::json& job, const nlohmann::json& mine) {
  if (!job.is_object() || !mine.is_object()) return job == mine ? "" : "descriptor differs: " + FieldDiff(job, mine);
  struct Section {
    const char* key;
    const char* label;
  };
  const Section sections[] = {{"keel_version", "keel version differs"},
                              {"world", "world size differs"},
                              {"model", "model config differs"},
                              {"data_fingerprint", "data fingerprint differs"},
                              {"training", "training options differ"},
                              {"resume", "checkpoint to resume from differs (is --out on a shared filesystem?)"}};
  for (const auto& s : sections) {
    nlohmann::json a = job.contains(s.key) ? job[s.key] : nlohmann::json();
    nlohmann::json b = mine.contains(s.key) ? mine[s.key] : nlohmann::json();
    if (a != b) return std::string(s.label) + ": " + FieldDiff(a, b);
  }
  for (auto& [k, v] : job.items())
    if (!mine.contains(k) || mine[k] != v) return k + " differs: " + FieldDiff(v, mine.contains(k) ? mine[k] : nlohmann::json());
  for (auto& [k, v] : mine.items())
    if (!job.contains(k)) return k + " differs: job has none, this worker has " + ValueText(v);
  return "";
}

Result<std::unique_ptr<WorkerGroup>> WorkerGroup::Join(std::shared_ptr<Store> job, std::string job_id, int rank,
                                                       int world, const nlohmann::json& descriptor_in,
                                                       const RendezvousOptions& o, const std::atomic<bool>* abort) {
  if (world < 1 || rank < 0 || rank >= world)
    return InvalidArgument("rank " + std::to_string(rank) + " of " + std::to_string(world) + " is out of range");
  const auto deadline = Clock::now() + std::chrono::duration<double>(o.rdzv_timeout_s);
  auto left = [&] { return std::max(0.0, std::chrono::duration<double>(deadline - Clock::now()).count()); };
  const std::string refused_prefix = "refused by job " + job_id + ": ";
  nlohmann::json descriptor = descriptor_in;
  descriptor["world"] = world;

  KEEL_ASSIGN_OR_RETURN(int64_t arrival, job->Increment("workers"));
  if (arrival > world)
    return InvalidArgument(refused_prefix + "more than " + std::to_string(world) +
                           " workers joined: the job id was used before (its keys are still in " + job->Describe() +
                           ") or two workers have the same rank; use a new job id");

  std::string refusal;
  if (rank == 0) {
    KEEL_RETURN_IF_ERROR(job->Set("desc", Dump(descriptor)));
  } else {
    KEEL_ASSIGN_OR_RETURN(std::string text,
                          WaitGet(*job, "desc", left(), "rank 0 of job " + job_id + " to publish the job's descriptor",
                                  abort));
    auto theirs = nlohmann::json::parse(text, nullptr, false);
    if (!theirs.is_object()) return Corrupt("job " + job_id + ": malformed descriptor in " + job->Describe());
    std::string diff = DescriptorDifference(theirs, descriptor);
    if (!diff.empty()) refusal = refused_prefix + diff;
  }
  nlohmann::json member = {{"host", Hostname()}, {"pid", static_cast<int64_t>(getpid())}};
  if (!refusal.empty()) member["refused"] = refusal.substr(refused_prefix.size());
  KEEL_ASSIGN_OR_RETURN(bool fresh, job->SetIfAbsent("member/" + std::to_string(rank), Dump(member)));
  if (!fresh)
    return InvalidArgument(refused_prefix + "rank " + std::to_string(rank) +
                           " joined twice (two workers were given the same rank, or the job id was used before)");
  if (!refusal.empty()) return InvalidArgument(refusal);

  // Wait for everyone, and fail at once if anyone was refused.
  std::vector<bool> seen(static_cast<size_t>(world), false);
  seen[static_cast<size_t>(rank)] = true;
  int n_seen = 1;
  double sleep_s = 0.005;
  while (n_seen < world) {
    for (int r = 0; r < world; ++r) {
      if (seen[static_cast<size_t>(r)]) continue;
      KEEL_ASSIGN_OR_RETURN(auto v, job->TryGet("member/" + std::to_string(r)));
      if (!v) continue;
      seen[static_cast<size_t>(r)] = true;
      ++n_seen;
      auto m = nlohmann::json::parse(*v, nullptr, false);
      if (!m.is_discarded() && m.contains("refused"))
        return Aborted("job " + job_id + " cannot start: rank " + std::to_string(r) + " (host " +
                       StrField(m, "host", "?") + ") was refused: " + StrField(m, "refused", "?"));
    }
    if (n_seen == world) break;
    if (abort && abort->load()) return Aborted("aborted while waiting for the workers of job " + job_id);
    if (left() <= 0) {
      std::string missing;
      int shown = 0;
      for (int r = 0; r < world && shown < 8; ++r)
        if (!seen[static_cast<size_t>(r)]) missing += (shown++ ? ", " : "") + std::to_string(r);
      if (world - n_seen > shown) missing += ", ...";
      return Timeout("timed out after " + Seconds(o.rdzv_timeout_s) + " (--rdzv-timeout) waiting for the workers of job " +
                     job_id + ": " + std::to_string(n_seen) + " of " + std::to_string(world) +
                     " joined (missing ranks: " + missing + "; " + job->Describe() + ")");
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(sleep_s));
    sleep_s = std::min(sleep_s * 1.5, 0.1);
  }
  return std::unique_ptr<WorkerGroup>(new WorkerGroup(std::move(job), std::move(job_id), rank, world, o));
}

Result<std::unique_ptr<Communicator>> WorkerGroup::CreateCommunicator(int generation, std::vector<int> members,
                                                                      const std::atomic<bool>* abort) {
  std::sort(members.begin(), members.end());
  if (std::adjacent_find(members.begin(), members.end()) != members.end())
    return InvalidArgument("generation " + std::to_string(generation) + ": a member is listed twice");
  auto it = std::find(members.begin(), members.end(), rank_);
  if (it == members.end())
    return InvalidArgument("generation " + std::to_string(generation) + ": rank " + std::to_string(rank_) +
                           " is not a member");
  const int my_rank = static_cast<int>(it - members.begin());
  const int size = static_cast<int>(members.size());
  if (size == 1) return MakeLocalCommunicator();
  GlooOptions g;
  g.hostname = o_.host;
  g.iface = o_.iface;
  g.timeout_s = o_.comm_timeout_s;
  auto gen_store = MakePrefixStore(job_, "gen/" + std::to_string(generation));
  auto comm = ConnectGlooCommunicator(gen_store, my_rank, size, g, abort);
  if (!comm.ok()) return comm.status().Wrap("job " + job_id_ + ", generation " + std::to_string(generation));
  return comm;
}

Status WorkerGroup::ClearJob() { return job_->Clear(); }

}  // namespace keel

#!/usr/bin/env python3
"""chaos.py: compare a training run under injected faults with the same run without faults.

Reads RUN_DIR/events.jsonl and metrics.jsonl of both runs (keel train writes them; see docs/step-protocol.md)
and prints: faults injected / detected / recovered, p50/p99 detection and recovery time per fault kind, steps
redone, goodput, members over time, and whether the final weights are bit-identical.

  detection time  inject -> first sign of it on a survivor: a collective failing or the watchdog (crash, hang),
                  the vote (nan: "nan" event, bitflip: "sdc" event)
  recovery time   inject -> the next committed step after it ("crash -> next completed step")
  goodput         (time the clean run took for its steps) / (time the faulty run took for the same steps);
                  confounded when the faulty run's membership makes it faster or slower per step (on an
                  oversubscribed machine fewer workers can be faster), hence also:
  goodput (own)   steps x the faulty run's own median first-attempt step time / its wall time: the fraction of
                  time spent making progress at its own normal speed (the rest: redone work, re-forming, waiting)

Usage: chaos.py CLEAN_RUN_DIR FAULTY_RUN_DIR [--json OUT]
"""
import hashlib
import json
import os
import sys


def load_jsonl(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def final_ckpt(run):
    names = sorted(n for n in os.listdir(run) if n.startswith("ckpt-") and n[5:].isdigit())
    for n in reversed(names):
        if os.path.exists(os.path.join(run, n, "COMMITTED")):
            return os.path.join(run, n)
    return None


def digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def train_span(events, metrics):
    commits = [e for e in events if e.get("event") == "commit"]
    if commits:
        return commits[0]["t"] - commits[0].get("step_ms", 0) / 1e3, commits[-1]["t"], commits
    return None, None, commits


DETECT = {
    "crash": ("attempt_failed", "detect"),
    "hang": ("detect", "attempt_failed"),
    "nan": ("nan",),
    "bitflip": ("sdc",),
}


def analyse(clean_dir, faulty_dir):
    ce = load_jsonl(os.path.join(clean_dir, "events.jsonl"))
    fe = load_jsonl(os.path.join(faulty_dir, "events.jsonl"))
    cm = load_jsonl(os.path.join(clean_dir, "metrics.jsonl"))
    fm = load_jsonl(os.path.join(faulty_dir, "metrics.jsonl"))
    fe.sort(key=lambda e: e.get("t", 0))
    injects = [e for e in fe if e.get("event") == "inject"]
    res = {"faults": [], "kinds": {}}
    for inj in injects:
        kind, t0 = inj.get("kind"), inj["t"]
        names = DETECT.get(kind, ())
        def is_detection(e):
            if e.get("t", 0) < t0 or e.get("event") not in names:
                return False
            # a crashed or stopped worker's own later events are not its survivors' detection
            return not (kind in ("crash", "hang") and e.get("uid") == inj.get("uid"))
        det = next((e for e in fe if is_detection(e)), None)
        rec = None
        if det is not None:
            rec = next((e for e in fe if e["t"] >= det["t"] and e.get("event") == "commit"), None)
        f = {"kind": kind, "t": t0, "rank": inj.get("rank"), "step": inj.get("step"),
             "detect_s": (det["t"] - t0) if det else None, "recover_s": (rec["t"] - t0) if rec else None,
             "recovered_step": rec.get("step") if rec else None}
        res["faults"].append(f)
    for f in res["faults"]:
        k = res["kinds"].setdefault(f["kind"], {"injected": 0, "detected": 0, "recovered": 0, "detect": [], "recover": []})
        k["injected"] += 1
        if f["detect_s"] is not None:
            k["detected"] += 1
            k["detect"].append(f["detect_s"])
        if f["recover_s"] is not None:
            k["recovered"] += 1
            k["recover"].append(f["recover_s"])
    c0, c1, ccommits = train_span(ce, cm)
    f0, f1, fcommits = train_span(fe, fm)
    res["clean_s"] = (c1 - c0) if c0 is not None else None
    res["faulty_s"] = (f1 - f0) if f0 is not None else None
    if res["clean_s"] and res["faulty_s"]:
        res["goodput"] = res["clean_s"] / res["faulty_s"]
    res["steps"] = len(fm)
    res["redone_attempts"] = sum(max(0, e.get("attempts", 1) - 1) for e in fcommits)
    steps = [e["step"] for e in fcommits]
    res["steps_committed_twice"] = len(steps) - len(set(steps))
    res["steps_missing"] = (max(steps) + 1 - min(steps) - len(set(steps))) if steps else 0
    res["restarts"] = sum(1 for e in fe if e.get("event") == "restart")
    res["rejoins"] = sum(1 for e in fe if e.get("event") == "rejoin")
    res["state_transfers"] = [e for e in fe if e.get("event") == "state_transfer"]
    gens = {}
    for e in fe:
        if e.get("event") == "generation":
            gens[e["gen"]] = len(e.get("members", []))
    res["generations"] = len(gens)
    res["members_min"] = min(gens.values()) if gens else None
    sizes = [e.get("members") for e in fcommits]
    res["commits_with_4"] = sum(1 for s in sizes if s == 4)
    a, b = final_ckpt(clean_dir), final_ckpt(faulty_dir)
    res["final_ckpt"] = [a, b]
    same = None
    if a and b and os.path.basename(a) == os.path.basename(b):
        same = all(digest(os.path.join(a, n)) == digest(os.path.join(b, n))
                   for n in ("model.safetensors", "optim.safetensors"))
    res["bit_identical"] = same
    cstep = [m["step_ms"] for m in cm]
    res["clean_step_ms_p50"] = pct(cstep, 50)
    first = [e.get("step_ms", 0) for e in fcommits if e.get("attempts", 1) == 1]
    res["faulty_first_attempt_step_ms_p50"] = pct(first, 50)
    if res.get("faulty_s") and first:
        res["goodput_own"] = len(set(steps)) * pct(first, 50) / 1e3 / res["faulty_s"]
    stalls = [m["checkpoint_stall_ms"] for m in cm + fm if "checkpoint_stall_ms" in m]
    res["checkpoint_stall_ms"] = stalls
    res["members_per_commit"] = {str(k): sizes.count(k) for k in sorted(set(s for s in sizes if s is not None))}
    return res


def main():
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    res = analyse(sys.argv[1], sys.argv[2])
    print("fault kind  injected detected recovered  detect p50/p99 (s)   recover p50/p99 (s)")
    for kind in ("crash", "hang", "nan", "bitflip"):
        k = res["kinds"].get(kind)
        if not k:
            continue
        print("%-10s %9d %8d %9d   %6.2f / %-6.2f        %6.2f / %-6.2f" % (
            kind, k["injected"], k["detected"], k["recovered"], pct(k["detect"], 50), pct(k["detect"], 99),
            pct(k["recover"], 50), pct(k["recover"], 99)))
    tot = sum(k["injected"] for k in res["kinds"].values())
    det = sum(k["detected"] for k in res["kinds"].values())
    rec = sum(k["recovered"] for k in res["kinds"].values())
    print("total      %9d %8d %9d" % (tot, det, rec))
    print("steps %d; attempts redone %d; steps committed twice %d; steps missing %d" % (
        res["steps"], res["redone_attempts"], res["steps_committed_twice"], res["steps_missing"]))
    print("generations %d (fewest members %s); worker restarts %d; evicted members rejoined %d; state transfers %d" % (
        res["generations"], res["members_min"], res["restarts"], res["rejoins"], len(res["state_transfers"])))
    if res.get("goodput"):
        print("clean %.1f s, faulty %.1f s for the same steps: goodput %.1f%% (clean step p50 %.0f ms)" % (
            res["clean_s"], res["faulty_s"], 100 * res["goodput"], res["clean_step_ms_p50"]))
    if res.get("goodput_own"):
        print("goodput (own): %.1f%% (faulty run's first-attempt step p50 %.0f ms; commits by group size %s)" % (
            100 * res["goodput_own"], res["faulty_first_attempt_step_ms_p50"], res["members_per_commit"]))
    if res["checkpoint_stall_ms"]:
        print("checkpoint stall on the training thread (ms): %s (vs clean step p50 %.0f ms)" % (
            ", ".join("%.0f" % x for x in res["checkpoint_stall_ms"]), res["clean_step_ms_p50"]))
    print("final weights bit-identical to the failure-free run: %s (%s vs %s)" % (
        {True: "YES", False: "NO", None: "n/a"}[res["bit_identical"]], res["final_ckpt"][0], res["final_ckpt"][1]))
    if "--json" in sys.argv:
        out = sys.argv[sys.argv.index("--json") + 1]
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return 0 if res["bit_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""serve_bench_client.py: load generator for bench/serve_bench.sh against a running `keel serve`.

  single  greedy requests one at a time; decode tokens/s = (N - 1) / (time of an N-token request - time of a
          1-token one), medians of 3 — decode steps only, as the PyTorch and llama.cpp figures
  load    C concurrent clients, each sending R streaming requests back to back; aggregate generated tokens/s over
          the wall time, and p50/p99 time to first token (request sent -> first token received)
Prints one JSON line. Standard library only.

  python3 bench/serve_bench_client.py single --port P --prompt-ids 1,2,3 --tokens 128
  python3 bench/serve_bench_client.py load --port P --prompt-ids 1,2,3 --tokens 64 --clients 4 --requests 4
"""
import argparse
import http.client
import json
import statistics
import threading
import time


def stream(port, prompt_ids, max_tokens, temperature, seed):
    """Returns (t_sent, [(t_received, n_tokens)], total tokens)."""
    body = json.dumps({"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": temperature, "seed": seed,
                       "stream": True, "return_tokens": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t_sent = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
    arrivals, buf, total = [], b"", 0
    while True:
        chunk = resp.read1(65536)
        if not chunk:
            break
        now = time.perf_counter()
        buf += chunk
        while b"\n\n" in buf:
            ev, buf = buf.split(b"\n\n", 1)
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            j = json.loads(ev[6:])
            n = len(j["choices"][0].get("tokens", [])) if j.get("choices") else 0
            if n:
                arrivals.append((now, n))
                total += n
    conn.close()
    return t_sent, arrivals, total


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["single", "load"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--requests", type=int, default=4, help="requests per client (load)")
    a = ap.parse_args()
    prompt = [int(t) for t in a.prompt_ids.split(",")]
    if a.mode == "single":
        # Decode rate from the difference of two request times (the median of 3 each): a request for N tokens
        # minus one for 1 token leaves N-1 decode steps; prefill and HTTP overhead cancel. (Timing arrivals of
        # streamed events instead undercounts when a fast model's tokens coalesce into one TCP read.)
        stream(a.port, prompt, 8, 0, 0)  # warm-up

        def wall(n):
            times, ttft, total = [], [], 0
            for _ in range(3):
                t_sent, arr, total = stream(a.port, prompt, n, 0, 0)
                times.append(arr[-1][0] - t_sent)
                ttft.append(arr[0][0] - t_sent)
            return statistics.median(times), statistics.median(ttft), total

        t1, ttft1, _ = wall(1)
        tn, _, total = wall(a.tokens)
        print(json.dumps({"decode_tok_s": (total - 1) / (tn - t1), "ttft_ms": ttft1 * 1000, "tokens": total}))
        return
    ttfts, totals, errors = [], [], []
    lock = threading.Lock()

    def client(ci):
        for r in range(a.requests):
            try:
                t_sent, arr, total = stream(a.port, prompt, a.tokens, 0.8, ci * 1000 + r)
                with lock:
                    ttfts.append(arr[0][0] - t_sent)
                    totals.append(total)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(json.dumps({"clients": a.clients, "requests": len(totals), "errors": errors[:3],
                      "agg_tok_s": sum(totals) / wall, "ttft_p50_ms": pct(ttfts, 50) * 1000,
                      "ttft_p99_ms": pct(ttfts, 99) * 1000, "wall_s": wall}))


if __name__ == "__main__":
    main()

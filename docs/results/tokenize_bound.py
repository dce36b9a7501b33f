#!/usr/bin/env python3
"""Issue 16 item 7: the router's cost of tokenizing hostile prompts (`--tokenizer`, one live
exact view). Not run in CI.

    cargo build --release
    python3 docs/results/tokenize_bound.py --bin target/release/switchyard --tokenizer DIR

Starts one `switchyard sim` engine publishing KV events (stand-in ids: the engine's own cost is
not measured) and a router with `--tokenizer DIR` following them, then, with a /health probe
every 50 ms throughout:

  1. four concurrent 8 MiB chat requests (one user message of words);
  2. one chat request just under 32 MiB (the default --max-body-bytes);
  3. twenty ordinary 2 KB chat requests, one after another, while two 8 MiB ones run.

For each phase: the router's peak RSS (VmHWM from /proc, reset between phases through
/proc/PID/clear_refs), each request's latency, the /health latencies, and how many requests
were tokenized (switchyard_tokenize_total) and capped (switchyard_tokenize_capped_total).
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(port, path, timeout=60):
    end = time.time() + timeout
    while time.time() < end:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", path)
            if c.getresponse().status < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"port {port} {path}: not up")


def post(port, body, timeout=600):
    t = time.time()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/chat/completions", body=body,
              headers={"content-type": "application/json"})
    r = c.getresponse()
    r.read()
    return r.status, time.time() - t, r.getheader("x-switchyard-kv")


def status_kb(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def metric(port, name):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    c.request("GET", "/metrics")
    total = 0.0
    for line in c.getresponse().read().decode().splitlines():
        if line.startswith(name) and not line.startswith("#"):
            if name == "switchyard_tokenize_total" and 'result="ok"' not in line:
                continue
            total += float(line.rsplit(" ", 1)[1])
    return total


WORDS = ("the router engine cache prefix block token request prompt model answer question "
         "because several replicas share load latency while queue evicted hash template "
         "système café 東京 2024 42 it's they're route() {json} p90 throughput").split()


def chat_body(size, seed):
    rng = random.Random(seed)
    parts, n = [], 0
    while n < size - 200:
        w = rng.choice(WORDS)
        parts.append(w)
        n += len(w.encode()) + 1
    text = " ".join(parts)
    body = json.dumps({"model": "m", "max_tokens": 1, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": text}]}, ensure_ascii=False).encode()
    return body


class Prober(threading.Thread):
    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.stop, self.lat = port, threading.Event(), []

    def run(self):
        while not self.stop.is_set():
            t = time.time()
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                c.request("GET", "/health")
                c.getresponse().read()
                self.lat.append(time.time() - t)
            except OSError:
                self.lat.append(float("inf"))
            time.sleep(0.05)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))] if xs else float("nan")


def phase(name, router, port, bodies, small=None):
    with open(f"/proc/{router.pid}/clear_refs", "w") as f:
        f.write("5")
    rss_before = status_kb(router.pid, "VmRSS")
    tok0 = metric(port, "switchyard_tokenize_total")
    cap0 = metric(port, "switchyard_tokenize_capped_total")
    probe = Prober(port)
    probe.start()
    results = [None] * len(bodies)

    def one(i):
        results[i] = post(port, bodies[i])
    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    t0 = time.time()
    for t in threads:
        t.start()
    small_lat = []
    if small is not None:
        time.sleep(0.2)
        for _ in range(20):
            small_lat.append(post(port, small)[1])
    for t in threads:
        t.join()
    wall = time.time() - t0
    probe.stop.set()
    probe.join()
    hwm = status_kb(router.pid, "VmHWM")
    print(f"\n## {name}")
    print(f"bodies: {', '.join(f'{len(b) / 2**20:.1f} MiB' for b in bodies)}")
    print(f"router RSS before: {rss_before / 1024:.0f} MiB; peak (VmHWM): {hwm / 1024:.0f} MiB; "
          f"after: {status_kb(router.pid, 'VmRSS') / 1024:.0f} MiB")
    print("requests: " + ", ".join(f"{s} in {d:.2f} s (kv {kv})" for s, d, kv in results)
          + f"; wall {wall:.2f} s")
    if small_lat:
        print(f"ordinary 2 KB chats meanwhile: median {pct(small_lat, 0.5) * 1000:.1f} ms, "
              f"max {max(small_lat) * 1000:.1f} ms")
    print(f"/health: {len(probe.lat)} probes, median {pct(probe.lat, 0.5) * 1000:.1f} ms, "
          f"p99 {pct(probe.lat, 0.99) * 1000:.1f} ms, max {max(probe.lat) * 1000:.1f} ms")
    print(f"tokenized: {metric(port, 'switchyard_tokenize_total') - tok0:.0f}, capped: "
          f"{metric(port, 'switchyard_tokenize_capped_total') - cap0:.0f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--phases", default="1,2,3")
    args = ap.parse_args()
    sim_port, router_port, kv_port = free_port(), free_port(), free_port()
    tmp = tempfile.mkdtemp()
    sim = subprocess.Popen([args.bin, "sim", "--port", str(sim_port), "--model", "m",
                            "--instant", "--kv-events-endpoint", f"tcp://127.0.0.1:{kv_port}"],
                           stdout=open(os.path.join(tmp, "sim.log"), "w"),
                           stderr=subprocess.STDOUT)
    wait_http(sim_port, "/health")
    router = subprocess.Popen([args.bin, "serve", "--port", str(router_port),
                               "--static-backends", f"http://127.0.0.1:{sim_port}",
                               "--static-models", "m", "--decision-headers",
                               "--static-kv-events", f"tcp://127.0.0.1:{kv_port}",
                               "--tokenizer", args.tokenizer],
                              stdout=open(os.path.join(tmp, "router.log"), "w"),
                              stderr=subprocess.STDOUT)
    try:
        wait_http(router_port, "/health")
        # The view goes live with the engine's first batch: a small request makes one.
        deadline = time.time() + 30
        while True:
            s, _, kv = post(router_port, chat_body(2000, 0))
            if kv == "exact" or time.time() > deadline:
                break
            time.sleep(0.2)
        print(f"router pid {router.pid}: warm-up kv={kv}; tokenizer {args.tokenizer}; "
              f"{os.cpu_count()} CPUs")
        phases = set(args.phases.split(","))
        if "1" in phases:
            phase("four concurrent 8 MiB chats", router, router_port,
                  [chat_body(8 << 20, i + 1) for i in range(4)])
        if "2" in phases:
            phase("one chat just under 32 MiB", router, router_port,
                  [chat_body((32 << 20) - 4096, 9)])
        if "3" in phases:
            phase("twenty 2 KB chats while two 8 MiB ones run", router, router_port,
                  [chat_body(8 << 20, i + 20) for i in range(2)], small=chat_body(2000, 7))
    finally:
        router.terminate()
        sim.terminate()
        router.wait()
        sim.wait()


if __name__ == "__main__":
    sys.exit(main())

"""Records the real wire bytes of vLLM 0.32's prefill/decode hand-off (NixlConnector) into
tests/fixtures/vllm-0.32.0/pd/ (not run in CI).

Needs setup.sh's venv plus NIXL in it (`pip install nixl==1.5.1`: the meta package and its
nixl-cu12 / nixl-cu13 wheels, which bundle UCX; with no CUDA driver it loads whichever backend
is installed and UCX moves host memory over TCP / shared memory). Run with the venv's python:

    $SWITCHYARD_VLLM_HOME/bin/python examples/real_vllm/record_pd_fixtures.py --start

`--start` starts three engines (P on 127.0.0.1:8190, NIXL side channel 5690; D on :8191,
side channel 5691; D2 on :8192, side channel 5692, with `kv_load_failure_policy: recompute`;
all `kv_both`), records, and stops them. Without it the script expects them already up on
those ports, started with the flags of `serve_args` (the P-gone scenario needs `--start`).

Each fixture file is one scenario: a list of HTTP exchanges in the order they were sent, each
with the request (method, path, headers, body bytes) and the response (status, headers, body
bytes exactly as received, SSE included). The router's rules are followed for the legs:
P gets the client's body plus `kv_transfer_params` {do_remote_decode: true, ...nulls},
`stream: false`, no `stream_options`, `max_tokens` 1 (and `max_completion_tokens` 1 if the
client used it), no `min_tokens`; D gets the client's original body plus P's
`kv_transfer_params` verbatim; both legs carry the same `X-Request-Id`.
"""

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
VHOME = os.environ.get("SWITCHYARD_VLLM_HOME",
                       os.path.expanduser("~/.cache/switchyard/vllm-0.32.0"))
MODEL = "tiny"
VERSION = "0.32.0"

# The engine flags, written into the fixtures' README as they are used here.
BLOCK_SIZE = 32
BLOCKS = 64
KV_TRANSFER = {"kv_connector": "NixlConnector", "kv_role": "kv_both", "kv_buffer_device": "cpu"}
ENV = {
    "VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
}
# Response headers kept in the fixtures (date and server say nothing about the protocol).
KEEP_HEADERS = ("content-type", "x-request-id", "content-length", "transfer-encoding")
LEASE_S = 30  # kv_lease_duration's default in vLLM 0.32 (not set here)
SETTLE_S = 2.0  # after each answer, before reading the counters again
# D2: a second decode engine that recomputes when the KV load fails (D keeps vLLM's default,
# "fail"); it never talks to P before P is gone.
KV_TRANSFER_RECOMPUTE = dict(KV_TRANSFER, kv_load_failure_policy="recompute")


def serve_args(port, kv_transfer):
    return [os.path.join(VHOME, "bin", "vllm"), "serve", os.path.join(VHOME, "models", "chatml"),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--max-model-len", str((BLOCKS - 1) * BLOCK_SIZE),
            "--block-size", str(BLOCK_SIZE), "--enable-prefix-caching",
            "--num-gpu-blocks-override", str(BLOCKS), "--enable-prompt-tokens-details",
            "--kv-transfer-config", json.dumps(kv_transfer, separators=(",", ":"))]


class Engine:
    """One `vllm serve` in its own process group, logging to run_dir/<name>.log."""

    def __init__(self, name, port, side_port, run_dir, kv_transfer=None):
        self.name, self.port, self.side_port = name, port, side_port
        self.kv_transfer = kv_transfer or KV_TRANSFER
        self.log = os.path.join(run_dir, f"{name}.log")
        self.proc = None

    def start(self):
        env = dict(os.environ, **ENV, VLLM_NIXL_SIDE_CHANNEL_PORT=str(self.side_port))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(serve_args(self.port, self.kv_transfer), env=env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        print(f"[pd] started {self.name} pid {self.proc.pid} on :{self.port}", flush=True)

    def wait_healthy(self, timeout=600):
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise SystemExit(f"{self.name} died; see {self.log}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    print(f"[pd] {self.name} healthy after {time.monotonic() - t0:.0f}s", flush=True)
                    return
            except OSError:
                pass
            time.sleep(2)
        raise SystemExit(f"{self.name} not healthy after {timeout}s; see {self.log}")

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        print(f"[pd] stopped {self.name}", flush=True)


# Counters of each engine's GET /metrics summed over labels, recorded as the change an exchange
# made: how many NIXL reads D did (and how many failed), how many prompt tokens D took from P
# (external prefix cache hits) and from its own prefix cache.
COUNTERS = (
    "vllm:nixl_xfer_time_seconds_count", "vllm:nixl_num_failed_transfers_total",
    "vllm:nixl_num_failed_notifications_total", "vllm:nixl_num_kv_expired_reqs_total",
    "vllm:nixl_num_notifications_after_expiry_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total", "vllm:external_prefix_cache_hits_total",
    "vllm:prompt_tokens_total", "vllm:request_success_total",
)
PORTS = {}  # role -> http port of the engines alive, for counters


def counters(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    except OSError:
        return None
    out = dict.fromkeys(COUNTERS, 0.0)
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def snapshot():
    return {role: counters(port) for role, port in PORTS.items()}


def delta(before, after):
    out = {}
    for role, b in before.items():
        a = after.get(role)
        if a is None or b is None:
            continue
        d = {k.removeprefix("vllm:"): int(a[k] - b[k]) for k in COUNTERS if a[k] != b[k]}
        if d:
            out[role] = d
    return out


def exchange(port, path, body, request_id, role, note=""):
    """Sends one request; returns the exchange as recorded (bodies exactly as bytes went), with
    the time it took and the change it made to the engines' counters."""
    before = snapshot()
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.monotonic()
    c.request("POST", path, body=raw, headers=headers)
    r = c.getresponse()
    data = r.read()
    elapsed = time.monotonic() - t0
    kept = {k.lower(): v for k, v in r.getheaders() if k.lower() in KEEP_HEADERS}
    text = data.decode("utf-8")  # vLLM sends UTF-8 JSON and SSE; fail loudly otherwise
    print(f"[pd] {role} {path} {request_id}: {r.status} in {elapsed:.2f}s", flush=True)
    # Counters reach /metrics with the engine's next stats update: let them land.
    time.sleep(SETTLE_S)
    return {"engine": role, "note": note, "elapsed_s": round(elapsed, 2),
            "counters_delta": delta(before, snapshot()),
            "request": {"method": "POST", "path": path, "headers": headers,
                        "body": raw.decode()},
            "response": {"status": r.status, "headers": kept, "body": text}}


def p_leg_body(client):
    """Rule 1: what the router sends P for a client's body."""
    b = json.loads(json.dumps(client))
    b["kv_transfer_params"] = {"do_remote_decode": True, "do_remote_prefill": False,
                               "remote_engine_id": None, "remote_block_ids": None,
                               "remote_host": None, "remote_port": None}
    b["stream"] = False
    b.pop("stream_options", None)
    b["max_tokens"] = 1
    if "max_completion_tokens" in b:
        b["max_completion_tokens"] = 1
    b.pop("min_tokens", None)
    b.pop("min_completion_tokens", None)
    return b


def d_leg_body(client, p_exchange):
    """Rule 3: the client's body plus P's kv_transfer_params verbatim."""
    b = json.loads(json.dumps(client))
    b["kv_transfer_params"] = json.loads(p_exchange["response"]["body"])["kv_transfer_params"]
    return b


def prompt_text(topic):
    """~110 tokens of the tiny model's tokenizer: three full blocks of 32 and a partial one."""
    return (f"Yard log for {topic}: " + " ".join(
        f"{topic}-{i} moved from track {i % 7} to track {(i * 3) % 11}." for i in range(9)))


def completion(topic, **extra):
    return {"model": MODEL, "prompt": prompt_text(topic), "max_tokens": 8, "temperature": 0,
            **extra}


def chat(topic, **extra):
    body = {"model": MODEL, "temperature": 0, "messages": [
        {"role": "system", "content": "You are the yard master's assistant."},
        {"role": "user", "content": prompt_text(topic)}]}
    body.update(extra)
    if "max_completion_tokens" not in body:
        body.setdefault("max_tokens", 8)
    return body


def save(out, name, description, exchanges, **extra):
    doc = {"vllm_version": VERSION, "scenario": name, "description": description, **extra,
           "exchanges": exchanges}
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"[pd] wrote {name}.json", flush=True)


def pd_pair(p, d, path, client, rid, note_d=""):
    ep = exchange(p, path, p_leg_body(client), rid, "P", "P leg (rules 1-2)")
    ed = exchange(d, path, d_leg_body(client, ep), rid, "D", note_d or "D leg (rule 3)")
    return ep, ed


def reference(d, path, client, rid):
    """The client's body sent to D alone after resetting D's prefix cache: D computes the whole
    prompt itself. With temperature 0 its text is what the P/D answer should be if the KV that
    D read from P was the prompt's."""
    plain = json.loads(json.dumps(client))
    return [exchange_reset(d),
            exchange(d, path, plain, rid, "D", "reference: D alone, cold cache, no hand-off")]


def record(args, p_engine):
    out = args.out
    os.makedirs(out, exist_ok=True)
    p, d = args.p_port, args.d_port
    cmpl, chat_path = "/v1/completions", "/v1/chat/completions"

    c = completion("alpha")
    ep, ed = pd_pair(p, d, cmpl, c, "pd-cmpl-json")
    save(out, "completions_json", "completions, D not streamed", [ep, ed]
         + reference(d, cmpl, c, "pd-cmpl-json-ref"))

    c = completion("bravo", stream=True, stream_options={"include_usage": True}, min_tokens=2)
    ep, ed = pd_pair(p, d, cmpl, c, "pd-cmpl-sse")
    save(out, "completions_sse", "completions, D streamed with include_usage; the client's "
         "min_tokens and stream_options go to D only", [ep, ed]
         + reference(d, cmpl, c, "pd-cmpl-sse-ref"))

    c = chat("charlie")
    ep, ed = pd_pair(p, d, chat_path, c, "pd-chat-json")
    save(out, "chat_json", "chat completions (max_tokens), D not streamed", [ep, ed]
         + reference(d, chat_path, c, "pd-chat-json-ref"))

    c = chat("delta", max_completion_tokens=8, stream=True,
             stream_options={"include_usage": True})
    ep, ed = pd_pair(p, d, chat_path, c, "pd-chat-sse")
    save(out, "chat_sse", "chat completions (max_completion_tokens), D streamed with "
         "include_usage", [ep, ed] + reference(d, chat_path, c, "pd-chat-sse-ref"))

    # P's prefix cache already holds the prompt: P reports its hits, and D's usage follows.
    c = completion("kilo")
    first = pd_pair(p, d, cmpl, c, "pd-phit-1")
    second = pd_pair(p, d, cmpl, c, "pd-phit-2")
    save(out, "p_prefix_hit", "the same completion twice through P and D: the second P leg "
         "finds the prompt's full blocks in P's prefix cache", [*first, *second])

    # P with no kv_transfer_params: an ordinary request.
    e = exchange(p, cmpl, completion("echo"), "pd-plain-p", "P", "no kv_transfer_params")
    e2 = exchange(p, chat_path, chat("echo"), "pd-plain-p-chat", "P", "no kv_transfer_params")
    save(out, "p_without_params", "P (a kv_both engine) answering requests that have no "
         "kv_transfer_params", [e, e2])

    # The same hand-off twice on D: after the first D request, D's prefix cache holds the
    # prompt's full blocks, then again after D's prefix cache is reset (nothing local: D must
    # read from P again, whose blocks were released when the first D read finished).
    client = completion("foxtrot")
    ep, ed = pd_pair(p, d, cmpl, client, "pd-reuse")
    again = exchange(d, cmpl, d_leg_body(client, ep), "pd-reuse-2", "D",
                     "same hand-off again, D's prefix cache warm")
    reset = exchange_reset(d)
    again2 = exchange(d, cmpl, d_leg_body(client, ep), "pd-reuse-3", "D",
                      "same hand-off again, after POST /reset_prefix_cache on D")
    save(out, "handoff_reused", "one P hand-off given to D three times: once as the router "
         "does, then again with D's prefix cache warm, then after resetting D's prefix cache",
         [ep, ed, again, reset, again2] + reference(d, cmpl, client, "pd-reuse-ref"))

    # Lease expired: P keeps the blocks kv_lease_duration (30 s default) after its answer.
    client = completion("golf")
    ep = exchange(p, cmpl, p_leg_body(client), "pd-lease", "P", "P leg (rules 1-2)")
    wait = LEASE_S + 15
    print(f"[pd] waiting {wait}s for P's lease to expire", flush=True)
    time.sleep(wait)
    ed = exchange(d, cmpl, d_leg_body(client, ep), "pd-lease", "D",
                  f"D leg sent {wait} s after P answered (lease {LEASE_S} s)")
    save(out, "lease_expired", f"D given a hand-off {wait} s after P answered (P's "
         f"kv_lease_duration is the default {LEASE_S} s)", [ep, ed]
         + reference(d, cmpl, client, "pd-lease-ref"), waited_s=wait)

    # P gone: P answers, then is stopped, then D (which has talked to P before, default
    # kv_load_failure_policy "fail") and D2 (which never has, policy "recompute") get the
    # hand-off.
    client = completion("hotel")
    ep = exchange(p, cmpl, p_leg_body(client), "pd-p-gone", "P", "P leg (rules 1-2)")
    if p_engine is None:
        raise SystemExit("the P-gone scenario needs --start (the script stops P itself)")
    p_engine.stop()
    PORTS.pop("P", None)
    ed = exchange(d, cmpl, d_leg_body(client, ep), "pd-p-gone", "D",
                  "D leg after P was stopped (SIGTERM, process gone); D's "
                  "kv_load_failure_policy is the default, fail")
    after = exchange(d, cmpl, completion("india"), "pd-after-p-gone", "D",
                     "an ordinary request to D right after")
    ed2 = exchange(args.d2_port, cmpl, d_leg_body(client, ep), "pd-p-gone-d2", "D2",
                   "the same hand-off to D2 (kv_load_failure_policy recompute, never "
                   "connected to P)")
    save(out, "p_gone", "D given a hand-off whose P engine was stopped after answering",
         [ep, ed, after, ed2] + reference(d, cmpl, client, "pd-p-gone-ref"))


def exchange_reset(port):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/reset_prefix_cache")
    r = c.getresponse()
    body = r.read().decode()
    print(f"[pd] D /reset_prefix_cache: {r.status}", flush=True)
    return {"engine": "D", "note": "reset D's prefix cache (VLLM_SERVER_DEV_MODE=1)",
            "request": {"method": "POST", "path": "/reset_prefix_cache", "headers": {},
                        "body": ""},
            "response": {"status": r.status, "headers": {}, "body": body}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--p-port", type=int, default=8190)
    ap.add_argument("--d-port", type=int, default=8191)
    ap.add_argument("--d2-port", type=int, default=8192)
    ap.add_argument("--p-side-port", type=int, default=5690)
    ap.add_argument("--d-side-port", type=int, default=5691)
    ap.add_argument("--d2-side-port", type=int, default=5692)
    ap.add_argument("--out", default=os.path.join(REPO, f"tests/fixtures/vllm-{VERSION}/pd"))
    ap.add_argument("--run-dir", default=os.path.join(VHOME, "run-pd"))
    ap.add_argument("--start", action="store_true", help="start (and stop) P, D and D2")
    args = ap.parse_args()
    os.makedirs(args.run_dir, exist_ok=True)
    PORTS.update(P=args.p_port, D=args.d_port, D2=args.d2_port)
    engines = []
    if args.start:
        engines = [Engine("P", args.p_port, args.p_side_port, args.run_dir),
                   Engine("D", args.d_port, args.d_side_port, args.run_dir),
                   Engine("D2", args.d2_port, args.d2_side_port, args.run_dir,
                          KV_TRANSFER_RECOMPUTE)]
        for e in engines:
            e.start()
    try:
        for e in engines:
            e.wait_healthy()
        record(args, engines[0] if engines else None)
    finally:
        for e in engines:
            e.stop()


if __name__ == "__main__":
    sys.exit(main())

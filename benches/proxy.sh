#!/usr/bin/env bash
# Proxy cost benchmark (issues 5, 12): Switchyard (default `load_balanced_kvaware.rhai` policy)
# against floors measured in the same run: a bare hyper forwarder (`examples/bare_forwarder.rs`:
# no parsing, no routing) and nginx (1 worker, proxy_buffering off) when it is installed, all in
# front of the same mock engine (`examples/sse_engine.rs`) that streams like a real engine: each
# SSE event its own write (one HTTP/1.1 chunk, TCP_NODELAY).
#
#   benches/proxy.sh                           # full run (a few minutes)
#   REQUESTS=2000 benches/proxy.sh             # fewer requests per cell
#   BIN=/path/to/switchyard benches/proxy.sh   # measure another build (e.g. an older commit's)
#   ALT_BIN=/path/to/other benches/proxy.sh    # add a second Switchyard build as row "alt"
#   OTLP=1 benches/proxy.sh                    # add rows otel1 and otel100: Switchyard tracing
#                                              # 1 % / 100 % of requests to a discarding OTLP
#                                              # receiver (examples/otlp_sink.rs, on core 0)
#
# Modes (TOKENS=16 token events + `data: [DONE]` = 17 events per streamed response, ~1 KB prompt):
#   plain   non-streamed completion (one JSON body)
#   burst   streamed, the engine writes the 17 events back to back (a proxy may coalesce them)
#   paced   streamed, the engine waits 1 ms before each event (nothing to coalesce: the figure is
#           the cost of relaying one event)
# Per cell: requests/s, p50/p99 latency (oha), each proxy's CPU µs per request (and per event
# for streams) from /proc/PID/task/*/schedstat (on-CPU ns delta / requests answered); the ratio columns
# divide by the bare forwarder's and nginx's CPU in the same cell. Each cell runs ROUNDS times,
# targets alternating so drift on a noisy machine hits all alike; the table shows medians.
# Memory: each proxy's RSS right after start, and its peak RSS (VmHWM) while OPEN_STREAMS
# streams are open at once (engine paced at 100 ms per event).
# On a machine with 2+ cores the load generator and the engine run on core 0 and every proxy on
# core 1 (taskset), so a proxy's CPU is not shared with the load it measures.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-5000}
CONCURRENCY=${CONCURRENCY:-"1 32"}
PACED_CONCURRENCY=${PACED_CONCURRENCY:-32}
MODES=${MODES:-"plain burst paced"}
TOKENS=${TOKENS:-16}
ROUNDS=${ROUNDS:-2}
OPEN_STREAMS=${OPEN_STREAMS:-1000}
OUT=${OUT:-bench-out/proxy}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

command -v oha >/dev/null || cargo install oha --locked
cargo build --release --quiet --example sse_engine --example bare_forwarder
[ -n "${OTLP:-}" ] && cargo build --release --quiet --example otlp_sink
ENGINE_BIN=target/release/examples/sse_engine
BARE_BIN=target/release/examples/bare_forwarder
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet --bin switchyard
  BIN=target/release/switchyard
fi
NGINX=$(command -v nginx || true)
[ -z "$NGINX" ] && [ -x /usr/sbin/nginx ] && NGINX=/usr/sbin/nginx
[ -z "$NGINX" ] && echo "nginx not installed: no nginx row (apt-get install -y nginx)"
ulimit -n 65536 2>/dev/null || ulimit -n 8192 || true

CORES=$(nproc)
PINNED=0
[ "$CORES" -ge 2 ] && command -v taskset >/dev/null && PINNED=1
pin() { # pin CORE CMD...  (foreground)
  local core=$1; shift
  if [ "$PINNED" = 1 ]; then taskset -c "$core" "$@"; else "$@"; fi
}
spawn() { # spawn CORE CMD...  (background; BGPID is the command's own pid: taskset execs it)
  local core=$1; shift
  if [ "$PINNED" = 1 ]; then taskset -c "$core" "$@" >>"$OUT/procs.log" 2>&1 & else "$@" >>"$OUT/procs.log" 2>&1 & fi
  BGPID=$!
  PIDS+=("$BGPID")
}
[ "$PINNED" = 1 ] && echo "pinning: load generator and engine on core 0, proxies on core 1" \
  || echo "pinning: only $CORES core(s); nothing pinned"
echo "load: $(uptime)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

PIDS=()
stop_all() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }
trap stop_all EXIT
: > "$OUT/procs.log"

MODEL=bench
PROMPT=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 23)[:1024])')
printf '{"model":"%s","prompt":"%s","max_tokens":%d}' "$MODEL" "$PROMPT" "$TOKENS" > "$OUT/plain.json"
printf '{"model":"%s","prompt":"%s","max_tokens":%d,"stream":true}' "$MODEL" "$PROMPT" "$TOKENS" > "$OUT/stream.json"

# CPU time of every thread of PID in ns (schedstat: on-CPU time, user and kernel; ns resolution,
# where utime+stime counts 10 ms ticks).
cpu_ns() { cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s+=$1} END {printf "%.0f\n", s}'; }
status_kb() { awk -v f="$2:" '$1==f{print $2}' "/proc/$1/status"; }

# start_targets ENGINE_PORT: starts every proxy in front of the engine; sets TARGETS, PORT_x, PID_x.
start_targets() {
  local eport=$1
  TARGETS="bare"
  PORT_bare=$(free_port)
  spawn 1 "$BARE_BIN" --port "$PORT_bare" --upstream "http://127.0.0.1:$eport"; PID_bare=$BGPID
  if [ -n "$NGINX" ]; then
    TARGETS="$TARGETS nginx"
    PORT_nginx=$(free_port)
    mkdir -p "$OUT/nginx/tmp"
    cat > "$OUT/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
master_process off;
worker_rlimit_nofile 65536;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log error;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $OUT/nginx/tmp/body;
  proxy_temp_path $OUT/nginx/tmp/proxy;
  fastcgi_temp_path $OUT/nginx/tmp/fastcgi;
  uwsgi_temp_path $OUT/nginx/tmp/uwsgi;
  scgi_temp_path $OUT/nginx/tmp/scgi;
  upstream engine { server 127.0.0.1:$eport; keepalive 1024; keepalive_requests 1000000; }
  server {
    listen 127.0.0.1:$PORT_nginx;
    keepalive_requests 1000000;
    tcp_nodelay on;
    location / {
      proxy_pass http://engine;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }
  }
}
EOF
    spawn 1 "$NGINX" -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf"; PID_nginx=$BGPID
  fi
  TARGETS="$TARGETS switchyard"
  PORT_switchyard=$(free_port)
  spawn 1 "$BIN" serve --port "$PORT_switchyard" --static-backends "http://127.0.0.1:$eport" \
    --static-models "$MODEL" --log-level error; PID_switchyard=$BGPID
  if [ -n "${ALT_BIN:-}" ]; then
    TARGETS="$TARGETS alt"
    PORT_alt=$(free_port)
    spawn 1 "$ALT_BIN" serve --port "$PORT_alt" --static-backends "http://127.0.0.1:$eport" \
      --static-models "$MODEL" --log-level error; PID_alt=$BGPID
  fi
  if [ -n "${OTLP:-}" ]; then
    local sink
    sink=$(free_port)
    spawn 0 target/release/examples/otlp_sink --port "$sink"
    for pct in 1 100; do
      local t="otel$pct" port ratio
      port=$(free_port); ratio=$(python3 -c "print($pct / 100)")
      TARGETS="$TARGETS $t"
      spawn 1 "$BIN" serve --port "$port" --static-backends "http://127.0.0.1:$eport" \
        --static-models "$MODEL" --log-level error \
        --otlp-endpoint "http://127.0.0.1:$sink" --otlp-sample-ratio "$ratio"
      printf -v "PORT_$t" '%s' "$port"; printf -v "PID_$t" '%s' "$BGPID"
    done
  fi
  for t in $TARGETS; do
    local p="PORT_$t"; wait_http "http://127.0.0.1:${!p}/health"
  done
}

start_engine() { # start_engine MODE [INTERVAL_US] -> EPORT
  EPORT=$(free_port)
  spawn 0 "$ENGINE_BIN" --port "$EPORT" --tokens "$TOKENS" --mode "$1" --interval-us "${2:-1000}"
  wait_http "http://127.0.0.1:$EPORT/health"
}

run_cell() { # run_cell TARGET PORT PID MODE C
  local target=$1 port=$2 pid=$3 mode=$4 c=$5 body=stream
  [ "$mode" = plain ] && body=plain
  local before=0 after=0
  [ "$pid" != "-" ] && before=$(cpu_ns "$pid")
  pin 0 oha -n "$REQUESTS" -c "$c" -m POST -T application/json -D "$OUT/$body.json" \
    --no-tui --output-format json "http://127.0.0.1:$port/v1/completions" > "$OUT/cell.json" 2>/dev/null
  [ "$pid" != "-" ] && after=$(cpu_ns "$pid")
  python3 - "$OUT/cell.json" "$target" "$mode" "$c" "$before" "$after" "$REQUESTS" >> "$OUT/cells.tsv" <<'PY'
import json, sys
f, target, mode, c, before, after, n = sys.argv[1:]
d = json.load(open(f))
s = d["summary"]; lat = d.get("latencyPercentiles", {})
ok = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if k.startswith("2"))
cpu_us = (int(after) - int(before)) / 1e3 / max(ok, 1)
print("\t".join(map(str, [target, mode, c, round(s["requestsPerSec"], 1), round(lat.get("p50", 0) * 1e3, 3),
    round(lat.get("p99", 0) * 1e3, 3), ok, int(n) - ok, round(cpu_us, 2) if target != "direct" else "-"])))
PY
}

: > "$OUT/cells.tsv"
: > "$OUT/memory.tsv"
for mode in $MODES; do
  if [ "$mode" = paced ]; then start_engine paced; else start_engine burst; fi
  start_targets "$EPORT"
  if [ "$mode" = "$(echo $MODES | cut -d' ' -f1)" ]; then
    for t in $TARGETS; do p="PID_$t"; printf '%s\tstart\t%s\n' "$t" "$(status_kb "${!p}" VmRSS)" >> "$OUT/memory.tsv"; done
  fi
  concs=$CONCURRENCY; [ "$mode" = paced ] && concs=$PACED_CONCURRENCY
  for c in $concs; do
    for round in $(seq 1 "$ROUNDS"); do
      run_cell direct "$EPORT" - "$mode" "$c"
      for t in $TARGETS; do p="PORT_$t"; q="PID_$t"; run_cell "$t" "${!p}" "${!q}" "$mode" "$c"; done
    done
  done
  stop_all
done

# OPEN_STREAMS concurrent streams through each fresh proxy (engine: 100 ms per event): none
# dropped, peak RSS.
start_engine paced 100000
start_targets "$EPORT"
for t in $TARGETS; do
  p="PORT_$t"; q="PID_$t"
  pin 0 oha -n "$OPEN_STREAMS" -c "$OPEN_STREAMS" -m POST -T application/json -D "$OUT/stream.json" \
    --no-tui --output-format json "http://127.0.0.1:${!p}/v1/completions" > "$OUT/open-$t.json" 2>/dev/null
  ok=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(sum(v for k,v in d.get("statusCodeDistribution",{}).items() if k.startswith("2")))' "$OUT/open-$t.json")
  printf '%s\topen\t%s\t%s\n' "$t" "$(status_kb "${!q}" VmHWM)" "$ok" >> "$OUT/memory.tsv"
done
stop_all

python3 - "$OUT/cells.tsv" "$OUT/memory.tsv" "$TOKENS" "$OPEN_STREAMS" <<'PY'
import sys, statistics
from collections import defaultdict
cells, memory, tokens, n_open = sys.argv[1:]
events = int(tokens) + 1
order = ["direct", "nginx", "bare", "switchyard", "alt", "otel1", "otel100"]
rows = defaultdict(list)
for line in open(cells):
    t, mode, c, rps, p50, p99, ok, failed, cpu = line.rstrip("\n").split("\t")
    rows[(mode, int(c), t)].append((float(rps), float(p50), float(p99), int(ok), int(failed), None if cpu == "-" else float(cpu)))
def med(xs): return statistics.median(xs) if xs else float("nan")
def cpu(mode, c, t):
    xs = [x[5] for x in rows.get((mode, c, t), []) if x[5] is not None]
    return med(xs) if xs else None
modes = ["plain", "burst", "paced"]
print(f"\n{'mode':6} {'conc':>4} {'target':10} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'fail':>4} {'CPU us/req':>10} {'us/event':>8} {'/bare':>6} {'/nginx':>6}")
for (mode, c, t) in sorted(rows, key=lambda k: (modes.index(k[0]), k[1], order.index(k[2]))):
    r = rows[(mode, c, t)]
    rps, p50, p99 = med([x[0] for x in r]), med([x[1] for x in r]), med([x[2] for x in r])
    failed = sum(x[4] for x in r)
    u = cpu(mode, c, t)
    b, n = cpu(mode, c, "bare"), cpu(mode, c, "nginx")
    f = lambda v: f"{v:10.1f}" if v is not None else f"{'-':>10}"
    ev = f"{u/events:8.2f}" if (u is not None and mode != "plain") else f"{'-':>8}"
    rb = f"{u/b:6.2f}" if (u is not None and b) else f"{'-':>6}"
    rn = f"{u/n:6.2f}" if (u is not None and n) else f"{'-':>6}"
    print(f"{mode:6} {c:>4} {t:10} {rps:8.0f} {p50:7.3f} {p99:7.3f} {failed:>4} {f(u)} {ev} {rb} {rn}")
mem = defaultdict(dict)
for line in open(memory):
    parts = line.rstrip("\n").split("\t")
    mem[parts[0]][parts[1]] = parts[2:]
print(f"\n{'target':10} {'RSS after start MiB':>19} {'peak RSS, ' + n_open + ' open streams MiB':>32} {'streams ok':>10}")
for t in order:
    if t not in mem: continue
    s = mem[t].get("start", ["nan"])[0]; o = mem[t].get("open", ["nan", "0"])
    print(f"{t:10} {int(s)/1024 if s != 'nan' else float('nan'):19.1f} {int(o[0])/1024:32.1f} {o[1]:>10}")
def ratio(mode, c, floor):
    s, f = cpu(mode, c, "switchyard"), cpu(mode, c, floor)
    return s / f if (s is not None and f) else None
def p99(mode, c, t):
    r = rows.get((mode, c, t)); return med([x[2] for x in r]) if r else None
checks = [
    ("non-streamed CPU/request (c=32) <= 1.25x bare", ratio("plain", 32, "bare"), 1.25),
    ("non-streamed CPU/request (c=1) <= 1.2x bare", ratio("plain", 1, "bare"), 1.2),
    ("burst stream CPU/request (c=32) <= 2.5x nginx", ratio("burst", 32, "nginx"), 2.5),
    ("paced stream CPU/event (c=32) <= 1.2x bare", ratio("paced", 32, "bare"), 1.2),
    ("burst stream p99 at c=1 < 2 ms", p99("burst", 1, "switchyard"), 2.0),
]
if "switchyard" in mem:
    checks.append(("RSS after start <= 20 MiB", int(mem["switchyard"]["start"][0]) / 1024, 20))
    checks.append((f"peak RSS, {n_open} open streams <= 60 MiB", int(mem["switchyard"]["open"][0]) / 1024, 60))
print("\ntargets (switchyard):")
for name, v, limit in checks:
    if v is None: print(f"  {name:48} not measured"); continue
    print(f"  {name:48} {v:7.2f}  {'met' if v <= limit else 'MISSED'}")
PY

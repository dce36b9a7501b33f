#!/usr/bin/env bash
# Proxy overhead benchmark (issue 5): direct-to-engine vs. through Switchyard with the default
# `load_balanced_kvaware.rhai` policy and with the `roundrobin` TOML policy, against a simulated
# engine that answers at once. Prints a table with ratios to direct.
#
#   benches/proxy.sh                 # full run (a few minutes)
#   REQUESTS=2000 benches/proxy.sh   # fewer requests per cell
#   BIN=/path/to/switchyard benches/proxy.sh   # measure another build (e.g. an older commit's)
#
# Per cell: requests/s and p50/p99 latency from oha; the router's CPU seconds per request from
# /proc/PID/stat (utime+stime delta / requests answered); the router's peak RSS (VmHWM).
# On a machine with 2+ cores the load generator and the engine run on core 0, the router on
# core 1 (taskset), so the router's CPU is not shared with the load it measures.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-5000}
CONCURRENCY=${CONCURRENCY:-"1 32 128"}
MODES=${MODES:-"plain stream"}
TOKENS=${TOKENS:-16}
OPEN_STREAMS=${OPEN_STREAMS:-1000}
OUT=${OUT:-bench-out/proxy}
mkdir -p "$OUT"

command -v oha >/dev/null || cargo install oha --locked
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/switchyard
fi
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
  if [ "$PINNED" = 1 ]; then taskset -c "$core" "$@" >/dev/null 2>&1 & else "$@" >/dev/null 2>&1 & fi
  BGPID=$!
  PIDS+=("$BGPID")
}
[ "$CORES" -ge 2 ] && echo "pinning: load generator and engine on core 0, router on core 1" \
  || echo "pinning: only $CORES core(s); nothing pinned"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 1 200); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.05; done; echo "no answer from $1" >&2; return 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

MODEL=bench
SIM_PORT=$(free_port)
spawn 0 "$BIN" sim --port "$SIM_PORT" --model "$MODEL" --instant --max-num-seqs 100000
wait_http "http://127.0.0.1:$SIM_PORT/health"

start_router() { # start_router POLICY -> sets RPORT RPID
  RPORT=$(free_port)
  spawn 1 "$BIN" serve --port "$RPORT" --static-backends "http://127.0.0.1:$SIM_PORT" --static-models "$MODEL" \
    --routing-logic "$1" --log-level error
  RPID=$BGPID
  wait_http "http://127.0.0.1:$RPORT/health"
}
start_router load_balanced_kvaware.rhai; RHAI_PORT=$RPORT; RHAI_PID=$RPID
start_router roundrobin;            RR_PORT=$RPORT;   RR_PID=$RPID

# ~1 KB prompt.
PROMPT=$(python3 -c 'print(("The quick brown fox jumps over the lazy dog. " * 23)[:1024])')
printf '{"model":"%s","prompt":"%s","max_tokens":%d}' "$MODEL" "$PROMPT" "$TOKENS" > "$OUT/plain.json"
printf '{"model":"%s","prompt":"%s","max_tokens":%d,"stream":true}' "$MODEL" "$PROMPT" "$TOKENS" > "$OUT/stream.json"

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
hwm_kb() { awk '/VmHWM/{print $2}' "/proc/$1/status"; }
TICK=$(getconf CLK_TCK)

run_cell() { # run_cell TARGET PORT PID MODE C
  local target=$1 port=$2 pid=$3 mode=$4 c=$5
  local before=0 after=0
  [ "$pid" != "-" ] && before=$(cpu_ticks "$pid")
  pin 0 oha -n "$REQUESTS" -c "$c" -m POST -T application/json -D "$OUT/$mode.json" \
    --no-tui --output-format json "http://127.0.0.1:$port/v1/completions" > "$OUT/$target-$mode-$c.json" 2>/dev/null
  [ "$pid" != "-" ] && after=$(cpu_ticks "$pid")
  python3 - "$OUT/$target-$mode-$c.json" "$target" "$mode" "$c" "$before" "$after" "$TICK" "$REQUESTS" >> "$OUT/cells.tsv" <<'PY'
import json, sys
f, target, mode, c, before, after, tick, n = sys.argv[1:]
d = json.load(open(f))
s = d["summary"]; lat = d.get("latencyPercentiles", {})
ok = sum(v for k, v in d.get("statusCodeDistribution", {}).items() if k.startswith("2"))
cpu_us = (int(after) - int(before)) / int(tick) / max(ok, 1) * 1e6
print("\t".join(map(str, [target, mode, c, round(s["requestsPerSec"], 1), round(lat.get("p50", 0) * 1e3, 3),
    round(lat.get("p99", 0) * 1e3, 3), ok, int(n) - ok, round(cpu_us, 1) if target != "direct" else "-"])))
PY
}

: > "$OUT/cells.tsv"
for mode in $MODES; do
  for c in $CONCURRENCY; do
    # Alternate the three targets, twice, so drift on a noisy machine hits all of them alike.
    for round in 1 2; do
      run_cell direct "$SIM_PORT" - "$mode" "$c"
      run_cell rhai "$RHAI_PORT" "$RHAI_PID" "$mode" "$c"
      run_cell roundrobin "$RR_PORT" "$RR_PID" "$mode" "$c"
    done
  done
done

# 1,000 concurrent open streams through the router: none dropped, router RSS.
SLOW_PORT=$(free_port)
spawn 0 "$BIN" sim --port "$SLOW_PORT" --model "$MODEL" --itl-ms 100 --prefill-overhead-ms 0 --prefill-ms-per-token 0 \
  --max-num-seqs 100000
wait_http "http://127.0.0.1:$SLOW_PORT/health"
OPEN_PORT=$(free_port)
spawn 1 "$BIN" serve --port "$OPEN_PORT" --static-backends "http://127.0.0.1:$SLOW_PORT" --static-models "$MODEL" --log-level error
OPEN_PID=$BGPID
wait_http "http://127.0.0.1:$OPEN_PORT/health"
pin 0 oha -n "$OPEN_STREAMS" -c "$OPEN_STREAMS" -m POST -T application/json -D "$OUT/stream.json" \
  --no-tui --output-format json "http://127.0.0.1:$OPEN_PORT/v1/completions" > "$OUT/open-streams.json" 2>/dev/null

python3 - "$OUT/cells.tsv" "$OUT/open-streams.json" "$(hwm_kb "$RHAI_PID")" "$(hwm_kb "$RR_PID")" "$(hwm_kb "$OPEN_PID")" "$OPEN_STREAMS" <<'PY'
import json, sys, statistics
from collections import defaultdict
cells, open_json, hwm_rhai, hwm_rr, hwm_open, n_open = sys.argv[1:]
rows = defaultdict(list)
for line in open(cells):
    t, mode, c, rps, p50, p99, ok, failed, cpu = line.rstrip("\n").split("\t")
    rows[(mode, int(c), t)].append((float(rps), float(p50), float(p99), int(ok), int(failed), None if cpu == "-" else float(cpu)))
def med(xs): return statistics.median(xs) if xs else float("nan")
print(f"\n{'mode':7} {'conc':>4} {'target':11} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>6} {'CPU us/req':>10} {'rps/direct':>10} {'p50/direct':>10}")
for (mode, c, t) in sorted(rows, key=lambda k: (k[0], k[1], ["direct", "rhai", "roundrobin"].index(k[2]))):
    r = rows[(mode, c, t)]; d = rows[(mode, c, "direct")]
    rps, p50, p99 = med([x[0] for x in r]), med([x[1] for x in r]), med([x[2] for x in r])
    cpu = [x[5] for x in r if x[5] is not None]
    failed = sum(x[4] for x in r)
    cpu_s = f"{med(cpu):10.1f}" if cpu else f"{'-':>10}"
    print(f"{mode:7} {c:>4} {t:11} {rps:9.0f} {p50:8.3f} {p99:8.3f} {failed:>6} {cpu_s} {rps/med([x[0] for x in d]):10.2f} {p50/med([x[1] for x in d]):10.2f}")
o = json.load(open(open_json))
ok = sum(v for k, v in o.get("statusCodeDistribution", {}).items() if k.startswith("2"))
print(f"\npeak RSS: rhai router {int(hwm_rhai)/1024:.1f} MiB, roundrobin router {int(hwm_rr)/1024:.1f} MiB")
print(f"{n_open} concurrent open streams: {ok} answered 2xx, {int(n_open)-ok} failed; router peak RSS {int(hwm_open)/1024:.1f} MiB")
PY

#!/usr/bin/env bash
# The real-engine benchmark (not in CI): N real vLLM 0.32 CPU engines with KV events
# (engines.sh), Switchyard in front, production-stack's multi-round QA shape sent by
# `switchyard bench --target`, one run per routing setup:
#
#   roundrobin             --routing-logic roundrobin
#   session                --routing-logic session (x-user-id)
#   kv-approximate         load_balanced_kvaware, no --tokenizer (the router's own index)
#   kv-exact               load_balanced_kvaware, --tokenizer + --static-kv-events (+ replay)
#   kv-exact-restarted     as kv-exact, the router killed halfway through and started again
#                          against the warm engines
#   kv-exact-noreplay      as kv-exact without the replay sockets (vLLM's default
#                          --kv-events-config has none)
#   kv-exact-noreplay-restarted   both: a router restarted next to warm engines that it
#                          cannot ask for their history (its views join mid-stream: partial)
#   kv-approximate-3       three router replicas (approximate), a roundrobin router in front
#   kv-exact-3             three router replicas (exact), a roundrobin router in front
#
# Before each run every engine's prefix cache is reset (POST /reset_prefix_cache) after the
# routers are up; vLLM's own vllm:prefix_cache_hits_total / queries_total are read from each
# engine before and after the run, and the hit rate of the run is their difference.
#
#   examples/real_vllm/bench.sh                # setup, 3 engines, every run, engines left up
#   RUNS="roundrobin kv-exact" USERS=4 ROUNDS=2 examples/real_vllm/bench.sh   # a short try
#   examples/real_vllm/engines.sh stop         # afterwards
#
# Environment: N (engines, default 3), RUNS (default: all of the above), OUT (default
# bench-real-out), SWITCHYARD_BIN (default target/release/switchyard, built if missing),
# ROUTER_PORT (default 8200; replicas take the next three), USERS, ROUNDS, QPS,
# SYSTEM_TOKENS, HISTORY_TOKENS, QUESTION_TOKENS, ANSWER_TOKENS (the workload), and those of
# setup.sh / engines.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VHOME="${SWITCHYARD_VLLM_HOME:-$HOME/.cache/switchyard/vllm-0.32.0}"
export SWITCHYARD_VLLM_HOME="$VHOME"
N="${N:-3}"
OUT="${OUT:-$REPO/bench-real-out}"
RUNS="${RUNS:-roundrobin session kv-approximate kv-exact kv-exact-restarted kv-exact-noreplay kv-exact-noreplay-restarted kv-approximate-3 kv-exact-3}"
PORT="${ROUTER_PORT:-8200}"
HTTP0="${SWITCHYARD_VLLM_HTTP_PORT:-8100}"
KV0="${SWITCHYARD_VLLM_KV_PORT:-5600}"
RP0="${SWITCHYARD_VLLM_REPLAY_PORT:-5700}"
MODEL_DIR="${SWITCHYARD_VLLM_MODEL:-$VHOME/models/chatml}"
SERVED="${SWITCHYARD_VLLM_SERVED:-tiny}"
BLOCK="${SWITCHYARD_VLLM_BLOCK:-32}"
WORKLOAD=(--workload multi-round-qa --users "${USERS:-12}" --rounds "${ROUNDS:-4}" --qps "${QPS:-1}"
  --system-prompt-tokens "${SYSTEM_TOKENS:-600}" --history-tokens "${HISTORY_TOKENS:-200}"
  --question-tokens "${QUESTION_TOKENS:-40}" --answer-tokens "${ANSWER_TOKENS:-16}")
PY="$VHOME/bin/python"
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

BIN="${SWITCHYARD_BIN:-$REPO/target/release/switchyard}"
if [ ! -x "$BIN" ]; then
  log "building $BIN"
  (cd "$REPO" && cargo build --release --bin switchyard)
fi

"$HERE/setup.sh"
"$HERE/engines.sh" start "$N"
mkdir -p "$OUT"

BACKENDS="" EVENTS="" REPLAY=""
for ((i = 0; i < N; i++)); do
  sep=${BACKENDS:+,}
  BACKENDS+="${sep}http://127.0.0.1:$((HTTP0 + i))"
  EVENTS+="${sep}tcp://127.0.0.1:$((KV0 + i))"
  REPLAY+="${sep}tcp://127.0.0.1:$((RP0 + i))"
done

ROUTER_PIDS=()
# start_router NAME PORT ARGS...: a router on PORT, logging to $OUT/NAME.log.
start_router() {
  local name="$1" port="$2"; shift 2
  "$BIN" serve --host 127.0.0.1 --port "$port" --static-backends "$BACKENDS" \
    --static-models "$SERVED" --session-key x-user-id --decision-headers \
    --block-size "$BLOCK" "$@" >> "$OUT/$name.log" 2>&1 &
  ROUTER_PIDS+=($!)
  for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$port/health" > /dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "router $name on :$port did not come up; see $OUT/$name.log"; exit 1
}
stop_routers() {
  for pid in "${ROUTER_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${ROUTER_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  ROUTER_PIDS=()
}
trap stop_routers EXIT

# Sums of vLLM's prefix-cache counters over the engines: "hits queries".
cache_counters() {
  local h=0 q=0
  for ((i = 0; i < N; i++)); do
    local page
    page=$(curl -fsS "http://127.0.0.1:$((HTTP0 + i))/metrics")
    h=$(awk -v h="$h" '/^vllm:prefix_cache_hits_total[{ ]/ {h += $NF} END {printf "%.0f", h}' <<< "$page")
    q=$(awk -v q="$q" '/^vllm:prefix_cache_queries_total[{ ]/ {q += $NF} END {printf "%.0f", q}' <<< "$page")
  done
  echo "$h $q"
}

# Resets every engine's prefix cache. vLLM publishes the AllBlocksCleared of a reset only with
# the engine's next scheduler step, so one 1-token request per engine flushes it: otherwise a
# router's complete views still show the previous run's blocks (the workload is the same each
# run) until each engine happens to run a step, and it routes by them.
reset_caches() {
  for ((i = 0; i < N; i++)); do
    curl -fsS -X POST "http://127.0.0.1:$((HTTP0 + i))/reset_prefix_cache" > /dev/null
    curl -fsS "http://127.0.0.1:$((HTTP0 + i))/v1/completions" -H 'content-type: application/json' \
      -d "{\"model\": \"$SERVED\", \"prompt\": [0], \"max_tokens\": 1}" > /dev/null
  done
  sleep 1  # the routers read the clears
}

EXACT=(--routing-logic load_balanced_kvaware --tokenizer "$MODEL_DIR" --static-kv-events "$EVENTS"
  --static-kv-events-replay "$REPLAY")
NOREPLAY=(--routing-logic load_balanced_kvaware --tokenizer "$MODEL_DIR" --static-kv-events "$EVENTS")
APPROX=(--routing-logic load_balanced_kvaware)

run() {
  local name="$1" dir="$OUT/$1"
  rm -rf "$dir"; mkdir -p "$dir"; : > "$OUT/$name.log"
  local restart_args=()
  case "$name" in
    roundrobin) start_router "$name" "$PORT" --routing-logic roundrobin ;;
    session) start_router "$name" "$PORT" --routing-logic session ;;
    kv-approximate) start_router "$name" "$PORT" "${APPROX[@]}" ;;
    kv-exact) start_router "$name" "$PORT" "${EXACT[@]}" ;;
    kv-exact-restarted) start_router "$name" "$PORT" "${EXACT[@]}"; restart_args=("${EXACT[@]}") ;;
    kv-exact-noreplay) start_router "$name" "$PORT" "${NOREPLAY[@]}" ;;
    kv-exact-noreplay-restarted)
      start_router "$name" "$PORT" "${NOREPLAY[@]}"; restart_args=("${NOREPLAY[@]}") ;;
    kv-approximate-3|kv-exact-3)
      local args=("${APPROX[@]}"); [ "$name" = kv-exact-3 ] && args=("${EXACT[@]}")
      local replicas=""
      for r in 1 2 3; do
        start_router "$name-replica$r" $((PORT + r)) "${args[@]}"
        replicas+="${replicas:+,}http://127.0.0.1:$((PORT + r))"
      done
      # The front spreads requests over the replicas (it drops their decision headers:
      # exact decisions are counted from the replicas' metrics below).
      "$BIN" serve --host 127.0.0.1 --port "$PORT" --static-backends "$replicas" \
        --static-models "$SERVED" --routing-logic roundrobin --engine-stats-interval 3600 \
        >> "$OUT/$name-front.log" 2>&1 &
      ROUTER_PIDS+=($!)
      for _ in $(seq 1 300); do
        curl -fsS "http://127.0.0.1:$PORT/health" > /dev/null 2>&1 && break
        sleep 0.1
      done ;;
    *) log "unknown run $name"; exit 2 ;;
  esac
  sleep 2  # let the routers' SUB sockets connect before the reset's AllBlocksCleared
  reset_caches
  local before after
  before=$(cache_counters)
  log "run $name"
  local policy="roundrobin"
  case "$name" in session) policy=session ;; kv-*) policy=load_balanced_kvaware ;; esac
  local t0; t0=$(date +%s.%N)
  "$BIN" bench --target "http://127.0.0.1:$PORT" --model "$SERVED" --policies "$policy" \
    --quiet --out "$dir" "${WORKLOAD[@]}" > "$dir/bench.txt" 2>&1 &
  local bench=$!
  if [ ${#restart_args[@]} -gt 0 ]; then
    # Halfway through (by requests answered), kill the router and start a new one against
    # the warm engines: it joins their event streams mid-way.
    local total=$(( ${USERS:-12} * ${ROUNDS:-4} ))
    until [ "$(curl -fsS "http://127.0.0.1:$PORT/metrics" | awk '/^switchyard_requests_total[{ ]/ {s += $NF} END {print int(s)}')" -ge $((total / 2)) ]; do
      kill -0 "$bench" 2>/dev/null || break
      sleep 0.5
    done
    log "restarting the router"
    kill -KILL "${ROUTER_PIDS[0]}"; wait "${ROUTER_PIDS[0]}" 2>/dev/null || true; ROUTER_PIDS=()
    echo "--- restarted ---" >> "$OUT/$name.log"
    start_router "$name" "$PORT" "${restart_args[@]}"
    # Seconds from the start of the run to the new router answering /health.
    awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f\n", b - a }' > "$dir/restart_at.txt"
  fi
  wait "$bench" || { log "bench failed: $(tail -5 "$dir/bench.txt")"; }
  after=$(cache_counters)
  case "$name" in
    *-3)
      # The front router drops the replicas' x-switchyard-* headers (only a router sets
      # them), so count the replicas' decisions from their metrics: "exact partial total".
      local ex=0 pa=0 tot=0
      for r in 1 2 3; do
        read -r e p t < <(curl -fsS "http://127.0.0.1:$((PORT + r))/metrics" | awk '
          /^switchyard_routing_decisions_total[{ ]/ { t += $NF; if ($0 ~ /kv="exact"/) e += $NF; if ($0 ~ /kv="partial"/) p += $NF }
          END { printf "%d %d %d\n", e, p, t }')
        ex=$((ex + e)); pa=$((pa + p)); tot=$((tot + t))
      done
      echo "$ex $pa $tot" > "$dir/router_decisions.txt" ;;
  esac
  stop_routers
  echo "$before $after" > "$dir/vllm_counters.txt"
}

for r in $RUNS; do run "$r"; done

"$PY" - "$OUT" $RUNS <<'PY'
import csv, statistics, sys, os
out, runs = sys.argv[1], sys.argv[2:]
rows = ["| run | requests ok/sent | TTFT mean | TTFT p50 | TTFT p90 | exact + partial decisions | after the restart | vLLM prefix-cache hits |",
        "|---|--:|--:|--:|--:|--:|--:|--:|"]
def pct(xs, p):
    xs = sorted(xs)
    if not xs: return float("nan")
    k = (len(xs) - 1) * p / 100; f = int(k); c = min(f + 1, len(xs) - 1)
    return xs[f] + (xs[c] - xs[f]) * (k - f)
for run in runs:
    d = os.path.join(out, run)
    try:
        recs = list(csv.DictReader(open(os.path.join(d, "requests.csv"))))
        h0, q0, h1, q1 = map(int, open(os.path.join(d, "vllm_counters.txt")).read().split())
    except (OSError, ValueError) as e:
        rows.append(f"| {run} | failed: {e} | | | | | | |"); continue
    ok = [r for r in recs if r["outcome"] == "ok"]
    ttft = [float(r["ttft_s"]) * 1000 for r in ok if r["ttft_s"]]
    def kv(rs):
        e = sum(r['kv'] == 'exact' for r in rs)
        p = sum(r['kv'] == 'partial' for r in rs)
        return f"{e} + {p} / {len(rs)}"
    exact = kv(ok)
    decisions = os.path.join(d, "router_decisions.txt")
    if os.path.exists(decisions):
        e, p, t = map(int, open(decisions).read().split())
        exact = f"{e} + {p} / {t} (replicas' metrics)"
    # Requests sent once the restarted router was up.
    after = ""
    restart = os.path.join(d, "restart_at.txt")
    if os.path.exists(restart):
        at = float(open(restart).read())
        later = [r for r in ok if float(r["start_s"]) >= at]
        after = kv(later)
    hit = (h1 - h0) / (q1 - q0) if q1 > q0 else float("nan")
    rows.append(f"| {run} | {len(ok)}/{len(recs)} | {statistics.mean(ttft):.0f} ms | {pct(ttft, 50):.0f} ms | "
                f"{pct(ttft, 90):.0f} ms | {exact} | {after} | {100 * hit:.1f} % ({h1 - h0}/{q1 - q0}) |")
table = "\n".join(rows)
print(table)
open(os.path.join(out, "summary.md"), "w").write(table + "\n")
PY
log "results in $OUT (summary.md); engines still running: examples/real_vllm/engines.sh stop"

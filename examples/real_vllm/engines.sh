#!/usr/bin/env bash
# Starts, lists and stops N real vLLM 0.32 CPU engines with KV events, set up by setup.sh.
#
#   examples/real_vllm/engines.sh start N    # engines 0..N-1; waits until each answers /health
#   examples/real_vllm/engines.sh status
#   examples/real_vllm/engines.sh stop
#
# Engine i listens on HTTP $SWITCHYARD_VLLM_HTTP_PORT+i (default 8100+i), publishes KV events
# on tcp://*:$SWITCHYARD_VLLM_KV_PORT+i (default 5600+i; vLLM binds `tcp://*`) and answers
# replay requests on tcp://*:$SWITCHYARD_VLLM_REPLAY_PORT+i (default 5700+i), topic
# `kv@127.0.0.1:<http port>@<served model name>`. Pids and logs: $SWITCHYARD_VLLM_HOME/run/.
#
# Environment (all optional):
#   SWITCHYARD_VLLM_HOME     as for setup.sh
#   SWITCHYARD_VLLM_MODEL    model dir (default $SWITCHYARD_VLLM_HOME/models/chatml)
#   SWITCHYARD_VLLM_SERVED   served model name (default tiny)
#   SWITCHYARD_VLLM_BLOCK    --block-size (default 32; vLLM's CPU backend wants a multiple of 32)
#   SWITCHYARD_VLLM_BLOCKS   --num-gpu-blocks-override (default: what 1 GiB of KV cache holds)
#   SWITCHYARD_VLLM_MAX_LEN  --max-model-len (default 4096, or what the overridden block count
#                            holds: (blocks - 1) * block size)
#   SWITCHYARD_VLLM_ARGS     more arguments for `vllm serve`
#   SWITCHYARD_VLLM_START_TIMEOUT  seconds to wait for /health per engine (default 400)
set -euo pipefail

VHOME="${SWITCHYARD_VLLM_HOME:-$HOME/.cache/switchyard/vllm-0.32.0}"
RUN="$VHOME/run"
MODEL="${SWITCHYARD_VLLM_MODEL:-$VHOME/models/chatml}"
SERVED="${SWITCHYARD_VLLM_SERVED:-tiny}"
HTTP0="${SWITCHYARD_VLLM_HTTP_PORT:-8100}"
KV0="${SWITCHYARD_VLLM_KV_PORT:-5600}"
RP0="${SWITCHYARD_VLLM_REPLAY_PORT:-5700}"
BLOCK="${SWITCHYARD_VLLM_BLOCK:-32}"
TIMEOUT="${SWITCHYARD_VLLM_START_TIMEOUT:-400}"
MAX_LEN=4096
if [ -n "${SWITCHYARD_VLLM_BLOCKS:-}" ] && (( (SWITCHYARD_VLLM_BLOCKS - 1) * BLOCK < MAX_LEN )); then
  MAX_LEN=$(( (SWITCHYARD_VLLM_BLOCKS - 1) * BLOCK ))
fi
MAX_LEN="${SWITCHYARD_VLLM_MAX_LEN:-$MAX_LEN}"
export VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_SERVER_DEV_MODE=1   # POST /reset_prefix_cache (gives AllBlocksCleared)
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

log() { printf '[engines %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

# RSS in MB of a process and all its descendants (vLLM runs its engine core in a child).
tree_rss_mb() {
  "$VHOME/bin/python" - "$1" <<'PY'
import sys, psutil
try:
    p = psutil.Process(int(sys.argv[1]))
    procs = [p] + p.children(recursive=True)
    print(sum(q.memory_info().rss for q in procs) // (1024 * 1024))
except psutil.NoSuchProcess:
    print(0)
PY
}

start() {
  local n="$1"
  mkdir -p "$RUN"
  [ -x "$VHOME/bin/vllm" ] || { echo "no vLLM in $VHOME: run examples/real_vllm/setup.sh" >&2; exit 1; }
  for ((i = 0; i < n; i++)); do
    local http=$((HTTP0 + i)) kv=$((KV0 + i)) rp=$((RP0 + i))
    if [ -f "$RUN/engine-$i.pid" ] && kill -0 "$(cat "$RUN/engine-$i.pid")" 2>/dev/null; then
      log "engine $i already running (pid $(cat "$RUN/engine-$i.pid"))"; touch "$RUN/engine-$i.running"; continue
    fi
    local events
    events=$(printf '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:%d","replay_endpoint":"tcp://*:%d","topic":"kv@127.0.0.1:%d@%s"}' "$kv" "$rp" "$http" "$SERVED")
    local extra=()
    [ -n "${SWITCHYARD_VLLM_BLOCKS:-}" ] && extra+=(--num-gpu-blocks-override "$SWITCHYARD_VLLM_BLOCKS")
    # shellcheck disable=SC2206
    [ -n "${SWITCHYARD_VLLM_ARGS:-}" ] && extra+=($SWITCHYARD_VLLM_ARGS)
    log "starting engine $i: http :$http, kv events :$kv, replay :$rp"
    setsid "$VHOME/bin/vllm" serve "$MODEL" --served-model-name "$SERVED" \
      --host 127.0.0.1 --port "$http" --dtype bfloat16 --max-model-len "$MAX_LEN" \
      --block-size "$BLOCK" --enable-prefix-caching --kv-events-config "$events" \
      "${extra[@]}" > "$RUN/engine-$i.log" 2>&1 < /dev/null &
    echo $! > "$RUN/engine-$i.pid"
    echo "$http $kv $rp" > "$RUN/engine-$i.ports"
    rm -f "$RUN/engine-$i.running"
    date +%s > "$RUN/engine-$i.started"
  done
  for ((i = 0; i < n; i++)); do
    local http=$((HTTP0 + i)) pid t0
    pid=$(cat "$RUN/engine-$i.pid"); t0=$(cat "$RUN/engine-$i.started")
    until curl -fsS "http://127.0.0.1:$http/health" > /dev/null 2>&1; do
      if ! kill -0 "$pid" 2>/dev/null; then log "engine $i died; see $RUN/engine-$i.log"; tail -20 "$RUN/engine-$i.log" >&2; exit 1; fi
      if (( $(date +%s) - t0 > TIMEOUT )); then log "engine $i not healthy after ${TIMEOUT}s; see $RUN/engine-$i.log"; exit 1; fi
      sleep 2
    done
    if [ -f "$RUN/engine-$i.running" ]; then rm -f "$RUN/engine-$i.running"; continue; fi
    log "engine $i healthy after $(( $(date +%s) - t0 ))s, RSS $(tree_rss_mb "$pid") MB (with its children)"
  done
}

status() {
  shopt -s nullglob
  for f in "$RUN"/engine-*.pid; do
    local i pid http
    i=$(basename "$f" .pid); i=${i#engine-}; pid=$(cat "$f"); http=$(cut -d' ' -f1 < "$RUN/engine-$i.ports")
    if kill -0 "$pid" 2>/dev/null; then
      echo "engine $i pid $pid http :$http RSS $(tree_rss_mb "$pid") MB $(curl -fsS -o /dev/null -w 'health %{http_code}' "http://127.0.0.1:$http/health" 2>/dev/null || echo 'not answering')"
    else
      echo "engine $i pid $pid: not running"
    fi
  done
}

stop() {
  shopt -s nullglob
  for f in "$RUN"/engine-*.pid; do
    local pid; pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping pid $pid ($(basename "$f" .pid))"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$f"
  done
}

case "${1:-}" in
  start) start "${2:-1}" ;;
  status) status ;;
  stop) stop ;;
  *) echo "usage: $0 start N | status | stop" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: tether (this
# checkout's dist build: the release profile with LTO, as shipped), HAProxy and Pingora (PEERS) and, with
# BASELINE_BIN, another build of tether, side by side.
#
# A keep-alive nginx on loopback serves /small (100 B). Each build runs under
# valgrind with one worker; after a warm-up the counters are zeroed
# (callgrind_control -z), `tether load` drives DURATION seconds of MODE, the
# counters are dumped, and the instructions are divided by the requests the
# load client completed. Counts do not depend on how busy the machine is,
# so changes too small for wall-clock figures show here.
#
# Knobs: MODES ("keep-alive http10"), DURATION (5), CONCURRENCY (8),
# PEERS ("haproxy pingora", each with one thread; empty for none), BASELINE_BIN, TETHER_BIN. The dumps stay in the printed directory. Needs valgrind and nginx (installed if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

MODES=${MODES:-"keep-alive http10"}
DURATION=${DURATION:-5}
CONCURRENCY=${CONCURRENCY:-8}
BASELINE_BIN=${BASELINE_BIN:-}
PEERS=${PEERS-"haproxy pingora"}
BACKEND=127.0.0.1:18080
PROXY=127.0.0.1:19000

command -v valgrind >/dev/null && command -v nginx >/dev/null && command -v haproxy >/dev/null || {
  apt-get update -qq && apt-get install -y -qq valgrind nginx haproxy >/dev/null
}
PINGORA_BIN=$PWD/target/bench-pingora/release/pingora-bench-proxy
if [[ " $PEERS " == *" pingora "* ]]; then
  command -v cmake >/dev/null || apt-get install -y -qq cmake >/dev/null  # zlib-ng's build
  cargo build --release -q --manifest-path bench/pingora/Cargo.toml --target-dir target/bench-pingora
fi
# TETHER_BIN: measure that build instead of this checkout's dist build
# (a `--profile profiling` one keeps symbols for callgrind_annotate).
if [ -n "${TETHER_BIN:-}" ]; then BIN=$TETHER_BIN; else cargo build --profile dist -q; BIN=$PWD/target/dist/tether; fi
WORK=$(mktemp -d /tmp/tether-callgrind.XXXXXX)
chmod 755 "$WORK"  # nginx workers read the files as their own user
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  pkill -f "callgrind.*$WORK" 2>/dev/null || true
}
trap cleanup EXIT

mkdir -p "$WORK/www"
head -c 100 /dev/zero | tr '\0' x > "$WORK/www/small"
cat > "$WORK/nginx.conf" <<CONF
daemon on; worker_processes 1; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 4096; }
http {
  access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  server { listen $BACKEND backlog=4096; root $WORK/www; }
}
CONF
nginx -c "$WORK/nginx.conf"
cat > "$WORK/tether.toml" <<CONF
[log]
level = "warn"
[[listener]]
name = "app"
listen = "$PROXY"
upstream = "backend"
[[upstream]]
name = "backend"
endpoints = ["$BACKEND"]
[admin]
enabled = false
[runtime]
worker_threads = 1
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  http-reuse always
  option http-keep-alive
frontend fe
  bind $PROXY
  default_backend be
backend be
  server s1 $BACKEND pool-max-conn 64
CONF

wait_for_port() {
  for _ in $(seq 100); do
    bash -c "exec 3<>/dev/tcp/${1%:*}/${1#*:}" 2>/dev/null && return 0
    sleep 0.2
  done
  echo "nothing listens on $1" >&2; return 1
}

measure() { # label mode command... -> one line
  local label=$1 mode=$2 out="$WORK/cg.$1.$2"
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >/dev/null 2>"$WORK/valgrind.err" &
  local pid=$!
  wait_for_port "$PROXY"
  "$BIN" load --target "$PROXY" --mode "$mode" --concurrency "$CONCURRENCY" --duration 1s --path /small --json >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  local result
  result=$("$BIN" load --target "$PROXY" --mode "$mode" --concurrency "$CONCURRENCY" \
    --duration "${DURATION}s" --path /small --json)
  callgrind_control -d "$pid" >/dev/null 2>&1
  # SIGINT stops tether and Pingora; HAProxy in -db mode stops on SIGTERM.
  kill -INT "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # The dump after zeroing is the highest-numbered part file.
  local dump
  dump=$(ls -v "$out".* 2>/dev/null | tail -1)
  python3 - "$label" "$mode" "$dump" <<PY
import json, sys
label, mode, dump = sys.argv[1:]
d = json.loads('''$result''')
ir = next(int(l.split()[1]) for l in open(dump) if l.startswith(("summary:", "totals:")))
print(f"{label:10} {mode:11} {d['requests']:7d} requests {d['errors']:3d} errors {ir / max(d['requests'], 1):9.0f} instructions/request", d["errors_by_kind"] or "")
PY
}

echo "callgrind dumps in $WORK"
for mode in $MODES; do
  measure tether "$mode" "$BIN" run --config "$WORK/tether.toml"
  [ -n "$BASELINE_BIN" ] && measure baseline "$mode" "$BASELINE_BIN" run --config "$WORK/tether.toml"
  for peer in $PEERS; do
    case $peer in
      haproxy) measure haproxy "$mode" haproxy -db -f "$WORK/haproxy.cfg" ;;
      pingora) measure pingora "$mode" "$PINGORA_BIN" "$PROXY" "$BACKEND" 1 64 ;;
    esac
  done
done

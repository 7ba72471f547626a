#!/usr/bin/env bash
# Benchmarks tether against no proxy, HAProxy, nginx and Pingora, side by side
# in one run.
#
# Two network namespaces joined by a veth pair: `app` holds the load client and
# the proxy (on 127.0.0.1:9000), `backend` holds a keep-alive nginx serving a
# 100-byte (/small) and a 16 KiB (/large) response. Both namespaces are made
# afresh for every case, so no case inherits another's TIME_WAIT sockets or
# port usage. Every case runs for each proxy in turn (interleaved), REPEAT
# times; bench/report.py takes the medians and draws the chart.
# Needs root. Results: bench/results.jsonl, bench/RESULTS.md, bench/RESULTS.svg.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}          # seconds per case
REPEAT=${REPEAT:-3}
THREADS=${THREADS:-"1 2"}
MODES=${MODES:-"http10 close-first keep-alive port-exhaustion"}
BODIES=${BODIES:-"small large"}
# tether-mr1-graceful / tether-mr1-abort: max_requests_per_connection = 1 with
# that client_close policy; they run in the close-first and port-exhaustion modes.
# pingora: a plain Pingora reverse proxy with its keep-alive pool (bench/pingora).
PROXIES=${PROXIES:-"direct haproxy nginx pingora tether tether-mr1-graceful tether-mr1-abort"}
# tether-baseline: another build of tether (BASELINE_BIN, e.g. one built from an
# earlier commit) with the `tether` config, for before/after comparisons.
BASELINE_BIN=${BASELINE_BIN:-}
PORTS=${PORTS:-1000}              # ephemeral ports left to `app` in port-exhaustion
CONCURRENCY=${CONCURRENCY:-32}
POOL=${POOL:-64}                  # upstream connections each proxy may keep

[ "$(id -u)" = 0 ] || { echo "bench/run.sh needs root (network namespaces)" >&2; exit 1; }
command -v haproxy >/dev/null && command -v nginx >/dev/null && command -v ss >/dev/null || {
  apt-get update -qq && apt-get install -y -qq haproxy nginx iproute2 >/dev/null
}
cargo build --release -q
BIN=$PWD/target/release/tether
PINGORA_BIN=$PWD/target/bench-pingora/release/pingora-bench-proxy
if [[ " $PROXIES " == *" pingora "* ]]; then
  command -v cmake >/dev/null || apt-get install -y -qq cmake >/dev/null  # zlib-ng's build
  cargo build --release -q --manifest-path bench/pingora/Cargo.toml --target-dir target/bench-pingora
fi
WORK=$(mktemp -d /tmp/tether-bench.XXXXXX)
APP=tb-app BACKEND=tb-backend
BACKEND_ADDR=10.88.0.2:8000
OUT=${OUT:-bench/results.jsonl}
: > "$OUT"

cleanup() {
  for ns in "$APP" "$BACKEND"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT

chmod 755 "$WORK"
head -c 16384 /dev/zero | tr '\0' 'x' > "$WORK/large"; chmod 644 "$WORK/large"
cat > "$WORK/backend.conf" <<CONF
worker_processes 2;
worker_rlimit_nofile 18000;
pid $WORK/backend.pid;
error_log $WORK/backend.err;
events { worker_connections 8000; }
http {
  access_log off;
  keepalive_timeout 300s;
  keepalive_requests 100000000;
  server {
    listen $BACKEND_ADDR backlog=4096;
    location = /small { default_type text/plain; return 200 "$(head -c 100 /dev/zero | tr '\0' 'y')"; }
    location = /large { default_type text/plain; alias $WORK/large; }
    location = /status { stub_status; }
  }
}
CONF

# Fresh namespaces, veth and backend for one case.
net_up() { # ephemeral port range for app ("" = the kernel's default)
  cleanup
  ip netns add "$APP"; ip netns add "$BACKEND"
  ip link add tb-a type veth peer name tb-b
  ip link set tb-a netns "$APP"; ip link set tb-b netns "$BACKEND"
  ip -n "$APP" addr add 10.88.0.1/24 dev tb-a; ip -n "$BACKEND" addr add 10.88.0.2/24 dev tb-b
  for ns in "$APP" "$BACKEND"; do
    ip -n "$ns" link set lo up
    # Count every TIME_WAIT socket: a full bucket table would hide them.
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_max_tw_buckets=1000000
  done
  ip -n "$APP" link set tb-a up; ip -n "$BACKEND" link set tb-b up
  [ -n "$1" ] && ip netns exec "$APP" sysctl -qw net.ipv4.ip_local_port_range="$1"
  ip netns exec "$BACKEND" nginx -c "$WORK/backend.conf"
  for _ in $(seq 50); do ip netns exec "$APP" bash -c "exec 3<>/dev/tcp/${BACKEND_ADDR%:*}/${BACKEND_ADDR#*:}" 2>/dev/null && break; sleep 0.1; done
}

backend_accepts() {
  ip netns exec "$BACKEND" bash -c "exec 3<>/dev/tcp/${BACKEND_ADDR%:*}/${BACKEND_ADDR#*:};
    printf 'GET /status HTTP/1.0\r\n\r\n' >&3; cat <&3" | awk 'f{print $1; exit} /server accepts/{f=1}'
}

write_configs() { # threads
  local t=$1
  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $t
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 60s
  http-reuse always
  option http-keep-alive
frontend fe
  bind 127.0.0.1:9000
  default_backend be
backend be
  server s1 $BACKEND_ADDR pool-max-conn $POOL
CONF
  cat > "$WORK/nginx.conf" <<CONF
worker_processes $t;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections 8000; }
worker_rlimit_nofile 18000;
http {
  access_log off;
  upstream be { server $BACKEND_ADDR; keepalive $POOL; keepalive_requests 100000000; }
  server {
    listen 127.0.0.1:9000 backlog=4096;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
  for variant in tether tether-mr1-graceful tether-mr1-abort; do
    local listener_extra=""
    case $variant in
      tether-mr1-graceful) listener_extra=$'max_requests_per_connection = 1\nclient_close = "graceful"' ;;
      tether-mr1-abort) listener_extra=$'max_requests_per_connection = 1\nclient_close = "abort"' ;;
    esac
    cat > "$WORK/$variant.toml" <<CONF
[log]
level = "warn"
[[listener]]
name = "app"
listen = "127.0.0.1:9000"
upstream = "backend"
$listener_extra
[[upstream]]
name = "backend"
endpoints = ["$BACKEND_ADDR"]
[upstream.pool]
max_connections = $POOL
max_idle = $POOL
[admin]
enabled = false
[runtime]
worker_threads = $t
CONF
  done
}

start_proxy() { # name -> prints pid
  case $1 in
    haproxy) ip netns exec "$APP" haproxy -D -p "$WORK/haproxy.pid" -f "$WORK/haproxy.cfg"; cat "$WORK/haproxy.pid" ;;
    nginx) ip netns exec "$APP" nginx -c "$WORK/nginx.conf"; sleep 0.2; cat "$WORK/nginx.pid" ;;
    pingora) ip netns exec "$APP" "$PINGORA_BIN" 127.0.0.1:9000 "$BACKEND_ADDR" "$t" "$POOL" \
               >/dev/null 2>"$WORK/pingora.err" &
             echo $! ;;
    tether-baseline) [ -x "$BASELINE_BIN" ] || { echo "tether-baseline needs BASELINE_BIN" >&2; exit 1; }
             ip netns exec "$APP" "$BASELINE_BIN" run --config "$WORK/tether.toml" >/dev/null 2>"$WORK/tether.err" &
             echo $! ;;
    tether*) ip netns exec "$APP" "$BIN" run --config "$WORK/$1.toml" >/dev/null 2>"$WORK/tether.err" &
             echo $! ;;
  esac
}

tree_pids() { echo "$1"; pgrep -P "$1" || true; }
cpu_ticks() { local sum=0; for p in $(tree_pids "$1"); do
  [ -r /proc/$p/stat ] && sum=$((sum + $(awk '{print $14+$15}' /proc/$p/stat))); done; echo $sum; }
peak_rss_kib() { local sum=0; for p in $(tree_pids "$1"); do
  [ -r /proc/$p/status ] && sum=$((sum + $(awk '/VmHWM/{print $2}' /proc/$p/status))); done; echo $sum; }
time_wait() { ip netns exec "$1" ss -Htan state time-wait | awk '{print $3" "$4}' | sort; }

for r in $(seq 1 "$REPEAT"); do
 for t in $THREADS; do
  write_configs "$t"
  for m in $MODES; do
   for b in $BODIES; do
    # port-exhaustion: close-first clients with only $PORTS ephemeral ports, 100 B.
    load_mode=$m; ports=""
    if [ "$m" = port-exhaustion ]; then
      [ "$b" = small ] || continue
      load_mode=close-first; ports="40000 $((40000 + PORTS - 1))"
    fi
    for p in $PROXIES; do
      case $p in tether-mr1-*) [ "$load_mode" = close-first ] || continue ;; esac
      net_up "$ports"
      target=127.0.0.1:9000; pid=""
      if [ "$p" = direct ]; then target=$BACKEND_ADDR; else pid=$(start_proxy "$p"); fi
      for _ in $(seq 50); do ip netns exec "$APP" bash -c "exec 3<>/dev/tcp/${target%:*}/${target#*:}" 2>/dev/null && break; sleep 0.1; done
      # The status queries open backend connections of their own: outside the
      # TIME_WAIT snapshots, and one subtracted from the accept count.
      accepts_before=$(backend_accepts)
      time_wait "$APP" > "$WORK/tw-app-before"; time_wait "$BACKEND" > "$WORK/tw-be-before"
      cpu_before=0; [ -n "$pid" ] && cpu_before=$(cpu_ticks "$pid")
      result=$(ip netns exec "$APP" "$BIN" load --target "$target" --mode "$load_mode" --concurrency "$CONCURRENCY" \
        --duration "${DURATION}s" --path "/$b" --json)
      cpu=0; rss=0; [ -n "$pid" ] && { cpu=$(( $(cpu_ticks "$pid") - cpu_before )); rss=$(peak_rss_kib "$pid"); }
      time_wait "$APP" > "$WORK/tw-app-after"; time_wait "$BACKEND" > "$WORK/tw-be-after"
      accepts=$(( $(backend_accepts) - accepts_before - 1 ))
      new_app=$(comm -13 "$WORK/tw-app-before" "$WORK/tw-app-after")
      tw_app_backend=$(grep -c " $BACKEND_ADDR\$" <<<"$new_app" || true)
      tw_client=$(grep -c " 127.0.0.1:9000\$" <<<"$new_app" || true)
      tw_proxy=$(grep -c "^127.0.0.1:9000 " <<<"$new_app" || true)
      tw_backend=$(comm -13 "$WORK/tw-be-before" "$WORK/tw-be-after" | grep -c "^$BACKEND_ADDR " || true)
      [ -n "$pid" ] && { kill "$pid"; for q in $(tree_pids "$pid"); do kill "$q" 2>/dev/null || true; done; sleep 0.5; }
      python3 - "$p" "$t" "$m" "$b" "$r" "$cpu" "$rss" "$accepts" "$tw_app_backend" "$tw_backend" "$tw_client" "$tw_proxy" <<PY >> "$OUT"
import json, sys, os
p, t, m, b, r, cpu, rss, acc, twab, twb, twc, twp = sys.argv[1:]
d = json.loads('''$result''')
hz = os.sysconf("SC_CLK_TCK")
done = max(d["requests"], 1)
d.update(proxy=p, threads=int(t), mode=m, body=b, repeat=int(r),
         cpu_s_per_1k=int(cpu) / hz / done * 1000 if p != "direct" else None,
         peak_rss_kib=int(rss) if p != "direct" else None, backend_accepts=int(acc),
         tw_app_to_backend=int(twab), tw_in_backend=int(twb), tw_client_to_proxy=int(twc), tw_proxy_to_client=int(twp))
print(json.dumps(d))
PY
      printf '%-20s t=%s %-15s %-5s run %s: %s\n' "$p" "$t" "$m" "$b" "$r" \
        "$(tail -1 "$OUT" | python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.0f req/s, p99 %.2f ms, errors %d" % (d["rps"], d["p99_ms"], d["errors"]))')"
    done
   done
  done
 done
done
cleanup
if [ "$OUT" = bench/results.jsonl ]; then
  DURATION=$DURATION REPEAT=$REPEAT python3 bench/report.py "$OUT" bench/RESULTS.svg > bench/RESULTS.md
  echo "wrote bench/RESULTS.md and bench/RESULTS.svg"
else
  echo "wrote $OUT"
fi

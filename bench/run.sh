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
# The namespaces, the backend and the proxies' configs are in bench/proxies.sh.
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
cargo build --profile dist -q
BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/dist/tether
PINGORA_BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/bench-pingora/release/pingora-bench-proxy
WORK=$(mktemp -d /tmp/tether-bench.XXXXXX)
OUT=${OUT:-bench/results.jsonl}
. bench/proxies.sh
need_proxies "$PROXIES"
: > "$OUT"
trap net_down EXIT
write_backend_conf

backend_accepts() {
  ip netns exec "$BACKEND" bash -c "exec 3<>/dev/tcp/${BACKEND_ADDR%:*}/${BACKEND_ADDR#*:};
    printf 'GET /status HTTP/1.0\r\n\r\n' >&3; cat <&3" | awk 'f{print $1; exit} /server accepts/{f=1}'
}

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
      target=$PROXY_ADDR; pid=""
      if [ "$p" = direct ]; then target=$BACKEND_ADDR; else pid=$(start_proxy "$p"); fi
      wait_port "$APP" "$target"
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
      [ -n "$pid" ] && stop_proxy "$pid"
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
net_down
if [ "$OUT" = bench/results.jsonl ]; then
  DURATION=$DURATION REPEAT=$REPEAT python3 bench/report.py "$OUT" bench/RESULTS.svg > bench/RESULTS.md
  echo "wrote bench/RESULTS.md and bench/RESULTS.svg"
else
  echo "wrote $OUT"
fi

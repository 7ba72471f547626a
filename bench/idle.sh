#!/usr/bin/env bash
# The memory an idle keep-alive client connection costs each proxy: HAProxy,
# nginx, Pingora and tether (and, with BASELINE_BIN, another tether build),
# side by side in one run.
#
# Each proxy runs with one worker/thread in the namespaces of bench/run.sh
# (bench/proxies.sh, the same configs), every one admitting HELD + HELD/8 +
# 100 client connections (nginx starts closing idle keep-alive connections
# when fewer than 1/16 of its worker_connections are free) and keeping an
# idle keep-alive client for IDLE seconds. After a warm-up (WARMUP
# connections of 25 requests each, then closed) and a second of rest, the
# proxy's RSS and PSS (the whole process tree, /proc) are read;
# bench/idle_client.py then opens HELD connections, one HTTP/1.1 request and
# its whole response on each, and leaves them idle; a second later the RSS
# and PSS are read again. Bytes per held connection = (after - before) / HELD.
# The client checks that every connection is still open before closing them
# all. Interleaved, REPEAT times. HAProxy warns at start that it would like
# two descriptors per connection: idle clients need one.
#
# Knobs: PROXIES ("haproxy nginx pingora tether"), HELD (10000), REPEAT (3),
# IDLE (120), WARMUP (4), SETTLE (1 s before each reading), POOL (64),
# TETHER_BIN, BASELINE_BIN, OUT (bench/idle.jsonl). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

PROXIES=${PROXIES:-"haproxy nginx pingora tether"}
BASELINE_BIN=${BASELINE_BIN:-}
[ -n "$BASELINE_BIN" ] && [[ " $PROXIES " != *" tether-baseline "* ]] && PROXIES="$PROXIES tether-baseline"
HELD=${HELD:-10000}
REPEAT=${REPEAT:-3}
IDLE=${IDLE:-120}
WARMUP=${WARMUP:-4}
SETTLE=${SETTLE:-1}
POOL=${POOL:-64}
OUT=${OUT:-bench/idle.jsonl}

[ "$(id -u)" = 0 ] || { echo "bench/idle.sh needs root (network namespaces)" >&2; exit 1; }
CLIENT_CONNS=$((HELD + HELD / 8 + 100)) CLIENT_IDLE=$IDLE
# Descriptors for the client connections, the upstream pool and some slack,
# in this shell and so in the proxies and the client it starts.
NOFILE=$((CLIENT_CONNS + 1000))
hard=$(ulimit -Hn)
if [ "$hard" != unlimited ] && [ "$hard" -lt "$NOFILE" ]; then
  ulimit -Hn "$NOFILE" 2>/dev/null || {
    echo "bench/idle.sh: the open-file hard limit ($hard) is below the $NOFILE descriptors HELD needs" >&2; exit 1; }
fi
ulimit -Sn "$NOFILE"

if [ -n "${TETHER_BIN:-}" ]; then
  BIN=$(realpath "$TETHER_BIN")
elif [[ " $PROXIES " == *" tether "* ]]; then
  cargo build --profile dist -q
  BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/dist/tether
fi
BIN=${BIN:-}
PINGORA_BIN=$(realpath -m "${CARGO_TARGET_DIR:-target}")/bench-pingora/release/pingora-bench-proxy
WORK=$(mktemp -d /tmp/tether-idle.XXXXXX)
# Names of their own, so that bench/run.sh can run at the same time.
NET=ti SUBNET=10.89.0
. bench/proxies.sh
need_proxies "$PROXIES"
: > "$OUT"
trap net_down EXIT
write_backend_conf
write_configs 1

tree_kib() { # pid field: VmRSS from status, Pss from smaps_rollup, summed over the tree
  local sum=0 file=status
  [ "$2" = Pss ] && file=smaps_rollup
  for p in $(tree_pids "$1"); do
    [ -r "/proc/$p/$file" ] && sum=$((sum + $(awk -v f="$2:" '$1 == f {print $2}' "/proc/$p/$file")))
  done
  echo "$sum"
}

for r in $(seq 1 "$REPEAT"); do
  for p in $PROXIES; do
    net_up ""
    pid=$(start_proxy "$p")
    wait_port "$APP" "$PROXY_ADDR"
    ip netns exec "$APP" python3 bench/idle_client.py "$PROXY_ADDR" "$WARMUP" --requests 25
    sleep "$SETTLE"
    rss_before=$(tree_kib "$pid" VmRSS); pss_before=$(tree_kib "$pid" Pss)

    # Emptied here, not by the client's redirection, which may come after the
    # first look for `held`. Not through a function: $! must be the client
    # itself, which SIGTERM asks to finish.
    : > "$WORK/held"
    ip netns exec "$APP" python3 bench/idle_client.py "$PROXY_ADDR" "$HELD" --hold > "$WORK/held" &
    client_pid=$!
    until grep -q '^held ' "$WORK/held"; do
      kill -0 "$client_pid" 2>/dev/null || { echo "$p: the client gave up" >&2; exit 1; }
      sleep 0.2
    done
    sleep "$SETTLE"
    rss_after=$(tree_kib "$pid" VmRSS); pss_after=$(tree_kib "$pid" Pss)
    # The proxy's side of the held connections, as the kernel sees them.
    established=$(ip netns exec "$APP" ss -Htn state established "( sport = :${PROXY_ADDR#*:} )" | wc -l)
    kill -TERM "$client_pid"
    wait "$client_pid"
    [ "$established" = "$HELD" ] && grep -q "\"open\": $HELD," "$WORK/held" ||
      echo "$p: not every connection was held: $established established, client saw $(tail -1 "$WORK/held")" >&2
    stop_proxy "$pid"

    python3 - "$p" "$r" "$HELD" "$rss_before" "$rss_after" "$pss_before" "$pss_after" \
      "$established" "$(tail -1 "$WORK/held")" <<'PY' >> "$OUT"
import json, sys
p, r, held, rb, ra, pb, pa, est, states = sys.argv[1:]
held, rb, ra, pb, pa = map(int, (held, rb, ra, pb, pa))
print(json.dumps(dict(
    proxy=p, repeat=int(r), held=held,
    rss_before_kib=rb, rss_after_kib=ra, pss_before_kib=pb, pss_after_kib=pa,
    rss_bytes_per_conn=round((ra - rb) * 1024 / held),
    pss_bytes_per_conn=round((pa - pb) * 1024 / held),
    proxy_established=int(est), client_saw=json.loads(states))))
PY
    tail -1 "$OUT" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print("%-16s run %d: %6d B/conn (RSS %.1f -> %.1f MiB), %d/%d still open" % (
    d["proxy"], d["repeat"], d["rss_bytes_per_conn"], d["rss_before_kib"] / 1024,
    d["rss_after_kib"] / 1024, d["client_saw"]["open"], d["held"]))'
  done
done
net_down

python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print()
print("%-16s %3s %12s %12s %10s %10s %9s %7s" % (
    "proxy", "run", "RSS before", "RSS after", "B/conn RSS", "B/conn PSS", "open", "estab"))
for d in sorted(rows, key=lambda d: (d["proxy"], d["repeat"])):
    print("%-16s %3d %9.1f MiB %9.1f MiB %10d %10d %9d %7d" % (
        d["proxy"], d["repeat"], d["rss_before_kib"] / 1024, d["rss_after_kib"] / 1024,
        d["rss_bytes_per_conn"], d["pss_bytes_per_conn"], d["client_saw"]["open"],
        d["proxy_established"]))
print()
for p in dict.fromkeys(d["proxy"] for d in rows):
    b = [d["rss_bytes_per_conn"] for d in rows if d["proxy"] == p]
    print("%-16s median %6d B per idle connection (RSS)" % (p, statistics.median(b)))
PY
echo "wrote $OUT"

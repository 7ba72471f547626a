#!/usr/bin/env bash
# An HTTPS backend called by connection-per-request clients: straight at the
# backend (every request a TCP and a full TLS handshake, as a legacy app makes
# them) against through tether (cleartext to tether on loopback, a few pooled
# and resumed TLS connections beyond). Interleaved and repeated.
#
# The backend is nginx with a certificate from a CA made here; tether verifies
# it against that CA. The client is wrk with `Connection: close`, which opens a
# new connection (and, toward HTTPS, makes a full handshake: wrk keeps no TLS
# sessions) for every request. Per run: req/s, p99, and the backend's CPU time
# per 1,000 requests (nginx's one worker, from /proc).
#
# Knobs: DURATION (10 s), REPEAT (3), CONCURRENCY (16), THREADS (tether
# workers, 1). Needs nginx, wrk and openssl (installed if missing, as root).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
REPEAT=${REPEAT:-3}
CONCURRENCY=${CONCURRENCY:-16}
THREADS=${THREADS:-1}
BACKEND_PORT=18443
TETHER_PORT=19443

for tool in nginx wrk openssl; do
  command -v "$tool" >/dev/null || {
    apt-get update -qq && apt-get install -y -qq nginx wrk openssl >/dev/null
    break
  }
done
cargo build --profile dist -q
BIN=$PWD/target/dist/tether
WORK=$(mktemp -d /tmp/tether-bench-tls.XXXXXX)
chmod 755 "$WORK"
cleanup() {
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  [ -n "${TETHER_PID:-}" ] && kill "$TETHER_PID" 2>/dev/null || true
}
trap cleanup EXIT
cd "$WORK"

# A CA, and the backend's certificate for backend.test and 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=bench-ca -keyout ca.key -out ca.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj /CN=backend.test -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=DNS:backend.test,IP:127.0.0.1\n' > san.ext
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
  -days 2 -extfile san.ext -out server.pem 2>/dev/null
chmod 644 ./*.pem ./*.key

mkdir -p www
head -c 100 /dev/zero | tr '\0' x > www/small
cat > nginx.conf <<CONF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$BACKEND_PORT ssl;
    ssl_certificate $WORK/server.pem;
    ssl_certificate_key $WORK/server.key;
    ssl_session_cache shared:tls:10m;
    ssl_session_tickets on;
    root $WORK/www;
    location /small { default_type text/plain; }
  }
}
CONF
nginx -c "$WORK/nginx.conf"
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat nginx.pid)" | head -1)

cat > tether.toml <<CONF
[[listener]]
name = "app"
listen = "127.0.0.1:$TETHER_PORT"
upstream = "api"

[[upstream]]
name = "api"
endpoints = ["127.0.0.1:$BACKEND_PORT"]
[upstream.pool]
min_idle = 4
max_connections = 64
[upstream.tls]
server_name = "backend.test"
ca = ["$WORK/ca.pem"]

[admin]
enabled = false

[runtime]
worker_threads = $THREADS
watch_config = false
CONF
"$BIN" run --config tether.toml 2> tether.log &
TETHER_PID=$!
sleep 1

# CPU ticks (user + system) of the nginx worker.
ticks() { awk '{print $14 + $15}' "/proc/$NGINX_WORKER/stat"; }
HZ=$(getconf CLK_TCK)

run() {
  local case=$1 url=$2 before after out rps p99 requests
  before=$(ticks)
  out=$(wrk -t1 -c"$CONCURRENCY" -d"${DURATION}s" --latency -H 'Connection: close' "$url")
  after=$(ticks)
  rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
  p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
  requests=$(awk '/requests in/ {print $1}' <<<"$out")
  errors=$(awk '/Non-2xx|Socket errors/ {print}' <<<"$out" | tr '\n' ' ')
  printf '%-8s %10s req/s  p99 %8s  backend CPU %6.1f ms/1k req  %s\n' "$case" "$rps" "$p99" \
    "$(awk -v t=$((after - before)) -v hz="$HZ" -v n="$requests" 'BEGIN {print n ? t / hz * 1e6 / n : 0}')" \
    "$errors"
}

echo "connection-per-request clients ($CONCURRENCY), ${DURATION}s each, tether workers: $THREADS"
for _ in $(seq "$REPEAT"); do
  run direct "https://127.0.0.1:$BACKEND_PORT/small"
  run tether "http://127.0.0.1:$TETHER_PORT/small"
done

# Sourced by bench/run.sh and bench/idle.sh, so that both run the same
# proxies the same way: two network namespaces joined by a veth pair (`app`:
# the client and the proxy on 127.0.0.1:9000; `backend`: a keep-alive nginx
# serving a 100-byte /small and a 16 KiB /large), the configs of HAProxy,
# nginx and tether, and how each proxy (Pingora too) is started and stopped.
#
# The caller sets WORK (a directory), POOL (upstream connections each proxy
# may keep), BIN (tether), PINGORA_BIN and BASELINE_BIN, and may set:
#   NET       prefix of the namespace and veth names (tb), so that two
#             benchmarks can run at once
#   SUBNET    the veth pair's /24 (10.88.0)
#   CLIENT_CONNS  client connections every proxy admits; unset: 8000 for
#             HAProxy (maxconn) and nginx (worker_connections), tether's
#             default max_connections
#   CLIENT_IDLE   seconds a keep-alive client may stay idle; unset: HAProxy's
#             60 s `timeout client`, nginx's and tether's default idle timeouts
#   NOFILE    nginx's worker_rlimit_nofile (18000)
# With CLIENT_CONNS, HAProxy gets `no strict-limits`: it wants two descriptors
# per connection (client and server side) and, strict, will not start when the
# hard limit is below that; it then warns and runs with the hard limit.
# Pingora takes neither limit: it admits what its open-file limit allows and
# keeps an idle HTTP/1.1 client without a deadline.

NET=${NET:-tb}
SUBNET=${SUBNET:-10.88.0}
APP=$NET-app BACKEND=$NET-backend
BACKEND_ADDR=$SUBNET.2:8000
PROXY_ADDR=127.0.0.1:9000

# HAProxy, nginx and ss from Debian's packages; Pingora built (needs cmake)
# when the list names it.
need_proxies() { # proxies
  command -v haproxy >/dev/null && command -v nginx >/dev/null && command -v ss >/dev/null || {
    apt-get update -qq && apt-get install -y -qq haproxy nginx iproute2 >/dev/null
  }
  if [[ " $1 " == *" pingora "* ]]; then
    command -v cmake >/dev/null || apt-get install -y -qq cmake >/dev/null  # zlib-ng's build
    cargo build --release -q --manifest-path bench/pingora/Cargo.toml --target-dir "${PINGORA_BIN%/release/*}"
  fi
}

net_down() {
  for ns in "$APP" "$BACKEND"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}

write_backend_conf() {
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
}

wait_port() { # namespace host:port
  for _ in $(seq 50); do
    ip netns exec "$1" bash -c "exec 3<>/dev/tcp/${2%:*}/${2#*:}" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on $2 in $1" >&2; return 1
}

# Fresh namespaces, veth and backend for one case.
net_up() { # ephemeral port range for app ("" = the kernel's default)
  net_down
  ip netns add "$APP"; ip netns add "$BACKEND"
  ip link add "$NET-a" type veth peer name "$NET-b"
  ip link set "$NET-a" netns "$APP"; ip link set "$NET-b" netns "$BACKEND"
  ip -n "$APP" addr add "$SUBNET.1/24" dev "$NET-a"; ip -n "$BACKEND" addr add "$SUBNET.2/24" dev "$NET-b"
  for ns in "$APP" "$BACKEND"; do
    ip -n "$ns" link set lo up
    # Count every TIME_WAIT socket: a full bucket table would hide them.
    ip netns exec "$ns" sysctl -qw net.ipv4.tcp_max_tw_buckets=1000000
  done
  ip -n "$APP" link set "$NET-a" up; ip -n "$BACKEND" link set "$NET-b" up
  [ -n "$1" ] && ip netns exec "$APP" sysctl -qw net.ipv4.ip_local_port_range="$1"
  ip netns exec "$BACKEND" nginx -c "$WORK/backend.conf"
  wait_port "$APP" "$BACKEND_ADDR"
}

write_configs() { # threads
  PROXY_THREADS=$1
  local t=$1 conns=${CLIENT_CONNS:-8000} nofile=${NOFILE:-18000}
  local haproxy_extra="" nginx_extra="" tether_extra=""
  if [ -n "${CLIENT_CONNS:-}" ]; then
    haproxy_extra="  no strict-limits"
    tether_extra+="max_connections = $CLIENT_CONNS"$'\n'
  fi
  if [ -n "${CLIENT_IDLE:-}" ]; then
    nginx_extra="  keepalive_timeout ${CLIENT_IDLE}s;"
    tether_extra+="idle_timeout = \"${CLIENT_IDLE}s\""$'\n'
  fi
  cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread $t
  maxconn $conns
$haproxy_extra
defaults
  mode http
  timeout connect 2s
  timeout client ${CLIENT_IDLE:-60}s
  timeout server 60s
  http-reuse always
  option http-keep-alive
frontend fe
  bind $PROXY_ADDR
  default_backend be
backend be
  server s1 $BACKEND_ADDR pool-max-conn $POOL
CONF
  cat > "$WORK/nginx.conf" <<CONF
worker_processes $t;
pid $WORK/nginx.pid;
error_log $WORK/nginx.err;
events { worker_connections $conns; }
worker_rlimit_nofile $nofile;
http {
  access_log off;
$nginx_extra
  upstream be { server $BACKEND_ADDR; keepalive $POOL; keepalive_requests 100000000; }
  server {
    listen $PROXY_ADDR backlog=4096;
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
listen = "$PROXY_ADDR"
upstream = "backend"
$tether_extra$listener_extra
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
    pingora) ip netns exec "$APP" "$PINGORA_BIN" "$PROXY_ADDR" "$BACKEND_ADDR" "$PROXY_THREADS" "$POOL" \
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

stop_proxy() { # pid
  kill "$1"; for q in $(tree_pids "$1"); do kill "$q" 2>/dev/null || true; done; sleep 0.5
}

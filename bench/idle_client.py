#!/usr/bin/env python3
"""Idle keep-alive clients for bench/idle.sh.

Opens CONNECTIONS connections to TARGET one after another, sends REQUESTS
HTTP/1.1 keep-alive requests on each and reads every response whole
(Content-Length or chunked). Without --hold it then closes them and exits: the
warm-up. With --hold it leaves them open and idle, prints `held N` once the
last response is read, and waits for SIGTERM; then it checks each connection
without reading from it (still open, closed by the peer, or reset), prints
one JSON line with the counts, and closes them all.

One blocking socket at a time: a cheap client, outside the proxy, that never
has more than one request in flight, so the proxy needs one upstream
connection whatever CONNECTIONS is.
"""

import argparse
import errno
import json
import resource
import signal
import socket
import sys

TIMEOUT_S = 10


def read_response(sock: socket.socket) -> tuple[int, bool]:
    """Reads one response; returns its status and whether it keeps the connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the response head")
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    if "content-length" in headers:
        want = int(headers["content-length"])
        while len(body) < want:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the body")
            body += chunk
    elif headers.get("transfer-encoding") == "chunked":
        while not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed inside the chunked body")
            body += chunk
    else:
        raise ValueError("response without Content-Length or chunked framing")
    return status, headers.get("connection") != "close"


def state(sock: socket.socket) -> str:
    """open, closed (FIN received) or reset, without consuming anything."""
    sock.setblocking(False)  # with a timeout, Python would wait for data
    try:
        data = sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return "open"
    except ConnectionResetError:
        return "reset"
    return "closed" if not data else "open"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="host:port")
    ap.add_argument("connections", type=int)
    ap.add_argument("--requests", type=int, default=1, help="requests per connection")
    ap.add_argument("--path", default="/small")
    ap.add_argument("--hold", action="store_true")
    args = ap.parse_args()

    # Block SIGTERM before the first connection: it is taken by sigwait below.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.connections + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    host, port = args.target.rsplit(":", 1)
    request = f"GET {args.path} HTTP/1.1\r\nHost: {args.target}\r\n\r\n".encode()
    socks = []
    not_ok = not_kept = 0
    for _ in range(args.connections):
        try:
            sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        except OSError as e:
            print(f"connect {args.target}: {errno.errorcode.get(e.errno, e)} after "
                  f"{len(socks)} connections", file=sys.stderr)
            return 1
        socks.append(sock)
        for _ in range(args.requests):
            sock.sendall(request)
            status, kept = read_response(sock)
            not_ok += status != 200
            not_kept += not kept
    if not_ok or not_kept:
        print(f"{not_ok} responses not 200, {not_kept} with Connection: close",
              file=sys.stderr)
        return 1
    if args.hold:
        print(f"held {len(socks)}", flush=True)
        signal.sigwait({signal.SIGTERM})
        counts = {"open": 0, "closed": 0, "reset": 0}
        for sock in socks:
            counts[state(sock)] += 1
        print(json.dumps(counts), flush=True)
    for sock in socks:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

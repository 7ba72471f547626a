#!/usr/bin/env python3
"""Calls an HTTPS API through tether, as a legacy app does: one call, on a
connection of its own, in plain HTTP to tether, which carries it over a
pooled connection with verified TLS.

With tether as the HTTP proxy (config/http-proxy-https.toml), from the
environment or from --proxy; the URL says http://, tether speaks TLS:

    http_proxy=http://127.0.0.1:3128 python3 call_api.py http://api.example.com/v1/status
    python3 call_api.py --proxy http://127.0.0.1:3128 http://api.example.com/v1/status

With a local port per API (config/https-api.toml), naming the API in Host:

    python3 call_api.py --host api.example.com http://127.0.0.1:8081/v1/status

Prints the status, then the body. Exits 1 when the answer is an error; when
tether made the answer itself, its reason (x-tether-error) goes to stderr.
"""

import argparse
import sys

import requests


def main():
    parser = argparse.ArgumentParser(description="Call an HTTPS API through tether.")
    parser.add_argument("url", help="http:// URL of the API (tether originates the TLS)")
    parser.add_argument("--proxy", help="tether's listener, e.g. http://127.0.0.1:3128 "
                        "(default: the http_proxy environment variable)")
    parser.add_argument("--host", help="Host header to send (a port per API)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")
    args = parser.parse_args()

    if args.url.startswith("https://"):
        # Through a proxy, https:// becomes a CONNECT tunnel (tether answers
        # 405: a tunnel cannot be pooled); without one it bypasses tether.
        sys.exit("call http://" + args.url[len("https://"):] + ": tether originates the TLS")

    # requests reads http_proxy (and no_proxy) from the environment itself;
    # --proxy overrides it.
    proxies = {"http": args.proxy} if args.proxy else None
    headers = {"Host": args.host} if args.host else None
    response = requests.get(args.url, proxies=proxies, headers=headers, timeout=args.timeout)

    print(response.status_code)
    print(response.text)
    reason = response.headers.get("x-tether-error")
    if reason:
        print("tether: " + reason, file=sys.stderr)
    return 0 if response.ok else 1


if __name__ == "__main__":
    sys.exit(main())

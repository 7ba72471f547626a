#!/usr/bin/env python3
"""Turns bench/results.jsonl into the markdown table of bench/RESULTS.md (medians)."""
import json
import platform
import statistics
import subprocess
import sys
from collections import defaultdict


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except OSError:
        return "not installed"


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["threads"], r["mode"], r["body"], r["proxy"])].append(r)
    repeats = max((r["repeat"] for r in rows), default=0)
    print("# tether benchmark results\n")
    print(f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
          f"{len(open('/proc/cpuinfo').read().split('processor')) - 1} cores")
    print(f"- tether: {version(['target/release/tether', '--version'])}; "
          f"{version(['haproxy', '-v'])}; {version(['nginx', '-v'])}")
    print(f"- command: `sudo bench/run.sh` (medians of {repeats} interleaved runs per case; "
          "load client `tether load`, proxies on loopback in the `app` namespace, "
          "backend nginx across a veth pair)\n")
    print("Modes: `http10` = new HTTP/1.0 connection per request, the server closes (ab-style); "
          "`close-first` = new connection per request, the client closes after reading the body "
          "(curl-style); `keep-alive` = persistent client connections.\n")
    print("| threads | mode | body | proxy | req/s | vs HAProxy | vs nginx | p50 ms | p99 ms | p99.9 ms "
          "| errors | conns/req | backend accepts | CPU s/1k req | peak RSS KiB "
          "| TW app→backend | TW in backend | TW client→proxy | TW proxy→client |")
    print("|" + "---|" * 19)
    for (t, m, b, p), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                  ["direct", "haproxy", "nginx", "tether"].index(kv[0][3]))):
        rps = median(rs, "rps")
        peers = {q: median(groups.get((t, m, b, q), []), "rps") for q in ("haproxy", "nginx")}
        ratio = {q: (f"{rps / v:.2f}×" if v and p == "tether" else "") for q, v in peers.items()}
        print(f"| {t} | {m} | {b} | {p} | {fmt(rps)} | {ratio['haproxy']} | {ratio['nginx']} "
              f"| {fmt(median(rs, 'p50_ms'), 3)} | {fmt(median(rs, 'p99_ms'), 3)} "
              f"| {fmt(median(rs, 'p999_ms'), 3)} | {fmt(median(rs, 'errors'))} "
              f"| {fmt(median(rs, 'connections_per_request'), 2)} | {fmt(median(rs, 'backend_accepts'))} "
              f"| {fmt(median(rs, 'cpu_s_per_1k'), 4)} | {fmt(median(rs, 'peak_rss_kib'))} "
              f"| {fmt(median(rs, 'tw_app_to_backend'))} | {fmt(median(rs, 'tw_in_backend'))} "
              f"| {fmt(median(rs, 'tw_client_to_proxy'))} | {fmt(median(rs, 'tw_proxy_to_client'))} |")


if __name__ == "__main__":
    main()

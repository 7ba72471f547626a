#!/usr/bin/env python3
"""Turns bench/results.jsonl into bench/RESULTS.md (medians, tether's ratios to
its peers) and, given a second argument, an SVG chart of req/s and p99 per case."""
import json
import os
import platform
import statistics
import subprocess
import sys
from collections import defaultdict

PROXIES = ["direct", "haproxy", "nginx", "pingora", "tether", "tether-mr1-graceful", "tether-mr1-abort"]
COLOURS = {"direct": "#9e9e9e", "haproxy": "#1f77b4", "nginx": "#2ca02c", "pingora": "#8c564b",
           "tether": "#d62728",
           "tether-mr1-graceful": "#ff7f0e", "tether-mr1-abort": "#9467bd"}
MODES = ["http10", "close-first", "keep-alive", "port-exhaustion"]


def version(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "not installed"


def median(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else None


def fmt(value, digits=0):
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def ratio(value, peer, inverse=False):
    if value is None or not peer:
        return ""
    return f"{(peer / value if inverse else value / peer):.2f}×" if value else ""


def order(key):
    t, m, b, p = key
    return (t, MODES.index(m) if m in MODES else 99, b, PROXIES.index(p) if p in PROXIES else 99)


def table(groups, repeats):
    print("# tether benchmark results\n")
    print(f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
          f"{len(open('/proc/cpuinfo').read().split('processor')) - 1} cores")
    print(f"- tether: {version(['target/release/tether', '--version'])}; "
          f"{version(['haproxy', '-v'])}; {version(['nginx', '-v'])}")
    knobs = " ".join(f"{k}={os.environ[k]}" for k in ("DURATION", "REPEAT") if k in os.environ)
    command = f"{knobs} sudo bench/run.sh".strip()
    print(f"- command: `{command}` (medians of {repeats} interleaved runs per case; "
          "load client `tether load`, proxies on loopback in the `app` namespace, "
          "backend nginx across a veth pair; fresh namespaces for every case)")
    print("- chart: [RESULTS.svg](RESULTS.svg)\n")
    print("Modes: `http10` = new HTTP/1.0 connection per request, the server closes (ab-style); "
          "`close-first` = new connection per request, the client closes after reading the body "
          "(curl-style); `keep-alive` = persistent client connections; `port-exhaustion` = "
          "close-first with the app namespace's ephemeral port range narrowed to 1,000 ports "
          "(requests that succeed in the window). `tether-mr1-*` = tether with "
          "`max_requests_per_connection = 1` and that `client_close` policy.\n")
    print("Ratios are tether's: req/s ÷ the peer's, and CPU per request ÷ HAProxy's (lower is better).\n")
    print("| threads | mode | body | proxy | req/s | vs HAProxy | vs nginx | vs Pingora | CPU vs HAProxy "
          "| p50 ms | p99 ms | p99.9 ms | errors | conns/req | backend accepts | CPU s/1k req "
          "| peak RSS KiB | TW app→backend | TW in backend | TW client→proxy | TW proxy→client |")
    print("|" + "---|" * 21)
    for key in sorted(groups, key=order):
        t, m, b, p = key
        rs = groups[key]
        rps = median(rs, "rps")
        cpu = median(rs, "cpu_s_per_1k")
        peer = {q: groups.get((t, m, b, q), []) for q in ("haproxy", "nginx", "pingora")}
        mine = p.startswith("tether")
        vs = {q: ratio(rps, median(v, "rps")) if mine else "" for q, v in peer.items()}
        cpu_vs = ratio(cpu, median(peer["haproxy"], "cpu_s_per_1k")) if mine else ""
        print(f"| {t} | {m} | {b} | {p} | {fmt(rps)} | {vs['haproxy']} | {vs['nginx']} | {vs['pingora']} | {cpu_vs} "
              f"| {fmt(median(rs, 'p50_ms'), 3)} | {fmt(median(rs, 'p99_ms'), 3)} "
              f"| {fmt(median(rs, 'p999_ms'), 3)} | {fmt(median(rs, 'errors'))} "
              f"| {fmt(median(rs, 'connections_per_request'), 2)} | {fmt(median(rs, 'backend_accepts'))} "
              f"| {fmt(cpu, 4)} | {fmt(median(rs, 'peak_rss_kib'))} "
              f"| {fmt(median(rs, 'tw_app_to_backend'))} | {fmt(median(rs, 'tw_in_backend'))} "
              f"| {fmt(median(rs, 'tw_client_to_proxy'))} | {fmt(median(rs, 'tw_proxy_to_client'))} |")


def chart(groups, path):
    """Two bar panels (req/s, p99 ms), one group of bars per case."""
    cases = sorted({(t, m, b) for t, m, b, _ in groups},
                   key=lambda c: (c[0], MODES.index(c[1]) if c[1] in MODES else 99, c[2]))
    bar, gap, left, top, height = 9, 14, 70, 40, 220
    width_of = lambda case: sum(bar for p in PROXIES if (*case, p) in groups) + gap
    width = max(left + sum(width_of(c) for c in cases) + 20, 760)
    panels = [("req/s", "rps"), ("p99 ms", "p99_ms")]
    total_height = top + len(panels) * (height + 110) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total_height}" '
           'font-family="sans-serif" font-size="10">',
           f'<rect width="{width}" height="{total_height}" fill="white"/>',
           '<text x="10" y="18" font-size="14">tether vs HAProxy vs nginx vs Pingora (medians; '
           'threads / mode / body)</text>']
    x = left + 10
    for p in PROXIES:
        out.append(f'<rect x="{x}" y="26" width="10" height="10" fill="{COLOURS[p]}"/>'
                   f'<text x="{x + 14}" y="35">{p}</text>')
        x += 14 + 7 * len(p) + 12
    for i, (label, key) in enumerate(panels):
        y0 = top + 20 + i * (height + 110)
        peak = max((median(rs, key) or 0) for rs in groups.values()) or 1
        out.append(f'<text x="10" y="{y0 + height / 2}" transform="rotate(-90 10 {y0 + height / 2})">'
                   f'{label}</text>')
        for frac in (0, 0.5, 1):
            y = y0 + height * (1 - frac)
            out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                       f'<text x="{left - 4}" y="{y + 3}" text-anchor="end">{peak * frac:,.0f}</text>'
                       if label == "req/s" else
                       f'<line x1="{left}" x2="{width - 10}" y1="{y}" y2="{y}" stroke="#ddd"/>'
                       f'<text x="{left - 4}" y="{y + 3}" text-anchor="end">{peak * frac:,.1f}</text>')
        x = left
        for case in cases:
            start = x
            for p in PROXIES:
                rs = groups.get((*case, p))
                if not rs:
                    continue
                value = median(rs, key) or 0
                h = height * value / peak
                out.append(f'<rect x="{x}" y="{y0 + height - h:.1f}" width="{bar - 1}" '
                           f'height="{h:.1f}" fill="{COLOURS[p]}"><title>{p} {"/".join(map(str, case))}: '
                           f'{value:,.2f}</title></rect>')
                x += bar
            mid = (start + x) / 2
            out.append(f'<text x="{mid}" y="{y0 + height + 8}" text-anchor="end" '
                       f'transform="rotate(-60 {mid} {y0 + height + 8})">{case[0]}t {case[1]} {case[2]}</text>')
            x += gap
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["threads"], r["mode"], r["body"], r["proxy"])].append(r)
    table(groups, max((r["repeat"] for r in rows), default=0))
    if len(sys.argv) > 2:
        chart(groups, sys.argv[2])


if __name__ == "__main__":
    main()

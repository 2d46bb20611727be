"""Statistics, report and plots of benches/run (python3 with matplotlib).

Subcommands (called by benches/run):
  parse TOOL FILE --meta k=v...   one load run's output (wrk, h2load, oha JSON) -> one JSON line
  brief                           a JSON line from stdin -> one log line
  handshakes                      outrider's /metrics on stdin -> "full resumed" (inbound)
  haproxy-ssl SOCKET              haproxy's CumSslConns -> "n -"
  collect WORKDIR OUT.json        runs, handshakes, processes, environment -> one results file
  report RESULTS.json DIR         report.md, latency.png, cpu.png (ratios from the same run)
  rss-sampler FILE PID...         append "time kib" (sum of VmRSS) every 0.5 s until killed
  churn WORKDIR DIR COUNT RATE AFTER
"""

import json
import math
import os
import re
import socket
import statistics as st
import sys
import time

from hs import read_to_eof

# ------------------------------------------------------------------------------------- parsing


def parse_wrk(text):
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    reqs = re.search(r"^\s*(\d+) requests in", text, re.M)
    errs = 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        errs += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        errs += sum(int(x) for x in m.groups())
    if not (rps and reqs):
        return None
    n = int(reqs.group(1))
    return {"rps": float(rps.group(1)), "requests": n, "ok": n - errs, "errors": errs}


def parse_h2load(text):
    fin = re.search(r"^finished in [\d.]+\w+, ([\d.]+) req/s", text, re.M)
    req = re.search(
        r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout",
        text,
        re.M,
    )
    codes = re.search(r"^status codes: (\d+) 2xx", text, re.M)
    if not (fin and req):
        return None
    done, ok2 = int(req.group(3)), int(codes.group(1)) if codes else 0
    return {"rps": float(fin.group(1)), "requests": done, "ok": ok2, "errors": done - ok2 + int(req.group(6))}


def parse_oha(text):
    try:
        d = json.loads(text)
    except ValueError:
        return None
    s = d.get("summary", {})
    lp = d.get("latencyPercentiles", {})
    codes = d.get("statusCodeDistribution", {})
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    bad = sum(v for k, v in codes.items() if not str(k).startswith("2"))
    # Requests cut by the end of the run (-z) are not errors.
    errs = bad + sum(v for k, v in d.get("errorDistribution", {}).items() if "deadline" not in k)
    us = lambda k: None if lp.get(k) is None else lp[k] * 1e6
    return {
        "rps": s.get("requestsPerSec", 0.0),
        "requests": ok + bad,
        "ok": ok,
        "errors": errs,
        "p50_us": us("p50"),
        "p99_us": us("p99"),
        "p999_us": us("p99.9"),
    }


def cmd_parse(args):
    tool, path = args[0], args[1]
    meta = dict(a.split("=", 1) for a in args[args.index("--meta") + 1 :])
    text = open(path, errors="replace").read()
    r = {"wrk": parse_wrk, "h2load": parse_h2load, "oha": parse_oha}[tool](text)
    tick = int(meta["tick"])
    u0, s0 = (int(x) for x in meta["cpu0"].split())
    u1, s1 = (int(x) for x in meta["cpu1"].split())
    out = {
        "round": int(meta["round"]),
        "mode": meta["mode"],
        "target": meta["target"],
        "group": meta["group"],
        "tool": tool,
        "exit": int(meta["rc"]),
        "wall_s": round(float(meta["wall"]), 3),
        "cpu_user_s": (u1 - u0) / tick,
        "cpu_sys_s": (s1 - s0) / tick,
        "upstream_conns": int(meta["upstream_conns"]),
        "mesh_conns": int(meta["mesh_conns"]),
        "procs": meta["procs"] if "procs" in meta else "",
        "parsed": r is not None,
    }
    out.update(r or {"rps": 0.0, "requests": 0, "ok": 0, "errors": -1})
    print(json.dumps(out))


def cmd_brief(_):
    r = json.loads(sys.stdin.readline())
    s = f"{r['rps']:.0f} req/s, ok {r['ok']}, errors {r['errors']}, CPU {r['cpu_user_s']:.2f}u+{r['cpu_sys_s']:.2f}s"
    if r.get("p50_us") is not None:
        s += f", p50/p99/p99.9 {r['p50_us']:.0f}/{r['p99_us']:.0f}/{r['p999_us']:.0f} µs"
    s += f", upstream conns {r['upstream_conns']}"
    if not r["parsed"]:
        s += " (OUTPUT NOT PARSED)"
    print(s)


def cmd_handshakes(_):
    v = {"full": 0.0, "resumed": 0.0}
    for line in sys.stdin:
        if line.startswith("outrider_tls_handshakes_total{") and 'direction="inbound"' in line:
            m = re.search(r'result="(\w+)"', line)
            if m and m.group(1) in v:
                v[m.group(1)] += float(line.rsplit(" ", 1)[1])
    print(int(v["full"]), int(v["resumed"]))


def cmd_haproxy_ssl(args):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect(args[0])
    s.sendall(b"show info\n")
    d = read_to_eof(s)
    info = dict(l.split(":", 1) for l in d.decode().splitlines() if ":" in l)
    print(info.get("CumSslConns", "0").strip(), "-")


def cmd_rss_sampler(args):
    path, pids = args[0], args[1:]
    with open(path, "a") as f:
        while True:
            t = 0
            for p in pids:
                try:
                    for line in open(f"/proc/{p}/status"):
                        if line.startswith("VmRSS:"):
                            t += int(line.split()[1])
                except OSError:
                    pass
            f.write(f"{time.time():.3f} {t}\n")
            f.flush()
            time.sleep(0.5)


# ------------------------------------------------------------------------------------- collect


def cmd_collect(args):
    work, out = args[0], args[1]
    runs = [json.loads(l) for l in open(f"{work}/runs.jsonl") if l.strip()]
    hs = []
    if os.path.exists(f"{work}/hs.jsonl"):
        for l in open(f"{work}/hs.jsonl"):
            if not l.strip():
                continue
            h = json.loads(l)
            tick = h["tick"]
            cpu = lambda pair: [
                (int(b) - int(a)) / tick for a, b in zip(pair[0].split(), pair[1].split())
            ]
            sh0, sh1 = h["server_hs"][0].split(), h["server_hs"][1].split()
            hs.append(
                {
                    "round": h["round"],
                    "target": h["target"],
                    "ok": h["client"]["ok"],
                    "bad": h["client"]["bad"],
                    "secs": h["client"]["secs"],
                    "server_cpu_user_s": cpu(h["server_cpu"])[0],
                    "server_cpu_sys_s": cpu(h["server_cpu"])[1],
                    "client_proxy_cpu_s": sum(cpu(h["client_proxy_cpu"])),
                    "server_handshakes": int(sh1[0]) - int(sh0[0]),
                    "server_resumed": (int(sh1[1]) - int(sh0[1])) if sh1[1] != "-" else None,
                }
            )
    procs = {}
    for l in open(f"{work}/procs-end.tsv"):
        name, pid, idle, hwm, end = l.rstrip("\n").split("\t")
        procs[name] = {"pid": int(pid), "idle_kib": int(idle), "peak_kib": int(hwm), "end_kib": int(end)}
    env = json.load(open(f"{work}/env.json"))
    json.dump({"env": env, "runs": runs, "handshakes": hs, "processes": procs}, open(out, "w"), indent=1)


# ------------------------------------------------------------------------------------- report

GROUP_TITLES = {
    "hop-h1": "One hop, HTTP/1.1 (client -> proxy -> app, keep-alive both sides)",
    "hop-h2c": "One hop, h2c client -> proxy -> HTTP/1.1 app",
    "mesh-h1": "Mesh path, HTTP/1.1 (client -> outbound -> mTLS -> inbound -> app)",
    "mesh-h2c": "Mesh path, h2c (client -> outbound -> mTLS -> inbound -> app, h2 to the app)",
    "mesh-grpc": "Mesh path, gRPC-shaped unary calls over h2c",
    "mesh-endpoints": "Mesh path, HTTP/1.1, a service of 3, 100 and 1,000 endpoints (p2c over peak-EWMA)",
}


def med(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return st.median(xs) if xs else None


def f(x, d=0):
    return "n/a" if x is None else f"{x:,.{d}f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def summarise(res):
    """Per group, target and mode: medians over rounds; added latency per round against the
    group's baseline (the first target, `direct`) of the same round and mode."""
    runs = res["runs"]
    groups = list(dict.fromkeys(r["group"] for r in runs))
    out = {}
    for g in groups:
        gr = [r for r in runs if r["group"] == g]
        targets = list(dict.fromkeys(r["target"] for r in gr))
        base = targets[0]
        modes = list(dict.fromkeys(r["mode"] for r in gr))
        gs = {"baseline": base, "targets": {}}
        for t in targets:
            ts = {}
            for m in modes:
                rr = [r for r in gr if r["target"] == t and r["mode"] == m]
                if not rr:
                    continue
                per = lambda k: [r.get(k) for r in rr]
                cpu10k = lambda r, k: (r[k] * 1e3 / r["ok"] * 1e4) if r["ok"] > 0 else None
                row = {
                    "rounds": len(rr),
                    "rps": med(per("rps")),
                    "ok": sum(r["ok"] for r in rr),
                    "errors": sum(max(r["errors"], 0) for r in rr),
                    "unparsed": sum(1 for r in rr if not r["parsed"]),
                    "cpu_user_ms_per_10k": med([cpu10k(r, "cpu_user_s") for r in rr]),
                    "cpu_sys_ms_per_10k": med([cpu10k(r, "cpu_sys_s") for r in rr]),
                    "upstream_conns": med(per("upstream_conns")),
                    "mesh_conns": med(per("mesh_conns")),
                }
                if m != "sat":
                    for k in ("p50_us", "p99_us", "p999_us"):
                        row[k] = med(per(k))
                        if t != base:
                            added = []
                            for r in rr:
                                b = [x for x in gr if x["target"] == base and x["mode"] == m and x["round"] == r["round"]]
                                if b and b[0].get(k) is not None and r.get(k) is not None:
                                    added.append(r[k] - b[0][k])
                            row["added_" + k] = med(added)
                u, s = row["cpu_user_ms_per_10k"], row["cpu_sys_ms_per_10k"]
                row["cpu_ms_per_10k"] = None if u is None or s is None else u + s
                ts[m] = row
            gs["targets"][t] = ts
        gs["modes"] = modes
        out[g] = gs
    return out


# which processes make a target (for RSS)
def procs_of(group, target):
    if group.startswith("mesh"):
        if target.startswith("outrider"):
            return ["outrider-a", "outrider-b"]
        if target.startswith("haproxy"):
            return ["haproxy-a", "haproxy-b"]
        return []
    if target == "outrider":
        return ["outrider-hop-h2c"] if group == "hop-h2c" else ["outrider-hop"]
    if target.startswith("haproxy"):
        return ["haproxy-hop"]
    if target == "nginx":
        return ["nginx-hop"]
    return []


def summarise_handshakes(res):
    by = {}
    for h in res["handshakes"]:
        by.setdefault(h["target"], []).append(h)
    out = {}
    for t, hs in by.items():
        per_cpu = [h["ok"] / (h["server_cpu_user_s"] + h["server_cpu_sys_s"]) for h in hs if h["server_cpu_user_s"] + h["server_cpu_sys_s"] > 0]
        out[t] = {
            "rounds": len(hs),
            "ok": sum(h["ok"] for h in hs),
            "bad": sum(h["bad"] for h in hs),
            "conn_per_s": med([h["ok"] / h["secs"] for h in hs if h["secs"]]),
            "per_server_cpu_s": med(per_cpu),
            "server_user_share": med([h["server_cpu_user_s"] / (h["server_cpu_user_s"] + h["server_cpu_sys_s"]) for h in hs if h["server_cpu_user_s"] + h["server_cpu_sys_s"] > 0]),
            "server_handshakes": sum(h["server_handshakes"] for h in hs),
            "server_resumed": None if any(h["server_resumed"] is None for h in hs) else sum(h["server_resumed"] for h in hs),
            "client_proxy_us_per_conn": med([h["client_proxy_cpu_s"] * 1e6 / h["ok"] for h in hs if h["ok"] and h["client_proxy_cpu_s"]]),
        }
    return out


def cmd_report(args):
    res = json.load(open(args[0]))
    outdir = args[1]
    summ = summarise(res)
    hss = summarise_handshakes(res)
    res["summary"] = summ
    res["handshake_summary"] = hss
    json.dump(res, open(args[0], "w"), indent=1)
    env = res["env"]
    P = env["params"]
    L = []
    p = L.append
    p(f"# Benchmark run {env['date']}")
    p("")
    p(f"- machine: {env['cores']} cores, {env['cpu']}, kernel {env['kernel']}, load average before the run {env['load_before']}")
    p(f"- outrider: {env['outrider']}")
    p(f"- peers: {env['haproxy']}; nginx {env['nginx']}; load: {env['wrk']}, {env['oha']}, {env['h2load']}")
    p(
        f"- {P['rounds']} round(s), targets alternated within each round; {P['duration']} s per load run; saturation: "
        f"`wrk -t1 -c{P['conns']}` (HTTP/1.1) or `h2load -t1 -c4 -m16` (h2c, gRPC); fixed rates {P['rates']} req/s: "
        f"`oha -q RATE --latency-correction` ({P['lat_conns']} connections for HTTP/1.1, 4 x 4 streams for h2c/gRPC)"
    )
    p("- figures are medians over rounds; `added` = the target minus the group's `direct` run of the same round and rate;"
      " CPU = utime and stime of the target's processes from /proc (both sidecars for the mesh path), per 10,000 requests answered 2xx")
    p("")
    for g, gs in summ.items():
        base = gs["baseline"]
        targets = list(gs["targets"])
        rates = [m for m in gs["modes"] if m != "sat"]
        p(f"## {GROUP_TITLES.get(g, g)}")
        p("")
        p("| target | req/s at saturation | CPU ms/10k req at saturation: user + sys | " + "".join(f"CPU ms/10k @{r}/s | " for r in rates) + "upstream conns opened (sat) | RSS idle / peak MiB | errors |")
        p("|---|---:|---:|" + "---:|" * len(rates) + "---:|---:|---:|")
        for t in targets:
            ts = gs["targets"][t]
            sat = ts.get("sat", {})
            pr = procs_of(g, t)
            idle = sum(res["processes"][x]["idle_kib"] for x in pr if x in res["processes"]) / 1024 if pr else None
            peak = sum(res["processes"][x]["peak_kib"] for x in pr if x in res["processes"]) / 1024 if pr else None
            cpu = "–" if t == base else f"{f(sat.get('cpu_ms_per_10k'))} ({f(sat.get('cpu_user_ms_per_10k'))} + {f(sat.get('cpu_sys_ms_per_10k'))})"
            rc = "".join(("–" if t == base else f(ts.get(r, {}).get("cpu_ms_per_10k"))) + " | " for r in rates)
            errs = sum(x["errors"] for x in ts.values())
            unp = sum(x["unparsed"] for x in ts.values())
            mem = "–" if idle is None else f"{idle:.1f} / {peak:.1f}"
            p(f"| {t} | {f(sat.get('rps'))} | {cpu} | {rc}{f(sat.get('upstream_conns'))} | {mem} | {errs}{f' ({unp} unparsed)' if unp else ''} |")
        p("")
        if rates:
            p("| target | " + " | ".join(f"@{r}/s achieved | +p50 | +p99 | +p99.9 µs" for r in rates) + " |")
            p("|---|" + "---:|---:|---:|---:|" * len(rates))
            for t in targets:
                ts = gs["targets"][t]
                cells = []
                for r in rates:
                    x = ts.get(r, {})
                    if t == base:
                        cells.append(f"{f(x.get('rps'))} | {f(x.get('p50_us'))} | {f(x.get('p99_us'))} | {f(x.get('p999_us'))} (absolute)")
                    else:
                        cells.append(f"{f(x.get('rps'))} | {f(x.get('added_p50_us'))} | {f(x.get('added_p99_us'))} | {f(x.get('added_p999_us'))}")
                p(f"| {t} | " + " | ".join(cells) + " |")
            p("")
        ours = [t for t in targets if t.startswith("outrider")]
        peers = [t for t in targets if t != base and not t.startswith("outrider")]
        for o in ours:
            for q in peers:
                a, b = gs["targets"][o], gs["targets"][q]
                parts = [
                    f"CPU/req at saturation {f(ratio(a.get('sat', {}).get('cpu_ms_per_10k'), b.get('sat', {}).get('cpu_ms_per_10k')), 2)}",
                    f"throughput {f(ratio(a.get('sat', {}).get('rps'), b.get('sat', {}).get('rps')), 2)}",
                ]
                for r in rates:
                    parts.append(
                        f"@{r}/s CPU/req {f(ratio(a.get(r, {}).get('cpu_ms_per_10k'), b.get(r, {}).get('cpu_ms_per_10k')), 2)}, "
                        f"added p50 {f(ratio(a.get(r, {}).get('added_p50_us'), b.get(r, {}).get('added_p50_us')), 2)}, "
                        f"added p99 {f(ratio(a.get(r, {}).get('added_p99_us'), b.get(r, {}).get('added_p99_us')), 2)}"
                    )
                p(f"- {o} / {q}: " + "; ".join(parts))
        if ours and peers:
            p("")
    if hss:
        p("## mTLS handshakes (server side: B's inbound proxy; CPU from /proc)")
        p("")
        p("| run | connections ok/failed | conn/s (client-bound) | handshakes per server CPU-second | server CPU user share | handshakes at B (resumed) | client-side proxy µs per conn |")
        p("|---|---:|---:|---:|---:|---:|---:|")
        for t, h in hss.items():
            res_s = f"{h['server_handshakes']} ({h['server_resumed'] if h['server_resumed'] is not None else '-'})"
            p(f"| {t} | {h['ok']}/{h['bad']} | {f(h['conn_per_s'])} | {f(h['per_server_cpu_s'])} | {f((h['server_user_share'] or 0) * 100)}% | {res_s} | {f(h['client_proxy_us_per_conn'])} |")
        p("")
        for kind in ("pair-conn", "full"):
            o, q = hss.get(f"outrider-{kind}"), hss.get(f"haproxy-{kind}")
            if o and q:
                p(f"- {kind}: handshakes per server CPU-second, outrider / haproxy: {f(ratio(o['per_server_cpu_s'], q['per_server_cpu_s']), 2)}")
        p("")
    p("## Processes (VmRSS idle before any load; VmHWM at the end)")
    p("")
    p("| process | idle MiB | peak MiB | at the end MiB |")
    p("|---|---:|---:|---:|")
    for n, x in res["processes"].items():
        p(f"| {n} | {x['idle_kib'] / 1024:.1f} | {x['peak_kib'] / 1024:.1f} | {x['end_kib'] / 1024:.1f} |")
    p("")
    p("Plots: `latency.png` (added p50 and p99 against the request rate, per target), `cpu.png` (CPU per request at saturation, user and system).")
    open(f"{outdir}/report.md", "w").write("\n".join(L) + "\n")
    plots(summ, outdir)
    print("\n".join(L))


def plots(summ, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in summ if any(m != "sat" for m in summ[g]["modes"])]
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
        for ax, g in zip(axes[0], groups):
            gs = summ[g]
            rates = [m for m in gs["modes"] if m != "sat"]
            xs = [int(r) for r in rates]
            for i, t in enumerate(t for t in gs["targets"] if t != gs["baseline"]):
                col = f"C{i}"
                for k, ls in (("added_p50_us", "-"), ("added_p99_us", "--")):
                    ys = [gs["targets"][t].get(r, {}).get(k) for r in rates]
                    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
                    if pts:
                        ax.plot([a for a, _ in pts], [b for _, b in pts], ls, marker="o", color=col,
                                label=f"{t} {'p50' if 'p50' in k else 'p99'}")
            ax.set_xscale("log")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel("added latency (µs)")
            ax.set_title(g, fontsize=10)
            ax.axhline(0, color="grey", lw=0.5)
            ax.legend(fontsize=7)
        fig.suptitle("Added latency vs request rate (solid p50, dashed p99; minus direct)", fontsize=10)
        fig.tight_layout()
        fig.savefig(f"{outdir}/latency.png", dpi=110)
        plt.close(fig)
    groups = [g for g in summ if "sat" in summ[g]["modes"]]
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.8), squeeze=False)
        for ax, g in zip(axes[0], groups):
            gs = summ[g]
            ts = [t for t in gs["targets"] if t != gs["baseline"]]
            us = [(gs["targets"][t].get("sat", {}).get("cpu_user_ms_per_10k") or 0) / 10 for t in ts]
            sy = [(gs["targets"][t].get("sat", {}).get("cpu_sys_ms_per_10k") or 0) / 10 for t in ts]
            ax.bar(ts, us, label="user", color="C0")
            ax.bar(ts, sy, bottom=us, label="system", color="C1")
            ax.set_ylabel("CPU µs per request")
            ax.set_title(g, fontsize=10)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            ax.legend(fontsize=7)
        fig.suptitle("CPU per request at saturation (the target's processes)", fontsize=10)
        fig.tight_layout()
        fig.savefig(f"{outdir}/cpu.png", dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------------- churn


def cmd_churn(args):
    work, outdir, count, rate, after = args[0], args[1], args[2], args[3], args[4]
    rows = [json.loads(l) for l in open(f"{work}/churn.jsonl") if l.strip()]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [f"# Connection churn: {count} new connections at {rate}/s, then {after} s idle", ""]
    L.append("| target | connections ok/failed | seconds | RSS before MiB | peak during MiB | at end of load MiB | after the idle window MiB |")
    L.append("|---|---:|---:|---:|---:|---:|---:|")
    fig, ax = plt.subplots(figsize=(7, 3.8))
    for r in rows:
        samples, end = [], None
        for line in open(f"{work}/{r['rss']}"):
            a, b = line.split()
            if b == "end-of-load":
                end = float(a)
            else:
                samples.append((float(a), int(b)))
        if not samples:
            continue
        t0 = samples[0][0]
        during = [k for t, k in samples if end is None or t <= end]
        at_end = during[-1] if during else samples[-1][1]
        L.append(
            f"| {r['target']} | {r['client']['ok']}/{r['client']['bad']} | {r['client']['secs']} | {samples[0][1] / 1024:.1f} | "
            f"{max(during) / 1024:.1f} | {at_end / 1024:.1f} | {samples[-1][1] / 1024:.1f} |"
        )
        ax.plot([t - t0 for t, _ in samples], [k / 1024 for _, k in samples], label=r["target"])
        if end:
            ax.axvline(end - t0, ls=":", color="grey")
    ax.set_xlabel("seconds (dotted: end of the load)")
    ax.set_ylabel("RSS MiB (sum of the target's proxies)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{outdir}/churn-rss.png", dpi=110)
    open(f"{outdir}/churn.md", "w").write("\n".join(L) + "\n")
    json.dump(rows, open(f"{outdir}/churn.json", "w"), indent=1)
    print("\n".join(L))


if __name__ == "__main__":
    cmds = {
        "parse": cmd_parse,
        "brief": cmd_brief,
        "handshakes": cmd_handshakes,
        "haproxy-ssl": cmd_haproxy_ssl,
        "collect": cmd_collect,
        "report": cmd_report,
        "rss-sampler": cmd_rss_sampler,
        "churn": cmd_churn,
    }
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        sys.exit(1)
    cmds[sys.argv[1]](sys.argv[2:])

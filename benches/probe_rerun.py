#!/usr/bin/env python3
"""Reruns the cases of the 2026-11-26 reliability probe (../shared/reviews) against two outrider
binaries, side by side, on loopback only, every load bounded. Usage:
    benches/probe_rerun.py NEW_BINARY [OLD_BINARY]
Prints a markdown table: case | old | new. Each case starts its own proxy and backends and stops
them by pid."""
import json, os, socket, subprocess, sys, threading, time, http.server, socketserver

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

class Raw(threading.Thread):
    """A backend that records the raw bytes of each request and answers with `reply`."""
    def __init__(self, reply=b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"):
        super().__init__(daemon=True)
        self.sock = socket.socket(); self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0)); self.sock.listen(512)
        self.port = self.sock.getsockname()[1]; self.reply = reply; self.seen = []; self.conns = 0
        self.start()
    def run(self):
        while True:
            try: c, _ = self.sock.accept()
            except OSError: return
            self.conns += 1
            threading.Thread(target=self.serve, args=(c,), daemon=True).start()
    def serve(self, c):
        c.settimeout(10); data = b""
        try:
            while b"\r\n\r\n" not in data:
                d = c.recv(65536)
                if not d: return
                data += d
            time.sleep(0.05)
            c.settimeout(0.2)
            try:
                while True:
                    d = c.recv(65536)
                    if not d: break
                    data += d
            except OSError: pass
            self.seen.append(data)
            if self.reply: c.sendall(self.reply)
            c.close()
        except OSError: pass

def start_proxy(binary, args, admin):
    p = subprocess.Popen([binary, "proxy", "--admin", f"127.0.0.1:{admin}"] + args,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=dict(os.environ, OUTRIDER_LOG="warn"))
    for _ in range(200):
        if p.poll() is not None: return p
        try:
            if b"200" in http_get(admin, "/ready")[:12]: return p
        except OSError: pass
        time.sleep(0.025)
    return p

def http_get(port, path):
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())

def raw(port, data, wait=5.0, shut=True):
    s = socket.create_connection(("127.0.0.1", port)); s.sendall(data)
    if shut: s.shutdown(socket.SHUT_WR)
    s.settimeout(wait); out = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            out += d
    except OSError: pass
    s.close(); return out

def status(rsp):
    line = rsp.split(b"\r\n", 1)[0].decode(errors="replace")
    return line[9:12] if line.startswith("HTTP/") else ("closed, no answer" if not rsp else "raw bytes")

def stop(p):
    p.terminate()
    try: p.wait(5)
    except subprocess.TimeoutExpired: p.kill(); p.wait()

def with_proxy(binary, backend_port, extra=(), fn=None):
    listen, admin = free_port(), free_port()
    p = start_proxy(binary, ["--forward", f"127.0.0.1:{listen}=127.0.0.1:{backend_port}"] + list(extra), admin)
    try:
        if p.poll() is not None:
            return "exit %d: %s" % (p.returncode, p.stderr.read().decode(errors="replace").strip().splitlines()[-1][:90])
        return fn(listen, admin)
    finally:
        if p.poll() is None: stop(p)

def metric(admin, name, label):
    text = http_get(admin, "/metrics").decode(errors="replace")
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name) and label in l)

CASES = []
def case(name):
    def deco(f): CASES.append((name, f)); return f
    return deco

@case("D1 two forwards pointing at each other")
def d1(b):
    a, c = free_port(), free_port()
    p = start_proxy(b, ["--forward", f"127.0.0.1:{a}=127.0.0.1:{c}", "--forward", f"127.0.0.1:{c}=127.0.0.1:{a}"], free_port())
    if p.poll() is not None:
        return "refused at start: exit %d" % p.returncode
    stop(p); return "accepted (one request would exhaust the fds; not sent)"

@case("D2 50 silent clients, 4 s (detect 1s, header timeout 2s): backend connections held")
def d2(b):
    be = Raw()
    def run(listen, admin):
        socks = [socket.create_connection(("127.0.0.1", listen)) for _ in range(50)]
        time.sleep(4.0)
        held = int(subprocess.run(["ss", "-Htn", "state", "established", f"( dport = :{be.port} )"], capture_output=True, text=True).stdout.count("\n"))
        for s in socks: s.close()
        return f"{held} held, {be.conns} dialled"
    return with_proxy(b, be.port, ["--detect-timeout", "1s", "--header-read-timeout", "2s"], run)

@case("D2 client sends one byte `G` then stalls (header timeout 2s)")
def d2b(b):
    be = Raw()
    def run(listen, admin):
        s = socket.create_connection(("127.0.0.1", listen)); s.sendall(b"G"); s.settimeout(6)
        t = time.time(); out = b""
        try:
            out = s.recv(200)
        except OSError: pass
        return f"{status(out)} after {time.time()-t:.1f} s, {be.conns} backend dials"
    return with_proxy(b, be.port, ["--detect-timeout", "1s", "--header-read-timeout", "2s"], run)

def one(b, req, reply=None, extra=(), show=lambda rsp, be: status(rsp)):
    be = Raw(reply) if reply else Raw()
    return with_proxy(b, be.port, extra, lambda l, a: show(raw(l, req), be))

def reason(r):
    if b"outrider-error: " not in r: return ""
    return "(" + r.split(b"outrider-error: ")[1].split(b"\r")[0].decode() + ")"

def body_h(r):
    return r.split(b"\r\n\r\n", 1)[1].count(b"H") if b"\r\n\r\n" in r else 0

@case("D3 malformed chunk size")
def d3(b): return one(b, b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nAAAA\r\n0\r\n\r\n",
                      show=lambda r, be: f"{status(r)} {reason(r)}, {be.conns} backend dials")

@case("D4 upstream sends TE chunked + Content-Length: 1 (30-byte body)")
def d4(b):
    body = b"1e\r\n" + b"H" * 30 + b"\r\n0\r\n\r\n"
    return one(b, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
               reply=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n" + body,
               show=lambda r, be: f"{status(r)}, client got {body_h(r)} of 30 bytes")

@case("D5 two Host header lines")
def d5(b): return one(b, b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", show=lambda r, be: f"{status(r)}, backend got {len(be.seen)}")

@case("D6 Transfer-Encoding: gzip, chunked")
def d6(b): return one(b, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n1\r\na\r\n0\r\n\r\n", show=lambda r, be: f"{status(r)}, backend got {len(be.seen)}")

@case("D7 PUT /log-level with an empty body")
def d7(b):
    be = Raw()
    return with_proxy(b, be.port, (), lambda l, a: status(raw(a, b"PUT /log-level HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", shut=False)))

@case("G5 request with a leading CRLF: counted as HTTP?")
def g5(b):
    be = Raw()
    def run(l, a):
        r = raw(l, b"\r\nGET /crlf HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return f"{status(r)}, outrider_requests_total {metric(a, 'outrider_requests_total', 'http1'):.0f}"
    return with_proxy(b, be.port, (), run)

@case("G6 `Connection: close, Host` strips Host?")
def g6(b): return one(b, b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: close, Host\r\n\r\n",
                      show=lambda r, be: "Host kept" if be.seen and b"host: payments" in be.seen[0].lower() else "Host stripped")

@case("G8 unfinished request head (header timeout 2s)")
def g8(b):
    be = Raw()
    def run(l, a):
        s = socket.create_connection(("127.0.0.1", l)); s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n"); s.settimeout(6)
        try: out = s.recv(200)
        except OSError: out = b""
        return status(out)
    return with_proxy(b, be.port, ["--header-read-timeout", "2s"], run)

@case("G7 /config with ?token= in --control")
def g7(b):
    be = Raw()
    def run(l, a):
        cfg = http_get(a, "/config")
        return "token shown" if b"abc123" in cfg else ("redacted" if b"redacted" in cfg else status(cfg))
    return with_proxy(b, be.port, ["--control", "http://127.0.0.1:9/?token=abc123", "--workload", "a/b"], run)

@case("h2c client, HTTP/1.0-only upstream (python -m http.server), default flags")
def h2c(b):
    port = free_port()
    srv = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1", port)).close(); break
            except OSError: time.sleep(0.05)
        def run(l, a):
            codes = [subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--http2-prior-knowledge", f"http://127.0.0.1:{l}/"], capture_output=True, text=True).stdout for _ in range(3)]
            line = raw(l, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").split(b"\r\n", 1)[0].decode()
            return f"h2c: {' '.join(codes)}; HTTP/1.1 client hears `{line[:15]}`"
        return with_proxy(b, port, (), run)
    finally:
        srv.terminate(); srv.wait()

@case("hung upstream (accepts, never answers), --request-timeout 1s")
def hung(b):
    be = Raw(reply=b"")
    be.serve = lambda c: time.sleep(30)
    return with_proxy(b, be.port, ["--request-timeout", "1s"], lambda l, a: status(raw(l, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", wait=4)))

@case("D8 `control --check` on 100k nested `[` (200 KB)")
def d8(b):
    path = "/tmp/probe-deep.yaml"
    with open(path, "w") as f: f.write("services: " + "[" * 100000 + "]" * 100000)
    t = time.time()
    try:
        r = subprocess.run([b, "control", "--check", path], capture_output=True, timeout=120)
        return f"exit {r.returncode} after {time.time()-t:.2f} s"
    except subprocess.TimeoutExpired:
        return "still parsing after 120 s"

@case("D9 config error quoting a 2 MB value: stderr size")
def d9(b):
    path = "/tmp/probe-big.yaml"
    with open(path, "w") as f: f.write('unknown_destinations: "' + "a" * 2_000_000 + '"\n')
    r = subprocess.run([b, "control", "--check", path], capture_output=True, timeout=60)
    return f"exit {r.returncode}, {len(r.stderr):,} bytes"

@case("`outrider demo --duration 1` (a bare number)")
def bare(b):
    r = subprocess.run([b, "demo", "--duration", "1"], capture_output=True, timeout=60)
    return f"exit {r.returncode}" + ("" if r.returncode == 0 else ": " + r.stderr.decode(errors="replace").strip().splitlines()[-1][:60])

def main():
    new = sys.argv[1]; old = sys.argv[2] if len(sys.argv) > 2 else None
    print("| case | old | new |\n| --- | --- | --- |")
    for name, f in CASES:
        row = [name]
        for b in (old, new):
            if b is None: row.append("-"); continue
            try: row.append(f(b))
            except Exception as e: row.append(f"error: {e}")
        print("| " + " | ".join(row) + " |", flush=True)

if __name__ == "__main__":
    main()

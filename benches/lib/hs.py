"""Bounded loop of new connections (benches/run): COUNT connections or SECONDS, whichever comes
first; one HTTP/1.1 request (Connection: close) per connection, read to EOF. With CHAIN KEY CA
ALPN: mutual TLS 1.3 that never resumes a session (every handshake full). With --rate R: start at
most R connections per second (a fixed schedule; late starts are not made up).

usage: hs.py HOST PORT COUNT SECONDS [CHAIN KEY CA ALPN] [--rate R]
prints one JSON object: ok, bad, secs.
"""

import json
import socket
import ssl
import sys
import time


def read_to_eof(s):
    """Everything `s` sends until it closes."""
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            return data
        data += b


def main(argv):
    rate = None
    if "--rate" in argv:
        i = argv.index("--rate")
        rate = float(argv[i + 1])
        argv = argv[:i] + argv[i + 2 :]
    host, port, count, secs = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    ctx = None
    if len(argv) > 4:
        chain, key, ca, alpn = argv[4:8]
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.load_verify_locations(ca)
        ctx.load_cert_chain(chain, key)
        ctx.set_alpn_protocols([alpn])
    req = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    ok = bad = 0
    start = time.monotonic()
    while ok + bad < count and time.monotonic() - start < secs:
        if rate:
            due = start + (ok + bad) / rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
        try:
            s = socket.create_connection((host, port), timeout=5)
            if ctx:
                s = ctx.wrap_socket(s)
            s.sendall(req)
            data = read_to_eof(s)
            s.close()
            if data.startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                bad += 1
        except OSError as e:
            bad += 1
            if bad <= 3:
                print(repr(e), file=sys.stderr)
    print(json.dumps({"ok": ok, "bad": bad, "secs": round(time.monotonic() - start, 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])

#!/usr/bin/env bash
# Mutual TLS between two meshed pods, side by side with haproxy (issue 10, "Measure and report").
#
# Two network namespaces joined by a veth: pod A (198.18.0.1, the client) and pod B (198.18.0.2,
# the server), each with `outrider init` capture and an `outrider proxy` as uid 1337 that gets its
# certificate from `outrider control` (a CA from `outrider control ca init`). One
# `outrider demo-app` in pod B (0.0.0.0:8080) is the app for every variant. haproxy A and B run as
# uid 1337 in the same two namespaces (so nothing of theirs is captured), with leaf certificates
# issued by the same issuer with the openssl CLI (port 9443 HTTP, 9444 TCP; excluded from capture).
#
# 1. Handshakes: a bounded loop of new connections (python3, one HTTP/1.1 request with
#    `Connection: close` per connection), measuring the server's CPU (utime+stime) and
#    `outrider_tls_handshakes_total{direction="inbound"}` (haproxy B: ssl_fc_is_resumed in its log):
#    - outrider-mesh: app in A -> outrider A -> (opaque service: one TLS stream per connection) ->
#      outrider B; the sidecars' own mix (TLS 1.3 resumption is on by default: mostly resumed)
#    - haproxy-mesh: app in A -> haproxy A (tcp) -> TLS -> haproxy B (tcp); haproxy A reuses
#      sessions by default, so also mostly resumed
#    - outrider-full / haproxy-full: a python TLS client with a mesh client certificate straight to
#      B's inbound (no session reuse: every handshake is full)
# 2. Latency and CPU per request at a fixed rate (h2load --h1, keep-alive, --rps per client),
#    variants interleaved each round: direct (baseline), outrider A -> B, haproxy A -> B.
# 3. VmRSS of each proxy: idle, after the handshake runs, at the end.
#
# Usage (root): benches/mtls.sh   Knobs (env): ROUNDS=3 DURATION=10 RATE=1000 CONNS=10
#   HS_N=3000 (connections per handshake run) HS_SECS=8 (time bound per handshake run)
#   OUTRIDER_BIN=./target/release/outrider  REPORT=file.md (also write the tables there)
#   HAPROXY_THREADS=2 OUTRIDER_WORKERS=(unset: the cores)
#   PERF_DIR=dir (perf record -g of the server during each handshake run, and perf record + perf
#   stat (syscalls, context switches) of both proxies during each fixed-rate run; perturbs figures)
# Prints markdown tables at the end. Everything started is stopped (trap), namespaces deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(realpath -m "${OUTRIDER_BIN:-./target/release/outrider}")
ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-10}; RATE=${RATE:-1000}; CONNS=${CONNS:-10}
HS_N=${HS_N:-3000}; HS_SECS=${HS_SECS:-8}; REPORT=${REPORT:-}; PERF_DIR=${PERF_DIR:-}
HAPROXY_THREADS=${HAPROXY_THREADS:-2}  # outrider's workers: its default (the cores), or OUTRIDER_WORKERS
PY=/usr/bin/python3
TICK=$(getconf CLK_TCK)
[ "$(id -u)" = 0 ] || { echo "needs root (network namespaces, iptables)" >&2; exit 1; }

# --- what it needs ---------------------------------------------------------------------------
missing=()
for pair in haproxy:haproxy h2load:nghttp2-client openssl:openssl setpriv:util-linux \
  iptables:iptables curl:curl ip:iproute2 python3:python3; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
[ -x "$PY" ] || missing+=(python3)
if ((${#missing[@]})); then
  apt-get install -y "${missing[@]}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${missing[@]}" >/dev/null; }
fi
[ -x "$BIN" ] || cargo build --release --locked

# --- cleanup -----------------------------------------------------------------------------------
NS_A=omtls-a-$$; NS_B=omtls-b-$$; VA=omt$$a; VB=omt$$b
W=$(mktemp -d /tmp/outrider-mtls.XXXXXX)
PIDS=()
cleanup() {
  local p
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    p=${PIDS[i]}; kill "$p" 2>/dev/null || true
  done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  ip netns del "$NS_A" 2>/dev/null || true
  ip netns del "$NS_B" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
inA() { ip netns exec "$NS_A" "$@"; }
inB() { ip netns exec "$NS_B" "$@"; }
U1337="setpriv --reuid 1337 --regid 1337 --clear-groups"  # word-split on purpose
cpu() { awk '{print $14+$15}' "/proc/$1/stat"; }   # ticks, all threads
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }  # KiB
log() { echo "[mtls $(date +%T)] $*" >&2; }
wait_for() { # wait_for DESCRIPTION TRIES COMMAND...: up to TRIES x 0.1 s
  local what=$1 n=$2; shift 2
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; for f in "$W"/*.log; do echo "== $f" >&2; tail -20 "$f" >&2; done
  exit 1
}

# --- topology ----------------------------------------------------------------------------------
A=198.18.0.1; B=198.18.0.2
ip netns add "$NS_A"; ip netns add "$NS_B"
ip link add "$VA" netns "$NS_A" type veth peer name "$VB" netns "$NS_B"
inA ip addr add "$A/24" dev "$VA"; inB ip addr add "$B/24" dev "$VB"
for ns in "$NS_A" "$NS_B"; do ip -n "$ns" link set lo up; done
inA ip link set "$VA" up; inB ip link set "$VB" up
inA ip route add 198.18.100.0/24 dev "$VA"
chmod 755 "$W"; mkdir -m 1777 "$W/out"

# --- CA, tokens, mesh config -------------------------------------------------------------------
"$BIN" control ca init --dir "$W/ca" >/dev/null
for sa in web api; do
  "$BIN" control token --token-key "$W/ca/token.key" --namespace demo --service-account "$sa" >"$W/$sa.token"
done
cat >"$W/mesh.yaml" <<EOF
services:
  - name: api
    namespace: demo
    addresses: [198.18.100.1:80]
    protocol: http1
    endpoints:
      - address: $B:8080
        identity: spiffe://outrider.local/ns/demo/sa/api
  - name: api-raw
    namespace: demo
    addresses: [198.18.100.2:7000]
    protocol: opaque
    endpoints:
      - address: $B:8080
        identity: spiffe://outrider.local/ns/demo/sa/api
workloads:
  - name: demo/web
  - name: demo/api
    default_policy: mesh-only
    servers:
      - port: 8080
        allow: [spiffe://outrider.local/ns/demo/sa/web]
EOF
chmod a+r "$W"/*.token "$W/ca/root.pem"; chmod a+rx "$W/ca"

# Leaf certificates from the same issuer for haproxy and the python TLS client (openssl CLI).
leaf() { # leaf NAME SPIFFE_URI
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$W/$1.key" \
    -subj "/O=outrider-bench/CN=$1" -out "$W/$1.csr" 2>/dev/null
  printf 'subjectAltName=URI:%s\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n' "$2" >"$W/$1.ext"
  openssl x509 -req -in "$W/$1.csr" -CA "$W/ca/issuer.pem" -CAkey "$W/ca/issuer-key.pem" \
    -set_serial "0x$(openssl rand -hex 16)" -days 1 -sha256 -extfile "$W/$1.ext" -out "$W/$1.crt" 2>/dev/null
  cat "$W/$1.crt" "$W/ca/issuer.pem" >"$W/$1.chain"
  cat "$W/$1.chain" "$W/$1.key" >"$W/$1.pem"
  chmod a+r "$W/$1".*
}
leaf ha spiffe://outrider.local/ns/demo/sa/web
leaf hb spiffe://outrider.local/ns/demo/sa/api
leaf pyc spiffe://outrider.local/ns/demo/sa/web

# --- processes ---------------------------------------------------------------------------------
inA "$BIN" init --exclude-inbound-ports 15012 >/dev/null
inB "$BIN" init --exclude-inbound-ports 9443,9444,18080 >/dev/null
# Baseline: port 18080 of pod B reaches the same app, past the capture (which returns for it).
inB iptables -t nat -A PREROUTING -p tcp --dport 18080 -j REDIRECT --to-ports 8080

OUTRIDER_LOG=warn ip netns exec "$NS_B" "$BIN" demo-app --listen 0.0.0.0:8080 --instance bench >"$W/app.log" 2>&1 &
APP=$!; PIDS+=("$APP")
ip netns exec "$NS_A" "$BIN" control --config "$W/mesh.yaml" --listen "$A:15012" --issuer-cert "$W/ca/issuer.pem" \
  --issuer-key "$W/ca/issuer-key.pem" --trust-anchors "$W/ca/root.pem" --token-key "$W/ca/token.key" \
  >"$W/control.log" 2>&1 &
PIDS+=("$!")
wait_for "control plane" 100 grep -q "control plane ready" "$W/control.log"
proxy() { # proxy NS WORKLOAD TOKEN LOG
  OUTRIDER_LOG=warn ip netns exec "$1" setpriv --reuid 1337 --regid 1337 --clear-groups "$BIN" proxy \
    --control "https://$A:15012" --trust-anchors "$W/ca/root.pem" --workload "$2" \
    --identity-token-file "$W/$3" >"$W/$4" 2>&1 &
}
proxy "$NS_A" demo/web web.token proxy-a.log; OA=$!; PIDS+=("$OA")
proxy "$NS_B" demo/api api.token proxy-b.log; OB=$!; PIDS+=("$OB")
wait_for "outrider A ready" 200 inA curl -sf http://127.0.0.1:15020/ready
wait_for "outrider B ready" 200 inB curl -sf http://127.0.0.1:15020/ready

cat >"$W/haproxy-b.cfg" <<EOF
global
  nbthread $HAPROXY_THREADS
  maxconn 1000
  stats socket $W/out/haproxy-b.sock mode 600 level user
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend mtls_http
  bind $B:9443 ssl crt $W/hb.pem ca-file $W/ca/root.pem verify required ssl-min-ver TLSv1.3
  default_backend app
frontend mtls_tcp
  mode tcp
  log stdout format raw local0
  log-format "resumed=%[ssl_fc_is_resumed]"
  bind $B:9444 ssl crt $W/hb.pem ca-file $W/ca/root.pem verify required ssl-min-ver TLSv1.3
  default_backend app_tcp
backend app
  server app 127.0.0.1:8080
backend app_tcp
  mode tcp
  server app 127.0.0.1:8080
EOF
cat >"$W/haproxy-a.cfg" <<EOF
global
  nbthread $HAPROXY_THREADS
  maxconn 1000
defaults
  mode http
  timeout connect 3s
  timeout client 30s
  timeout server 30s
frontend plain
  bind 127.0.0.1:10080
  default_backend meshed
frontend plain_tcp
  mode tcp
  bind 127.0.0.1:10081
  default_backend meshed_tcp
backend meshed
  server b $B:9443 ssl crt $W/ha.pem ca-file $W/ca/root.pem verify required ssl-min-ver TLSv1.3
backend meshed_tcp
  mode tcp
  server b $B:9444 ssl crt $W/ha.pem ca-file $W/ca/root.pem verify required ssl-min-ver TLSv1.3
EOF
chmod a+r "$W"/*.cfg
ip netns exec "$NS_B" setpriv --reuid 1337 --regid 1337 --clear-groups haproxy -db -f "$W/haproxy-b.cfg" >"$W/haproxy-b.log" 2>&1 &
HB=$!; PIDS+=("$HB")
ip netns exec "$NS_A" setpriv --reuid 1337 --regid 1337 --clear-groups haproxy -db -f "$W/haproxy-a.cfg" >"$W/haproxy-a.log" 2>&1 &
HA=$!; PIDS+=("$HA")

# Smoke: every path answers 200 before anything is measured.
wait_for "app direct" 100 inA $U1337 curl -sf --max-time 2 "http://$B:18080/"
wait_for "outrider path" 100 inA curl -sf --max-time 2 http://198.18.100.1/
wait_for "haproxy path" 100 inA curl -sf --max-time 2 http://127.0.0.1:10080/
log "topology up: app $APP, outrider A $OA B $OB, haproxy A $HA B $HB"
rss_snap() { for p in "$OA" "$OB" "$HA" "$HB"; do echo -n "$(rss "$p") "; done; echo; }
RSS_IDLE=$(rss_snap)

# --- 1. handshakes -----------------------------------------------------------------------------
# The bounded connection loop (one HTTP/1.1 request per connection; optional mutual TLS without
# session reuse) is benches/lib/hs.py, shared with benches/run.
HS_PY=$(pwd)/benches/lib/hs.py
hb_ssl_conns() { # haproxy B: TLS sessions accepted so far (CumSslConns)
  $PY -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(5); s.connect(sys.argv[1]); s.sendall(b"show info\n")
d = b""
while True:
    b = s.recv(65536)
    if not b: break
    d += b
info = dict(l.split(":", 1) for l in d.decode().splitlines() if ":" in l)
print(info.get("CumSslConns", "0").strip())' "$W/out/haproxy-b.sock"
}
hb_hs_log() { # haproxy B's tcp frontend: full and resumed handshakes, from its log (one line per connection)
  echo "$(grep -c '^resumed=0' "$W/haproxy-b.log") $(grep -c '^resumed=1' "$W/haproxy-b.log") 0"
}
hs_metrics() { # full resumed failed, outrider B inbound
  inB curl -s --max-time 5 http://127.0.0.1:15020/metrics | $PY -c '
import re, sys
v = {"full": 0.0, "resumed": 0.0, "failed": 0.0}
for line in sys.stdin:
    if line.startswith("outrider_tls_handshakes_total{") and "direction=\"inbound\"" in line:
        m = re.search(r"result=\"(\w+)\"", line)
        if m and m.group(1) in v:
            v[m.group(1)] += float(line.rsplit(" ", 1)[1])
print(int(v["full"]), int(v["resumed"]), int(v["failed"]))'
}
# hs_run NAME SERVER_PID CLIENT_PROXY_PID|0 WRAPPER HS.PY-ARGS...: one TSV row to $W/hs.tsv
hs_run() {
  local name=$1 spid=$2 cpid=$3 wrap=$4; shift 4
  local c0 c1 ca0 ca1 m0 m1 out
  local perf=""
  if [ -n "$PERF_DIR" ]; then # optional profile of the server (perturbs the figures a little)
    perf record -q -F 2999 -g -p "$spid" -o "$PERF_DIR/$name-$r.data" >/dev/null 2>&1 &
    perf=$!; PIDS+=("$perf"); sleep 0.5
  fi
  local ms=hs_metrics; [ "$spid" = "$HB" ] && ms=hb_hs_log
  ca0=0; ca1=0
  c0=$(cpu "$spid"); [ "$cpid" = 0 ] || ca0=$(cpu "$cpid"); m0=$($ms)
  out=$(inA $wrap "$PY" "$HS_PY" "$@")
  c1=$(cpu "$spid"); [ "$cpid" = 0 ] || ca1=$(cpu "$cpid"); m1=$($ms)
  if [ -n "$perf" ]; then kill -INT "$perf"; wait "$perf" 2>/dev/null || true; fi
  echo -e "$name\t$out\t$((c1 - c0))\t$((ca1 - ca0))\t$m0\t$m1" >>"$W/hs.tsv"
  log "handshakes $name: $out server ${c1}-${c0} ticks, client proxy ${ca1}-${ca0} ticks, server handshake counters $m0 -> $m1"
}
PYCERT=("$W/pyc.chain" "$W/pyc.key" "$W/ca/root.pem" outrider.opaque)
: >"$W/hs.tsv"
for r in $(seq "$ROUNDS"); do
  # The mesh's own mix (app -> outrider A -> outrider B, one TLS stream per opaque connection).
  hs_run outrider-mesh "$OB" "$OA" env 198.18.100.2 7000 "$HS_N" "$HS_SECS"
  # The same through haproxy A -> haproxy B (tcp; haproxy A reuses TLS sessions by default).
  hs_run haproxy-mesh "$HB" "$HA" env 127.0.0.1 10081 "$HS_N" "$HS_SECS"
  # Full handshakes only: the python TLS client (uid 1337: not captured in A) straight to B.
  hs_run outrider-full "$OB" 0 "$U1337" "$B" 8080 "$HS_N" "$HS_SECS" "${PYCERT[@]}"
  hs_run haproxy-full "$HB" 0 "$U1337" "$B" 9444 "$HS_N" "$HS_SECS" "${PYCERT[@]}"
done

RSS_HS=$(rss_snap)

# --- 2. latency and CPU per request at a fixed rate -------------------------------------------
RPS_PER=$((RATE / CONNS))
hb_hs() { # TLS handshakes served by B's proxy so far
  case $1 in
    outrider) hs_metrics | awk '{print $1 + $2 + $3}' ;;
    haproxy) hb_ssl_conns ;;
    *) echo 0 ;;
  esac
}
# lat_run VARIANT URL WRAPPER...: one warm-up, one measured run; row to $W/lat.tsv
lat_run() {
  local v=$1 url=$2 wrap=$3
  local p1=0 p2=0 c1a c1b c2a c2b a0 a1 out lf=$W/out/$v-$r.log
  case $v in outrider) p1=$OA; p2=$OB ;; haproxy) p1=$HA; p2=$HB ;; esac
  inA $wrap h2load --h1 -t 1 -c "$CONNS" -n $((CONNS * 50)) "$url" >/dev/null
  c1a=0; c1b=0; c2a=0; c2b=0
  [ "$p1" = 0 ] || { c1a=$(cpu "$p1"); c2a=$(cpu "$p2"); }
  a0=$(cpu "$APP")
  local h0 h1; h0=$(hb_hs "$v")
  local prof=()
  if [ -n "$PERF_DIR" ] && [ "$p1" != 0 ]; then # optional: profile, syscalls and switches per proxy
    for p in "$p1" "$p2"; do
      perf record -q -F 2999 -g -p "$p" -o "$PERF_DIR/lat-$v-$r-$p.data" >/dev/null 2>&1 &
      prof+=("$!"); PIDS+=("$!")
      perf stat -x, -e raw_syscalls:sys_enter,context-switches,cpu-migrations -p "$p" \
        -o "$PERF_DIR/lat-$v-$r-$p.stat" >/dev/null 2>&1 &
      prof+=("$!"); PIDS+=("$!")
    done
    sleep 0.5
  fi
  out=$(inA $wrap h2load --h1 -t 1 -c "$CONNS" --rps "$RPS_PER" -D "$DURATION" --log-file "$lf" "$url")
  for p in "${prof[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
  [ "$p1" = 0 ] || { c1b=$(cpu "$p1"); c2b=$(cpu "$p2"); }
  a1=$(cpu "$APP")
  h1=$(hb_hs "$v")
  local ok; ok=$(echo "$out" | awk '/^requests:/ {print $8}')
  local lat; lat=$($PY -c '
import sys
v = sorted(int(l.split("\t")[2]) for l in open(sys.argv[1]) if l.split("\t")[1] == "200")
q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000
print(f"{q(0.5):.3f}\t{q(0.99):.3f}\t{len(v)}")' "$lf")
  echo -e "$v\t$r\t$ok\t$((c1b - c1a))\t$((c2b - c2a))\t$((a1 - a0))\t$lat\t$((h1 - h0))" >>"$W/lat.tsv"
  log "latency $v round $r: ok $ok, p50/p99/n ms $(echo "$lat" | tr '\t' ' '), CPU ticks client-side $((c1b - c1a)) server-side $((c2b - c2a)) app $((a1 - a0))"
}
: >"$W/lat.tsv"
for r in $(seq "$ROUNDS"); do
  lat_run direct "http://$B:18080/" "$U1337"
  lat_run outrider "http://198.18.100.1/" env
  lat_run haproxy "http://127.0.0.1:10080/" env
done

# --- 3. memory, then the report ----------------------------------------------------------------
RSS_END=$(rss_snap)
paste <(printf '%s\n' outrider-a outrider-b haproxy-a haproxy-b) <(tr ' ' '\n' <<<"$RSS_IDLE" | grep .) \
  <(tr ' ' '\n' <<<"$RSS_HS" | grep .) <(tr ' ' '\n' <<<"$RSS_END" | grep .) >"$W/rss.tsv"
log "RSS KiB (A B haproxy-A haproxy-B): idle $RSS_IDLE; after handshakes $RSS_HS; at the end $RSS_END"
{
  echo "### Run"
  echo
  echo "- $(date -u '+%F %T UTC'), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), kernel $(uname -r)"
  echo "- outrider binary $BIN built $(date -u -r "$BIN" '+%F %T UTC') (checkout at $(git rev-parse --short HEAD 2>/dev/null || echo '?')) (rustls/ring, TLS 1.3), $(haproxy -v | head -1 | cut -d' ' -f1-3) ($(haproxy -vv | grep 'Running on OpenSSL' | sed 's/.*: //')), $(h2load --version | head -1)"
  echo "- ROUNDS=$ROUNDS DURATION=$DURATION RATE=$RATE CONNS=$CONNS HS_N=$HS_N HS_SECS=$HS_SECS HAPROXY_THREADS=$HAPROXY_THREADS OUTRIDER_WORKERS=${OUTRIDER_WORKERS:-default}; CPU from /proc/PID/stat utime+stime (1 tick = $((1000 / TICK)) ms)"
  echo
} | tee "${REPORT:-/dev/null}"
$PY - "$W" "$TICK" "$RATE" "$DURATION" "$CONNS" <<'EOF' | tee -a "${REPORT:-/dev/null}"
import json, statistics as st, sys
w, tick, rate, dur, conns = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
ms = 1000 / tick
med = st.median
print("### Handshakes (server side: the inbound proxy terminating mutual TLS)\n")
print("| run | connections ok/failed | conn/s (client-bound) | server CPU s | handshakes per server CPU-second | handshakes at B: full / resumed / failed | client-side proxy CPU per conn |")
print("|---|---|---|---|---|---|---|")
rows = {}
for line in open(f"{w}/hs.tsv"):
    name, out, cs, ca, m0, m1 = line.rstrip("\n").split("\t")
    o = json.loads(out)
    m0 = m0.split(); m1 = m1.split()
    d = [int(b) - int(a) if a.isdigit() and b.isdigit() else "?" for a, b in zip(m0, m1)]
    cpu_s = int(cs) / tick
    rows.setdefault(name, []).append((o, cpu_s, d, int(ca) / tick))
for name, rs in rows.items():
    for o, cpu_s, d, ca in rs:
        per = o["ok"] / cpu_s if cpu_s else float("nan")
        mix = f"{d[0]} / {d[1]} / {d[2]}" if name.startswith("outrider") else f"{d[0]} / {d[1]} / - (from its log)"
        cl = f"{ca * 1e6 / o['ok']:.0f} µs" if name.endswith("-mesh") and o["ok"] else "-"
        print(f"| {name} | {o['ok']}/{o['bad']} | {o['ok'] / o['secs']:.0f} | {cpu_s:.2f} | {per:.0f} | {mix} | {cl} |")
print()
print("| run (median of rounds) | handshakes per server CPU-second | server CPU per handshake |")
print("|---|---|---|")
hs_med = {}
for name, rs in rows.items():
    pers = [o["ok"] / c for o, c, _, _ in rs if c > 0]
    if pers:
        hs_med[name] = med(pers)
        print(f"| {name} | {med(pers):.0f} | {1e6 / med(pers):.0f} µs |")
for kind in ("mesh", "full"):
    if f"outrider-{kind}" in hs_med and f"haproxy-{kind}" in hs_med:
        print(f"\n{kind}: handshakes per server CPU-second, outrider/haproxy: {hs_med[f'outrider-{kind}'] / hs_med[f'haproxy-{kind}']:.2f}")

print(f"\n### Fixed rate: {rate} req/s, HTTP/1.1 keep-alive, {conns} connections, {dur} s per run\n")
print("| variant | round | requests ok | p50 ms | p99 ms | proxy CPU per request (A + B) | app CPU per request | TLS handshakes at B |")
print("|---|---|---|---|---|---|---|---|")
lat = {}
for line in open(f"{w}/lat.tsv"):
    v, r, ok, c1, c2, ca, p50, p99, n, hs = line.rstrip("\n").split("\t")
    ok = int(ok)
    pc = (int(c1) + int(c2)) * ms * 1000 / ok if ok else float("nan")
    ac = int(ca) * ms * 1000 / ok if ok else float("nan")
    lat.setdefault(v, []).append((float(p50), float(p99), pc, ac, int(c1) * ms * 1000 / ok, int(c2) * ms * 1000 / ok))
    pcs = f"{pc:.1f} µs ({int(c1) * ms * 1000 / ok:.1f} + {int(c2) * ms * 1000 / ok:.1f})" if v != "direct" else "-"
    print(f"| {v} | {r} | {ok} | {p50} | {p99} | {pcs} | {ac:.1f} µs | {hs if v != 'direct' else '-'} |")
print("\n| variant (median of rounds) | p50 ms | p99 ms | added p50 ms | added p99 ms | proxy CPU per request (A + B) |")
print("|---|---|---|---|---|---|")
m = {v: [med(x[i] for x in rs) for i in range(6)] for v, rs in lat.items()}
base = m.get("direct")
for v, (p50, p99, pc, ac, c1, c2) in m.items():
    add = f"{p50 - base[0]:.3f} | {p99 - base[1]:.3f}" if base and v != "direct" else "- | -"
    pcs = f"{pc:.1f} µs ({c1:.1f} + {c2:.1f})" if v != "direct" else "-"
    print(f"| {v} | {p50:.3f} | {p99:.3f} | {add} | {pcs} |")
if "outrider" in m and "haproxy" in m:
    o, h = m["outrider"], m["haproxy"]
    r = lambda a, b: f"{a / b:.2f}" if b else "n/a"
    print(f"\noutrider/haproxy: CPU per request {r(o[2], h[2])}, p50 {r(o[0], h[0])}, p99 {r(o[1], h[1])}, "
          f"added p50 {r(o[0] - base[0], h[0] - base[0]) if base else 'n/a'}, added p99 {r(o[1] - base[1], h[1] - base[1]) if base else 'n/a'}")
if "outrider" in lat and "haproxy" in lat and len(lat["outrider"]) == len(lat["haproxy"]):
    # Paired per round (the rounds run back to back, so a drifting machine moves both alike).
    pairs = list(zip(lat["outrider"], lat["haproxy"], lat.get("direct", [None] * len(lat["outrider"]))))
    cpu_r = [o[2] / h[2] for o, h, _ in pairs if h[2]]
    p50_r = [o[0] / h[0] for o, h, _ in pairs]
    add_r = [(o[0] - d[0]) / (h[0] - d[0]) for o, h, d in pairs if d and h[0] > d[0]]
    print(f"paired per round, median of the ratios outrider/haproxy: CPU per request {med(cpu_r):.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in cpu_r)}), p50 {med(p50_r):.2f}"
          + (f", added p50 {med(add_r):.2f} (rounds: {', '.join(f'{x:.2f}' for x in add_r)})" if add_r else ""))
print("\n### Memory after the runs (VmRSS)\n")
print("| proxy | idle (certificate loaded) | after the handshake runs | after the fixed-rate runs |")
print("|---|---|---|---|")
for line in open(f"{w}/rss.tsv"):
    n, *k = line.split()
    print(f"| {n} | " + " | ".join(f"{int(x) / 1024:.1f} MiB" for x in k) + " |")
EOF

#!/usr/bin/env bash
# Paired A/B of two outrider binaries in local mode: CPU seconds the proxy process spends per
# request for the same fixed load (h2load, HTTP/1.1, keep-alive), runs interleaved A B A B so a
# drifting machine moves both. Usage: benches/ab-local.sh A_BINARY B_BINARY [PAIRS] [REQUESTS]
# Prints each pair's proxy CPU (user+sys, ms) and the median A/B ratio. Loopback only.
set -euo pipefail
a=$1; b=$2; pairs=${3:-5}; n=${4:-40000}
tick=$(getconf CLK_TCK)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
app_port=$(port)
"$a" demo-app --listen "127.0.0.1:$app_port" >/dev/null 2>&1 & app=$!
trap 'kill $app 2>/dev/null' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$app_port") 2>/dev/null && break; sleep 0.1; done
run() {
  local bin=$1 listen admin pid ready=0
  listen=$(port); admin=$(port)
  OUTRIDER_LOG=warn "$bin" proxy --workers 1 --forward "127.0.0.1:$listen=127.0.0.1:$app_port" --admin "127.0.0.1:$admin" >/dev/null 2>&1 & pid=$!
  for _ in $(seq 100); do
    if curl -sf "http://127.0.0.1:$admin/ready" >/dev/null 2>&1; then ready=1; break; fi; sleep 0.05
  done
  [ "$ready" = 1 ] || { kill $pid; echo "proxy not ready" >&2; exit 1; }
  h2load --h1 -n "$n" -c 8 -m 1 "http://127.0.0.1:$listen/" >/dev/null
  local cpu; cpu=$(awk '{print $14+$15}' "/proc/$pid/stat")
  kill $pid; wait $pid 2>/dev/null || true
  echo "$cpu"
}
ratios=()
for i in $(seq "$pairs"); do
  ca=$(run "$a"); cb=$(run "$b")
  r=$(python3 -c "print(f'{$ca/$cb:.3f}')")
  ratios+=("$r")
  echo "pair $i: A ${ca} ticks, B ${cb} ticks (1 tick = $((1000/tick)) ms, $n requests): A/B $r"
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{a[NR]=$1} END {print "median A/B CPU per request:", a[int((NR+1)/2)]}'

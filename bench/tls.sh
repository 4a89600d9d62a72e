#!/usr/bin/env bash
# tls.sh - HTTPS through our listener vs HAProxy (nbthread 1) with the same ECDSA P-256 certificate,
# in one run, loopback only.
#
#   bench/tls.sh                 DUR=5 RUNS=3 CONNS=64 SSLYZE=1
#
# Starts 4 nginx backends shaped like anchors.sh's (127.0.0.1:3000-3003 -> 200 "ok" + X-Backend),
# HAProxy `mode http` with `bind 127.0.0.1:8444 ssl crt <pem>` over them, and pmdaemon with
# bench/anchors-http-tls.json (copied next to a certificate generated into a temp dir: :8443).
# Measures, in interleaved rounds (table = median):
#   keep-alive   wrk -c$CONNS over https: requests/s on reused TLS connections
#   handshakes   wrk -c$CONNS -H 'Connection: close' over https: every request is a new TCP
#                connection and a full TLS handshake (wrk does not resume sessions), so req/s =
#                new handshakes/s
# with CPU us/req of each balancer's process tree (user+sys from /proc), the balancers on CPU_LB=0,
# wrk and nginx on CPU_GEN=1 (PIN=0: no taskset). Waits for the machine to be quiet (QUIET % of one
# core used by other processes, at most QUIET_WAIT s) before each measurement, like anchors.sh.
# With SSLYZE=1 and sslyze installed (`pip install sslyze`) it then runs
#   python3 -m sslyze --mozilla_config=intermediate 127.0.0.1:8443
# and prints its verdict. Everything started here is stopped by PID (trap on EXIT/INT/TERM).
set -u
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DUR=${DUR:-5} RUNS=${RUNS:-3} CONNS=${CONNS:-64} SSLYZE=${SSLYZE:-1} OURS_PORT=8443 HAP_PORT=8444
TMP=$(mktemp -d /tmp/pmdaemon-tls-XXXXXX)
for t in nginx haproxy wrk openssl curl taskset pmdaemon; do
  command -v $t >/dev/null || { echo "missing $t"; exit 1; }; done
source "$ROOT/bench/lib.sh"
trap 'stop_all; exit 130' INT TERM; trap stop_all EXIT

# ---- certificate (ECDSA P-256), backends, HAProxy, ours ----------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
chmod 600 "$TMP/key.pem"; cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"
{ printf 'global\n  maxconn 4096\n  nbthread 1\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n'
  printf 'defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n'
  printf 'listen lb\n  bind 127.0.0.1:%s ssl crt %s\n  balance roundrobin\n' $HAP_PORT "$TMP/haproxy.pem"
  for p in 3000 3001 3002 3003; do printf '  server s%s 127.0.0.1:%s\n' "$p" "$p"; done; } >"$TMP/haproxy.cfg"
cp "$ROOT/bench/anchors-http-tls.json" "$TMP/lb.json"; mkdir -p "$TMP/home"
start_backends
start $CPU_LB haproxy $HAP_PORT haproxy -db -f "$TMP/haproxy.cfg"
start $CPU_LB ours $OURS_PORT env PMDAEMON_HOME="$TMP/home" pmdaemon start "$TMP/lb.json" --no-daemon

{ echo "# $(date -u +%FT%TZ) $(uname -r) nproc=$(nproc) PIN=$PIN DUR=$DUR RUNS=$RUNS CONNS=$CONNS"
  echo "# $(haproxy -v | head -1 | cut -d' ' -f1-3) | $(openssl version) | cert: ECDSA P-256 self-signed"; }
measure() { # NAME PORT MODE ROUND
  local h=(); [ "$3" = handshakes ] && h=(-H "Connection: close")
  wrk_run "$1" "https://127.0.0.1:$2/" "$1	$3	$4" "${h[@]}"
}
: >"$TMP/results.tsv"
for t in $HAP_PORT $OURS_PORT; do pin $CPU_GEN timeout 12 wrk -t1 -c16 -d2s "https://127.0.0.1:$t/" >/dev/null 2>&1; done  # warm-up
spread() { # distinct X-Backend over 8 requests on one connection (after the warm-up: backends are up)
  local i u=(); for i in 1 2 3 4 5 6 7 8; do u+=("https://127.0.0.1:$1/"); done
  timeout 10 curl -sk -o /dev/null -D - "${u[@]}" | tr -d '\r' | awk 'tolower($1) == "x-backend:" {s[$2]} END {print length(s)}'; }
for t in haproxy:$HAP_PORT ours:$OURS_PORT; do
  echo "# ${t%:*}: $(spread ${t#*:}) distinct backends over 8 requests on one connection;" \
    "$(echo | timeout 5 openssl s_client -connect 127.0.0.1:${t#*:} 2>/dev/null | grep -E '^(New|Peer signature type|Server Temp Key)' | tr '\n' ' ')"
done

for r in $(seq "$RUNS"); do for mode in keep-alive handshakes; do
  measure haproxy $HAP_PORT $mode "$r"; measure ours $OURS_PORT $mode "$r"; done; done

python3 - "$TMP/results.tsv" <<'EOF'
import collections, statistics as st, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, mode, _run, *v = line.rstrip("\n").split("\t")
    rows[(name, mode)].append([float(x) for x in v])
med = lambda key, i: st.median(x[i] for x in rows[key])
print("\n| mode | target | req/s (median) | spread | p50 ms | p99 ms | CPU% | CPU us/req | x HAProxy-1t req/s "
      "| x HAProxy-1t CPU/req (capacity) | err | bg% max | bar (req/s ≥ 0.80) |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for mode in ("keep-alive", "handshakes"):
    for name in ("haproxy", "ours"):
        key = (name, mode); rps = [x[0] for x in rows[key]]; m = med(key, 0)
        ratio = m / med(("haproxy", mode), 0)
        capacity = med(("haproxy", mode), 4) / med(key, 4)
        bar = "" if name == "haproxy" else ("pass" if ratio >= 0.80 else "fail")
        print(f"| {mode} | {name} | {m:.0f} | {100 * (max(rps) - min(rps)) / m:.0f}% | {med(key, 1):.2f} | {med(key, 2):.2f} "
              f"| {med(key, 3):.0f} | {med(key, 4):.1f} | {ratio:.2f} | {capacity:.2f} | {sum(x[5] for x in rows[key]):.0f} "
              f"| {max(x[6] for x in rows[key]):.0f} | {bar} |")
print("\nCPU/req (capacity) = HAProxy's CPU us per request / ours: the share of HAProxy's requests (or handshakes)"
      "\nper second of one core that ours would reach with the client not the limit. When HAProxy's CPU% is well"
      "\nbelow 100 the client (wrk on one core) was the bottleneck and the req/s ratio flatters the slower side.")
EOF

if [ "$SSLYZE" = 1 ]; then
  if python3 -c 'import sslyze' 2>/dev/null; then
    echo; echo '$ python3 -m sslyze --mozilla_config=intermediate 127.0.0.1:8443'; echo '```'
    timeout 180 python3 -m sslyze --mozilla_config=intermediate 127.0.0.1:$OURS_PORT >"$TMP/sslyze.txt" 2>&1
    echo "exit status $?"; sed -n '/COMPLIANCE AGAINST/,$p' "$TMP/sslyze.txt" | grep -v -e '^ *$' -e -----
    sed -n '/\* SSL 2.0 Cipher Suites/,/\* Deflate/p' "$TMP/sslyze.txt" | grep -v -e '^ *$' -e Deflate
    echo '```'
  else echo; echo "sslyze not installed (pip install sslyze): compliance check skipped"; fi
fi

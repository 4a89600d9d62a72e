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
DUR=${DUR:-5} RUNS=${RUNS:-3} CONNS=${CONNS:-64} THREADS=${THREADS:-2} PIN=${PIN:-1} CPU_LB=${CPU_LB:-0}
CPU_GEN=${CPU_GEN:-1} QUIET=${QUIET:-10} QUIET_WAIT=${QUIET_WAIT:-120} SSLYZE=${SSLYZE:-1}
OURS_PORT=8443 HAP_PORT=8444 BE="3000 3001 3002 3003" CLK=$(getconf CLK_TCK)
TMP=$(mktemp -d /tmp/pmdaemon-tls-XXXXXX); STARTED=()
for t in nginx haproxy wrk openssl curl taskset pmdaemon; do
  command -v $t >/dev/null || { echo "missing $t"; exit 1; }; done

tree() { ps -e -o pid=,ppid= | awk -v r="$1" '{p[$1]=$2} END {s[r]=1; do {n=0; for (i in p)
  if (!(i in s) && (p[i] in s)) {s[i]=1; n++}} while (n); for (i in s) print i}'; }
ticks() { # user+system CPU ticks (incl. reaped children) of the process tree of $1
  local t=0 p s; for p in $(tree "$1"); do read -r s 2>/dev/null </proc/$p/stat || continue
    s=${s##*) }; set -- $s; t=$((t + ${12} + ${13} + ${14} + ${15})); done; echo $t; }
busy() { local _c u n s _i _w q f _r; read -r _c u n s _i _w q f _r </proc/stat; echo $((u + n + s + q + f)); }
stop_all() {
  local all=() p i alive=(); for p in "${STARTED[@]}"; do all+=($(tree "$p")); done
  if [ ${#all[@]} -gt 0 ]; then kill -TERM "${all[@]}" 2>/dev/null
    for i in $(seq 50); do alive=(); for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive+=($p); done
      [ ${#alive[@]} -eq 0 ] && break; sleep 0.1; done
    [ ${#alive[@]} -gt 0 ] && kill -KILL "${alive[@]}" 2>/dev/null; wait "${STARTED[@]}" 2>/dev/null; fi
  STARTED=(); rm -rf "$TMP"
}
trap 'stop_all; exit 130' INT TERM; trap stop_all EXIT
pin() { local cpu=$1; shift; if [ "$PIN" = 1 ]; then taskset -c "$cpu" "$@"; else "$@"; fi; }
open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
declare -A PIDOF
start() { # CPU NAME PORT CMD...
  local cpu=$1 name=$2 port=$3 i; shift 3
  open "$port" && { echo "port $port already in use - stop that first"; exit 1; }
  pin "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  STARTED+=($!); PIDOF[$name]=$!
  for i in $(seq 100); do open "$port" && return 0; sleep 0.1; done
  echo "$name never opened port $port:"; cat "$TMP/$name.log"; exit 1
}
wait_quiet() {
  local i b0 m0 f=0; for i in $(seq "$QUIET_WAIT"); do b0=$(busy); m0=$(ticks $$); sleep 1
    f=$(( ($(busy) - b0 - $(ticks $$) + m0) * 100 / CLK )); [ "$f" -le "$QUIET" ] && return 0; done
  echo "  (machine still ${f}% busy with other processes)" >&2
}

# ---- certificate (ECDSA P-256), backends, HAProxy, ours ----------------------------------------
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 -subj /CN=localhost \
  -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
  -addext "basicConstraints=critical,CA:FALSE" -keyout "$TMP/key.pem" -out "$TMP/cert.pem" 2>/dev/null
chmod 600 "$TMP/key.pem"; cat "$TMP/cert.pem" "$TMP/key.pem" >"$TMP/haproxy.pem"
body=""; for p in $BE; do body+="server { listen 127.0.0.1:$p; location / { add_header X-Backend $p; return 200 \"ok\"; } } "; done
printf '%s\n' "worker_processes 1; daemon off; pid $TMP/nginx.pid;" "events { worker_connections 4096; }" \
  "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s; $body }" >"$TMP/backend.conf"
{ printf 'global\n  maxconn 4096\n  nbthread 1\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n'
  printf 'defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n'
  printf 'listen lb\n  bind 127.0.0.1:%s ssl crt %s\n  balance roundrobin\n' $HAP_PORT "$TMP/haproxy.pem"
  for p in $BE; do printf '  server s%s 127.0.0.1:%s\n' "$p" "$p"; done; } >"$TMP/haproxy.cfg"
cp "$ROOT/bench/anchors-http-tls.json" "$TMP/lb.json"; mkdir -p "$TMP/home"
start $CPU_GEN backend 3000 nginx -p "$TMP/" -e "$TMP/backend.err" -c "$TMP/backend.conf"
start $CPU_LB haproxy $HAP_PORT haproxy -db -f "$TMP/haproxy.cfg"
start $CPU_LB ours $OURS_PORT env PMDAEMON_HOME="$TMP/home" pmdaemon start "$TMP/lb.json" --no-daemon

{ echo "# $(date -u +%FT%TZ) $(uname -r) nproc=$(nproc) PIN=$PIN DUR=$DUR RUNS=$RUNS CONNS=$CONNS"
  echo "# $(haproxy -v | head -1 | cut -d' ' -f1-3) | $(openssl version) | cert: ECDSA P-256 self-signed"; }
spread() { local i u=(); for i in 1 2 3 4 5 6 7 8; do u+=("https://127.0.0.1:$1/"); done
  timeout 10 curl -sk -o /dev/null -D - "${u[@]}" | tr -d '\r' | awk 'tolower($1) == "x-backend:" {s[$2]} END {print length(s)}'; }
for t in haproxy:$HAP_PORT ours:$OURS_PORT; do
  echo "# ${t%:*}: $(spread ${t#*:}) distinct backends over 8 requests on one connection;" \
    "$(echo | timeout 5 openssl s_client -connect 127.0.0.1:${t#*:} 2>/dev/null | grep -E '^(New|Peer signature type|Server Temp Key)' | tr '\n' ' ')"
done

measure() { # NAME PORT MODE ROUND
  local name=$1 port=$2 mode=$3 r=$4 h=() f t0 c0 c1 dt b0 m0 bg
  [ "$mode" = handshakes ] && h=(-H "Connection: close")
  f="$TMP/$name-$mode-r$r.txt"; wait_quiet
  b0=$(busy); m0=$(ticks $$); c0=$(ticks "${PIDOF[$name]}"); t0=$(date +%s%N)
  pin $CPU_GEN timeout $((DUR + 20)) wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency "${h[@]}" \
    "https://127.0.0.1:$port/" >"$f" 2>&1
  c1=$(ticks "${PIDOF[$name]}"); dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  bg=$(( ($(busy) - b0 - $(ticks $$) + m0) * 100000 / CLK / dt ))
  awk -v n="$name" -v m="$mode" -v r="$r" -v lb=$((c1 - c0)) -v clk="$CLK" -v dt="$dt" -v bg="$bg" '
    function ms(v) { return v ~ /us$/ ? v / 1000 : v ~ /ms$/ ? v + 0 : v * 1000 }
    /requests in/ { n_ = $1 } /Requests\/sec/ { rps = $2 } /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /Socket errors/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 } /Non-2xx/ { err += $NF }
    END { if (!n_) n_ = 1; printf "%s\t%s\t%s\t%.0f\t%.3f\t%.3f\t%.1f\t%.2f\t%d\t%d\n", n, m, r, rps, p50, p99,
          100 * lb / clk / (dt / 1000), lb * 1e6 / clk / n_, err, bg }' "$f" >>"$TMP/results.tsv"
  tail -1 "$TMP/results.tsv" | awk -F'\t' '{printf "  %-8s %-10s run%s %8s req/s p50 %sms p99 %sms cpu %s%% %s us/req err %s bg %s%%\n", $1, $2, $3, $4, $5, $6, $7, $8, $9, $10}' >&2
}
: >"$TMP/results.tsv"
for t in $HAP_PORT $OURS_PORT; do pin $CPU_GEN timeout 12 wrk -t1 -c16 -d2s "https://127.0.0.1:$t/" >/dev/null 2>&1; done  # warm-up
for r in $(seq "$RUNS"); do for mode in keep-alive handshakes; do
  measure haproxy $HAP_PORT $mode "$r"; measure ours $OURS_PORT $mode "$r"; done; done

python3 - "$TMP/results.tsv" <<'EOF'
import collections, statistics as st, sys
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, mode, _run, *v = line.rstrip("\n").split("\t")
    rows[(name, mode)].append([float(x) for x in v])
med = lambda key, i: st.median(x[i] for x in rows[key])
print("\n| mode | target | req/s (median) | spread | p50 ms | p99 ms | CPU% | CPU us/req | x HAProxy-1t | err | bg% max | bar |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
for mode in ("keep-alive", "handshakes"):
    for name in ("haproxy", "ours"):
        key = (name, mode); rps = [x[0] for x in rows[key]]; m = med(key, 0)
        ratio = m / med(("haproxy", mode), 0)
        bar = "" if name == "haproxy" else ("pass" if ratio >= 0.80 else "fail") + " (>= 0.80)"
        print(f"| {mode} | {name} | {m:.0f} | {100 * (max(rps) - min(rps)) / m:.0f}% | {med(key, 1):.2f} | {med(key, 2):.2f} "
              f"| {med(key, 3):.0f} | {med(key, 4):.1f} | {ratio:.2f} | {sum(x[5] for x in rows[key]):.0f} "
              f"| {max(x[6] for x in rows[key]):.0f} | {bar} |")
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

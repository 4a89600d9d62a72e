# lib.sh - process helpers shared by bench/tls.sh and bench/ab.sh (sourced, not run). The same
# techniques as ../shared/bench/anchors.sh: everything started is tracked by PID and stopped as a
# process tree by `stop_all` (the caller's trap), CPU is read from /proc, and a measurement waits
# (bounded) for the machine to be quiet.
#
# Expects: $TMP (a scratch dir, removed by stop_all), and optionally PIN=1 CPU_LB=0 CPU_GEN=1
# QUIET=10 QUIET_WAIT=120.
PIN=${PIN:-1} CPU_LB=${CPU_LB:-0} CPU_GEN=${CPU_GEN:-1} QUIET=${QUIET:-10} QUIET_WAIT=${QUIET_WAIT:-120}
CLK=$(getconf CLK_TCK); STARTED=(); declare -A PIDOF

tree() { # $1 and all its descendants
  ps -e -o pid=,ppid= | awk -v r="$1" '{p[$1]=$2} END {s[r]=1; do {n=0; for (i in p)
    if (!(i in s) && (p[i] in s)) {s[i]=1; n++}} while (n); for (i in s) print i}'
}
ticks() { # user+system CPU ticks (incl. reaped children) of the process tree of $1
  local t=0 p s; for p in $(tree "$1"); do read -r s 2>/dev/null </proc/$p/stat || continue
    s=${s##*) }; set -- $s; t=$((t + ${12} + ${13} + ${14} + ${15})); done; echo $t
}
busy() { local _c u n s _i _w q f _r; read -r _c u n s _i _w q f _r </proc/stat; echo $((u + n + s + q + f)); }
stop_all() {
  local all=() p i alive=(); for p in "${STARTED[@]}"; do all+=($(tree "$p")); done
  if [ ${#all[@]} -gt 0 ]; then kill -TERM "${all[@]}" 2>/dev/null
    for i in $(seq 50); do alive=(); for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive+=($p); done
      [ ${#alive[@]} -eq 0 ] && break; sleep 0.1; done
    [ ${#alive[@]} -gt 0 ] && kill -KILL "${alive[@]}" 2>/dev/null; wait "${STARTED[@]}" 2>/dev/null; fi
  STARTED=(); rm -rf "$TMP"
}
pin() { local cpu=$1; shift; if [ "$PIN" = 1 ]; then taskset -c "$cpu" "$@"; else "$@"; fi; }
open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
start() { # CPU NAME PORT CMD... : in the background, log in $TMP/NAME.log, waits for PORT to accept
  local cpu=$1 name=$2 port=$3 i; shift 3
  open "$port" && { echo "port $port already in use - stop that first"; exit 1; }
  pin "$cpu" "$@" >"$TMP/$name.log" 2>&1 &
  STARTED+=($!); PIDOF[$name]=$!
  for i in $(seq 100); do open "$port" && return 0; sleep 0.1; done
  echo "$name never opened port $port:"; cat "$TMP/$name.log"; exit 1
}
start_backends() { # the 4 nginx backends of anchors.sh: 127.0.0.1:3000-3003 -> 200 "ok" + X-Backend
  local p body=""; for p in 3000 3001 3002 3003; do
    body+="server { listen 127.0.0.1:$p; location / { add_header X-Backend $p; return 200 \"ok\"; } } "; done
  printf '%s\n' "worker_processes 1; daemon off; pid $TMP/nginx.pid;" "events { worker_connections 4096; }" \
    "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s; $body }" >"$TMP/backend.conf"
  start "$CPU_GEN" backend 3000 nginx -p "$TMP/" -e "$TMP/backend.err" -c "$TMP/backend.conf"
}
wait_quiet() { # bounded wait until processes outside this script use < QUIET % of one core
  local i b0 m0 f=0; for i in $(seq "$QUIET_WAIT"); do b0=$(busy); m0=$(ticks $$); sleep 1
    f=$(( ($(busy) - b0 - $(ticks $$) + m0) * 100 / CLK )); [ "$f" -le "$QUIET" ] && return 0; done
  echo "  (machine still ${f}% busy with other processes)" >&2
}
wrk_run() { # NAME URL RESULT-LINE-PREFIX [wrk args]: one bounded wrk run on CPU_GEN against NAME's
  # process tree; appends "PREFIX req/s p50 p99 cpu% us/req errors bg%" (tab-separated) to $TMP/results.tsv
  local name=$1 url=$2 prefix=$3 f t0 c0 c1 dt b0 m0 bg; shift 3
  f=$(mktemp "$TMP/wrk-XXXXXX"); wait_quiet
  b0=$(busy); m0=$(ticks $$); c0=$(ticks "${PIDOF[$name]}"); t0=$(date +%s%N)
  pin "$CPU_GEN" timeout $((DUR + 20)) wrk -t"${THREADS:-2}" -c"$CONNS" -d"${DUR}s" --latency "$@" "$url" >"$f" 2>&1
  c1=$(ticks "${PIDOF[$name]}"); dt=$(( ($(date +%s%N) - t0) / 1000000 ))
  bg=$(( ($(busy) - b0 - $(ticks $$) + m0) * 100000 / CLK / dt ))
  awk -v pre="$prefix" -v lb=$((c1 - c0)) -v clk="$CLK" -v dt="$dt" -v bg="$bg" '
    function ms(v) { return v ~ /us$/ ? v / 1000 : v ~ /ms$/ ? v + 0 : v * 1000 }
    /requests in/ { n_ = $1 } /Requests\/sec/ { rps = $2 } /^ +50%/ { p50 = ms($2) } /^ +99%/ { p99 = ms($2) }
    /Socket errors/ { gsub(/,/, ""); err += $4 + $6 + $8 + $10 } /Non-2xx/ { err += $NF }
    END { if (!n_) n_ = 1; printf "%s\t%.0f\t%.3f\t%.3f\t%.1f\t%.2f\t%d\t%d\n", pre, rps, p50, p99,
          100 * lb / clk / (dt / 1000), lb * 1e6 / clk / n_, err, bg }' "$f" >>"$TMP/results.tsv"
  tail -1 "$TMP/results.tsv" | awk -F'\t' '{l = $1; for (i = 2; i <= NF - 7; i++) l = l " " $i
    printf "  %-24s %8s req/s p50 %sms p99 %sms cpu %s%% %s us/req err %s bg %s%%\n",
    l, $(NF-6), $(NF-5), $(NF-4), $(NF-3), $(NF-2), $(NF-1), $NF}' >&2
}

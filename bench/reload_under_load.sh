#!/usr/bin/env bash
# reload_under_load.sh - what a rolling `pmdaemon reload` costs the clients of a busy listener.
#
#   bench/reload_under_load.sh            DUR=20 CONNS=64 THREADS=4 RELOADS=2 INSTANCES=4
#
# Starts a daemon in a temporary PMDAEMON_HOME with INSTANCES copies of examples/apps/server.js
# (node: one write per response, so latency is the balancer's, not Nagle's) behind one HTTP listener
# (round robin, health check every 0.5 s). Then two wrk runs of DUR seconds at CONNS keep-alive
# connections, each after the pool is fully up:
#   steady   nothing else happens
#   reload   1 s in, `pmdaemon reload web` RELOADS times in a row (every instance drained, restarted,
#            health-checked and put back, one at a time)
# and prints requests/s, p50/p99 latency, non-2xx responses and socket errors of each run, plus how
# long each reload took. Expected: 0 non-2xx and 0 socket errors in both runs. Everything started
# here is stopped (`pmdaemon kill`, then the daemon's PID) and the home removed on exit.
set -u
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DUR=${DUR:-20} CONNS=${CONNS:-64} THREADS=${THREADS:-4} RELOADS=${RELOADS:-2} INSTANCES=${INSTANCES:-4}
for tool in wrk node python3; do command -v $tool >/dev/null || { echo "missing $tool"; exit 1; }; done
TMP=$(mktemp -d /tmp/pmdaemon-reload-XXXXXX)
export PMDAEMON_HOME=$TMP/home NO_COLOR=1
PM() { python3 -m pmdaemon "$@"; }

cleanup() {
  local pid; pid=$(cat "$PMDAEMON_HOME/daemon.pid" 2>/dev/null)
  (cd "$ROOT" && PM kill >/dev/null 2>&1)
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  rm -rf "$TMP"
}
trap cleanup EXIT; trap 'exit 130' INT TERM
cd "$ROOT" || exit 1

read -r LB BASE < <(python3 - "$INSTANCES" <<'EOF'
import socket, sys
def free(port):
    with socket.socket() as s:
        try: s.bind(("127.0.0.1", port)); return True
        except OSError: return False
n = int(sys.argv[1])
for base in range(20000, 60000, 97):
    if all(free(base + i) for i in range(n + 1)):
        print(base + n, base); break
EOF
)
cat >"$TMP/reload.json" <<EOF
{"apps": [{"name": "web", "script": "$ROOT/examples/apps/server.js", "instances": $INSTANCES,
           "increment_var": "PORT", "env": {"PORT": $BASE}, "kill_timeout": 3000,
           "health_check": {"url": "http://localhost:{{PORT}}/health", "interval": 0.5, "timeout": 1}}],
 "load_balancer": {"host": "127.0.0.1", "port": $LB, "apps": ["web"]}}
EOF
PM start "$TMP/reload.json" >/dev/null || { echo "pmdaemon start failed"; exit 1; }

all_up() { # wait until every backend is up (at most 20 s)
  local i; for i in $(seq 200); do
    PM lb backends --json | python3 -c "import json,sys; b=json.load(sys.stdin); \
sys.exit(0 if len(b) == $INSTANCES and all(x['state'] == 'up' for x in b) else 1)" && return 0
    sleep 0.1; done; echo "backends not up"; exit 1; }

run_wrk() { # NAME: wrk for DUR s, output kept in $TMP/NAME.wrk
  wrk -t"$THREADS" -c"$CONNS" -d"${DUR}s" --latency "http://127.0.0.1:$LB/" >"$TMP/$1.wrk" 2>&1; }

summary() { # NAME -> "requests/s p50 p99 non2xx socket_errors"
  awk '/Requests\/sec/ {rps=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2}
       /Non-2xx or 3xx/ {bad=$NF}
       /Socket errors/ {gsub(",", ""); err=$4+$6+$8+$10}
       END {printf "%s %s %s %d %d\n", rps, p50, p99, bad, err}' "$TMP/$1.wrk"; }

all_up
run_wrk steady
all_up
run_wrk reload & WRK=$!
sleep 1
TIMES=()
for i in $(seq "$RELOADS"); do
  start=$(date +%s.%N)
  PM reload web >"$TMP/reload-$i.out" 2>&1 || { echo "reload $i failed:"; cat "$TMP/reload-$i.out"; }
  TIMES+=("$(echo "$(date +%s.%N) - $start" | bc)")
done
wait $WRK

printf "\n%d x node server.js behind 127.0.0.1:%d, wrk -t%d -c%d -d%ds\n\n" "$INSTANCES" "$LB" "$THREADS" "$CONNS" "$DUR"
printf "%-28s %10s %9s %9s %8s %13s\n" "run" "req/s" "p50" "p99" "non-2xx" "socket errors"
read -r rps p50 p99 bad err < <(summary steady)
printf "%-28s %10s %9s %9s %8s %13s\n" "steady state" "$rps" "$p50" "$p99" "$bad" "$err"
read -r rps p50 p99 bad err < <(summary reload)
printf "%-28s %10s %9s %9s %8s %13s\n" "during $RELOADS x reload ($INSTANCES inst.)" "$rps" "$p50" "$p99" "$bad" "$err"
printf "\nreload durations: %s s\n" "$(printf "%.1f " "${TIMES[@]}")"

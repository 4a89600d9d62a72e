#!/usr/bin/env bash
# run.sh - pmdaemon's listener side by side with nginx and HAProxy (../shared/bench/anchors.sh),
# plus the feature-cost variants, TLS, idle connections and start-up benchmarks.
#
#   bench/run.sh                 everything below, in this order (about 12 minutes on 2 cores)
#   bench/run.sh http            HTTP (anchors-http.json on :8080) and TCP (anchors-tcp.json on
#                                :5200 over redis) against direct, nginx and HAProxy (targets
#                                HONLY; HONLY=. adds nginx-auto, haproxy-auto and the -close rows)
#   bench/run.sh variants        CPU per request with a feature on vs the plain listener (below)
#   bench/run.sh tls             bench/tls.sh: HTTPS keep-alive and new handshakes vs HAProxy
#   bench/run.sh idle            bench/idle_conns.py: RSS with 10,000 idle keep-alive clients
#   bench/run.sh startup         bench/startup.py: start-to-online for 1/8/32 instances, idle daemon
#   bench/run.sh profile         py-spy of the daemon under wrk -c64 (top functions, text)
#
# Variants (resilience, monitoring) are measured by bench/ab.sh, not anchors.sh: anchors.sh measures
# one LB_CMD per invocation, and invocations minutes apart drift by more than the 10% these bars
# allow. ab.sh runs the plain, resilience and monitoring configs as three daemons at once (ports
# 8080-8082) and alternates short wrk runs between them, so each round's ratio is taken within the
# same minute; see its header.
# Knobs (env): DUR=5 RUNS=3 CONNS="64 8" HONLY (main run; anchors.sh's own knobs such as QUIET, PIN,
#   REDIS_N pass through), VDUR=4 VCONNS=64 VROUNDS=7 (variants: ab.sh's DUR, CONNS, ROUNDS), SCRAPE_EVERY=5,
#   RESULTS=bench/results/<UTC date-time> (tables are copied there; raw logs of every anchors.sh
#   run stay in /tmp/pmdaemon-bench-*/, printed at the end),
#   PORT_WAIT=600 (seconds to wait for another run of anchors.sh to free ports 3000/8080/...),
#   QUIET_WAIT=15 RETRY=1 (anchors.sh's waits for a quiet machine, shorter than its defaults so that
#   other developers' test runs cannot stretch the bench past ~15 minutes; the bg% column shows
#   how much other load remained; tls.sh honours QUIET_WAIT too).
set -u
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel); BENCH=$ROOT/bench
ANCHORS=$ROOT/../shared/bench/anchors.sh
DUR=${DUR:-5} RUNS=${RUNS:-3} CONNS=${CONNS:-"64 8"}
VDUR=${VDUR:-4} VCONNS=${VCONNS:-64} VROUNDS=${VROUNDS:-7}
HONLY=${HONLY:-'^(direct-nginx|nginx-w1|haproxy-t1|ours|redis-direct|haproxy-tcp|ours-tcp)$'}
SCRAPE_EVERY=${SCRAPE_EVERY:-5}
PORT_WAIT=${PORT_WAIT:-600}
export QUIET_WAIT=${QUIET_WAIT:-15} RETRY=${RETRY:-1}  # anchors.sh's: bounded, so a busy machine cannot stretch the run
RESULTS=${RESULTS:-$BENCH/results/$(date -u +%Y%m%dT%H%M%SZ)}
TMP=$(mktemp -d /tmp/pmdaemon-bench-XXXXXX)
command -v pmdaemon >/dev/null || { echo "pmdaemon not on PATH: pip install -e $ROOT"; exit 1; }
mkdir -p "$RESULTS"; MODES=("$@"); [ ${#MODES[@]} -gt 0 ] || MODES=(http variants tls idle startup profile)
cleanup() { rm -rf "$TMP"/home-*; }
{ echo "HEAD $(git -C "$ROOT" log -1 --format='%h %cI %s')"; echo "uncommitted (measured as they are, editable install):"
  git -C "$ROOT" status --short -- net actors config control cli.py; } >"$RESULTS/git.txt"
trap cleanup EXIT; trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_ports() { # anchors.sh refuses to start while another run holds its ports: wait (bounded)
  local i p busy; for i in $(seq "$PORT_WAIT"); do busy=
    for p in 3000 5000 8080 8101 8103 5100 5200 8443 8444 "$@"; do port_busy "$p" && busy+=" $p"; done
    [ -z "$busy" ] && return 0; [ $((i % 30)) = 1 ] && echo "  waiting for ports$busy to be freed" >&2
    sleep 1; done; echo "ports$busy still busy after ${PORT_WAIT}s" >&2; return 1
}
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
lb_cmd() { # CONFIG -> the LB_CMD that runs our daemon in the foreground with a fresh home
  local home; home=$(mktemp -d "$TMP/home-XXXX")
  echo "PMDAEMON_HOME=$home exec pmdaemon start $1 --no-daemon"
}

run_http() {
  echo "== HTTP and TCP anchors (DUR=$DUR RUNS=$RUNS CONNS=$CONNS)"; wait_ports || return 1
  local out=$TMP/anchors-main
  OUT=$out DUR=$DUR RUNS=$RUNS CONNS=$CONNS ONLY=$HONLY LB_PORT=8080 LB_CMD="$(lb_cmd "$BENCH/anchors-http.json")" \
    LB_TCP_PORT=5200 LB_TCP_CMD="$(lb_cmd "$BENCH/anchors-tcp.json")" bash "$ANCHORS"
  cp "$out/table.md" "$RESULTS/http-tcp.md"; cp "$out/results.tsv" "$RESULTS/http-tcp.tsv"
  cp "$out/meta.txt" "$RESULTS/http-tcp.meta"; grep -h "" "$out"/log/ours*.log >"$RESULTS/http-tcp.ours.log" 2>/dev/null
}

run_variants() {
  echo "== variants: bench/ab.sh plain vs resilience vs monitoring (VDUR=$VDUR VROUNDS=$VROUNDS VCONNS=$VCONNS)"
  wait_ports 8081 8082 || return 1
  DUR=$VDUR ROUNDS=$VROUNDS CONNS=$VCONNS SCRAPE_EVERY=$SCRAPE_EVERY bash "$BENCH/ab.sh" \
    plain="$BENCH/anchors-http.json" resilience="$BENCH/anchors-http-resilience.json" \
    monitoring="$BENCH/anchors-http-monitoring.json" | tee "$RESULTS/variants.md"
}

run_profile() { # two py-spy samplers (all non-idle threads; GIL holders only) on the daemon started by
  # anchors.sh, from 5 s after it starts, i.e. through its wrk -c64 run; py-spy runs on CPU 1, not the LB's
  local secs=${PROFILE_SECONDS:-8} out=$TMP/anchors-profile raw=$TMP/profile home
  echo "== py-spy profile of the daemon under wrk -c64 ($secs s)"; wait_ports || return 1
  home=$(mktemp -d "$TMP/home-XXXX")
  OUT=$out DUR=12 RUNS=1 CONNS=64 TCP=0 ONLY='ours$' LB_PORT=8080 LB_CMD="PMDAEMON_HOME=$home \
    pmdaemon start $BENCH/anchors-http.json --no-daemon & d=\$!; sleep 5
    for g in all gil; do taskset -c 1 py-spy record --pid \$d -d $secs -r 250 -f raw --threads --nonblocking \
      \$([ \$g = gil ] && echo --gil) -o $raw.\$g >/dev/null 2>&1 & done; wait \$d" bash "$ANCHORS" >/dev/null
  { echo "### all non-idle samples (a thread waiting for the GIL counts as busy)"; echo
    python3 "$BENCH/profile_summary.py" "$raw.all"; echo
    echo "### samples of the thread holding the GIL (py-spy --gil: where the CPU goes)"; echo
    python3 "$BENCH/profile_summary.py" "$raw.gil"; } | tee "$RESULTS/profile.md"
}

for mode in "${MODES[@]}"; do
  case $mode in
    http) run_http ;;
    variants) run_variants ;;
    tls) wait_ports && bash "$BENCH/tls.sh" | tee "$RESULTS/tls.md" ;;
    idle) wait_ports && python3 "$BENCH/idle_conns.py" | tee "$RESULTS/idle.md" ;;
    startup) echo "== startup.py"; python3 "$BENCH/startup.py" | tee "$RESULTS/startup.md" ;;
    profile) run_profile ;;
    *) echo "unknown mode $mode (http variants tls idle startup profile)"; exit 2 ;;
  esac
done
echo "tables: $RESULTS  raw logs: $TMP"

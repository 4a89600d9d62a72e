#!/usr/bin/env bash
# ab.sh - CPU per request of our listener with a feature on vs off, all configs live at once and
# measured in alternating short wrk runs, loopback only.
#
#   bench/ab.sh plain=bench/anchors-http.json resilience=bench/anchors-http-resilience.json \
#               monitoring=bench/anchors-http-monitoring.json          (the first is the baseline)
#
# Why not one anchors.sh invocation per config: anchors.sh measures one LB_CMD per run, and two
# invocations minutes apart drift by more (on this shared 2-core machine, 10-20%) than the 10% these
# bars allow. Here every config runs as its own daemon (`pmdaemon start --no-daemon`, own
# PMDAEMON_HOME) on its own port (8080, 8081, ...: a copy of the config with `port` changed and any
# Prometheus endpoint moved to a free port) over the same 4 nginx backends (127.0.0.1:3000-3003,
# shaped like anchors.sh's). Each round runs wrk -c$CONNS for $DUR s against every config, in an
# order rotated each round, and counts CPU (user+sys, /proc) of that daemon's process tree only. The
# ratio to the baseline is taken per round (same minute) and the table shows the median over ROUNDS.
# While a config with a Prometheus endpoint runs, /metrics is scraped every SCRAPE_EVERY s.
# Daemons on CPU_LB=0, wrk and nginx on CPU_GEN=1 (PIN=0: no taskset). Waits (bounded by
# QUIET_WAIT) for other processes to use < QUIET % of a core before each run.
#
# CMD_<name> runs that config with another pmdaemon command instead of `pmdaemon`, e.g. an older
# checkout for a before/after comparison of the same config in one run:
#   CMD_before="env PYTHONPATH=/tmp/old python3 -m cli" bench/ab.sh before=bench/anchors-http.json after=bench/anchors-http.json
#
# Knobs: DUR=4 ROUNDS=5 CONNS=64 THREADS=2 WARM=2 SCRAPE_EVERY=5 BAR=1.10 QUIET=10 QUIET_WAIT=15
set -u
ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
DUR=${DUR:-4} ROUNDS=${ROUNDS:-5} CONNS=${CONNS:-64} WARM=${WARM:-2} SCRAPE_EVERY=${SCRAPE_EVERY:-5}
BAR=${BAR:-1.10} QUIET_WAIT=${QUIET_WAIT:-15}
[ $# -ge 2 ] || { sed -n '2,7p' "$0"; exit 2; }
TMP=$(mktemp -d /tmp/pmdaemon-ab-XXXXXX)
for t in nginx wrk curl taskset pmdaemon python3; do command -v $t >/dev/null || { echo "missing $t"; exit 1; }; done
source "$ROOT/bench/lib.sh"
SCRAPER=
finish() { [ -n "$SCRAPER" ] && kill "$SCRAPER" 2>/dev/null; stop_all; }
trap 'finish; exit 130' INT TERM; trap finish EXIT

NAMES=(); declare -A PORT METRICS
i=0; for arg in "$@"; do
  name=${arg%%=*} cfg=${arg#*=}; NAMES+=("$name"); PORT[$name]=$((8080 + i)); i=$((i + 1))
  METRICS[$name]=$(python3 - "$cfg" "$TMP/$name.json" "${PORT[$name]}" <<'EOF'
import json, os, socket, sys
source, target, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = json.load(open(source))
listener = config["load_balancer"]
listener["port"] = port
prometheus = listener.get("monitoring", {}).get("export", {}).get("prometheus")
metrics_port = ""
if prometheus:
    probe = socket.socket(); probe.bind(("127.0.0.1", 0)); metrics_port = probe.getsockname()[1]; probe.close()
    if prometheus is True:
        prometheus = listener["monitoring"]["export"]["prometheus"] = {}
    prometheus["port"] = metrics_port
    prometheus["host"] = "127.0.0.1"
for key in ("cert_file", "key_file"):  # keep relative paths working from the copy's directory
    if key in listener.get("ssl", {}):
        listener["ssl"][key] = os.path.join(os.path.dirname(os.path.abspath(source)), listener["ssl"][key])
json.dump(config, open(target, "w"), indent=2)
print(metrics_port)
EOF
  ) || exit 1
done

start_backends
for name in "${NAMES[@]}"; do
  mkdir -p "$TMP/home-$name"
  command_var="CMD_$name"; read -r -a command <<<"${!command_var:-pmdaemon}"
  start "$CPU_LB" "$name" "${PORT[$name]}" env PMDAEMON_HOME="$TMP/home-$name" "${command[@]}" start "$TMP/$name.json" --no-daemon
done
echo "# $(date -u +%FT%TZ) $(uname -r) nproc=$(nproc) PIN=$PIN DUR=$DUR ROUNDS=$ROUNDS CONNS=$CONNS" \
  "configs: $(for n in "${NAMES[@]}"; do printf '%s=:%s ' "$n" "${PORT[$n]}"; done)"
sleep 1  # backends come up when the daemon's first connect to them succeeds
for name in "${NAMES[@]}"; do pin "$CPU_GEN" timeout $((WARM + 10)) wrk -t1 -c16 -d"${WARM}s" "http://127.0.0.1:${PORT[$name]}/" >/dev/null 2>&1; done

: >"$TMP/results.tsv"; n=${#NAMES[@]}
for r in $(seq "$ROUNDS"); do
  for k in $(seq 0 $((n - 1))); do
    name=${NAMES[$(( (k + r) % n ))]}
    if [ -n "${METRICS[$name]}" ]; then
      ( while sleep "$SCRAPE_EVERY"; do curl -s -o /dev/null --max-time 2 "http://127.0.0.1:${METRICS[$name]}/metrics"; done ) &
      SCRAPER=$!
    fi
    wrk_run "$name" "http://127.0.0.1:${PORT[$name]}/" "$name	$r"
    if [ -n "$SCRAPER" ]; then kill "$SCRAPER" 2>/dev/null; wait "$SCRAPER" 2>/dev/null; SCRAPER=; fi
  done
done
for name in "${NAMES[@]}"; do kill -0 "${PIDOF[$name]}" 2>/dev/null || echo "!! daemon $name exited during the run (see $TMP/$name.log)"; done

python3 - "$TMP/results.tsv" "$BAR" "${NAMES[@]}" <<'EOF'
import collections, statistics as st, sys
path, bar, names = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
rows = collections.defaultdict(dict)  # round -> name -> values
for line in open(path):
    name, round_, *v = line.rstrip("\n").split("\t")
    rows[round_][name] = [float(x) for x in v]
base = names[0]
print(f"\n| config | req/s (median) | p99 ms | CPU% | CPU us/req (median) | x {base} CPU/req (median of per-round ratios) "
      f"| per-round ratios | err | bg% max | bar (≤ {bar:.2f}) |")
print("|---|---:|---:|---:|---:|---:|---|---:|---:|---|")
for name in names:
    mine = [r[name] for r in rows.values() if name in r]
    ratios = [r[name][4] / r[base][4] for r in rows.values() if name in r and base in r and r[base][4]]
    ratio = st.median(ratios)
    verdict = "" if name == base else ("pass" if ratio <= bar else "fail")
    print(f"| {name} | {st.median(x[0] for x in mine):.0f} | {st.median(x[2] for x in mine):.2f} "
          f"| {st.median(x[3] for x in mine):.0f} | {st.median(x[4] for x in mine):.1f} | {ratio:.3f} "
          f"| {' '.join('%.2f' % x for x in ratios)} | {sum(x[5] for x in mine):.0f} | {max(x[6] for x in mine):.0f} | {verdict} |")
EOF

"""Summarise bench/run.sh's variant runs: CPU per request with a feature on vs the plain listener.

    python3 bench/variants_summary.py LIST    (LIST: lines "variant<TAB>round<TAB>anchors OUT dir")

Each anchors.sh invocation measured ours and HAProxy (nbthread 1) in the same run; this prints, per
variant and connection count, our CPU us/req, HAProxy's, the raw ratio to the plain invocation and
the drift-corrected ratio (ours/HAProxy with the feature) / (ours/HAProxy plain), whose halves are
both same-run ratios. Medians over rounds when VROUNDS > 1.
"""
from __future__ import annotations

import collections
import statistics
import sys
from pathlib import Path

# results.tsv columns written by anchors.sh
KIND, NAME, CONNS, RUN, RPS, P50, P99, CPU_PCT, US_PER_REQ, ERRORS = range(10)


def load(list_path: str) -> dict:
    """{(variant, round): {(target, conns): [rows]}}"""
    runs = {}
    for line in Path(list_path).read_text().splitlines():
        variant, round_, out = line.split("\t")
        rows = collections.defaultdict(list)
        for row in (Path(out) / "results.tsv").read_text().splitlines():
            fields = row.split("\t")
            rows[(fields[NAME], fields[CONNS])].append(fields)
        runs[(variant, round_)] = rows
    return runs


def median(rows: list, column: int) -> float:
    return statistics.median(float(r[column]) for r in rows)


def main() -> None:
    runs = load(sys.argv[1])
    rounds = sorted({r for _, r in runs})
    variants = [v for v in ("resilience", "monitoring") if any(k[0] == v for k in runs)]
    conns = sorted({c for rows in runs.values() for (_, c) in rows}, key=int, reverse=True)
    print("| variant | c | ours us/req plain → variant | HAProxy-1t us/req plain → variant "
          "| raw ratio | drift-corrected ratio | req/s ours plain → variant | errors | bar (≤ 1.10) |")
    print("|---|---:|---|---|---:|---:|---|---:|---|")
    for variant in variants:
        for c in conns:
            raw, corrected, cells = [], [], []
            for round_ in rounds:
                plain, feature = runs.get(("plain", round_)), runs.get((variant, round_))
                if not plain or not feature or ("ours", c) not in plain or ("ours", c) not in feature:
                    continue
                ours_p, ours_v = median(plain[("ours", c)], US_PER_REQ), median(feature[("ours", c)], US_PER_REQ)
                hap_p, hap_v = (median(plain[("haproxy-t1", c)], US_PER_REQ),
                                median(feature[("haproxy-t1", c)], US_PER_REQ))
                raw.append(ours_v / ours_p)
                corrected.append((ours_v / hap_v) / (ours_p / hap_p))
                errors = sum(int(r[ERRORS]) for r in feature[("ours", c)] + plain[("ours", c)])
                cells.append((ours_p, ours_v, hap_p, hap_v, median(plain[("ours", c)], RPS),
                              median(feature[("ours", c)], RPS), errors))
            if not cells:
                continue
            ours_p, ours_v, hap_p, hap_v, rps_p, rps_v, errors = cells[len(cells) // 2]
            r, k = statistics.median(raw), statistics.median(corrected)
            verdict = "pass" if max(r, k) <= 1.10 else ("fail" if min(r, k) > 1.10 else "borderline")
            print(f"| {variant} | {c} | {ours_p:.1f} → {ours_v:.1f} | {hap_p:.1f} → {hap_v:.1f} | {r:.3f} "
                  f"| {k:.3f} | {rps_p:.0f} → {rps_v:.0f} | {errors} | {verdict} |")


if __name__ == "__main__":
    main()

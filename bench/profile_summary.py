"""Top functions of a py-spy raw profile (`py-spy record -f raw --threads`), as Markdown text.

    python3 bench/profile_summary.py PROFILE.raw [--top 20]

Each raw line is "thread;frame;frame;... COUNT" with frames "function (file:line)", outermost
first. Prints samples per thread, then per function (file:function, lines merged) its self share
(leaf frame) and inclusive share (anywhere on the stack, counted once per sample), as percentages
of all non-idle samples; then the self shares within the busiest thread alone.
"""
from __future__ import annotations

import argparse
import collections
import os
import re

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    short = "/".join(path.split(os.sep)[-2:]) if "site-packages" not in path else os.path.basename(path)
    return f"{short}:{match['func']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile")
    parser.add_argument("--top", type=int, default=20)
    options = parser.parse_args()
    threads, self_time, inclusive = collections.Counter(), collections.Counter(), collections.Counter()
    self_by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    total = 0
    for line in open(options.profile):
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        thread, *frames = stack.split(";")
        total += n
        threads[thread] += n
        if frames:
            names = [frame_name(f) for f in frames]
            self_time[names[-1]] += n
            self_by_thread[thread][names[-1]] += n
            for name in set(names):
                inclusive[name] += n
    if not total:
        print("no samples (was the daemon busy while py-spy ran?)")
        return
    print(f"{total} non-idle samples\n\n| thread | share |\n|---|---:|")
    for thread, n in threads.most_common(8):
        print(f"| {thread} | {100 * n / total:.1f}% |")
    for title, counter in (("self (leaf frame)", self_time), ("inclusive (on the stack)", inclusive)):
        print(f"\n| function — {title} | share |\n|---|---:|")
        for name, n in counter.most_common(options.top):
            print(f"| `{name}` | {100 * n / total:.1f}% |")
    busiest, busy = threads.most_common(1)[0]
    print(f"\n| function — self, within {busiest} ({busy} samples) | share of that thread |\n|---|---:|")
    for name, n in self_by_thread[busiest].most_common(options.top):
        print(f"| `{name}` | {100 * n / busy:.1f}% |")


if __name__ == "__main__":
    main()

"""Test app: a process tree. It starts CHILDREN (default 2) `sleep`-ing children, each with a grandchild,
plus one grandchild that escapes into its own session (setsid), writes every pid to PIDS_FILE, then sleeps.
With IGNORE_TERM=1 every process of the tree ignores SIGTERM (only SIGKILL ends it).
"""
import json
import os
import signal
import subprocess
import time

if os.environ.get("IGNORE_TERM") == "1":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited as ignored by the exec'd children
pids = [os.getpid()]
children = []
for _ in range(int(os.environ.get("CHILDREN", "2"))):
    # the shell (child) runs a sleep in the background (grandchild) and waits for it
    child = subprocess.Popen(["sh", "-c", "sleep 300 & echo $! ; wait"], stdout=subprocess.PIPE)
    pids += [child.pid, int(child.stdout.readline())]
    children.append(child)
escaped = subprocess.Popen(["setsid", "sh", "-c", "sleep 300 & echo $! ; wait"], stdout=subprocess.PIPE)
pids += [escaped.pid, int(escaped.stdout.readline())]
with open(os.environ["PIDS_FILE"] + ".tmp", "w") as out:
    json.dump(pids, out)
os.replace(os.environ["PIDS_FILE"] + ".tmp", os.environ["PIDS_FILE"])
print("family ready", flush=True)
while True:
    time.sleep(60)

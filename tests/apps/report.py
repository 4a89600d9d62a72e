"""Test app: writes what it was started with (argv, cwd, selected env) to REPORT_DIR/<PM2_INSTANCE_ID>.json,
then sleeps."""
import json
import os
import sys
import time

report = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pgid": os.getpgid(0), "pid": os.getpid(),
          "env": {key: os.environ.get(key) for key in os.environ.get("REPORT_KEYS", "").split(",") if key}}
path = os.path.join(os.environ["REPORT_DIR"], f"{os.environ['PM2_INSTANCE_ID']}.json")
with open(path + ".tmp", "w") as out:
    json.dump(report, out)
os.replace(path + ".tmp", path)
while True:
    time.sleep(60)

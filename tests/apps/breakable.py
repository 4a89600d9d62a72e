"""Test app: examples/apps/server.py, unless the file named by BROKEN_FILE exists when it starts.

Then, with BROKEN_MODE=crash (the default), it exits 1 at once; with BROKEN_MODE=unhealthy it serves
but its GET /health answers 503 for as long as that file exists. Instances started before the file
appeared keep serving normally: a test breaks only the instances (re)started from then on.
"""
import os
import runpy
import sys
from pathlib import Path

SERVER = Path(__file__).resolve().parents[2] / "examples" / "apps" / "server.py"

broken = os.environ.get("BROKEN_FILE")
if broken and os.path.exists(broken):
    if os.environ.get("BROKEN_MODE", "crash") == "crash":
        print(f"breakable: {broken} exists, exiting", file=sys.stderr, flush=True)
        sys.exit(1)
    os.environ["FAIL_HEALTH_FILE"] = broken
runpy.run_path(str(SERVER), run_name="__main__")

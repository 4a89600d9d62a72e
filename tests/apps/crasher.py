"""Test app: exits with EXIT_CODE (default 1) after CRASH_AFTER_MS (default 0), writing one line to each log."""
import os
import sys
import time

print(f"crasher {os.environ.get('PM2_INSTANCE_ID')} starting", flush=True)
time.sleep(float(os.environ.get("CRASH_AFTER_MS", "0")) / 1000)
print("crasher giving up", file=sys.stderr, flush=True)
sys.exit(int(os.environ.get("EXIT_CODE", "1")))

"""Test app: holds HOG_MB (default 64) MiB of touched memory, then sleeps."""
import os
import time

hog = bytearray(int(os.environ.get("HOG_MB", "64")) * 1024 * 1024)
for offset in range(0, len(hog), 4096):
    hog[offset] = 1  # touch every page so it counts in RSS
print("holding memory", flush=True)
while True:
    time.sleep(60)

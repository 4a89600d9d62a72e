"""Test app: leaves a short-lived orphan behind (a shell that backgrounds `sleep 0.2` and exits at once),
then sleeps."""
import subprocess
import time

subprocess.run(["sh", "-c", "sleep 0.2 & exit 0"], check=True)
print("orphan left", flush=True)
while True:
    time.sleep(60)

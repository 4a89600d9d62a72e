"""pmdaemon command line (placeholder until the CLI lands)."""


def main() -> int:
    raise SystemExit("pmdaemon: not built yet")

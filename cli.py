"""pmdaemon: a process manager with a built-in HTTP/TLS/TCP load balancer.

Usage:
  pmdaemon start <config> [--no-daemon] [--json]
  pmdaemon validate <config> [--json]
  pmdaemon list [--json]
  pmdaemon stop <target> [--json]
  pmdaemon restart <target> [--json]
  pmdaemon reload --config=<config> [--json]
  pmdaemon reload <target> [--json]
  pmdaemon scale <app> <n> [--json]
  pmdaemon delete <target> [--json]
  pmdaemon logs <app> [--lines=<n>] [--json]
  pmdaemon kill [--json]
  pmdaemon lb status [--json]
  pmdaemon lb health [--json]
  pmdaemon lb stats [--json]
  pmdaemon lb monitor [--interval=<s>] [--count=<n>] [--json]
  pmdaemon lb config [--json]
  pmdaemon lb backends [--json]
  pmdaemon lb traffic [--json]
  pmdaemon lb health-check --test [--json]
  pmdaemon lb metrics [--detailed] [--json]
  pmdaemon lb drain <backend> [--json]
  pmdaemon lb enable <backend> [--json]
  pmdaemon lb export (nginx | haproxy) [--json]
  pmdaemon -h | --help
  pmdaemon --version

Arguments:
  <config>   a config file (.json or .toml)
  <target>   an app name, an instance name (web-app-2) or "all"
  <backend>  host:port or an instance name such as web-app-2

Options:
  --no-daemon       run in the foreground until SIGINT/SIGTERM, then stop everything it started
  --config=<config> apply a changed config in place (an invalid one is refused whole)
  --lines=<n>       how many of the last lines of each log to show [default: 15]
  --interval=<s>    seconds between two frames of the monitor [default: 1]
  --count=<n>       stop the monitor after n frames (default: until Ctrl-C)
  --detailed        add per-backend and per-status series
  --json            print one JSON document on stdout (lb monitor: one per frame, one per line)
  -h --help         show this help
  --version         print the installed version

Environment:
  PMDAEMON_HOME     where the daemon keeps its socket, logs and state [default: ~/.pmdaemon]
  NO_COLOR          set it to print states without colour

Exit status: 0 success, 1 a runtime failure, 2 a usage or config error.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from docopt import DocoptExit, docopt

from pmdaemon import __version__
from pmdaemon.control.protocol import EXIT_RUNTIME, EXIT_USAGE, CommandFailed, ControlClient, DaemonNotRunning
from pmdaemon.control.tables import (Column, MonitorView, format_ago, format_bytes, format_duration, format_ms, format_percent,
                        render_pairs, render_table, use_colour)

DAEMON_START_TIMEOUT = 15.0  # seconds to wait for a freshly spawned daemon's socket
KILL_TIMEOUT = 60.0  # seconds to wait for the daemon's pid to disappear after `kill`


class UsageError(Exception):
    """A bad argument value docopt cannot check (exit 2)."""


# ---------------------------------------------------------------------------------------------
# Output helpers


def _print_json(document: object) -> None:
    print(json.dumps(document, indent=2, default=str))


def _os_error_text(exc: OSError) -> str:
    return f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}"


def _error(message: str) -> None:
    print(f"pmdaemon: {message}", file=sys.stderr)


def _scalar(value: object) -> str:
    """A cell or value as text: nested data as compact JSON, floats with two decimals."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _flatten(obj: dict, prefix: str = "") -> list[tuple[str, object]]:
    """{"apps": {"started": ["web"]}} -> [("apps.started", "web")] for key/value output."""
    pairs = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            pairs.extend(_flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple, dict)) and not value:
            pairs.append((name, "-"))
        elif isinstance(value, (list, tuple)) and not any(isinstance(item, (dict, list)) for item in value):
            pairs.append((name, ", ".join(_scalar(item) for item in value)))
        else:
            pairs.append((name, _scalar(value)))
    return pairs


def _table(rows: list[dict], preferred: list[Column], colour: bool) -> str:
    """The preferred columns the rows have (--json shows every field); without any, every key."""
    present = {key for row in rows for key in row}
    columns = [column for column in preferred if column.key in present]
    if not columns:
        columns = [Column(key, key, format=_scalar) for key in dict.fromkeys(k for row in rows for k in row)]
    return render_table(columns or preferred, rows, colour)


INSTANCE_COLUMNS = [
    Column("name", "name"),
    Column("app", "app"),
    Column("status", "status", state=True),
    Column("pid", "pid", align="right"),
    Column("port", "port", align="right"),
    Column("uptime", "uptime", align="right", format=format_duration),
    Column("restarts", "restarts", align="right"),
    Column("cpu", "cpu", align="right", format=format_percent),
    Column("memory", "memory", align="right", format=format_bytes),
]
LISTENER_COLUMNS = [
    Column("host", "host"),
    Column("port", "port", align="right"),
    Column("type", "type"),
    Column("strategy", "strategy"),
    Column("tls", "tls"),
    Column("up", "backends_up", align="right"),
    Column("total", "backends_total", align="right"),
    Column("active", "active", align="right"),
    Column("req/s", "requests_per_second", align="right"),
]
BACKEND_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
    Column("weight", "weight", align="right"),
    Column("score", "score", align="right"),  # performance_based listeners only
    Column("active", "active", align="right"),
    Column("breaker", "breaker", state=True),
    Column("requests", "requests", align="right"),
    Column("req/s", "requests_per_second", align="right"),
]
HEALTH_COLUMNS = [
    Column("backend", "backend"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
    Column("last check", "last_check", align="right", format=format_ago),
    Column("failures", "consecutive_failures", align="right"),
    Column("check", "check"),
    Column("last error", "last_error"),
]
HEALTH_TEST_COLUMNS = [
    Column("backend", "backend"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("result", "result", state=True),
    Column("check", "check"),
    Column("error", "error"),
]
TRAFFIC_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("requests 1m", "requests_last_minute", align="right"),
    Column("share 1m", "share_last_minute", align="right", format=format_percent),
    Column("requests", "requests_total", align="right"),
    Column("share", "share_total", align="right", format=format_percent),
]
REGION_TRAFFIC_COLUMNS = [
    Column("client region", "client_region"),
    Column("listener", "listener", align="right"),
    Column("requests 1m", "requests_last_minute", align="right"),
    Column("share 1m", "share_last_minute", align="right", format=format_percent),
    Column("requests", "requests_total", align="right"),
    Column("share", "share_total", align="right", format=format_percent),
]
STATS_LISTENER_COLUMNS = [
    Column("port", "port", align="right"),
    Column("type", "type"),
    Column("requests", "requests", align="right"),
    Column("errors", "errors", align="right"),
    Column("p50", "p50", align="right", format=format_ms),
    Column("p95", "p95", align="right", format=format_ms),
    Column("p99", "p99", align="right", format=format_ms),
    Column("req/s", "requests_per_second", align="right"),
]
DRAIN_COLUMNS = [
    Column("address", "address"),
    Column("instance", "instance"),
    Column("listener", "listener", align="right"),
    Column("state", "state", state=True),
]


# ---------------------------------------------------------------------------------------------
# Config loading in the CLI process (so a bad config exits 2 and starts nothing)


def _load_config(path: str):
    from pmdaemon.config.loader import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageError(f"invalid config {path}: {exc}\n"
                         f"fix the file and check it with `pmdaemon validate {path}`") from None
    except OSError as exc:
        raise UsageError(f"cannot read config {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# Daemon lifecycle from the CLI side


def _home() -> Path:
    from pmdaemon.control.daemon import default_home
    return default_home()


def _spawn_daemon(client: ControlClient) -> bool:
    """Make sure a daemon runs for this home. True if this call started it."""
    from pmdaemon.control.daemon import HomePaths, prepare_home

    try:
        client.call("ping", timeout=5)
        return False
    except DaemonNotRunning:
        pass
    paths = HomePaths(client.home)
    prepare_home(paths)
    with open(paths.log_file, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "pmdaemon.control.daemon", "--home", str(paths.home)],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            cwd=paths.home, start_new_session=True)
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while True:
        try:
            client.call("ping", timeout=5)
            return True
        except DaemonNotRunning:
            pass
        returncode = process.poll()
        if returncode is not None:
            try:  # it lost a race against another `pmdaemon start`: use the winner
                client.call("ping", timeout=5)
                return False
            except DaemonNotRunning:
                raise CommandFailed(f"the daemon exited at start (status {returncode}):\n"
                                    f"{_tail(paths.log_file)}") from None
        if time.monotonic() > deadline:
            raise CommandFailed(f"the daemon (pid {process.pid}) did not open {client.path} within "
                                f"{DAEMON_START_TIMEOUT:g} s; see {paths.log_file}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    """Wait for a process (not our child) to exit. A pidfd becomes readable at exit."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(pidfd)


def _run_foreground(config, as_json: bool) -> int:
    from pmdaemon.control.daemon import AlreadyRunning, Daemon, configure_logging, prepare_home

    daemon = Daemon(_home())
    try:
        prepare_home(daemon.paths)
        configure_logging(daemon.paths, foreground=True)
        daemon.acquire()
    except AlreadyRunning as exc:
        _error(str(exc))
        return EXIT_RUNTIME
    except OSError as exc:
        _error(_os_error_text(exc))
        return EXIT_RUNTIME
    daemon.install_signal_handlers()
    try:
        try:
            report = daemon.start(config)
        except (OSError, RuntimeError) as exc:
            _error(f"could not start {config.source}: {exc}")
            return EXIT_RUNTIME
        _print_start_report(report, as_json, foreground=True)
        sys.stdout.flush()
        daemon.wait()
    finally:
        daemon.shutdown()
    return 0


def _print_start_report(report: dict, as_json: bool, foreground: bool = False) -> None:
    if as_json:
        _print_json(report)
        return
    started = ", ".join(report["started"]) or "nothing new"
    print(f"started: {started}")
    if report["unchanged_apps"]:
        print(f"already running, left alone: {', '.join(report['unchanged_apps'])}")
    if report["listeners"]:
        print(f"listeners: {', '.join(report['listeners'])}")
    if report["unchanged_listeners"]:
        print(f"listeners already running, left alone: {', '.join(report['unchanged_listeners'])}")
    if foreground:
        print("running in the foreground; Ctrl-C or SIGTERM stops everything")


# ---------------------------------------------------------------------------------------------
# Commands


def cmd_start(args: dict, client: ControlClient) -> int:
    config = _load_config(args["<config>"])
    if args["--no-daemon"]:
        return _run_foreground(config, args["--json"])
    spawned = _spawn_daemon(client)
    try:
        report = client.call("start", {"config": config.source}, timeout=300)
    except CommandFailed:
        if spawned:  # leave nothing behind: the daemon we started for this config goes too
            _kill_daemon(client)
        raise
    _print_start_report(report, args["--json"])
    return 0


def cmd_validate(args: dict, _client: ControlClient) -> int:
    path = args["<config>"]
    try:
        config = _load_config(path)
    except UsageError as exc:
        if args["--json"]:
            _print_json({"valid": False, "config": path, "error": str(exc).split("\n")[0]})
        raise
    apps = [app.name for app in config.apps]
    listeners = [f"{listener.type}:{listener.host}:{listener.port}" for listener in config.listeners]
    if args["--json"]:
        _print_json({"valid": True, "config": config.source, "apps": apps, "listeners": listeners})
    else:
        print(f"{path}: valid ({len(apps)} app(s): {', '.join(apps) or '-'}; "
              f"{len(listeners)} listener(s): {', '.join(listeners) or '-'})")
    return 0


def cmd_list(args: dict, client: ControlClient) -> int:
    try:
        rows = client.call("list")
    except DaemonNotRunning:
        rows = []
    if args["--json"]:
        _print_json(rows)
    else:
        print(render_table(INSTANCE_COLUMNS, rows, use_colour(sys.stdout), empty="no instances running"))
    return 0


def _target_cmd(verb: str, past: str):
    def command(args: dict, client: ControlClient) -> int:
        target = args["<target>"]
        names = client.call(verb, {"target": target}, timeout=300)
        if args["--json"]:
            _print_json({"target": target, past: names})
        else:
            print(f"{past}: {', '.join(names)}" if names else f"nothing to {verb}")
        return 0
    command.__name__ = f"cmd_{verb}"
    return command


cmd_stop = _target_cmd("stop", "stopped")
cmd_restart = _target_cmd("restart", "restarted")
cmd_delete = _target_cmd("delete", "deleted")


def _print_result(result: object, as_json: bool) -> None:
    """Generic output for commands whose result shape the runtime decides."""
    if as_json:
        _print_json(result)
    elif isinstance(result, dict):
        print(render_pairs(_flatten(result)))
    elif isinstance(result, list) and all(isinstance(row, dict) for row in result):
        print(_table(result, [], use_colour(sys.stdout)))
    else:
        print(result)


def cmd_reload(args: dict, client: ControlClient) -> int:
    if args["--config"]:
        config = _load_config(args["--config"])
        result = client.call("reload_config", {"config": config.source}, timeout=300)
    else:
        result = client.call("reload", {"target": args["<target>"]}, timeout=600)
    _print_result(result, args["--json"])
    return 0


def _int_arg(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name} must be a whole number, got '{text}'") from None
    if value < minimum:
        raise UsageError(f"{name} must be at least {minimum}, got {value}")
    return value


def cmd_scale(args: dict, client: ControlClient) -> int:
    n = _int_arg(args["<n>"], "<n> (the number of instances)", 0)
    result = client.call("scale", {"app": args["<app>"], "n": n}, timeout=300)
    _print_result(result, args["--json"])
    return 0


def cmd_logs(args: dict, client: ControlClient) -> int:
    lines = _int_arg(args["--lines"], "--lines", 0)
    logs = client.call("logs", {"app": args["<app>"], "lines": lines})
    if args["--json"]:
        _print_json(logs)
        return 0
    for instance, streams in logs.items():
        for stream in ("out", "err"):
            path = streams.get(f"{stream}_path") or f"{instance} {stream}"
            print(f"==> {path} (last {lines} lines) <==")
            text = streams.get(stream) or ""
            print(text.rstrip("\n") if text else "(empty)")
            print()
    return 0


def _kill_daemon(client: ControlClient) -> dict | None:
    """Ask the daemon to stop everything and exit, then wait until its pid is gone."""
    try:
        result = client.call("kill", timeout=KILL_TIMEOUT)
    except DaemonNotRunning:
        return None
    if not _wait_pid_gone(result["pid"], KILL_TIMEOUT):
        raise CommandFailed(f"the daemon (pid {result['pid']}) is still running {KILL_TIMEOUT:g} s after "
                            f"`kill`; see {client.home / 'daemon.log'}")
    return result


def cmd_kill(args: dict, client: ControlClient) -> int:
    result = _kill_daemon(client)
    if args["--json"]:
        _print_json({"killed": result is not None, "pid": result and result["pid"],
                     "instances": result["instances"] if result else []})
    elif result is None:
        print(f"no daemon running for PMDAEMON_HOME={client.home}")
    else:
        stopped = ", ".join(result["instances"]) or "no instances"
        print(f"daemon (pid {result['pid']}) stopped, with {stopped}")
    return 0


# -- lb ------------------------------------------------------------------------------------------


def _lb_table(cmd: str, columns: list[Column]):
    def command(args: dict, client: ControlClient) -> int:
        rows = client.call(cmd)
        if args["--json"]:
            _print_json(rows)
        else:
            print(_table(rows, columns, use_colour(sys.stdout)))
        return 0
    command.__name__ = f"cmd_{cmd}"
    return command


cmd_lb_status = _lb_table("lb_status", LISTENER_COLUMNS)
cmd_lb_health = _lb_table("lb_health", HEALTH_COLUMNS)
cmd_lb_backends = _lb_table("lb_backends", BACKEND_COLUMNS)


def cmd_lb_traffic(args: dict, client: ControlClient) -> int:
    """Shares per backend; a geographic listener's rows by client region follow in a second table."""
    rows = client.call("lb_traffic")
    if args["--json"]:
        _print_json(rows)
        return 0
    colour = use_colour(sys.stdout)
    backends = [row for row in rows if "client_region" not in row]
    regions = [dict(row, client_region=row["client_region"] or "unknown") for row in rows if "client_region" in row]
    print(_table(backends, TRAFFIC_COLUMNS, colour))
    if regions:
        print()
        print(render_table(REGION_TRAFFIC_COLUMNS, regions, colour))
    return 0


def cmd_lb_stats(args: dict, client: ControlClient) -> int:
    stats = client.call("lb_stats")
    if args["--json"]:
        _print_json(stats)
    else:
        print(render_stats(stats, use_colour(sys.stdout)))
    return 0


def render_stats(stats: dict, colour: bool) -> str:
    """Totals as key/value lines, then one row per listener."""
    responses = stats.get("responses") or {}
    latency = stats.get("latency_ms") or {}
    errors_by_kind = {kind: n for kind, n in (stats.get("errors_by_kind") or {}).items() if n}
    errors = stats.get("errors")
    if errors_by_kind:
        errors = f"{errors} ({', '.join(f'{kind} {n}' for kind, n in errors_by_kind.items())})"
    pairs = [
        ("requests", stats.get("requests")),
        ("responses", "  ".join(f"{cls} {n}" for cls, n in responses.items()) or None),
        ("errors", errors),
        ("bytes in/out", f"{format_bytes(stats.get('bytes_in') or 0)} / {format_bytes(stats.get('bytes_out') or 0)}"),
        ("latency", "  ".join(f"{q} {format_ms(latency[q])}" for q in ("p50", "p95", "p99") if latency.get(q) is not None)
         or None),
        ("requests/s", None if stats.get("requests_per_second") is None else f"{stats['requests_per_second']:.2f}"),
        ("active connections", stats.get("active_connections")),
    ]
    listeners = [dict(row, **(row.get("latency_ms") or {})) for row in stats.get("listeners") or []]
    text = render_pairs(pairs)
    if listeners:
        text += "\n\n" + render_table(STATS_LISTENER_COLUMNS, listeners, colour)
    return text


def cmd_lb_config(args: dict, client: ControlClient) -> int:
    config = client.call("lb_config")
    if args["--json"]:
        _print_json(config)
    else:
        print(json.dumps(config, indent=2, default=str))
    return 0


def cmd_lb_health_check(args: dict, client: ControlClient) -> int:
    results = client.call("lb_health_check_test", timeout=300)
    if args["--json"]:
        _print_json(results)
    else:
        rows = [dict(row, result="pass" if row.get("ok") else "fail") for row in results]
        print(render_table(HEALTH_TEST_COLUMNS, rows, use_colour(sys.stdout), empty="no health checks configured"))
    failed = [row for row in results if not row.get("ok")]
    if failed and not args["--json"]:
        _error(f"{len(failed)} of {len(results)} health check(s) failed")
    return EXIT_RUNTIME if failed else 0


def cmd_lb_metrics(args: dict, client: ControlClient) -> int:
    detailed = bool(args["--detailed"])
    if args["--json"]:
        _print_json(client.call("lb_metrics", {"detailed": detailed, "samples": True}))
    else:
        sys.stdout.write(client.call("lb_metrics", {"detailed": detailed}))
    return 0


def _lb_backend_cmd(cmd: str, past: str):
    def command(args: dict, client: ControlClient) -> int:
        result = client.call(cmd, {"backend": args["<backend>"]})
        if args["--json"]:
            _print_json(result)
        else:
            print(f"{past} {args['<backend>']}:")
            print(render_table(DRAIN_COLUMNS, result.get("backends") or [], use_colour(sys.stdout)))
        return 0
    command.__name__ = f"cmd_{cmd}"
    return command


cmd_lb_drain = _lb_backend_cmd("lb_drain", "draining")
cmd_lb_enable = _lb_backend_cmd("lb_enable", "enabled")


def cmd_lb_export(args: dict, client: ControlClient) -> int:
    kind = "nginx" if args["nginx"] else "haproxy"
    text = client.call("lb_export", {"kind": kind})
    if args["--json"]:
        _print_json({"format": kind, "config": text})
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


def cmd_lb_monitor(args: dict, client: ControlClient) -> int:
    try:
        interval = float(args["--interval"])
    except ValueError:
        raise UsageError(f"--interval must be a number of seconds, got '{args['--interval']}'") from None
    if interval <= 0:
        raise UsageError("--interval must be more than 0 seconds")
    count = _int_arg(args["--count"], "--count", 1) if args["--count"] is not None else None
    view = MonitorView(interval)
    terminal = sys.stdout.isatty() and not args["--json"]
    colour = use_colour(sys.stdout)
    frames = 0
    if terminal:
        sys.stdout.write("\x1b[?1049h\x1b[?25l")  # alternate screen, hide cursor
    try:
        while count is None or frames < count:
            if frames:
                time.sleep(interval)
            frame = client.call("lb_monitor")
            if args["--json"]:
                print(json.dumps(frame, default=str))
            elif terminal:
                sys.stdout.write("\x1b[H\x1b[2J" + view.render(frame, colour) + "\n")
            else:
                sys.stdout.write(("\n" if frames else "") + view.render(frame, colour) + "\n")
            sys.stdout.flush()
            frames += 1
    except KeyboardInterrupt:
        pass
    finally:
        if terminal:
            sys.stdout.write("\x1b[?25h\x1b[?1049l")  # show cursor, leave the alternate screen
            sys.stdout.flush()
    return 0


def _dispatch(args: dict):
    if args["lb"]:
        for name in ("status", "health", "stats", "monitor", "config", "backends", "traffic",
                     "metrics", "drain", "enable", "export"):
            if args[name]:
                return globals()[f"cmd_lb_{name}"]
        return cmd_lb_health_check
    for name in ("start", "validate", "list", "stop", "restart", "reload", "scale", "delete", "logs", "kill"):
        if args[name]:
            return globals()[f"cmd_{name}"]
    raise AssertionError(f"docopt matched no command: {args}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = docopt(__doc__, argv=sys.argv[1:] if argv is None else argv, version=__version__)
    except DocoptExit as exc:
        print(exc, file=sys.stderr)
        print("run `pmdaemon --help` for the commands and their options", file=sys.stderr)
        return EXIT_USAGE
    client = ControlClient(_home())
    try:
        return _dispatch(args)(args, client)
    except UsageError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except CommandFailed as exc:
        _error(str(exc))
        return exc.exit
    except OSError as exc:  # e.g. PMDAEMON_HOME not writable
        _error(_os_error_text(exc))
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pmdaemon lb metrics | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

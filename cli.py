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
import sys
import time
from pathlib import Path

from docopt import DocoptExit, docopt

from pmdaemon import __version__
from pmdaemon.control.launcher import ensure_daemon, kill_daemon, run_foreground
from pmdaemon.control.protocol import EXIT_RUNTIME, EXIT_USAGE, CommandFailed, ControlClient, DaemonNotRunning
from pmdaemon.control.resultviews import (
    BACKEND_COLUMNS,
    DRAIN_COLUMNS,
    HEALTH_COLUMNS,
    HEALTH_TEST_COLUMNS,
    INSTANCE_COLUMNS,
    LISTENER_COLUMNS,
    REGION_TRAFFIC_COLUMNS,
    TRAFFIC_COLUMNS,
    flatten,
    render_stats,
    result_table,
)
from pmdaemon.control.tables import Column, MonitorView, render_pairs, render_table, use_colour


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
# The daemon of this home (control/launcher.py spawns, runs and kills it)


def _home() -> Path:
    from pmdaemon.control.daemon import default_home
    return default_home()


def _run_foreground(config, as_json: bool) -> int:
    def on_started(report: dict) -> None:
        _print_start_report(report, as_json, foreground=True)
        sys.stdout.flush()

    run_foreground(_home(), config, on_started)
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
    spawned = ensure_daemon(client)
    try:
        report = client.call("start", {"config": config.source}, timeout=300)
    except CommandFailed:
        if spawned:  # leave nothing behind: the daemon we started for this config goes too
            kill_daemon(client)
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
        print(render_pairs(flatten(result)))
    elif isinstance(result, list) and all(isinstance(row, dict) for row in result):
        print(result_table(result, [], use_colour(sys.stdout)))
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


def cmd_kill(args: dict, client: ControlClient) -> int:
    result = kill_daemon(client)
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
            print(result_table(rows, columns, use_colour(sys.stdout)))
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
    print(result_table(backends, TRAFFIC_COLUMNS, colour))
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

"""AlbRegistrar: keeps an AWS ALB target group's targets in step with the instances of apps that have `aws.alb`.

Theory of operation
-------------------
- The registrar is subscribed to the ProcessSupervisor's InstanceEvents. An instance of an app with
  `aws.alb` is *wanted* in that app's target group while it is `online` and not drained. The actor
  remembers what it registered and, after every change, deregisters the registered targets no
  longer wanted (stopping, stopped, crashed, errored, deleted, scaled away, drained) and registers
  the wanted ones that are missing. ALB's own health checks then decide when a registered target
  gets traffic, so an instance is registered as soon as it is online (PM2's `online`: its process
  runs), not when it first answers.
- A target is `{Id: aws.alb.target_id, Port: the instance's port}`. `target_id` is an IP address
  (an `ip` target group) or an EC2 instance id (`instance` target group); by default it is this
  host's primary IPv4 address. An instance without a port (no `increment_var`) is registered
  without one, so ALB uses the target group's port.
- The first time it sees a target group, the registrar sets the group's health check path and its
  deregistration delay (`deregistration_delay.timeout_seconds`) to the config's
  `health_check_path` and `deregistration_delay`.
- `lb drain <instance>` deregisters at once: ALB then drains the target (finishes its in-flight
  requests, sends no new ones) for `deregistration_delay`. `set_draining` returns that delay so a
  caller about to stop the instance (reload, scale down) can let ALB's draining finish first.
- Every AWS call (boto3's elbv2 client; boto3 is the optional `aws` extra and is imported only
  when a config uses `aws.alb`) runs on this actor's thread: the control plane, never the I/O loop.
  A failed call leaves the wanted state as it is and is retried with backoff (Timers).
- Endpoint: the `PMDAEMON_AWS_ENDPOINT_URL` environment variable, else `aws.alb.endpoint_url`,
  else AWS itself. Region: the one in the target group ARN. Credentials: boto3's usual chain.
- Planned stops deregister first (`deregister_and_wait`): `pmdaemon stop/restart/delete`, the rolling
  `reload` (per instance, after pmdaemon's own drain) and `scale` down take the instances' targets
  out, then wait on the calling control thread until ALB has drained them (the deregistration delay,
  less what already passed since an earlier `lb drain`; at most PLANNED_WAIT_MAX so a command
  answers within the CLI's timeouts), and only then stop them. Such a target stays out until the
  instance's status next changes (stopping, ...), so a restarted instance is registered again once
  online; `lb enable` also puts it back. A crash cannot wait: its target is deregistered after.
- Daemon shutdown (`pmdaemon kill`, SIGTERM): every target is deregistered at once and the daemon
  waits for the longest deregistration delay still running, at most SHUTDOWN_WAIT_MAX (the CLI gives
  a `kill` 60 s, which must also cover the instances' kill_timeout), then stops the instances.
- When the actor stops it deregisters whatever is still registered.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pykka

from pmdaemon.actors.messages import InstanceEvent, Tick
from pmdaemon.config.model import AppConfig, Config
from pmdaemon.control.timers import Timers
from pmdaemon.states import InstanceStatus

log = logging.getLogger(__name__)

ENDPOINT_ENV = "PMDAEMON_AWS_ENDPOINT_URL"
ASK_TIMEOUT = 30.0  # seconds; `watch` makes AWS calls (target group settings)
RETRY_FIRST = 1.0  # seconds before retrying a failed AWS call; doubles up to RETRY_MAX
RETRY_MAX = 60.0
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 15.0
PLANNED_WAIT_MAX = 60.0  # seconds a planned stop waits for ALB's draining, at most (see the docstring)
SHUTDOWN_WAIT_MAX = 30.0  # seconds daemon shutdown waits for it, at most
MISSING_BOTO3 = ("{where}: registering instances in an ALB target group needs boto3, which is not installed; "
                 "install the AWS extra: pip install 'pmdaemon[aws]' (or pip install boto3)")


@dataclass(frozen=True)
class AlbSettings:
    """One app's `aws.alb` block (config/loader.py parses it into AppConfig.aws_alb)."""

    target_group_arn: str
    health_check_path: str
    deregistration_delay: float  # seconds
    endpoint_url: str | None
    target_id: str | None

    @classmethod
    def of(cls, alb: Mapping[str, object]) -> AlbSettings:
        return cls(str(alb["target_group_arn"]), str(alb["health_check_path"]), float(alb["deregistration_delay"]),
                   alb.get("endpoint_url"), alb.get("target_id"))

    @property
    def region(self) -> str:
        return self.target_group_arn.split(":")[3]

    @property
    def endpoint(self) -> str | None:
        return os.environ.get(ENDPOINT_ENV) or self.endpoint_url


@dataclass(frozen=True)
class Target:
    group_arn: str
    id: str
    port: int | None

    def for_aws(self) -> dict:
        return {"Id": self.id} if self.port is None else {"Id": self.id, "Port": self.port}

    @property
    def address(self) -> str:
        return self.id if self.port is None else f"{self.id}:{self.port}"


@dataclass
class _Instance:
    app: str
    status: InstanceStatus
    port: int | None


def default_target_id() -> str:
    """This host's primary IPv4 address: the source address the kernel picks for traffic leaving the
    host (a UDP connect only consults the routing table, it sends nothing); 127.0.0.1 without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: any off-host address does
            address = probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"
    return address if address != "0.0.0.0" else "127.0.0.1"


def require_boto3(where: str) -> None:
    """Raise RuntimeError naming the config path when boto3 cannot be imported."""
    try:
        importlib.import_module("boto3")
    except ImportError:
        raise RuntimeError(MISSING_BOTO3.format(where=where)) from None


def attach(current: pykka.ActorRef | None, config: Config, supervisor: pykka.ActorRef,
           timers: Timers) -> pykka.ActorRef | None:
    """The Runtime's hook: the registrar for `config`'s `aws.alb` apps, started and subscribed the first
    time a config has any. Raises RuntimeError (before anything starts) if boto3 is missing."""
    apps = [app for app in config.apps if app.aws_alb]
    if not apps:
        return current
    if current is None:
        require_boto3(f"apps[{config.apps.index(apps[0])}].aws.alb")
        current = AlbRegistrar.start(timers)
        current.proxy().watch(apps).get(timeout=ASK_TIMEOUT)
        supervisor.proxy().subscribe(current).get(timeout=ASK_TIMEOUT)
    else:
        current.proxy().watch(apps).get(timeout=ASK_TIMEOUT)
    return current


def set_draining(registrar: pykka.ActorRef | None, backend: str, drain: bool) -> list[dict]:
    """The Runtime's hook for `lb drain/enable`: the ALB targets `backend` names ([] if none)."""
    if registrar is None:
        return []
    return registrar.proxy().set_draining(backend, drain).get(timeout=ASK_TIMEOUT)


def deregister_and_wait(registrar: pykka.ActorRef | None, instance_names: Iterable[str],
                        wait: Callable[[float], object] = time.sleep, limit: float = PLANNED_WAIT_MAX) -> float:
    """Before a planned stop: deregister these instances' targets, then `wait` (on the caller's thread)
    until ALB has drained them, at most `limit` seconds. Returns the seconds waited (0 without ALB targets)."""
    names = list(instance_names)
    if registrar is None or not names:
        return 0.0
    seconds = min(limit, registrar.proxy().deregister(names).get(timeout=ASK_TIMEOUT))
    if seconds > 0:
        log.info("ALB: waiting %.3g s for the targets of %s to drain before stopping them", seconds, ", ".join(names))
        wait(seconds)
    return seconds


class AlbRegistrar(pykka.ThreadingActor):
    def __init__(self, timers: Timers):
        super().__init__()
        self._timers = timers
        self._apps: dict[str, AlbSettings] = {}
        self._groups: dict[str, AlbSettings] = {}  # target group ARN -> the settings that name it (kept)
        self._instances: dict[str, _Instance] = {}
        self._drained: set[str] = set()
        self._leaving: set[str] = set()  # about to be stopped: out of the group until their status changes
        self._registered: set[Target] = set()
        self._deregistered_at: dict[Target, float] = {}  # time.monotonic() of each target's last deregistration
        self._configured_groups: set[str] = set()
        self._clients: dict[tuple[str, str | None], object] = {}
        self._default_id: str | None = None
        self._retry_delay = RETRY_FIRST
        self._retry_pending = False
        self._last_error: str | None = None

    # --- asked by the Runtime ---

    def watch(self, apps: Iterable[AppConfig]) -> None:
        """Register the instances of these apps (their `aws.alb` settings replace earlier ones)."""
        for app in apps:
            settings = self._apps[app.name] = AlbSettings.of(app.aws_alb)
            self._groups[settings.target_group_arn] = settings
        for settings in self._apps.values():
            self._configure_group(settings)
        self._reconcile()

    def set_draining(self, backend: str, drain: bool) -> list[dict]:
        """Drain (deregister) or enable the instances `backend` names: an instance name or the target's
        `host:port` (127.0.0.1, localhost or the target id). Returns one row per matching instance."""
        names = self._match(backend)
        for name in names:
            if drain:
                self._drained.add(name)
            else:
                self._drained.discard(name)
                self._leaving.discard(name)
        self._reconcile()
        return [self._row(name) for name in names]

    def deregister(self, names: list[str]) -> float:
        """A planned stop of these instances: take their targets out now. Returns how long ALB still drains
        the one that left last (its deregistration delay from the moment it left; 0 if none was registered)."""
        known = [name for name in names if name in self._instances]
        self._leaving.update(known)
        self._reconcile()
        now = time.monotonic()
        remaining = [self._deregistered_at[target] + self._apps[self._instances[name].app].deregistration_delay - now
                     for name in known if self._instances[name].status == InstanceStatus.ONLINE
                     and (target := self._target(name)) in self._deregistered_at]
        return max([0.0, *remaining])

    # --- messages ---

    def on_receive(self, message: object) -> None:
        match message:
            case InstanceEvent(name=name, app=app, status=status, port=port, removed=removed):
                if app not in self._apps:
                    return
                if removed:
                    self._instances.pop(name, None)
                    self._drained.discard(name)
                else:
                    self._instances[name] = _Instance(app, status, port)
                if removed or status != InstanceStatus.ONLINE:
                    self._leaving.discard(name)  # its stop began: back in the group once online again
                self._reconcile()
            case Tick(key="retry"):
                self._retry_pending = False
                for settings in self._apps.values():
                    self._configure_group(settings)
                self._reconcile()

    def on_stop(self) -> None:
        """Leave nothing registered behind (the instances stop with the daemon)."""
        self._instances.clear()
        self._retry_pending = True  # no retries scheduled from here on
        self._reconcile()

    # --- the work ---

    def _target(self, name: str) -> Target:
        instance = self._instances[name]
        settings = self._apps[instance.app]
        if settings.target_id is None and self._default_id is None:
            self._default_id = default_target_id()
        return Target(settings.target_group_arn, settings.target_id or self._default_id, instance.port)

    def _wanted(self) -> set[Target]:
        return {self._target(name) for name, instance in self._instances.items()
                if instance.status == InstanceStatus.ONLINE and name not in self._drained and name not in self._leaving}

    def _reconcile(self) -> None:
        wanted = self._wanted()
        stale = [t for t in self._registered if t not in wanted]
        missing = [t for t in wanted if t not in self._registered]
        ok = True
        for arn, targets in _by_group(stale).items():
            if self._call("deregister_targets", arn, targets, tolerate="InvalidTarget"):
                self._registered.difference_update(targets)
                self._deregistered_at.update(dict.fromkeys(targets, time.monotonic()))
            else:
                ok = False
        for arn, targets in _by_group(missing).items():
            if self._call("register_targets", arn, targets):
                self._registered.update(targets)
                for target in targets:
                    self._deregistered_at.pop(target, None)
            else:
                ok = False
        if ok:
            self._retry_delay = RETRY_FIRST
        else:
            self._schedule_retry()

    def _call(self, operation: str, arn: str, targets: list[Target], tolerate: str | None = None) -> bool:
        """One elbv2 call for `targets`; False (logged) if it failed. `tolerate` is an error code that
        means the change is already in place (AWS ignores deregistering an unknown target; moto does not)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            call = getattr(self._client(self._groups[arn]), operation)
            call(TargetGroupArn=arn, Targets=[t.for_aws() for t in targets])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == tolerate:
                return True
            return self._failed(f"{operation} {', '.join(t.address for t in targets)} in {arn}: {exc}")
        except BotoCoreError as exc:
            return self._failed(f"{operation} {', '.join(t.address for t in targets)} in {arn}: {exc}")
        log.info("%s %s in %s", operation, ", ".join(t.address for t in targets), arn)
        self._last_error = None
        return True

    def _configure_group(self, settings: AlbSettings) -> None:
        """Give the target group the config's health check path and deregistration delay, once."""
        from botocore.exceptions import BotoCoreError, ClientError

        arn = settings.target_group_arn
        if arn in self._configured_groups:
            return
        client = self._client(settings)
        try:
            client.modify_target_group(TargetGroupArn=arn, HealthCheckPath=settings.health_check_path)
            client.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
                {"Key": "deregistration_delay.timeout_seconds", "Value": str(round(settings.deregistration_delay))}])
        except (ClientError, BotoCoreError) as exc:
            self._failed(f"setting the health check path and deregistration delay of {arn}: {exc}")
            self._schedule_retry()
            return
        self._configured_groups.add(arn)

    def _client(self, settings: AlbSettings):
        key = (settings.region, settings.endpoint)
        if key not in self._clients:
            import boto3
            from botocore.config import Config as BotoConfig

            self._clients[key] = boto3.client(
                "elbv2", region_name=settings.region, endpoint_url=settings.endpoint,
                config=BotoConfig(connect_timeout=CONNECT_TIMEOUT, read_timeout=READ_TIMEOUT,
                                  retries={"mode": "standard", "max_attempts": 3}))
        return self._clients[key]

    def _failed(self, what: str) -> bool:
        self._last_error = what
        log.warning("ALB: %s (retrying in %g s)", what, self._retry_delay)
        return False

    def _schedule_retry(self) -> None:
        if self._retry_pending:
            return
        self._retry_pending = True
        self._timers.tell_later(self._retry_delay, self.actor_ref, Tick("retry"))
        self._retry_delay = min(RETRY_MAX, self._retry_delay * 2)

    # --- helpers ---

    def _match(self, backend: str) -> list[str]:
        wanted = backend.strip()
        if wanted in self._instances:
            return [wanted]
        host, _, port = wanted.rpartition(":")
        if not port.isdigit():
            return []
        return [name for name in sorted(self._instances) if self._instances[name].port == int(port)
                and host in ("127.0.0.1", "localhost", self._target(name).id)]

    def _row(self, name: str) -> dict:
        instance = self._instances.get(name)
        target = self._target(name) if instance else None
        settings = self._apps[instance.app] if instance else None
        return {
            "instance": name,
            "target": target.address if target else None,
            "target_group_arn": target.group_arn if target else None,
            "endpoint": settings.endpoint if settings else None,
            "registered": target in self._registered if target else False,
            "draining": name in self._drained,
            "status": instance.status if instance else None,
            "deregistration_delay": settings.deregistration_delay if settings else None,
            "error": self._last_error,
        }


def _by_group(targets: Iterable[Target]) -> dict[str, list[Target]]:
    groups: dict[str, list[Target]] = defaultdict(list)
    for target in targets:
        groups[target.group_arn].append(target)
    return groups

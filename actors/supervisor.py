"""ProcessSupervisor: runs every app instance as its own process group and keeps it running (PM2's job).

Theory of operation
-------------------
Each instance (`<app>-<i>`) is a record owned by the actor thread: its `InstanceSpec`, its status,
its current process, what the operator wants of it (`goal`: run, stop or remove) and its restart
history (control/restartpolicy.py). Statuses:

  launching        being spawned; becomes online as soon as the spawn succeeds
  online           its process runs. Like PM2, an instance is online from a successful spawn,
                   whether or not it listens yet; `min_uptime` only decides whether a crash counts
                   as unstable (the balancer waits for the port or the health check anyway).
  stopping         SIGTERM went to its process group; SIGKILL follows after `kill_timeout`
  stopped          no process, on request (or after an exit with `autorestart: false`)
  waiting restart  crashed; `restart_delay` or the exponential backoff is running
  errored          not restarted: `max_restarts` unstable restarts, its port already in use, or a
                   spawn failure (missing interpreter); `instances()` says why in `error`

The actor never blocks on a process (except `stop_all()`, which is for shutdown). The watcher thread
(control/procwatch.py) tells it `_ChildExited` the moment a process exits, and its timers tell it
`_RestartDue`, `_KillDue` and `_SampleTick`. Each message carries the spawn generation, so a late
message about an older process of the instance is ignored.

When a process exits, whatever is left of its process group and of its known descendants is
killed and reaped first (no grandchild outlives its instance or keeps the port the next spawn
needs). Then: goal remove -> the record is dropped (InstanceEvent removed=True); goal stop ->
stopped; a requested restart -> spawned again at once; otherwise it was a crash and the restart
rules decide: restart (now or after a delay), errored, or stopped.

Before each spawn of an instance that has a port, 127.0.0.1:<port> is probed with a connect: when
something already accepts there, the instance is `errored` with that reason (in `instances()` and its
error log) instead of crash-looping on EADDRINUSE. Every `sample_interval` the process trees are
sampled (RSS over the whole tree against `max_memory_restart`; orphans adopted from a running
instance's group are reaped), and usage subscribers are told the CPU and RSS of the instances whose
app has `monitoring.metrics_collection` (`InstanceUsage`).

stop/restart/delete return at once; `settled(names)` gives a future for "those requests are done".
Every status change is told to each subscriber as an `InstanceEvent`.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from enum import Enum, auto
from pathlib import Path

import psutil
import pykka

from pmdaemon.actors.messages import InstanceEvent, InstanceInfo, InstanceUsage, ScaleResult
from pmdaemon.config.model import AppConfig, InstanceSpec, instance_spec
from pmdaemon.control import proctree
from pmdaemon.control.instancelogs import InstanceLogs
from pmdaemon.control.procwatch import ProcessWatcher, kill_and_reap
from pmdaemon.control.restartpolicy import CrashAction, RestartHistory, RestartRules
from pmdaemon.control.timers import TimerHandle
from pmdaemon.states import InstanceStatus


class Goal(Enum):
    """What the operator wants of an instance: its process running, stopped, or the record gone."""

    RUN = auto()
    STOP = auto()
    REMOVE = auto()


_IDLE = frozenset({InstanceStatus.STOPPED, InstanceStatus.ERRORED})  # no process, none coming


class UnknownTarget(LookupError):
    """No app or instance has the name given to stop/restart/delete/logs/scale."""


def _spec(app: AppConfig, index: int) -> InstanceSpec:
    """Instance `index` of `app`: the loader's spec, or one made the loader's way (scaling up)."""
    return app.instance_specs[index] if index < len(app.instance_specs) else instance_spec(app, index)


@dataclass(frozen=True)
class _ChildExited:
    name: str
    generation: int
    returncode: int


@dataclass(frozen=True)
class _RestartDue:
    name: str
    generation: int


@dataclass(frozen=True)
class _KillDue:
    name: str
    generation: int


@dataclass(frozen=True)
class _SampleTick:
    pass


@dataclass(eq=False)
class _Instance:
    spec: InstanceSpec
    app: AppConfig
    status: InstanceStatus = InstanceStatus.STOPPED
    goal: Goal = Goal.RUN
    process: subprocess.Popen | None = None
    generation: int = 0
    started_at: float = 0.0  # time.monotonic() of the spawn
    restarts: int = 0
    history: RestartHistory = RestartHistory()
    restart_requested: bool = False  # the running process is being stopped to be spawned again
    error: str | None = None
    timer: TimerHandle | None = None  # the pending restart or SIGKILL
    tree: proctree.Tree = field(default_factory=dict)  # last seen process tree, by pid

    @property
    def name(self) -> str:
        return self.spec.name

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class ProcessSupervisor(pykka.ThreadingActor):
    """Spawns, watches, restarts and stops the instances of the configured apps.

    Logs go to `<home>/logs/<instance>-out.log` and `-error.log`, appended across restarts.
    `sample_interval` is how often the process trees are sampled for `max_memory_restart` and for
    usage subscribers.
    """

    def __init__(self, home: Path, sample_interval: float = 5.0):
        super().__init__()
        self._logs = InstanceLogs(Path(home) / "logs")
        self._sample_interval = sample_interval
        self._apps: dict[str, AppConfig] = {}
        self._instances: dict[str, _Instance] = {}
        self._subscribers: list[pykka.ActorRef] = []
        self._usage_subscribers: list[pykka.ActorRef] = []
        self._settle_waiters: list[tuple[frozenset[str], pykka.ThreadingFuture]] = []
        self._watcher = ProcessWatcher()

    # -- actor lifecycle ------------------------------------------------------------------------

    def on_start(self) -> None:
        self._logs.create()
        self._watcher.start()
        self._watcher.call_later(self._sample_interval, lambda: self._tell_self(_SampleTick()))

    def on_stop(self) -> None:
        self._shutdown()

    def on_failure(self, exception_type, exception_value, traceback) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        try:
            self.stop_all()
        finally:
            self._watcher.close()

    # -- public API (through .proxy()) ----------------------------------------------------------

    def start_app(self, app: AppConfig) -> list[str]:
        """Start `app`'s instances; returns the names started.

        An app with a running instance is left alone, except that its stopped or errored instances
        start again. Otherwise the app (re)starts whole with this config.
        """
        mine = self._of_app(app.name)
        if any(i.goal == Goal.RUN and i.status not in _IDLE for i in mine):
            idle = [i for i in mine if i.goal == Goal.RUN and i.status in _IDLE]
            for instance in idle:
                self._start_fresh(instance)
            return [i.name for i in idle]
        self._apps[app.name] = app
        started = [self._launch_index(app, index).name for index in range(app.instances)]
        for instance in mine:
            if instance.spec.index >= app.instances and instance.goal != Goal.REMOVE:
                self._request_stop(instance, Goal.REMOVE)
        return started

    def stop(self, target: str) -> list[str]:
        """Stop an app, an instance or "all": SIGTERM to each process group now, SIGKILL after kill_timeout.

        Returns at once with the names; the instances are `stopping` until their processes are
        gone (see `settled()`).
        """
        selected = self._select(target)
        for instance in selected:
            self._request_stop(instance, Goal.STOP)
        return [i.name for i in selected]

    def restart(self, target: str) -> list[str]:
        """Restart an app, an instance or "all" (stopped and errored ones start again); counted."""
        selected = self._select(target)
        for instance in selected:
            self._request_restart(instance)
        return [i.name for i in selected]

    def restart_instance(self, name: str) -> bool:
        """Restart one instance (health checks, memory limit); False if there is no such instance."""
        instance = self._instances.get(name)
        if instance is None or instance.goal == Goal.REMOVE:
            return False
        self._request_restart(instance)
        return True

    def delete(self, target: str) -> list[str]:
        """Stop and forget an app, an instance or "all"; each removal is told as InstanceEvent(removed=True)."""
        selected = self._select(target)
        if target == "all":
            self._apps.clear()
        else:
            self._apps.pop(target, None)
        for instance in selected:
            self._request_stop(instance, Goal.REMOVE)
        return [i.name for i in selected]

    def scale(self, app: str, count: int) -> ScaleResult:
        """Run `count` instances of `app`: new ones get the next increment_var ports; the highest-numbered go first."""
        if app not in self._apps:
            raise UnknownTarget(f"no app named {app!r}")
        if count < 0:
            raise ValueError(f"cannot scale {app!r} to {count} instances")
        config = self._apps[app] = replace(self._apps[app], instances=count)
        live = sorted((i for i in self._of_app(app) if i.goal != Goal.REMOVE), key=lambda i: i.spec.index)
        removed = [i.name for i in live[count:][::-1]]
        for name in removed:
            self._request_stop(self._instances[name], Goal.REMOVE)
        taken = {i.spec.index for i in live}
        added, index = [], 0
        while len(taken) + len(added) < count:
            if index not in taken:
                added.append(self._launch_index(config, index).name)
            index += 1
        return ScaleResult(app, count, tuple(added), tuple(removed))

    def update_app(self, app: AppConfig) -> None:
        """Use `app`'s config (same name) from the next spawn of each of its instances on; running
        processes are left alone (`reload --config` then restarts them one at a time)."""
        if app.name not in self._apps:
            raise UnknownTarget(f"no app named {app.name!r}")
        self._apps[app.name] = app
        for instance in self._of_app(app.name):
            if instance.goal != Goal.REMOVE:
                instance.app, instance.spec = app, _spec(app, instance.spec.index)

    def stop_all(self) -> list[str]:
        """Stop every instance and wait until their processes are gone (at most the longest kill_timeout + 1 s)."""
        instances = self._ordered()
        for instance in instances:
            if instance.goal == Goal.RUN:
                instance.goal = Goal.STOP
            instance.restart_requested = False
            instance.cancel_timer()
            if instance.process is not None and instance.status != InstanceStatus.STOPPING:
                self._terminate(instance)
        running = [i for i in instances if i.process is not None]
        deadline = time.monotonic() + max((i.app.kill_timeout for i in running), default=0.0)
        for instance in running:
            if not proctree.wait_until(instance.process, deadline):
                proctree.signal_group(instance.process.pid, signal.SIGKILL)
        for instance in running:
            proctree.wait_until(instance.process, time.monotonic() + 1.0)
            self._process_gone(instance)
        for instance in instances:
            if instance.process is None and instance.goal == Goal.STOP and instance.status != InstanceStatus.STOPPED:
                self._set_status(instance, InstanceStatus.STOPPED)
        return [i.name for i in instances]

    def instances(self) -> list[InstanceInfo]:
        """Every instance, in the order `pmdaemon list` shows them (apps in config order, then index)."""
        infos, children = [], proctree.children_by_parent()
        for instance in self._ordered():
            cpu, memory = proctree.tree_usage(self._sample_tree(instance, children))
            running = instance.process is not None
            infos.append(InstanceInfo(
                name=instance.name, app=instance.spec.app, index=instance.spec.index, status=instance.status,
                pid=instance.process.pid if running else None, port=instance.spec.port,
                uptime=round(time.monotonic() - instance.started_at, 3) if running else 0.0,
                restarts=instance.restarts, cpu=round(cpu, 1), memory=memory, error=instance.error,
            ))
        return infos

    def logs(self, app: str, lines: int = 15) -> dict[str, dict]:
        """The last `lines` lines of each selected instance's logs: {instance: {out, err, out_path, err_path}}."""
        return {instance.name: self._logs.last_lines(instance.name, lines) for instance in self._select(app)}

    def subscribe(self, actor_ref: pykka.ActorRef) -> None:
        """Tell `actor_ref` an InstanceEvent now for every instance, then on every status change."""
        self._subscribers.append(actor_ref)
        for instance in self._ordered():
            self._notify(instance, only=actor_ref)

    def subscribe_usage(self, actor_ref: pykka.ActorRef) -> None:
        """Tell `actor_ref` an InstanceUsage every `sample_interval` (app `monitoring.metrics_collection`)."""
        self._usage_subscribers.append(actor_ref)

    def settled(self, names: Collection[str]) -> pykka.ThreadingFuture:
        """A future set (to the `InstanceInfo`s of those still present) once none of `names` is stopping
        or launching.

        stop/restart/delete return at once; a caller that wants PM2's "wait until done" does
        `proxy.settled(names).get().get(timeout)`.
        """
        future = pykka.ThreadingFuture()
        self._settle_waiters.append((frozenset(names), future))
        self._resolve_settled()
        return future

    def pids(self, name: str) -> list[int]:
        """The pids of an instance's process tree (leader first); [] when it is not running."""
        instance = self._instances.get(name)
        return [p.pid for p in self._sample_tree(instance)] if instance else []

    def app_names(self) -> list[str]:
        return list(self._apps)

    # -- messages from the watcher thread -------------------------------------------------------

    def on_receive(self, message: object) -> None:
        if isinstance(message, _ChildExited):
            self._on_child_exited(message)
        elif isinstance(message, _RestartDue):
            instance = self._current(message.name, message.generation)
            if instance is not None and instance.status == InstanceStatus.WAITING_RESTART:
                instance.timer = None
                self._spawn(instance, counted=True)
        elif isinstance(message, _KillDue):
            instance = self._current(message.name, message.generation)
            if instance is not None and instance.process is not None:
                instance.timer = None
                self._logs.note(instance.name, f"still running {instance.app.kill_timeout:g} s after SIGTERM: SIGKILL")
                self._sample_tree(instance)
                proctree.signal_group(instance.process.pid, signal.SIGKILL)
                kill_and_reap(p for p in instance.tree.values() if p.pid != instance.process.pid)
        elif isinstance(message, _SampleTick):
            children = None
            if any(i.process is not None for i in self._instances.values()):
                children = proctree.children_by_parent()
                self._enforce_memory_limits(children)
                leaders = {i.process.pid for i in self._instances.values() if i.process is not None}
                proctree.reap_adopted_zombies(leaders, children)
            self._publish_usage(children)
            self._watcher.call_later(self._sample_interval, lambda: self._tell_self(_SampleTick()))

    def _on_child_exited(self, message: _ChildExited) -> None:
        instance = self._current(message.name, message.generation)
        if instance is None or instance.process is None:
            return  # already handled by stop_all()
        uptime = time.monotonic() - instance.started_at
        self._process_gone(instance)
        if instance.goal != Goal.RUN:
            return
        if instance.restart_requested:
            instance.restart_requested = False
            self._spawn(instance, counted=True)
            return
        verdict, instance.history = instance.history.after_crash(RestartRules.of(instance.app), uptime)
        if verdict.action == CrashAction.RESTART:
            if verdict.delay > 0:
                self._set_status(instance, InstanceStatus.WAITING_RESTART)
                generation = instance.generation
                instance.timer = self._watcher.call_later(
                    verdict.delay, lambda: self._tell_self(_RestartDue(instance.name, generation)))
            else:
                self._spawn(instance, counted=True)
        elif verdict.action == CrashAction.ERRORED:
            instance.error = f"exited with code {message.returncode}; {verdict.reason}"
            self._logs.note(instance.name, instance.error)
            self._set_status(instance, InstanceStatus.ERRORED)
        else:
            self._set_status(instance, InstanceStatus.STOPPED)

    # -- transitions ----------------------------------------------------------------------------

    def _launch_index(self, app: AppConfig, index: int) -> _Instance:
        """Create (or revive a being-removed) instance `index` of `app` and start it."""
        spec = _spec(app, index)
        instance = self._instances.get(spec.name)
        if instance is None:
            instance = self._instances[spec.name] = _Instance(spec, app)
        instance.spec, instance.app, instance.goal = spec, app, Goal.RUN
        if instance.process is None:
            self._start_fresh(instance)
        else:  # its previous process is still being stopped: spawn again when it is gone
            instance.restart_requested = True
        return instance

    def _start_fresh(self, instance: _Instance) -> None:
        instance.history = RestartHistory()
        instance.cancel_timer()
        self._spawn(instance, counted=False)

    def _request_restart(self, instance: _Instance) -> None:
        instance.goal = Goal.RUN
        if instance.process is not None:
            instance.restart_requested = True
            if instance.status != InstanceStatus.STOPPING:
                self._terminate(instance)
        elif instance.status == InstanceStatus.WAITING_RESTART:
            instance.cancel_timer()
            self._spawn(instance, counted=True)
        else:
            instance.history = RestartHistory()
            self._spawn(instance, counted=True)

    def _request_stop(self, instance: _Instance, goal: Goal) -> None:
        instance.goal = goal
        instance.restart_requested = False
        instance.cancel_timer()
        if instance.process is not None:
            if instance.status != InstanceStatus.STOPPING:
                self._terminate(instance)
        elif goal == Goal.REMOVE:
            self._drop(instance)
        else:
            self._set_status(instance, InstanceStatus.STOPPED)

    def _spawn(self, instance: _Instance, counted: bool) -> None:
        spec = instance.spec
        instance.error = None
        if spec.port is not None and proctree.port_in_use(spec.port):
            self._fail(instance, proctree.port_in_use_message(spec.port, spec.name))
            return
        self._set_status(instance, InstanceStatus.LAUNCHING)
        out_path, err_path = self._logs.paths(spec.name)
        try:
            with open(out_path, "ab") as out, open(err_path, "ab") as err:
                env = {**os.environ, **{key: str(value) for key, value in spec.env.items()}}  # numbers allowed
                process = subprocess.Popen(spec.argv, cwd=spec.cwd, env=env,
                                           stdin=subprocess.DEVNULL, stdout=out, stderr=err, process_group=0)
        except OSError as exc:
            self._fail(instance, f"cannot start {' '.join(spec.argv)!r} in {spec.cwd!r}: {exc.strerror or exc}")
            return
        instance.process = process
        instance.generation += 1
        instance.started_at = time.monotonic()
        instance.tree = {}
        if counted:
            instance.restarts += 1
        generation = instance.generation
        self._watcher.watch(process, lambda code: self._tell_self(_ChildExited(spec.name, generation, code)))
        self._set_status(instance, InstanceStatus.ONLINE)

    def _fail(self, instance: _Instance, error: str) -> None:
        instance.error = error
        self._logs.note(instance.name, error)
        self._set_status(instance, InstanceStatus.ERRORED)

    def _terminate(self, instance: _Instance) -> None:
        """SIGTERM the group (and descendants that left it); schedule the SIGKILL."""
        self._sample_tree(instance)
        proctree.signal_group(instance.process.pid, signal.SIGTERM)
        proctree.terminate_strays(instance.tree.values(), pgid=instance.process.pid)
        self._set_status(instance, InstanceStatus.STOPPING)
        generation = instance.generation
        instance.timer = self._watcher.call_later(
            instance.app.kill_timeout, lambda: self._tell_self(_KillDue(instance.name, generation)))

    def _process_gone(self, instance: _Instance) -> None:
        """The leader has exited: kill and reap what is left of its tree, then settle the goal."""
        kill_and_reap(proctree.leftovers(instance.process.pid, instance.tree, proctree.children_by_parent()))
        instance.process = None
        instance.tree = {}
        instance.cancel_timer()
        if instance.goal == Goal.REMOVE:
            self._drop(instance)
        elif instance.goal == Goal.STOP:
            self._set_status(instance, InstanceStatus.STOPPED)

    def _drop(self, instance: _Instance) -> None:
        del self._instances[instance.name]
        instance.status = InstanceStatus.STOPPED
        self._notify(instance, removed=True)
        self._resolve_settled()

    def _set_status(self, instance: _Instance, status: InstanceStatus) -> None:
        if instance.status != status:
            instance.status = status
            self._notify(instance)
        self._resolve_settled()

    # -- resources ------------------------------------------------------------------------------

    def _sample_tree(self, instance: _Instance, children: proctree.Children | None = None) -> list[psutil.Process]:
        """The instance's live process tree (leader first), remembered for the next sample and the stop.

        `children` is a `proctree.children_by_parent()` map; callers sampling many instances make it
        once, as one pass over /proc instead of one per instance.
        """
        if instance.process is None:
            return []
        children = proctree.children_by_parent() if children is None else children
        instance.tree = proctree.sample_tree(instance.process.pid, instance.tree, children)
        return list(instance.tree.values())

    def _publish_usage(self, children: proctree.Children | None) -> None:
        """Tell usage subscribers the usage of every running instance whose app collects metrics.
        `children` is this tick's `proctree.children_by_parent()`, None when no instance runs."""
        if not self._usage_subscribers:
            return
        collected = [i for i in self._ordered() if i.process is not None and i.app.monitoring_enabled
                     and i.app.metrics_collection] if children is not None else []
        usage = InstanceUsage(tuple((i.name, *proctree.tree_usage(self._sample_tree(i, children))) for i in collected))
        for subscriber in list(self._usage_subscribers):
            try:
                subscriber.tell(usage)
            except pykka.ActorDeadError:
                self._usage_subscribers.remove(subscriber)

    def _enforce_memory_limits(self, children: proctree.Children) -> None:
        for instance in self._ordered():
            limit = instance.app.max_memory_restart
            if instance.status != InstanceStatus.ONLINE or not limit:
                continue
            memory = proctree.tree_memory(self._sample_tree(instance, children))
            if memory > limit:
                self._logs.note(instance.name,
                                f"memory {memory} bytes over max_memory_restart {limit} bytes: restarting")
                self._request_restart(instance)

    # -- helpers --------------------------------------------------------------------------------

    def _select(self, target: str) -> list[_Instance]:
        """The instances `target` names (an app, an instance or "all"), leaving out those being deleted."""
        ordered = [i for i in self._ordered() if i.goal != Goal.REMOVE]
        if target == "all":
            return ordered
        selected = [i for i in ordered if i.spec.app == target] or [i for i in ordered if i.name == target]
        if not selected:
            raise UnknownTarget(f"no app or instance named {target!r}")
        return selected

    def _of_app(self, app: str) -> list[_Instance]:
        return [i for i in self._instances.values() if i.spec.app == app]

    def _ordered(self) -> list[_Instance]:
        apps = {name: rank for rank, name in enumerate(self._apps)}
        return sorted(self._instances.values(),
                      key=lambda i: (apps.get(i.spec.app, len(apps)), i.spec.app, i.spec.index))

    def _current(self, name: str, generation: int) -> _Instance | None:
        instance = self._instances.get(name)
        return instance if instance is not None and instance.generation == generation else None

    def _notify(self, instance: _Instance, removed: bool = False, only: pykka.ActorRef | None = None) -> None:
        event = InstanceEvent(instance.name, instance.spec.app, instance.status,
                              instance.process.pid if instance.process else None, instance.spec.port, removed)
        for subscriber in [only] if only else list(self._subscribers):
            try:
                subscriber.tell(event)
            except pykka.ActorDeadError:
                self._subscribers.remove(subscriber)

    def _resolve_settled(self) -> None:
        if not self._settle_waiters:
            return
        busy = {i.name for i in self._instances.values()
                if i.status in (InstanceStatus.STOPPING, InstanceStatus.LAUNCHING) or i.restart_requested}
        for waiter in list(self._settle_waiters):
            names, future = waiter
            if not names & busy:
                self._settle_waiters.remove(waiter)
                future.set([info for info in self.instances() if info.name in names])

    def _tell_self(self, message: object) -> None:
        """From the watcher thread: hand the event to the actor thread (dropped once the actor stopped)."""
        try:
            self.actor_ref.tell(message)
        except pykka.ActorDeadError:
            pass


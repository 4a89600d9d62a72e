"""ProcessSupervisor with real processes in a temporary PMDAEMON_HOME.

Apps: examples/apps/server.py (HTTP, says which port answered) and the test apps in tests/apps/
(crasher, family = a process tree with an escaped grandchild, memhog, report = writes its argv, cwd
and env). Configs are built directly (short min_uptime and kill_timeout keep the tests fast). Every
test ends with the actors stopped and checks that no child process, zombies included, is left.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pykka
import pytest

from pmdaemon.actors.messages import InstanceEvent, InstanceInfo, ScaleResult
from pmdaemon.actors.supervisor import ProcessSupervisor, UnknownTarget
from pmdaemon.config.model import AppConfig, instance_spec

from support.http import get
from support.paths import EXAMPLE_APPS, REPO, SERVER_APP, TEST_APPS
from support.ports import free_port, free_port_range
from support.wait import wait_until


def app_config(name: str, script: Path, instances: int = 1, port: int | None = None, env: dict | None = None,
               **settings) -> AppConfig:
    """An AppConfig as the config loader would make it, with fast test defaults for the restart rules."""
    env = {"PYTHONUNBUFFERED": "1", **(env or {})}
    if port is not None:
        env["PORT"] = port
    settings = {"min_uptime": 0.3, "kill_timeout": 0.5, "cwd": str(REPO), **settings}
    config = AppConfig(name=name, script=str(script), interpreter=(sys.executable,), env=env, instances=instances,
                       increment_var="PORT" if port is not None else None, base_port=port, **settings)
    return replace(config, instance_specs=tuple(instance_spec(config, i) for i in range(instances)))


class Recorder(pykka.ThreadingActor):
    """A subscriber that keeps every InstanceEvent it is told."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[InstanceEvent] = []

    def on_receive(self, message) -> None:
        self.events.append(message)

    def seen(self) -> list[InstanceEvent]:
        return list(self.events)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def supervisor(home):
    before = children_now()
    try:
        yield ProcessSupervisor.start(home, sample_interval=0.2).proxy()
    finally:
        pykka.ActorRegistry.stop_all()
    assert_no_children_left(before)


def children_now() -> set[psutil.Process]:
    return set(psutil.Process().children(recursive=True))


def assert_no_children_left(before: set[psutil.Process]) -> None:
    """No child this test made is left, not even a zombie (the supervisor reaps what it adopts)."""
    wait_until(lambda: not children_now() - before, timeout=1.0, message="no child process left, zombies included")


def row(supervisor, name: str) -> InstanceInfo:
    return next(r for r in supervisor.instances().get() if r.name == name)


def wait_status(supervisor, name: str, status: str, timeout: float = 5.0) -> InstanceInfo:
    return wait_until(lambda: (r := row(supervisor, name)).status == status and r, timeout=timeout,
                      interval=0.01, message=f"{name} {status}")


def answers(port: int) -> bool:
    try:
        return get(port, "/health")[0] == 200
    except OSError:
        return False


def settle(supervisor, names: list[str]) -> list[dict]:
    return supervisor.settled(names).get().get(timeout=10)


def gone(processes: list[psutil.Process]) -> bool:
    return not any(p.is_running() for p in processes)  # is_running() is true for zombies too


def statuses(recorder, name: str) -> list[str]:
    return [e.status for e in recorder.proxy().seen().get() if e.name == name]


def test_instances_get_consecutive_ports_instance_ids_env_args_and_cwd(supervisor, tmp_path):
    base = free_port_range(3)
    reports = tmp_path / "reports"
    reports.mkdir()
    app = app_config("rep", TEST_APPS / "report.py", instances=3, port=base, args=("--mode", "fast"),
                     cwd=str(tmp_path), env={"REPORT_DIR": str(reports), "WORKERS": 4,
                                             "REPORT_KEYS": "PORT,PM2_INSTANCE_ID,NODE_APP_INSTANCE,WORKERS"})
    assert supervisor.start_app(app).get() == ["rep-0", "rep-1", "rep-2"]
    wait_until(lambda: len(list(reports.glob("*.json"))) == 3, message="three reports")
    for i in range(3):
        report = json.loads((reports / f"{i}.json").read_text())
        assert report["env"] == {"PORT": str(base + i), "PM2_INSTANCE_ID": str(i), "NODE_APP_INSTANCE": str(i),
                                 "WORKERS": "4"}
        assert report["argv"] == ["--mode", "fast"]
        assert report["cwd"] == str(tmp_path)
        assert report["pgid"] == report["pid"]  # each instance leads its own process group
    rows = supervisor.instances().get()
    assert [(r.name, r.app, r.status, r.port) for r in rows] == [
        ("rep-0", "rep", "online", base), ("rep-1", "rep", "online", base + 1), ("rep-2", "rep", "online", base + 2)]
    assert supervisor.app_names().get() == ["rep"]


def test_http_instances_answer_on_their_ports(supervisor):
    base = free_port_range(2)
    supervisor.start_app(app_config("web", SERVER_APP, instances=2, port=base)).get()
    for i in range(2):
        wait_until(lambda i=i: answers(base + i), message=f"web-{i} listening")
        status, headers, body = get(base + i, "/who")
        assert (status, headers["X-Backend"], headers["X-Instance"]) == (200, str(base + i), str(i))
        assert body == f"instance {i} port {base + i}\n".encode()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_a_node_app_runs_under_its_interpreter(supervisor):
    port = free_port()
    app = replace(app_config("js", EXAMPLE_APPS / "server.js", port=port), interpreter=("node",))
    supervisor.start_app(replace(app, instance_specs=(instance_spec(app, 0),))).get()
    wait_until(lambda: answers(port), message="the node server listening")
    assert get(port)[1]["X-Backend"] == str(port)


def test_kill_9_is_back_online_within_a_second_with_the_restart_counted(supervisor):
    port = free_port()
    supervisor.start_app(app_config("web", SERVER_APP, port=port, min_uptime=1.0)).get()
    wait_until(lambda: answers(port), message="web listening")
    old_pid = row(supervisor, "web-0").pid
    os.kill(old_pid, signal.SIGKILL)
    back = wait_until(lambda: (r := row(supervisor, "web-0")).pid not in (None, old_pid)
                      and r.status == "online" and r, timeout=1.0, interval=0.005, message="web-0 back online")
    assert back.restarts == 1
    wait_until(lambda: answers(port), message="the new process listening")


def test_crash_loop_ends_errored_with_restarts_equal_to_max_restarts(supervisor, home):
    recorder = Recorder.start()
    supervisor.subscribe(recorder).get()
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "crash-0-out.log").write_text("line from an earlier run\n")
    supervisor.start_app(app_config("crash", TEST_APPS / "crasher.py", max_restarts=3, min_uptime=1.0)).get()
    errored = wait_status(supervisor, "crash-0", "errored")
    assert errored.restarts == 3 and errored.pid is None
    assert "max_restarts (3)" in errored.error
    assert statuses(recorder, "crash-0") == ["launching", "online"] * 4 + ["errored"]
    out = (logs / "crash-0-out.log").read_text()
    assert out.startswith("line from an earlier run\n") and out.count("crasher 0 starting") == 4  # appended
    err = (logs / "crash-0-error.log").read_text()
    assert err.count("crasher giving up") == 4 and "max_restarts (3)" in err
    tail = supervisor.logs("crash", 2).get()["crash-0"]
    assert tail["out"] == "crasher 0 starting\ncrasher 0 starting\n"
    assert tail["out_path"] == str(logs / "crash-0-out.log") and tail["err_path"] == str(logs / "crash-0-error.log")
    time.sleep(0.3)
    assert row(supervisor, "crash-0").restarts == 3  # stays errored: no more restarts


def test_restart_delay_shows_waiting_restart_then_restarts(supervisor):
    recorder = Recorder.start()
    supervisor.subscribe(recorder).get()
    app = app_config("slowcrash", TEST_APPS / "crasher.py", env={"CRASH_AFTER_MS": 400}, restart_delay=0.3,
                     min_uptime=0.2)
    supervisor.start_app(app).get()
    wait_status(supervisor, "slowcrash-0", "waiting restart")
    wait_until(lambda: row(supervisor, "slowcrash-0").restarts == 1, message="the delayed restart")
    assert statuses(recorder, "slowcrash-0")[:5] == ["launching", "online", "waiting restart", "launching", "online"]


def test_stop_during_waiting_restart_cancels_the_restart(supervisor):
    app = app_config("slowcrash", TEST_APPS / "crasher.py", restart_delay=5.0)
    supervisor.start_app(app).get()
    wait_status(supervisor, "slowcrash-0", "waiting restart")
    supervisor.stop("slowcrash").get()
    assert row(supervisor, "slowcrash-0").status == "stopped"
    assert supervisor.restart("slowcrash").get() == ["slowcrash-0"]  # and a restart starts it at once
    assert row(supervisor, "slowcrash-0").restarts == 1


def test_autorestart_false_leaves_a_crashed_instance_stopped(supervisor):
    supervisor.start_app(app_config("once", TEST_APPS / "crasher.py", autorestart=False)).get()
    stopped = wait_status(supervisor, "once-0", "stopped")
    assert stopped.restarts == 0


def family(supervisor, tmp_path, name: str = "fam", **settings) -> list[psutil.Process]:
    """Start the family app and return its whole tree: leader, children, grandchildren, escaped ones."""
    pids_file = tmp_path / f"{name}.pids"
    env = {"PIDS_FILE": str(pids_file), **settings.pop("env", {})}
    supervisor.start_app(app_config(name, TEST_APPS / "family.py", env=env, **settings)).get()
    wait_until(pids_file.exists, message="the family's pids")
    processes = [psutil.Process(pid) for pid in json.loads(pids_file.read_text())]
    assert len(processes) == 7 and all(p.is_running() for p in processes)
    assert os.getpgid(processes[-1].pid) != processes[0].pid  # one grandchild left the process group
    return processes


def test_stop_leaves_no_process_of_the_tree_behind(supervisor, tmp_path):
    processes = family(supervisor, tmp_path)
    assert supervisor.stop("fam").get() == ["fam-0"]
    [stopped] = settle(supervisor, ["fam-0"])
    assert stopped.status == "stopped" and stopped.pid is None
    assert gone(processes)


def test_stop_sends_sigkill_after_kill_timeout(supervisor, tmp_path, home):
    processes = family(supervisor, tmp_path, env={"IGNORE_TERM": "1"}, kill_timeout=0.3)
    supervisor.stop("fam-0").get()
    assert row(supervisor, "fam-0").status == "stopping"
    time.sleep(0.1)
    assert all(p.is_running() for p in processes)  # SIGTERM is ignored
    settle(supervisor, ["fam-0"])
    assert gone(processes)
    assert "SIGKILL" in (home / "logs" / "fam-0-error.log").read_text()


def test_delete_removes_the_instances_and_tells_subscribers(supervisor, tmp_path):
    recorder = Recorder.start()
    supervisor.subscribe(recorder).get()
    processes = family(supervisor, tmp_path, instances=1)
    assert supervisor.delete("fam").get() == ["fam-0"]
    assert settle(supervisor, ["fam-0"]) == []
    assert gone(processes)
    assert supervisor.instances().get() == [] and supervisor.app_names().get() == []
    last = recorder.proxy().seen().get()[-1]
    assert (last.name, last.removed) == ("fam-0", True)


def test_stop_all_waits_until_every_process_is_gone(supervisor, tmp_path):
    processes = family(supervisor, tmp_path, env={"IGNORE_TERM": "1"}, kill_timeout=0.3)
    port = free_port()
    supervisor.start_app(app_config("web", SERVER_APP, port=port)).get()
    web = psutil.Process(row(supervisor, "web-0").pid)
    supervisor.stop_all().get()
    assert gone(processes + [web])
    assert {r.status for r in supervisor.instances().get()} == {"stopped"}


def test_orphans_of_a_running_instance_are_reaped(supervisor):
    before = children_now()
    supervisor.start_app(app_config("orph", TEST_APPS / "orphaner.py")).get()
    leader = row(supervisor, "orph-0").pid
    orphan = wait_until(lambda: next((c for c in psutil.Process().children() if c.pid != leader and c not in before),
                                     None), message="the orphan adopted")
    wait_until(lambda: not orphan.is_running(), message="the orphan reaped")


def test_stopping_the_actor_stops_its_processes(home, tmp_path):
    before = children_now()
    try:
        supervisor = ProcessSupervisor.start(home).proxy()
        processes = family(supervisor, tmp_path)
    finally:
        pykka.ActorRegistry.stop_all()
    assert gone(processes)
    assert_no_children_left(before)


def test_restart_spawns_a_new_process_and_counts_it(supervisor):
    recorder = Recorder.start()
    port = free_port()
    supervisor.start_app(app_config("web", SERVER_APP, port=port)).get()
    supervisor.subscribe(recorder).get()
    old = psutil.Process(row(supervisor, "web-0").pid)
    assert supervisor.restart("web").get() == ["web-0"]
    [restarted] = settle(supervisor, ["web-0"])
    assert restarted.status == "online" and restarted.pid != old.pid and restarted.restarts == 1
    assert not old.is_running()
    assert statuses(recorder, "web-0") == ["online", "stopping", "launching", "online"]
    wait_until(lambda: answers(port), message="the restarted server listening")


def test_a_port_in_use_is_errored_clearly_without_a_restart_loop(supervisor, home):
    with socket.create_server(("127.0.0.1", 0)) as squatter:
        port = squatter.getsockname()[1]
        assert supervisor.start_app(app_config("web", SERVER_APP, port=port)).get() == ["web-0"]
        errored = row(supervisor, "web-0")
        assert errored.status == "errored" and errored.pid is None and errored.restarts == 0
        assert f"port {port} is already in use" in errored.error
        assert f"by pid {os.getpid()}" in errored.error
        assert f"port {port} is already in use" in (home / "logs" / "web-0-error.log").read_text()
        time.sleep(0.3)
        assert row(supervisor, "web-0").status == "errored"
    supervisor.restart("web-0").get()  # freed: a restart brings it up
    wait_until(lambda: answers(port), message="web listening once the port is free")


def test_a_missing_interpreter_is_errored_clearly(supervisor):
    app = replace(app_config("ghost", SERVER_APP), interpreter=("/nonexistent/python3",))
    app = replace(app, instance_specs=(instance_spec(app, 0),))
    supervisor.start_app(app).get()
    errored = row(supervisor, "ghost-0")
    assert errored.status == "errored" and "/nonexistent/python3" in errored.error


def test_max_memory_restart_restarts_an_instance_over_its_limit(supervisor, home):
    app = app_config("hog", TEST_APPS / "memhog.py", env={"HOG_MB": 64}, max_memory_restart=32 * 1024 * 1024)
    supervisor.start_app(app).get()
    wait_until(lambda: row(supervisor, "hog-0").restarts >= 1, message="a memory restart")
    assert "max_memory_restart" in (home / "logs" / "hog-0-error.log").read_text()


def test_scale_adds_the_next_ports_and_removes_the_highest_numbered_first(supervisor):
    base = free_port_range(3)
    recorder = Recorder.start()
    supervisor.subscribe(recorder).get()
    supervisor.start_app(app_config("web", SERVER_APP, port=base)).get()
    assert supervisor.scale("web", 3).get() == ScaleResult("web", 3, added=("web-1", "web-2"), removed=())
    for i in (1, 2):
        wait_until(lambda i=i: answers(base + i), message=f"web-{i} listening")
        assert get(base + i)[1]["X-Instance"] == str(i)
    doomed = [psutil.Process(row(supervisor, f"web-{i}").pid) for i in (1, 2)]
    assert supervisor.scale("web", 1).get().removed == ("web-2", "web-1")
    settle(supervisor, ["web-1", "web-2"])
    assert gone(doomed)
    assert [r.name for r in supervisor.instances().get()] == ["web-0"]
    removed = [e.name for e in recorder.proxy().seen().get() if e.removed]
    assert sorted(removed) == ["web-1", "web-2"]


def test_subscribe_tells_the_current_state_at_once(supervisor):
    base = free_port_range(2)
    supervisor.start_app(app_config("web", SERVER_APP, instances=2, port=base)).get()
    recorder = Recorder.start()
    supervisor.subscribe(recorder).get()
    events = wait_until(lambda: len(seen := recorder.proxy().seen().get()) == 2 and seen, message="two events")
    assert [(e.name, e.status, e.port) for e in events] == [("web-0", "online", base), ("web-1", "online", base + 1)]
    assert all(e.pid for e in events)


def test_list_reports_uptime_memory_and_the_process_tree(supervisor, tmp_path):
    processes = family(supervisor, tmp_path)
    time.sleep(0.2)
    listed = row(supervisor, "fam-0")
    assert listed.uptime > 0 and listed.memory > 10 * 1024 * 1024 and isinstance(listed.cpu, float)
    assert set(supervisor.pids("fam-0").get()) == {p.pid for p in processes}


def test_unknown_targets_are_refused(supervisor):
    for call in (supervisor.stop, supervisor.restart, supervisor.delete, supervisor.logs):
        with pytest.raises(UnknownTarget):
            call("nope").get()
    with pytest.raises(UnknownTarget):
        supervisor.scale("nope", 2).get()


def test_starting_a_running_app_leaves_it_alone(supervisor):
    port = free_port()
    app = app_config("web", SERVER_APP, port=port)
    supervisor.start_app(app).get()
    pid = row(supervisor, "web-0").pid
    assert supervisor.start_app(app).get() == []
    assert row(supervisor, "web-0").pid == pid

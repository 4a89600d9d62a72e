"""`aws.alb`: the AlbRegistrar keeps a target group's targets in step with the instances (actors/alb.py).

AWS itself is never reached: the elbv2 API is moto's server on 127.0.0.1 (the `aws-test` extra),
every client gets its URL, and the credentials are dummies with the shared config files pointed
away. One fidelity fix to moto: its target groups key targets by Id alone, so registering one IP
on several ports keeps only the last (moto/elbv2/models.py, FakeTargetGroup.register); AWS keys
them by Id and Port, which is what instances of one host on their own ports need. The fixture makes
moto's target group do the same.
"""
from __future__ import annotations

import ipaddress
import os
import signal
import sys
import threading
import time
import uuid

import psutil
import pytest

from support.configs import alb_app, write_config
from support.ports import free_port, free_port_range
from support.wait import wait_until

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install 'pmdaemon[aws-test]')")
moto_server = pytest.importorskip("moto.server",
                                  reason="moto[server] is not installed (pip install 'pmdaemon[aws-test]')")
moto_elbv2 = pytest.importorskip("moto.elbv2.models")

from pmdaemon.actors.alb import ENDPOINT_ENV, default_target_id  # noqa: E402
from pmdaemon.config.loader import load_config  # noqa: E402

REGION = "us-east-1"
DUMMY_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION, "AWS_CONFIG_FILE": "/nonexistent/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "AWS_EC2_METADATA_DISABLED": "true",
}


def _patch_moto_targets_by_id_and_port(monkeypatch) -> None:
    group = moto_elbv2.FakeTargetGroup

    def key(self, target):
        return target["Id"], int(target.get("Port", self.port))

    def register(self, targets):
        for target in targets:
            k = key(self, target)
            self.targets[k] = {"Id": k[0], "Port": k[1]}
            self.deregistered_targets.pop(k, None)

    def deregister(self, targets):
        for target in targets:
            k = key(self, target)
            if k not in self.targets:
                raise moto_elbv2.InvalidTargetError()
            self.deregistered_targets[k] = self.targets.pop(k)

    def health_for(self, target, ec2_backend):
        k = key(self, target)
        if k in self.targets:
            return moto_elbv2.FakeHealthStatus(k[0], k[1], self.health_check_port, "healthy")
        return moto_elbv2.FakeHealthStatus(k[0], k[1], self.health_check_port, "unused", "Target.NotRegistered",
                                           "Target is not registered to the target group")

    monkeypatch.setattr(group, "register", register)
    monkeypatch.setattr(group, "deregister", deregister)
    monkeypatch.setattr(group, "health_for", health_for)


class FakeAws:
    """moto's elbv2 on loopback with one `ip` target group."""

    def __init__(self, url: str):
        self.url = url
        self.elbv2 = boto3.client("elbv2", endpoint_url=url, region_name=REGION)
        ec2 = boto3.client("ec2", endpoint_url=url, region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        self.arn = self.elbv2.create_target_group(
            Name=f"pm-{uuid.uuid4().hex[:12]}", Protocol="HTTP", Port=80, VpcId=vpc, TargetType="ip",
        )["TargetGroups"][0]["TargetGroupArn"]

    def registered(self) -> set[tuple[str, int]]:
        descriptions = self.elbv2.describe_target_health(TargetGroupArn=self.arn)["TargetHealthDescriptions"]
        return {(d["Target"]["Id"], int(d["Target"]["Port"])) for d in descriptions
                if d["TargetHealth"]["State"] not in ("draining", "unused")}

    def group(self) -> dict:
        return self.elbv2.describe_target_groups(TargetGroupArns=[self.arn])["TargetGroups"][0]

    def attribute(self, key: str) -> str:
        attributes = self.elbv2.describe_target_group_attributes(TargetGroupArn=self.arn)["Attributes"]
        return next(a["Value"] for a in attributes if a["Key"] == key)


def _start_moto(port: int = 0):
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    host, bound = server.get_host_and_port()
    assert ipaddress.ip_address(host).is_loopback
    return server, f"http://{host}:{bound}"


@pytest.fixture
def aws(monkeypatch):
    for name, value in DUMMY_AWS_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(ENDPOINT_ENV, raising=False)
    _patch_moto_targets_by_id_and_port(monkeypatch)
    server, url = _start_moto()
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # any client that was not given an endpoint lands here too
    try:
        yield FakeAws(url)
    finally:
        server.stop()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.timeout(60)
def test_targets_follow_scale_up_drain_scale_down_and_stop(aws, runtime, tmp_path, app_script, monkeypatch):
    monkeypatch.setenv(ENDPOINT_ENV, aws.url)
    base = free_port_range(3)
    runtime.apply(load_config(str(write_config(tmp_path, {"apps": [alb_app(app_script, base, aws.arn)]}))))
    wait_until(lambda: aws.registered() == {("127.0.0.1", base)}, 15, message="web-0 registered")
    assert aws.group()["HealthCheckPath"] == "/health"
    assert aws.attribute("deregistration_delay.timeout_seconds") == "5"

    supervisor = runtime.supervisor.proxy()
    supervisor.scale("web", 3).get(timeout=10)
    every = {("127.0.0.1", base + i) for i in range(3)}
    wait_until(lambda: aws.registered() == every, 15, message="the scaled-up instances registered")

    drained = runtime.lb_drain("web-1")
    assert [(row["instance"], row["target"], row["registered"], row["endpoint"]) for row in drained["alb_targets"]] \
        == [("web-1", f"127.0.0.1:{base + 1}", False, aws.url)]
    assert drained["alb_targets"][0]["deregistration_delay"] == 5.0
    assert aws.registered() == every - {("127.0.0.1", base + 1)}
    runtime.lb_enable(f"127.0.0.1:{base + 1}")
    assert aws.registered() == every

    supervisor.scale("web", 2).get(timeout=10)
    wait_until(lambda: aws.registered() == every - {("127.0.0.1", base + 2)}, 15, message="web-2 deregistered")

    supervisor.stop("web").get(timeout=10)
    wait_until(lambda: aws.registered() == set(), 15, message="every target deregistered")


@pytest.mark.timeout(60)
def test_a_crashed_instance_leaves_the_group_and_rejoins_when_restarted(aws, runtime, tmp_path, app_script,
                                                                         monkeypatch):
    monkeypatch.setenv(ENDPOINT_ENV, aws.url)
    base = free_port_range(1)
    app = alb_app(app_script, base, aws.arn)
    app["restart_delay"] = 1000  # long enough to see the crashed instance out of the group
    runtime.apply(load_config(str(write_config(tmp_path, {"apps": [app]}))))
    wait_until(lambda: aws.registered() == {("127.0.0.1", base)}, 15, message="web-0 registered")
    pid = runtime.supervisor.proxy().instances().get(timeout=10)[0].pid
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: aws.registered() == set(), 10, message="the crashed instance deregistered")
    wait_until(lambda: aws.registered() == {("127.0.0.1", base)}, 15, message="the restarted instance registered")


@pytest.mark.timeout(90)
def test_daemon_registers_with_the_config_endpoint_and_deregisters_on_drain_and_kill(aws, pmdaemon, tmp_path,
                                                                                     app_script):
    base = free_port_range(2)
    config = write_config(tmp_path, {"apps": [alb_app(app_script, base, aws.arn, instances=2, endpoint_url=aws.url)]})
    result = pmdaemon("start", config, env={ENDPOINT_ENV: None})
    assert result.returncode == 0, result.stderr
    both = {("127.0.0.1", base), ("127.0.0.1", base + 1)}
    wait_until(lambda: aws.registered() == both, 15, message="both instances registered")

    drained = pmdaemon.json("lb", "drain", "web-0")  # an ALB-only instance: no pmdaemon listener holds it
    assert drained["alb_targets"][0]["instance"] == "web-0" and drained["backends"] == []
    assert aws.registered() == {("127.0.0.1", base + 1)}

    assert pmdaemon("kill").returncode == 0
    wait_until(lambda: aws.registered() == set(), 15, message="the daemon to deregister on its way out")


@pytest.mark.timeout(60)
def test_stop_deregisters_and_waits_the_deregistration_delay_before_stopping(aws, pmdaemon, tmp_path, app_script):
    base = free_port_range(1)
    delay = 1.0
    config = write_config(tmp_path, {"apps": [alb_app(app_script, base, aws.arn, endpoint_url=aws.url,
                                                      deregistration_delay=delay)]})
    assert pmdaemon("start", config, env={ENDPOINT_ENV: None}).returncode == 0
    wait_until(lambda: aws.registered() == {("127.0.0.1", base)}, 15, message="web-0 registered")
    pid = pmdaemon.json("list")[0]["pid"]

    stopping = threading.Thread(target=pmdaemon, args=("stop", "web"))
    began = time.monotonic()
    stopping.start()
    wait_until(lambda: aws.registered() == set(), 5, interval=0.02, message="web-0 deregistered")
    assert _alive(pid), "the target left the group only after its process had stopped"
    stopping.join(30)
    assert not stopping.is_alive()
    assert time.monotonic() - began >= delay
    assert not _alive(pid)
    assert [row["status"] for row in pmdaemon.json("list")] == ["stopped"]
    assert aws.registered() == set()


@pytest.mark.timeout(60)
def test_reload_takes_each_target_out_before_restarting_it_and_puts_it_back(aws, runtime, tmp_path, app_script,
                                                                           monkeypatch):
    monkeypatch.setenv(ENDPOINT_ENV, aws.url)
    base = free_port_range(2)
    both = {("127.0.0.1", base), ("127.0.0.1", base + 1)}
    runtime.apply(load_config(str(write_config(tmp_path, {"apps": [
        alb_app(app_script, base, aws.arn, instances=2, deregistration_delay=1)]}))))
    wait_until(lambda: aws.registered() == both, 15, message="both instances registered")
    old = {row.name: row.pid for row in runtime.supervisor.proxy().instances().get(timeout=10)}

    result = []
    reloading = threading.Thread(target=lambda: result.append(runtime.reload_app("web")))
    reloading.start()
    out_while_alive = set()
    while reloading.is_alive():
        registered = aws.registered()
        assert registered, "both targets were out of the group at once"
        for i, name in enumerate(("web-0", "web-1")):
            if ("127.0.0.1", base + i) not in registered and _alive(old[name]):
                out_while_alive.add(name)
        time.sleep(0.02)
    reloading.join()
    assert result == [{"target": "web", "reloaded": ["web-0", "web-1"]}]
    assert out_while_alive == {"web-0", "web-1"}, "each target leaves the group before its process stops"
    new = {row.name: row.pid for row in runtime.supervisor.proxy().instances().get(timeout=10)}
    assert all(new[name] != old[name] and not _alive(old[name]) for name in old)
    wait_until(lambda: aws.registered() == both, 15, message="both restarted instances registered again")


@pytest.mark.timeout(60)
def test_registration_is_retried_until_the_endpoint_answers(aws, runtime, tmp_path, app_script, monkeypatch):
    """The target group exists (moto's state is per process) but the endpoint the daemon uses is down at first."""
    port = free_port()
    monkeypatch.setenv(ENDPOINT_ENV, f"http://127.0.0.1:{port}")
    base = free_port_range(1)
    runtime.apply(load_config(str(write_config(tmp_path, {"apps": [alb_app(app_script, base, aws.arn)]}))))
    wait_until(lambda: runtime.supervisor.proxy().instances().get(timeout=10)[0].status == "online", 10,
               message="web-0 online")
    assert aws.registered() == set()
    late, _ = _start_moto(port)
    try:
        wait_until(lambda: aws.registered() == {("127.0.0.1", base)}, 20, message="registration after a retry")
        runtime.supervisor.proxy().stop("web").get(timeout=10)
        wait_until(lambda: aws.registered() == set(), 10, message="deregistration while the endpoint is up")
    finally:
        late.stop()


def test_missing_boto3_is_a_clear_error_and_starts_nothing(runtime, tmp_path, app_script, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # what `import boto3` meets when it is not installed
    arn = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/web/73e2d6bc24d8a067"
    config = load_config(str(write_config(tmp_path, {"apps": [alb_app(app_script, free_port(), arn)]})))
    with pytest.raises(RuntimeError, match=r"apps\[0\]\.aws\.alb: .*pip install 'pmdaemon\[aws\]'"):
        runtime.apply(config)
    assert runtime.supervisor.proxy().instances().get(timeout=10) == []


def test_default_target_id_is_an_ipv4_address_of_this_host():
    assert ipaddress.ip_address(default_target_id()).version == 4

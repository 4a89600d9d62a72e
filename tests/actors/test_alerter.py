"""The Alerter delivering alerts to real HTTP and SMTP servers (its rule state machine:
tests/unit/test_alert_rules.py)."""
import email
import email.policy
import json
import logging
import queue
import ssl
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pykka
import pytest

from pmdaemon.actors.alerter import Alerter, DeliveryPolicy, Notification, PermanentFailure, send_email, values_from
from pmdaemon.actors.metrics import MetricsActor
from pmdaemon.config.model import AlertRule, AlertsConfig, BackendConfig, ListenerConfig, SmtpConfig
from pmdaemon.states import AlertState

from support.alerts import rule
from support.ports import free_port
from support.wait import wait_until

FAST = DeliveryPolicy(timeout=5.0, attempts=3, retry_delay=0.05)


def listener(*rules: AlertRule, smtp: SmtpConfig = SmtpConfig(), port=18080) -> ListenerConfig:
    backends = tuple(BackendConfig("127.0.0.1", port + i, instance=f"web-{i}") for i in (1, 2, 3))
    return ListenerConfig(index=0, port=port, backends=backends,
                          alerts=AlertsConfig(enabled=True, rules=rules, smtp=smtp))


# ---------------------------------------------------------------- real servers


class Webhooks:
    """A real HTTP server recording POSTed JSON; paths under /slow wait for `release`, /fail/N fail N times."""

    def __init__(self) -> None:
        self.received: queue.Queue = queue.Queue()
        self.release = threading.Event()
        self.failures: dict[str, int] = {}
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.startswith("/slow"):
                    hooks.release.wait(10)
                if self.path.startswith("/fail/"):
                    count = hooks.failures.get(self.path, 0)
                    hooks.failures[self.path] = count + 1
                    if count < int(self.path.split("/")[2]):
                        self.send_response(500 if self.path.endswith("500") else 404)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                hooks.received.put((self.path, self.headers["Content-Type"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def next(self, timeout: float = 5.0):
        return self.received.get(timeout=timeout)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhooks():
    hooks = Webhooks()
    yield hooks
    pykka.ActorRegistry.stop_all()
    hooks.close()


@pytest.mark.timeout(20)
def test_webhook_fires_after_duration_and_resolves_when_backends_recover(webhooks):
    config = listener(rule(duration=1.0, url=webhooks.url("/hook?token=s3cret")))
    metrics = MetricsActor.start([config])
    metrics.proxy().set_backend_states(0, {"127.0.0.1:18081": "up", "127.0.0.1:18082": "down",
                                           "127.0.0.1:18083": "open"}).get(timeout=5)
    started = time.time()
    Alerter.start(config, values_from(metrics), interval=0.1, delivery=FAST)

    path, content_type, firing = webhooks.next()
    assert time.time() - started >= 1.0  # held for its duration first
    assert path == "/hook?token=s3cret" and content_type == "application/json"
    assert firing["rule"] == "backend_down" and firing["state"] == "firing"
    assert firing["condition"] == "healthy_backends < 2"
    assert (firing["value"], firing["threshold"], firing["listener"]) == (1, 2.0, 18080)
    since = datetime.fromisoformat(firing["since"])
    assert since.tzinfo == UTC and abs(since.timestamp() - started) < 2

    time.sleep(0.3)  # several more ticks with the condition still holding: no second "firing"
    assert webhooks.received.empty()
    metrics.proxy().set_backend_states(0, {"127.0.0.1:18082": "up"}).get(timeout=5)
    _, _, resolved = webhooks.next()
    assert resolved["state"] == "resolved" and resolved["value"] == 2 and resolved["rule"] == "backend_down"
    time.sleep(0.3)
    assert webhooks.received.empty()


@pytest.mark.timeout(20)
def test_a_slow_webhook_does_not_delay_another_rule(webhooks):
    values = {"healthy_backends": 0, "open_circuits": 3}
    config = listener(
        rule("slow_one", url=webhooks.url("/slow"), duration=0.0),
        rule("fast_one", "open_circuits > 0", "open_circuits", ">", 0.0, duration=0.0, url=webhooks.url("/fast")),
    )
    Alerter.start(config, lambda index: dict(values), interval=0.1, delivery=FAST)
    path, _, body = webhooks.next()  # arrives while /slow still holds its request
    assert path == "/fast" and body["rule"] == "fast_one"
    values["open_circuits"] = 0
    path, _, body = webhooks.next()
    assert (path, body["state"]) == ("/fast", "resolved")
    webhooks.release.set()
    path, _, body = webhooks.next()
    assert (path, body["rule"], body["state"]) == ("/slow", "slow_one", "firing")


@pytest.mark.timeout(20)
def test_transient_webhook_failures_are_retried_and_client_errors_are_not(webhooks):
    values = {"healthy_backends": 0}
    config = listener(rule("retried", url=webhooks.url("/fail/2/500"), duration=0.0),
                      rule("refused", url=webhooks.url("/fail/9/404"), duration=0.0))
    Alerter.start(config, lambda index: dict(values), interval=0.1, delivery=FAST)
    path, _, body = webhooks.next()
    assert path == "/fail/2/500" and body["rule"] == "retried"
    # the other rule's delivery runs on a thread of its own: wait for its one request, then make sure
    # no retry follows it
    wait_until(lambda: "/fail/9/404" in webhooks.failures, 5, message="the refused webhook's request")
    time.sleep(0.5)
    assert webhooks.failures == {"/fail/2/500": 3, "/fail/9/404": 1}


@pytest.mark.timeout(20)
def test_an_unchanged_rule_keeps_its_state_across_reconfigure(webhooks):
    values = {"healthy_backends": 0}
    config = listener(rule(url=webhooks.url("/hook"), duration=0.0))
    alerter = Alerter.start(config, lambda index: dict(values), interval=0.1, delivery=FAST)
    assert webhooks.next()[2]["state"] == "firing"
    alerter.proxy().reconfigure(config).get(timeout=5)
    time.sleep(0.3)
    assert webhooks.received.empty()
    [state] = alerter.proxy().rule_states().get(timeout=5)
    assert state["state"] == "firing" and state["value"] == 0


# ---------------------------------------------------------------- email


class Mailbox:
    def __init__(self) -> None:
        self.messages: queue.Queue = queue.Queue()

    async def handle_DATA(self, server, session, envelope):
        self.messages.put(envelope)
        return "250 OK"


def smtp_server(mailbox: Mailbox, **kwargs):
    from aiosmtpd.controller import Controller

    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port(), **kwargs)
    controller.start()
    return controller


@pytest.mark.timeout(20)
def test_email_alert_is_delivered_with_login_from_the_environment(monkeypatch, caplog):
    from aiosmtpd.smtp import AuthResult

    password = "hunter2-not-in-logs"
    monkeypatch.setenv("PMDAEMON_TEST_SMTP_PASSWORD", password)
    logins = []

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == password.encode())

    mailbox = Mailbox()
    controller = smtp_server(mailbox, authenticator=authenticator, auth_require_tls=False)
    caplog.set_level(logging.DEBUG)
    try:
        smtp = SmtpConfig(host="127.0.0.1", port=controller.port, sender="lb@example.test",
                          username="alerts", password_env="PMDAEMON_TEST_SMTP_PASSWORD")
        config = listener(rule(action="email", recipients=("admin@example.test", "ops@example.test"), duration=0.0),
                          smtp=smtp)
        Alerter.start(config, lambda index: {"healthy_backends": 1}, interval=0.1, delivery=FAST)
        envelope = mailbox.messages.get(timeout=10)
        assert envelope.mail_from == "lb@example.test"
        assert envelope.rcpt_tos == ["admin@example.test", "ops@example.test"]
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert message["Subject"].strip() == (
            "[pmdaemon] FIRING backend_down on http:18080: healthy_backends < 2 (value 1)")
        assert '"state": "firing"' in message.get_content()
        assert logins == [(b"alerts", password.encode())]
        # The delivery thread logs "delivered" after QUIT, i.e. after the mailbox already holds the
        # message: wait for the line (bounded) before stopping the actors.
        deadline = time.monotonic() + 5
        while not any("delivered" in line for line in _alerter_log(caplog)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert any("delivered" in line for line in _alerter_log(caplog))
    finally:
        pykka.ActorRegistry.stop_all()
        controller.stop()
    ours = _alerter_log(caplog)
    assert not any(password in line for line in ours)


@pytest.mark.timeout(20)
def test_email_over_starttls(monkeypatch, tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # the alerter verifies with the default trust store

    mailbox = Mailbox()
    controller = smtp_server(mailbox, tls_context=server_context, require_starttls=True)
    try:
        smtp = SmtpConfig(host="127.0.0.1", port=controller.port, sender="lb@example.test", starttls=True)
        config = listener(rule(action="email", recipients=("admin@example.test",), duration=0.0), smtp=smtp)
        Alerter.start(config, lambda index: {"healthy_backends": 0}, interval=0.1, delivery=FAST)
        envelope = mailbox.messages.get(timeout=10)
        assert envelope.rcpt_tos == ["admin@example.test"]
        assert "FIRING backend_down" in envelope.content.decode()
    finally:
        pykka.ActorRegistry.stop_all()
        controller.stop()


def test_a_missing_password_variable_is_a_clear_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("PMDAEMON_TEST_UNSET_PASSWORD", raising=False)
    smtp = SmtpConfig(host="127.0.0.1", port=free_port(), username="alerts",
                      password_env="PMDAEMON_TEST_UNSET_PASSWORD")
    r = rule(action="email", recipients=("admin@example.test",))
    with pytest.raises(PermanentFailure, match="PMDAEMON_TEST_UNSET_PASSWORD"):
        send_email(smtp, r.recipients, Notification(r, AlertState.FIRING, 1, time.time(), listener(r)), timeout=1.0)


def _alerter_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("pmdaemon.actors")]

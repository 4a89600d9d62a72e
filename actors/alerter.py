"""Alerter: evaluates one listener's alert rules every second and delivers their notifications.

Theory of operation, per rule (`RuleTracker`, a plain class):
- ok      --condition holds-->                 pending (since = now)
- pending --condition no longer holds-->       ok, nothing sent
- pending --has held for `duration`-->         firing: one "firing" notification
- firing  --condition no longer holds-->       ok: one "resolved" notification
A tick whose values lack the rule's metric (no answer from the metrics) changes nothing.

Values come from a callable `values(listener_index) -> dict` (keyed by the metric names of
`config/alertrule.py`, as `MetricsActor.alert_values` answers), called on the Alerter's thread;
`values_from(metrics_ref)` makes one that asks the MetricsActor. The Alerter asks for the listener's
current index at every tick, so a reload that moves the listener needs only `reconfigure(listener)`.

Delivery never blocks evaluation or another rule: each rule has its own courier thread and queue,
so a webhook that hangs delays only that rule's later notifications (which stay in order: a
rule's "resolved" never overtakes its "firing"). A webhook is a JSON POST with a timeout; an
email goes through `alerts.smtp` with smtplib. Both retry transient failures a few times with
exponential backoff. Logs name the webhook's scheme and host only (webhook URLs often carry
tokens) and never the SMTP password, which is read from the environment variable `password_env`
names at the moment of sending.

Webhook body: {"rule", "state": "firing"|"resolved", "condition", "metric", "value", "threshold",
"since", "listener" (port), "listener_name", "duration"}. `since` (ISO 8601, UTC) is when the
condition started to hold for "firing", and when it stopped holding for "resolved".

Use:  Alerter.start(listener_config, values_from(metrics_ref), timers=timers)
"""
from __future__ import annotations

import json
import logging
import operator
import os
import queue
import smtplib
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from urllib.parse import urlsplit

import pykka

from pmdaemon.actors.messages import Tick
from pmdaemon.config.model import AlertRule, ListenerConfig, SmtpConfig
from pmdaemon.control.timers import Timers
from pmdaemon.states import AlertState

log = logging.getLogger(__name__)

OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt, "<=": operator.le, ">": operator.gt,
    ">=": operator.ge, "==": operator.eq, "!=": operator.ne,
}
QUEUED_PER_RULE = 64  # notifications waiting behind a stuck delivery; older ones are kept, newer dropped
_EVALUATE = Tick("evaluate alert rules")


def values_from(metrics_ref: pykka.ActorRef, timeout: float = 1.0) -> Callable[[int], dict]:
    """A `values` callable that asks the MetricsActor for a listener's alert values."""
    proxy = metrics_ref.proxy()
    return lambda listener_index: proxy.alert_values(listener_index).get(timeout=timeout)


class RuleTracker:
    """One rule's state machine (module docstring); time is passed in."""

    def __init__(self, rule: AlertRule) -> None:
        self.rule = rule
        self.state = AlertState.OK
        self.since: float | None = None  # wall-clock time the current state's condition began
        self._held_from: float | None = None  # monotonic time the condition started to hold
        self.value: float | None = None
        self._compare = OPERATORS[rule.op]

    def observe(self, value: float, now: float, wall: float) -> AlertState | None:
        """Feed the metric's value; returns FIRING or RESOLVED when a notification is due."""
        self.value = value
        holds = self._compare(value, self.rule.threshold)
        if holds:
            if self.state == AlertState.OK:
                self.state, self._held_from, self.since = AlertState.PENDING, now, wall
            if self.state == AlertState.PENDING and now - self._held_from >= self.rule.duration:
                self.state = AlertState.FIRING
                return AlertState.FIRING
            return None
        was_firing = self.state == AlertState.FIRING
        self.state, self._held_from = AlertState.OK, None
        if was_firing:
            self.since = wall
            return AlertState.RESOLVED
        self.since = None
        return None


@dataclass(frozen=True)
class Notification:
    rule: AlertRule
    state: AlertState  # FIRING or RESOLVED
    value: float
    since: float  # wall clock seconds
    listener: ListenerConfig

    def payload(self) -> dict:
        return {
            "rule": self.rule.name,
            "state": self.state,
            "condition": self.rule.condition,
            "metric": self.rule.metric,
            "value": self.value,
            "threshold": self.rule.threshold,
            "since": iso_utc(self.since),
            "listener": self.listener.port,
            "listener_name": self.listener.name,
            "duration": self.rule.duration,
        }


def iso_utc(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class DeliveryPolicy:
    timeout: float = 5.0  # per webhook request or SMTP conversation step
    attempts: int = 3  # every attempt, the first included
    retry_delay: float = 1.0  # before attempt n+1: retry_delay x 2^(n-1)


class Alerter(pykka.ThreadingActor):
    def __init__(self, listener: ListenerConfig, values: Callable[[int], dict], timers: Timers | None = None,
                 interval: float = 1.0, delivery: DeliveryPolicy = DeliveryPolicy()):
        super().__init__()
        self._listener = listener
        self._values = values
        self._timers = timers
        self._own_timers = timers is None
        self._interval = interval
        self._delivery = delivery
        self._trackers: dict[str, RuleTracker] = {}
        self._couriers: dict[str, _Courier] = {}
        self._scheduled = False

    def on_start(self) -> None:
        if self._timers is None:
            self._timers = Timers()
        self.reconfigure(self._listener)

    def on_stop(self) -> None:
        for courier in self._couriers.values():
            courier.close()
        if self._own_timers:
            self._timers.close()

    def on_receive(self, message: object) -> None:
        if message == _EVALUATE:
            self._scheduled = False
            self.evaluate()
            self._schedule()

    def reconfigure(self, listener: ListenerConfig) -> None:
        """New rules for this listener; a rule kept unchanged (same name and fields) keeps its state."""
        self._listener = listener
        rules = listener.alerts.rules if listener.alerts.enabled else ()
        trackers = {}
        for rule in rules:
            old = self._trackers.get(rule.name)
            trackers[rule.name] = old if old is not None and old.rule == rule else RuleTracker(rule)
        self._trackers = trackers
        for name in [n for n in self._couriers if n not in trackers]:
            self._couriers.pop(name).close()
        self._schedule()

    def evaluate(self) -> None:
        """One round: read the values once, feed every rule, hand due notifications to couriers."""
        if not self._trackers:
            return
        try:
            values = self._values(self._listener.index)
        except Exception as exc:  # metrics actor stopping or slow: try again next tick
            log.debug("alert values for %s unavailable: %r", self._listener.name, exc)
            return
        now, wall = time.monotonic(), time.time()
        for name, tracker in self._trackers.items():
            value = values.get(tracker.rule.metric)
            if value is None:
                continue
            transition = tracker.observe(value, now, wall)
            if transition is not None:
                log.info("alert %s on %s %s: %s (value %s)", name, self._listener.name, transition,
                         tracker.rule.condition, value)
                notification = Notification(tracker.rule, transition, value, tracker.since, self._listener)
                self._courier(name).submit(notification, self._listener.alerts.smtp)

    def rule_states(self) -> list[dict]:
        """Each rule: name, condition, state (ok, pending, firing), last value, since (ISO or None)."""
        return [
            {"name": name, "condition": t.rule.condition, "state": t.state, "value": t.value,
             "since": iso_utc(t.since) if t.since is not None else None}
            for name, t in self._trackers.items()
        ]

    def _courier(self, name: str) -> _Courier:
        if name not in self._couriers:
            self._couriers[name] = _Courier(name, self._delivery)
        return self._couriers[name]

    def _schedule(self) -> None:
        if self._trackers and not self._scheduled:
            self._timers.tell_later(self._interval, self.actor_ref, _EVALUATE)
            self._scheduled = True


class _Courier:
    """One rule's delivery thread: sends its notifications in order, retrying transient failures."""

    def __init__(self, rule_name: str, policy: DeliveryPolicy) -> None:
        self._policy = policy
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUED_PER_RULE)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"pmdaemon-alert-{rule_name}", daemon=True)
        self._thread.start()

    def submit(self, notification: Notification, smtp: SmtpConfig) -> None:
        try:
            self._queue.put_nowait((notification, smtp))
        except queue.Full:
            log.error("alert %s: %d notifications already wait for delivery; dropping this %s one",
                      notification.rule.name, QUEUED_PER_RULE, notification.state)

    def close(self) -> None:
        """Stop retrying and let the thread end; a request in progress ends by its own timeout."""
        self._closed.set()
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass

    def _run(self) -> None:
        while not self._closed.is_set():
            job = self._queue.get()
            if job is None:
                return
            notification, smtp = job
            self._deliver(notification, smtp)

    def _deliver(self, notification: Notification, smtp: SmtpConfig) -> None:
        rule = notification.rule
        if rule.action == "webhook":
            send, target = (lambda: post_webhook(rule.url, notification.payload(), self._policy.timeout)), \
                safe_url(rule.url)
        elif rule.action == "email":
            send, target = (lambda: send_email(smtp, rule.recipients, notification, self._policy.timeout)), \
                f"{smtp.host}:{smtp.port}"
        else:
            log.error("alert %s: unknown action %r", rule.name, rule.action)
            return
        for attempt in range(1, self._policy.attempts + 1):
            try:
                send()
                log.info("alert %s: %s notification delivered to %s", rule.name, notification.state, target)
                return
            except PermanentFailure as exc:
                log.error("alert %s: %s notification to %s refused: %s", rule.name, notification.state, target, exc)
                return
            except Exception as exc:
                log.warning("alert %s: %s notification to %s failed (attempt %d of %d): %s", rule.name,
                            notification.state, target, attempt, self._policy.attempts, describe(exc))
            if attempt < self._policy.attempts and self._closed.wait(self._policy.retry_delay * 2 ** (attempt - 1)):
                return


class PermanentFailure(Exception):
    """A delivery that retrying cannot fix (a 4xx from the webhook, a refused recipient, bad config)."""


def post_webhook(url: str, payload: dict, timeout: float) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "pmdaemon-alerter"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise PermanentFailure(f"HTTP {exc.code}") from None
        raise


def send_email(smtp: SmtpConfig, recipients: tuple[str, ...], notification: Notification, timeout: float) -> None:
    if not recipients:
        raise PermanentFailure("the rule has no recipients")
    password = None
    if smtp.username:
        if not smtp.password_env:
            raise PermanentFailure("alerts.smtp.username is set but alerts.smtp.password_env is not")
        password = os.environ.get(smtp.password_env)
        if password is None:
            raise PermanentFailure(f"environment variable {smtp.password_env} (alerts.smtp.password_env) is not set")
    message = email_message(smtp.sender, recipients, notification)
    try:
        with smtplib.SMTP(smtp.host, smtp.port, timeout=timeout) as client:
            if smtp.starttls:
                client.starttls(context=ssl.create_default_context())
            if smtp.username:
                client.login(smtp.username, password)
            client.send_message(message)
    except (smtplib.SMTPAuthenticationError, smtplib.SMTPNotSupportedError, smtplib.SMTPRecipientsRefused,
            smtplib.SMTPSenderRefused) as exc:
        raise PermanentFailure(describe(exc)) from None
    except smtplib.SMTPResponseException as exc:
        if exc.smtp_code >= 500:
            raise PermanentFailure(describe(exc)) from None
        raise


def email_message(sender: str, recipients: tuple[str, ...], notification: Notification) -> EmailMessage:
    payload = notification.payload()
    message = EmailMessage()
    message["Subject"] = (f"[pmdaemon] {notification.state.upper()} {payload['rule']} on "
                          f"{payload['listener_name']}: {payload['condition']} (value {notification.value:g})")
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    verb = "is firing" if notification.state == AlertState.FIRING else "has resolved"
    message.set_content(
        f"Alert rule {payload['rule']} on listener {payload['listener_name']} {verb}.\n\n"
        f"condition: {payload['condition']}\nvalue:     {notification.value:g}\n"
        f"since:     {payload['since']}\n\n" + json.dumps(payload, indent=2) + "\n"
    )
    return message


def safe_url(url: str | None) -> str:
    """scheme://host[:port] only: the path and query of a webhook URL are often its secret."""
    parts = urlsplit(url or "")
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def describe(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return str(exc.reason)
    if isinstance(exc, smtplib.SMTPResponseException):
        detail = exc.smtp_error.decode(errors="replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"SMTP {exc.smtp_code} {detail}"
    return f"{exc.__class__.__name__}: {exc}"

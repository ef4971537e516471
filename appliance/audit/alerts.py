"""Where alerts go: a durable list, a digest mail, a webhook.

- ``AlertStore``: the last ``KEEP`` alerts in ``<data_dir>/audit/alerts.json``
  (JSON lines, appended and fsynced off the reactor thread in batches,
  compacted to the last ``KEEP`` when it grows past twice that). ``latest(n)``
  and ``ack(alert_id)`` serve the admin shell's ``alerts``.
- ``Digest``: new alerts mailed to ``[audit] alert_to`` through our own queue
  (``QueueRunner.accept``: a null-sender message, like a DSN: durable, delivered or retried
  like any mail, never bounced), at most once per ``alert_interval``. Nothing
  is mailed when there is no alert.
- ``Webhook``: each alert POSTed as JSON to ``[audit] webhook`` with bounded
  retries; never blocks the reactor; a POST that fails for good, or an alert
  dropped because too many wait, is an event.
"""

import collections
import dataclasses
import io
import email.policy
import email.utils
import json
import os
from email.message import EmailMessage

from twisted.internet import defer, threads
from twisted.logger import Logger

from appliance import events
from appliance.envelope import Envelope, new_queue_id
from appliance.clock import cancel

_log = Logger(namespace="mailappliance.audit")

events.register("audit.alert", "the auditor found something (SPEC §4 \"The auditor\"): "
                "rule, the network (peer_ip) or account, the count within the window "
                "(seconds) and the action taken (ban, hold, none)",
                ("alert_id", "rule", "peer_ip", "account", "count", "window", "action",
                 "detail"))
events.register("audit.digest_sent", "a digest of new alerts was queued for [audit] alert_to",
                ("queue_id", "to", "alerts"))
events.register("audit.digest_failed", "the alert digest could not be queued; it is tried "
                "again at the next interval", ("to", "error"))
events.register("audit.webhook_failed", "an alert could not be POSTed to [audit] webhook "
                "(after the retries, or dropped: too many waiting)",
                ("alert_id", "url", "attempts", "error"))
events.register("audit.store_failed", "alerts could not be written to data_dir",
                ("path", "error"))

KEEP = 10_000
ALERTS_FILE = "alerts.json"
DIGEST_LISTENER = "audit"       # Envelope.listener of the digests
DIGEST_GATHER = 2.0             # seconds: alerts of one burst go in one mail
DIGEST_MAX_LISTED = 500
WEBHOOK_RETRIES = (1.0, 5.0, 30.0)      # waits before the 2nd, 3rd and 4th attempt
WEBHOOK_TIMEOUT = 10.0
WEBHOOK_CONCURRENCY = 4
WEBHOOK_MAX_WAITING = 1000


class AlertStore:
    """The last ``keep`` alerts, in memory and in ``<directory>/alerts.json``."""

    def __init__(self, directory, keep=KEEP, write=threads.deferToThread):
        self.path = os.path.join(directory, ALERTS_FILE)
        self.keep = keep
        self.write = write
        self.alerts = collections.OrderedDict()     # alert_id -> record (oldest first)
        self.next_id = 1
        self._lines_on_disk = 0
        self._pending = []
        self._writing = None

    def load(self):
        """Read the file (at start): the last ``keep`` alerts and their acks."""
        try:
            with open(self.path, "rb") as handle:
                lines = handle.read().splitlines()
        except FileNotFoundError:
            return
        except OSError as exc:
            _log.error("cannot read {path}: {error}", path=self.path, error=str(exc))
            return
        self._lines_on_disk = len(lines)
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue        # a torn last line after a crash
            if not isinstance(record, dict):
                continue
            if "ack" in record:
                alert = self.alerts.get(record["ack"])
                if alert is not None:
                    alert["acked"] = True
            elif isinstance(record.get("alert_id"), int):
                self.alerts[record["alert_id"]] = record
                self.next_id = max(self.next_id, record["alert_id"] + 1)
        self._trim()

    def new_id(self):
        alert_id, self.next_id = self.next_id, self.next_id + 1
        return alert_id

    def add(self, record):
        """Keep ``record`` (it has ``alert_id``); written soon, off the reactor."""
        record = dict(record, acked=False)
        self.alerts[record["alert_id"]] = record
        self._trim()
        self._append(record)

    def ack(self, alert_id):
        """Mark an alert as seen; False if there is no such alert."""
        alert = self.alerts.get(alert_id)
        if alert is None:
            return False
        if not alert["acked"]:
            alert["acked"] = True
            self._append({"ack": alert_id})
        return True

    def latest(self, n=20):
        """The ``n`` newest alerts, newest first."""
        found = []
        for record in reversed(self.alerts.values()):
            if len(found) >= n:
                break
            found.append(dict(record))
        return found

    def _trim(self):
        while len(self.alerts) > self.keep:
            self.alerts.popitem(last=False)

    def _append(self, record):
        self._pending.append(record)
        if self._writing is None:
            self._write_batch()

    def _write_batch(self):
        batch, self._pending = self._pending, []
        compact = self._lines_on_disk + len(batch) > 2 * self.keep
        if compact:
            lines = [_line(r) for r in self.alerts.values()]
            lines += [_line({"ack": r["alert_id"]}) for r in self.alerts.values() if r["acked"]]
            self._lines_on_disk = len(lines)
            self._writing = self.write(_rewrite, self.path, b"".join(lines))
        else:
            self._lines_on_disk += len(batch)
            self._writing = self.write(_append_lines, self.path,
                                       b"".join(_line(r) for r in batch))
        self._writing.addErrback(self._write_failed)
        self._writing.addBoth(self._written)

    def _write_failed(self, failure):
        events.emit("audit.store_failed", path=self.path, error=failure.getErrorMessage()[:200])

    def _written(self, _):
        self._writing = None
        if self._pending:
            self._write_batch()

    def flushed(self):
        """A Deferred firing once everything added so far is on disk."""
        d = defer.Deferred()

        def check(_=None):
            if self._writing is None and not self._pending:
                d.callback(None)
            elif self._writing is not None:
                self._writing.addBoth(lambda r: (check(), r)[1])
        check()
        return d


def _line(record):
    return (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")


def _append_lines(path, data):
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _rewrite(path, data):
    from appliance.audit.actions import _write_atomic
    _write_atomic(path, data)


def describe(alert):
    """One line for a person: time, rule, subject, count, window, action."""
    subject = alert.get("peer_ip") or alert.get("account") or "-"
    when = email.utils.formatdate(alert["ts"], usegmt=True) if "ts" in alert else ""
    return (f"{when}  {alert['rule']}  {subject}  count {alert['count']} in "
            f"{_duration(alert['window'])}  action {alert['action']}  ({alert['detail']})")


def _duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@dataclasses.dataclass(eq=False)
class Digest:
    """Mails new alerts to ``to`` at most once per ``interval`` (see the module
    docstring). ``queue``: the QueueRunner (``accept``); ``clock``: IReactorTime."""

    queue: object
    clock: object
    hostname: str
    to: str
    interval: float
    gather: float = DIGEST_GATHER
    waiting: list = dataclasses.field(default_factory=list, init=False)
    last_sent: float = dataclasses.field(default=None, init=False)
    _timer: object = dataclasses.field(default=None, init=False, repr=False)

    def add(self, alert):
        self.waiting.append(alert)
        if self._timer is None:
            now = self.clock.seconds()
            due = now + self.gather
            if self.last_sent is not None:
                due = max(due, self.last_sent + self.interval)
            self._timer = self.clock.callLater(due - now, self._send)

    def stop(self):
        self._timer = cancel(self._timer)

    def _send(self):
        self._timer = None
        alerts, self.waiting = self.waiting, []
        if not alerts:
            return None
        now = self.clock.seconds()
        self.last_sent = now
        qid = new_queue_id(now)
        body = self.message(alerts, now, qid)
        envelope = Envelope(queue_id=qid, sender="", recipients=[self.to], received_at=now,
                            helo=self.hostname, listener=DIGEST_LISTENER, size=len(body),
                            params={} if body.isascii() else {"BODY": "8BITMIME"})
        d = defer.maybeDeferred(self.queue.accept, envelope, body)
        d.addCallbacks(self._queued, self._failed, callbackArgs=(len(alerts),),
                       errbackArgs=(alerts,))
        return d

    def _queued(self, qid, count):
        events.emit("audit.digest_sent", queue_id=qid, to=self.to, alerts=count)
        return qid

    def _failed(self, failure, alerts):
        events.emit("audit.digest_failed", to=self.to, error=failure.getErrorMessage()[:200])
        # Back in line, in front: mailed with the next ones, one interval later.
        self.waiting[:0] = alerts
        if self._timer is None:
            self._timer = self.clock.callLater(self.interval, self._send)

    def message(self, alerts, now, qid):
        """The digest (bytes, CRLF)."""
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = f"mailappliance auditor <MAILER-DAEMON@{self.hostname}>"
        msg["To"] = self.to
        rules = sorted({a["rule"] for a in alerts})
        msg["Subject"] = (f"[mailappliance] {len(alerts)} new alert"
                          f"{'s' if len(alerts) != 1 else ''}: {', '.join(rules)}")
        msg["Date"] = email.utils.formatdate(now, usegmt=True)
        msg["Message-ID"] = f"<{qid}.audit@{self.hostname}>"
        msg["Auto-Submitted"] = "auto-generated"
        lines = [f"The auditor on {self.hostname} raised {len(alerts)} alert"
                 f"{'s' if len(alerts) != 1 else ''} since the last digest.", ""]
        lines += [f"#{a.get('alert_id', '-')} {describe(a)}"
                  for a in alerts[:DIGEST_MAX_LISTED]]
        if len(alerts) > DIGEST_MAX_LISTED:
            lines.append(f"... and {len(alerts) - DIGEST_MAX_LISTED} more "
                         "(`mailappliance alerts` lists them)")
        lines += ["", "Bans: `mailappliance bans list`; held mail: `mailappliance queue list`."]
        msg.set_content("\n".join(lines) + "\n")
        return msg.as_bytes()


class Webhook:
    """POSTs each alert as JSON to ``url`` (see the module docstring).

    ``post(url, body) -> Deferred`` firing with the HTTP status code; the
    default uses twisted.web's Agent (HTTPS verified against the system CAs).
    """

    def __init__(self, url, clock, post=None, retries=WEBHOOK_RETRIES,
                 concurrency=WEBHOOK_CONCURRENCY, max_waiting=WEBHOOK_MAX_WAITING):
        self.url = url
        self.clock = clock
        self.post = post or _agent_post(clock)
        self.retries = tuple(retries)
        self.concurrency = concurrency
        self.max_waiting = max_waiting
        self.waiting = collections.deque()
        self.active = 0
        self.stopped = False
        self._timers = set()

    def send(self, alert):
        if len(self.waiting) >= self.max_waiting:
            events.emit("audit.webhook_failed", alert_id=alert.get("alert_id"), url=self.url,
                        attempts=0, error="dropped: too many alerts waiting")
            return
        self.waiting.append((alert, 1))
        self._start()

    def stop(self):
        self.stopped = True
        for timer in list(self._timers):
            if timer.active():
                timer.cancel()
        self._timers.clear()

    def _start(self):
        while not self.stopped and self.waiting and self.active < self.concurrency:
            alert, attempt = self.waiting.popleft()
            self.active += 1
            body = json.dumps(alert, ensure_ascii=False, default=str).encode("utf-8")
            d = defer.maybeDeferred(self.post, self.url, body)
            d.addCallback(_check_status)
            d.addCallbacks(self._done, self._failed, errbackArgs=(alert, attempt))
            d.addBoth(self._slot_free)

    def _done(self, _):
        return None

    def _failed(self, failure, alert, attempt):
        error = failure.getErrorMessage()[:200] or failure.type.__name__
        if attempt > len(self.retries) or self.stopped:
            events.emit("audit.webhook_failed", alert_id=alert.get("alert_id"), url=self.url,
                        attempts=attempt, error=error)
            return None
        timer = self.clock.callLater(self.retries[attempt - 1], self._retry, alert, attempt + 1)
        self._timers.add(timer)
        return None

    def _retry(self, alert, attempt):
        self._timers = {t for t in self._timers if t.active()}
        self.waiting.append((alert, attempt))
        self._start()

    def _slot_free(self, _):
        self.active -= 1
        self._start()


class WebhookError(Exception):
    pass


def _check_status(code):
    if not 200 <= code < 300:
        raise WebhookError(f"HTTP status {code}")
    return code


def _agent_post(reactor):
    """``post(url, body)`` with twisted.web's Agent, bounded by WEBHOOK_TIMEOUT."""
    from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
    from twisted.web.http_headers import Headers

    pool = HTTPConnectionPool(reactor, persistent=False)
    factory = getattr(pool, "_factory", None)
    if factory is not None:     # one "Starting factory" text line per POST otherwise
        pool._factory = type("QuietHTTPClientFactory", (factory,), {"noisy": False})
    agent = Agent(reactor, connectTimeout=WEBHOOK_TIMEOUT, pool=pool)
    headers = Headers({b"Content-Type": [b"application/json"],
                       b"User-Agent": [b"mailappliance-auditor"]})

    def post(url, body):
        d = agent.request(b"POST", url.encode("ascii"), headers,
                          FileBodyProducer(io.BytesIO(body)))

        def got(response):
            done = readBody(response)
            done.addCallback(lambda _: response.code)
            return done
        d.addCallback(got)
        d.addTimeout(WEBHOOK_TIMEOUT, reactor)
        return d
    return post

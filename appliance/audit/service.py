"""The live auditor: the rule engine as an observer of the event publisher.

``AuditService`` (a twisted Service) adds one observer to
``appliance.events``' publisher while it runs. Each published event becomes
the record ``[log] events`` holds for it (``events.as_record``) and goes
through the same ``Engine`` as ``mailappliance audit`` replays: for the same
events, the same findings. A finding is handled inside the observer call,
i.e. in the same reactor turn as the event that crossed the threshold: the
ban or hold is in place before the client's next command is read. Then
``audit.alert`` is emitted, the alert is kept (``AlertStore``), queued for the
digest and POSTed to the webhook (both asynchronous).

``QueueWatch`` looks at the queue once a minute and emits ``queue.stale`` when
its oldest message (not on hold) is older than ``[queue] delay_warning`` (once
per episode): a rule input like any other event.
"""

import ipaddress
import os

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from appliance import events
from appliance.audit.actions import Actions
from appliance.audit.alerts import AlertStore, Digest, Webhook
from appliance.audit.rules import BAN, HOLD, Engine, Settings

_log = Logger(namespace="mailappliance.audit")

events.register("queue.stale", "the oldest queued message (not on hold) is older than "
                "[queue] delay_warning: delivery is stuck somewhere (once per episode)",
                ("queue_id", "age", "delay_warning"))

WATCH_INTERVAL = 60.0
AUDIT_DIR = "audit"


class AuditService(service.Service):
    """The live auditor; see the module docstring.

    ``actions``: an IActions (its ``holds``, if any, hears of admin
    releases: ``queue.released``); ``store``: AlertStore or None;
    ``digest``: Digest or None; ``webhook``: Webhook or None.
    """

    name = "auditor"
    findings = 0                # since start
    shared = None               # the RedisState alerts are shared through (share())

    def __init__(self, settings, actions, store=None, digest=None, webhook=None):
        self.engine = Engine(settings, self._finding)
        self.actions = actions
        self.store = store
        self.digest = digest
        self.webhook = webhook

    @property
    def holds(self):
        return getattr(self.actions, "holds", None)

    @classmethod
    def from_config(cls, cfg, reactor, spool=None, runner=None, bans=None, write=None):
        """The auditor for ``cfg``: alerts in ``<data_dir>/audit``, digests
        through ``runner`` (the queue), holds through ``runner`` and ``spool``,
        bans through ``bans`` (None: no
        ban service, each ban is an ``audit.action_skipped`` event).
        ``write(f, *args) -> Deferred`` runs the file writes off the reactor."""
        from appliance.audit.actions import Holds
        directory = os.path.join(cfg.server.data_dir, AUDIT_DIR)
        files = {} if write is None else {"write": write}
        holds = Holds(runner, spool, directory, reactor, **files) if runner is not None else None
        digest = None
        if cfg.audit.alert_to and runner is not None:
            to = cfg.audit.alert_to
            if "@" not in to:
                to = f"{to}@{cfg.server.domains[0]}"
            digest = Digest(runner, reactor, cfg.server.hostname, to, cfg.audit.alert_interval)
        webhook = Webhook(cfg.audit.webhook, reactor) if cfg.audit.webhook else None
        return cls(Settings.from_config(cfg), Actions(bans, holds), AlertStore(directory, **files),
                   digest, webhook)

    def share(self, state):
        """Alerts shared with the other appliances through ``state`` (a
        ``RedisState``): ours are published, theirs kept in our store (with
        ``origin``) so ``alerts`` on any appliance lists all. Digest and
        webhook stay with the appliance that raised the alert."""
        self.shared = state
        state.on_alert(self._remote_alert)

    def _remote_alert(self, alert, origin):
        if self.store is None or not isinstance(alert, dict) or "rule" not in alert:
            return
        self.store.add(dict(alert, alert_id=self.store.new_id(), origin=origin,
                            origin_alert_id=alert.get("alert_id")))

    def startService(self):
        if self.store is not None:
            self.store.load()
        if self.holds is not None:
            self.holds.load()
        events.add_observer(self)
        super().startService()

    def stopService(self):
        events.remove_observer(self)
        if self.digest is not None:
            self.digest.stop()
        if self.webhook is not None:
            self.webhook.stop()
        return super().stopService()

    def __call__(self, event):
        name = event.get("event")
        if name not in self.engine.handlers:
            if name == "queue.released" and self.holds is not None:
                self.holds.message_released(event.get("queue_id"))
            return
        if name == "smtp.message.accepted" and not event.get("account"):
            return      # unauthenticated: no account to count (the cheap, common case)
        record = events.as_record(event)
        if record is None:
            return
        try:
            self.engine.feed(record)
        except Exception:  # noqa: BLE001 - the auditor must never break an emit
            _log.failure("the auditor failed on {name}", name=name)

    def _finding(self, finding):
        self.findings += 1
        alert_id = self.store.new_id() if self.store is not None else self.findings
        if finding.action == BAN:
            self.actions.ban(ipaddress.ip_network(finding.peer_ip), finding.rule,
                             finding.detail)
        elif finding.action == HOLD:
            self.actions.hold(finding.account, finding.rule)
        alert = dict(finding.to_json(), alert_id=alert_id)
        events.emit("audit.alert", alert_id=alert_id, rule=finding.rule,
                    peer_ip=finding.peer_ip, account=finding.account, count=finding.count,
                    window=finding.window, action=finding.action, detail=finding.detail)
        if self.store is not None:
            self.store.add(alert)
        if self.digest is not None:
            self.digest.add(alert)
        if self.webhook is not None:
            self.webhook.send(alert)
        if self.shared is not None:
            self.shared.publish_alert(alert)


class QueueWatch(service.Service):
    """Emits ``queue.stale`` (see the module docstring)."""

    name = "queue-watch"

    def __init__(self, spool, delay_warning, clock, interval=WATCH_INTERVAL):
        self.spool = spool
        self.delay_warning = delay_warning
        self.clock = clock
        self.interval = interval
        self.stale = False
        self._loop = None

    def startService(self):
        super().startService()
        if self.delay_warning:
            self._loop = task.LoopingCall(self.check)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False)

    def stopService(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        return super().stopService()

    def check(self):
        now = self.clock.seconds()
        oldest = None
        for qid in self.spool.queue_ids():          # queue ids sort by arrival time
            entry = self.spool.get(qid)
            if entry is not None and not entry.held:
                oldest = entry
                break
        age = now - oldest.envelope.received_at if oldest is not None else 0.0
        if age > self.delay_warning:
            if not self.stale:
                self.stale = True
                events.emit("queue.stale", queue_id=oldest.queue_id, age=round(age, 1),
                            delay_warning=self.delay_warning)
        else:
            self.stale = False

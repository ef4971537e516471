"""What a finding does: ban a network, hold an account's outbound mail.

``IActions`` is the seam between the rules and the rest of the server. The
live ``Actions`` bans through an injected ban service (the defences' ban API:
any object with ``ban(network, reason=..., rule=...)``, called with keywords,
as ``appliance.defence.bans.Bans.ban`` takes them; a ban of a network already
banned is not a new offence there) and holds through ``Holds``
(the queue). With no ban service configured, a ban is an ``audit.action_skipped``
event naming the network and the rule: the alert still goes out.

``Holds``: accounts whose outbound mail is held (a send spike: a stolen
password). Holding an account holds its messages already queued
(``QueueRunner.hold``) and makes the spool commit each new message of it on
hold (``QueueRunner.holds``: not even local delivery happens). The held
accounts are kept in ``<data_dir>/audit/holds.json`` (written off the reactor
thread, fsynced, renamed into place), so a restart keeps them held. An admin
ends the hold by releasing one of the account's held messages (``queue
release ID``: the account is released with it) or with ``release(account)``
(every held message of the account released too).
"""

import json
import os

from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import Interface, implementer

from appliance import events
from appliance.durable.files import write_atomic

_log = Logger(namespace="mailappliance.audit")

events.register("audit.action_skipped", "the auditor could not take an action (no ban "
                "service configured ...); the alert went out anyway",
                ("action", "target", "rule", "reason"))
events.register("audit.hold", "an account's outbound mail is held after a finding "
                "(its queued messages held, new ones held at acceptance)",
                ("account", "rule", "messages"))
events.register("audit.held", "a new message of a held account is being queued on hold "
                "(if its commit fails, the client gets 451 as for any message)",
                ("queue_id", "account"))
events.register("audit.released", "an admin ended an account's hold",
                ("account", "queue_id"))

HOLDS_FILE = "holds.json"


class IActions(Interface):
    """The actions a finding can take; each names the rule that took it."""

    def ban(network, rule, reason):
        """Ban ``network`` (an ``ipaddress`` network) on every listener."""

    def hold(account, rule):
        """Hold ``account``'s outbound mail until an admin releases it."""


@implementer(IActions)
class Actions:
    """``bans``: the ban service (``ban(network, reason=, rule=)``) or None;
    ``holds``: a ``Holds`` or None (then a hold is skipped with an event)."""

    def __init__(self, bans=None, holds=None):
        self.bans = bans
        self.holds = holds

    def ban(self, network, rule, reason):
        if self.bans is None:
            events.emit("audit.action_skipped", action="ban", target=str(network), rule=rule,
                        reason="no ban service configured")
            return None
        try:
            return self.bans.ban(network, reason=reason, rule=rule)
        except Exception as exc:  # noqa: BLE001 - a ban that fails must not stop the auditor
            _log.failure("ban of {network} failed", network=str(network))
            events.emit("audit.action_skipped", action="ban", target=str(network), rule=rule,
                        reason=f"ban failed: {exc}"[:200])
            return None

    def hold(self, account, rule):
        if self.holds is None:
            events.emit("audit.action_skipped", action="hold", target=account, rule=rule,
                        reason="no queue to hold in")
            return None
        return self.holds.hold(account, rule)


class Holds:
    """Held accounts, against the queue (see the module docstring).

    ``runner``: the QueueRunner (hold/release); ``spool``: its Spool;
    ``directory``: where ``holds.json`` lives; ``write``: ``f(*args) ->
    Deferred`` running ``f`` off the reactor thread.
    """

    def __init__(self, runner, spool, directory, clock, write=threads.deferToThread):
        self.runner = runner
        self.spool = spool
        self.path = os.path.join(directory, HOLDS_FILE)
        self.clock = clock
        self.write = write
        self.accounts = {}              # account -> {"rule", "since"}
        self._saving = None             # Deferred of the write in flight
        self._dirty = False
        self._releasing = set()         # queue ids we release ourselves
        if runner is not None:
            runner.holds = self         # the runner asks holds_new of every new message

    def load(self):
        """Read the held accounts (at start; a missing file is no holds)."""
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            _log.error("cannot read {path}: {error}; no account is held",
                       path=self.path, error=str(exc))
            return
        if isinstance(data, dict):
            self.accounts = {str(k): dict(v) for k, v in data.items() if isinstance(v, dict)}

    def is_held(self, account):
        return account in self.accounts

    def holds_new(self, envelope):
        """The queue runner's question at acceptance: a new message of a held
        account is committed on hold."""
        if envelope.auth_user and envelope.auth_user in self.accounts:
            events.emit("audit.held", queue_id=envelope.queue_id, account=envelope.auth_user)
            return True
        return False

    def hold(self, account, rule):
        """Hold ``account``: its queued messages now, its new ones at acceptance."""
        fresh = account not in self.accounts
        self.accounts[account] = {"rule": rule, "since": self.clock.seconds()}
        held = []
        for qid in self.spool.queue_ids():
            entry = self.spool.get(qid)
            if entry is not None and not entry.held and entry.envelope.auth_user == account:
                d = self.runner.hold(qid)
                d.addErrback(lambda f: None)        # deleted meanwhile: nothing to hold
                held.append(qid)
        events.emit("audit.hold", account=account, rule=rule, messages=len(held))
        if fresh:
            self._save()
        return held

    def release(self, account):
        """End ``account``'s hold and release its held messages; their ids."""
        if self.accounts.pop(account, None) is None:
            return defer.succeed([])
        events.emit("audit.released", account=account, queue_id="")
        self._save()
        qids = [qid for qid in self.spool.queue_ids()
                if (e := self.spool.get(qid)) is not None and e.held
                and e.envelope.auth_user == account]
        self._releasing.update(qids)
        ds = [self.runner.release(qid).addErrback(lambda f: None) for qid in qids]
        d = defer.gatherResults(ds)
        d.addBoth(lambda _: (self._releasing.difference_update(qids), qids)[1])
        return d

    def message_released(self, qid):
        """An admin released ``qid`` (event queue.released): its account's hold ends."""
        if qid in self._releasing:
            return
        entry = self.spool.get(qid)
        if entry is None:
            return
        account = entry.envelope.auth_user
        if account and self.accounts.pop(account, None) is not None:
            events.emit("audit.released", account=account, queue_id=qid)
            self._save()

    # -- the file

    def _save(self):
        self._dirty = True
        if self._saving is None:
            self._write_next()

    def _write_next(self):
        self._dirty = False
        data = json.dumps(self.accounts, indent=1, sort_keys=True).encode("utf-8")
        self._saving = self.write(_write_atomic, self.path, data)
        self._saving.addErrback(self._write_failed)
        self._saving.addBoth(self._written)

    def _write_failed(self, failure):
        _log.failure("cannot write {path}", failure, path=self.path)

    def _written(self, _):
        self._saving = None
        if self._dirty:
            self._write_next()

    def flushed(self):
        """A Deferred firing when the file holds the current state."""
        if self._saving is None:
            return defer.succeed(None)
        d = defer.Deferred()

        def check(result):
            if self._saving is None:
                d.callback(None)
            else:
                self._saving.addBoth(check)
            return result
        self._saving.addBoth(check)
        return d


def _write_atomic(path, data):
    """Replace ``path`` with ``data`` durably, its directory made if missing."""
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    write_atomic(path, data, mode=0o640)

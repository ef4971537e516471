"""The queue manager: takes committed spool entries to their mailboxes and MXes.

It works on an entry (a "pass") when the spool commits it (a spool listener),
at start (recovery after a crash or a restart), and when the entry's next
retry time comes (``WakeupSchedule``: one timer for the whole queue). A pass:

1. delivers the due local recipients (``LocalDelivery``) and writes their new
   states; an alias that forwards off the box adds its remote targets to the
   entry as recipients of their own (``original`` names the alias);
2. hands the due remote recipients, grouped by route kind and domain (one
   SMTP transaction each; on an edge the local domains take the MAILBOX
   route to ``[relay] mailbox_host``, appliance.deliver.routes), to the
   ``Dispatcher``, which runs at most ``[queue] concurrency``
   deliveries in all and ``per_domain`` per domain; each result is written
   back as soon as it arrives;
3. reports: one DSN for the recipients that failed since the last one, one
   "delayed" warning after ``[queue] delay_warning`` (``appliance.queue.bounce``);
4. removes the entry when every recipient is delivered or failed-and-reported.

Recipient states (``appliance.queue.store``): pending, delivered, deferred
(``next_attempt``, ``attempts``, ``last_error``), failed (``status``, ``dsn``
once reported). A temporary failure waits per ``[queue] retry`` (the last
step repeats, plus a little jitter); when ``max_age`` has run out it fails
with 4.4.7 instead. Local states are written only after the Maildir renames
are durable and a redo rewrites the same Maildir file, so local delivery is
exactly once across crashes; a remote result is written as soon as the remote
side answered, so a restart re-sends only what was not yet confirmed.

Without ``remote`` (delivery to other hosts not configured), recipients for
other hosts stay deferred with no retry time; without ``bouncer`` failed
recipients stay in the spool, unreported.
"""

import random as random_module

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance import events
from appliance.address import domain_of
from appliance.deliver.local import REMOTE_NOT_AVAILABLE, LocalDelivery
from appliance.deliver.routes import LOCAL, REMOTE, Routing
from appliance.queue.bounce import (DELAYED, FAILED as DSN_FAILED, FORWARD_UNVERIFIED, one_line,
                                    reports)
from appliance.queue.manager import RETRY_SCHEDULE, Dispatcher, QueueSettings, WakeupSchedule
from appliance.durable.commit import StorageError
from appliance.envelope import DEFERRED, DELIVERED, FAILED, PENDING
from appliance.queue.admin import QueueAdmin, QueueError

_log = Logger(namespace="mailappliance.queue")

events.register("queue.recovered", "committed spool entries found at start", ("count",))
events.register("queue.deferred", "a recipient failed temporarily and waits for a retry",
                ("queue_id", "recipient", "reason", "next_attempt"))
events.register("queue.expired", "a deferred recipient ran out of [queue] max_age",
                ("queue_id", "recipient", "age"))
events.register("delivery.failed", "a recipient failed permanently",
                ("queue_id", "recipient", "status", "reason"))

_FAILED = object()    # a pass that raised: retry after a pause, not at once

MAX_RCPTS_PER_TRANSACTION = 100    # RFC 5321 4.5.3.1.8: servers must take at least 100
EXPIRED = "4.4.7"

__all__ = ["QueueRunner", "QueueError", "RETRY_SCHEDULE"]


def _status_of(text, default):
    """The RFC 3463 code ``text`` starts with ("5.1.1 user unknown"), else ``default``."""
    word = text.split(" ", 1)[0] if text else ""
    parts = word.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245":
        return word
    return default


def _chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


class QueueRunner(service.Service):
    """Delivers spooled messages; see the module docstring.

    ``spool``: appliance.queue.store.Spool; ``directory``: resolve /
    is_local_domain; ``deliverer``: appliance.deliver.maildir.MaildirDeliverer
    (None on an edge: no Maildirs);
    ``clock``: an IReactorTime (task.Clock in tests); ``settings``: a
    QueueSettings; ``remote``: ``deliver(envelope, message, recipients,
    domain, kind) -> Deferred[list of RecipientResult]``
    (appliance.deliver.remote; ``kind`` from appliance.deliver.routes);
    ``bouncer``: appliance.queue.bounce.Bouncer; ``random() -> [0, 1)`` for
    the retry jitter; ``routing``: an ``appliance.deliver.routes.Routing``
    (the route kind of each recipient; default: local domains here, the
    rest by MX). An edge's routing sends the local domains to the mailbox
    host, through ``remote`` like any remote delivery.
    """

    name = "queue-runner"

    def __init__(self, spool, directory, deliverer, clock, retry_schedule=None, *,
                 settings=None, remote=None, bouncer=None, random=random_module.random,
                 routing=None):
        self.settings = settings or QueueSettings()
        self.spool = spool
        self.clock = clock
        self.directory = directory
        self.routing = routing or Routing(directory)
        self.local = LocalDelivery(directory, deliverer, clock)
        self.remote = remote
        self.bouncer = bouncer
        self.random = random
        self.retry_schedule = tuple(retry_schedule or self.settings.retry)
        self.outbound = Dispatcher(self.settings.concurrency, self.settings.per_domain)
        self.wakeups = WakeupSchedule(clock, self.process)
        self._active = {}        # queue id -> Deferred of the pass in progress
        self._again = set()      # queue ids asked for while a pass was running
        self._forced = set()     # queue ids whose deferred recipients are due now (retry)
        self._inflight = {}      # queue id -> set of recipients handed to the dispatcher
        self._recovery_retry = None
        self.ready = None        # fires when the first recovery attempt is over
        self.admin = QueueAdmin(spool, clock, self)     # list/show/hold/... (the admin shell)
        self.holds = None        # holds_new(envelope) -> True: commit it on hold (the auditor's)

    # -- service life

    def startService(self):
        super().startService()
        if self.outbound.stopped:       # started again after a stop
            self.outbound = Dispatcher(self.settings.concurrency, self.settings.per_domain)
        self.ready = self._recover()

    def _recover(self):
        self._recovery_retry = None
        d = self.spool.recover()
        d.addCallbacks(self._recovered, self._recovery_failed)
        return d

    def _recovery_failed(self, failure):
        # Without recovery nothing spooled earlier is delivered: keep trying.
        if not failure.check(StorageError):
            _log.failure("queue recovery failed", failure)
        if self.running:
            self._recovery_retry = self.clock.callLater(self.retry_schedule[0], self._recover)

    def _recovered(self, entries):
        events.emit("queue.recovered", count=len(entries))
        # Every known entry, not just the recovered ones: one committed before
        # this service started was announced to nobody.
        for qid in self.spool.queue_ids():
            self._schedule(qid)

    def stopService(self):
        """Stop scheduling; drop outbound work (it is redone after a restart)
        and wait for the local passes in progress."""
        super().stopService()
        self.wakeups.stop()
        self.outbound.stop()
        if self.remote is not None and hasattr(self.remote, "stop"):
            self.remote.stop()          # QUIT the idle outbound connections
        if self._recovery_retry is not None and self._recovery_retry.active():
            self._recovery_retry.cancel()
        return defer.DeferredList(list(self._active.values()))

    # -- passes

    def accept(self, envelope, message):
        """Queue a new message (from a client, a DSN, an alert digest): routed
        first, so its local deliveries are linked in the commit's own batch,
        then worked on. Fires with its queue id once it is durable."""
        held = self.holds is not None and self.holds.holds_new(envelope)
        d = self.spool.accept(envelope, message, router=self._route, held=held)
        d.addCallback(self._accepted)
        return d

    def space_available(self, size):
        return self.spool.space_available(size)

    def body_file(self, on_drain=None):
        """A spool file for a DATA body too big for memory, or None
        (``Spool.body_file``)."""
        return self.spool.body_file(on_drain)

    def _accepted(self, qid):
        self.process(qid)       # a failure here is the pass's: the message is queued
        return qid

    def process(self, qid):
        """Work on ``qid`` now (or right after the pass already running)."""
        if not self.running:
            return defer.succeed(None)
        entry = self.spool.get(qid)
        if entry is not None and entry.retired:
            # Delivered and removed by its own commit's batch: report, forget.
            self.local.report(entry)
            self.spool.forget(qid)
            return defer.succeed(None)
        if qid in self._active:
            self._again.add(qid)
            return self._active[qid]
        self.wakeups.cancel(qid)
        if entry is None:
            # Gone (removed by its last delivery's record, or deleted): the
            # pass would find nothing. Every relayed message ends here.
            return defer.succeed(None)
        d = defer.maybeDeferred(self._pass, qid)
        d.addErrback(self._pass_failed, qid)
        self._active[qid] = d
        d.addCallback(self._pass_done, qid)
        return d

    def _pass_failed(self, failure, qid):
        if self.spool.get(qid) is None:       # deleted meanwhile: nothing left to do
            return None
        if not failure.check(StorageError):   # the spool already emitted spool.error
            _log.failure("queue pass failed for {queue_id}", failure, queue_id=qid)
        return _FAILED

    def _pass_done(self, result, qid):
        self._active.pop(qid, None)
        if qid in self._again:
            self._again.discard(qid)
            self.process(qid)
        elif result is _FAILED:
            # Not at once: a disk that failed a moment ago fails again.
            self._wake(qid, self.clock.seconds() + self.retry_schedule[0])
        else:
            self._schedule(qid)

    @defer.inlineCallbacks
    def _pass(self, qid):
        entry = self.spool.get(qid)
        if entry is None or entry.held:
            return
        force = qid in self._forced
        self._forced.discard(qid)
        now = self.clock.seconds()
        local = [r for r in self._due(entry, now, force) if not self._is_remote(r)]
        if local:
            changes = yield self._deliver_local(entry, local)
            if self._finishes(entry, changes):
                # All delivered: removing the entry is the one state write needed.
                yield self.spool.remove(qid)
                return
            yield self.spool.update(qid, changes)
        remote = [r for r in self._due(entry, now, force) if self._is_remote(r)]
        if remote:
            self._send_remote(entry, remote)
        yield self._report(entry)
        if entry.finished() and not self._inflight.get(qid) and self.spool.get(qid) is entry:
            yield self.spool.remove(qid)

    def _route(self, entry):
        """The spool's router: resolve and link at commit while running (the
        first pass then finds its local deliveries done)."""
        if not self.running:
            return None
        if self.routing.edge:
            return None         # an edge has no Maildirs: nothing to link
        return self.local.route(entry)

    def _due(self, entry, now, force=False):
        busy = self._inflight.get(entry.queue_id, ())
        due = []
        for rcpt, st in entry.recipients.items():
            if rcpt in busy:
                continue
            if st["state"] == PENDING:
                due.append(rcpt)
            elif st["state"] == DEFERRED:
                when = st["next_attempt"]
                if when is None:
                    # "Remote delivery not available" (written without remote):
                    # due once there is remote delivery.
                    if self.remote is not None:
                        due.append(rcpt)
                elif force or when <= now:
                    due.append(rcpt)
        return due

    def _is_remote(self, rcpt):
        """Sent by ``remote`` (by MX, or to the mailbox host from an edge)."""
        return self.remote is not None and self.routing.kind(rcpt) != LOCAL

    def _finishes(self, entry, changes, settling=()):
        """Would ``changes`` leave nothing to do (every recipient delivered)?
        ``settling``: the in-flight recipients these changes are the results of."""
        if any(rcpt not in entry.recipients for rcpt in changes):
            return False            # new recipients (forward targets) still to deliver
        if self._inflight.get(entry.queue_id, set()).difference(settling):
            return False
        for rcpt, st in entry.recipients.items():
            change = changes.get(rcpt)
            if change is not None:
                if change["state"] != DELIVERED:
                    return False
            elif not (st["state"] == DELIVERED or (st["state"] == FAILED and st.get("dsn"))):
                return False
        return True

    # -- local delivery

    @defer.inlineCallbacks
    def _deliver_local(self, entry, todo):
        """``{recipient: spool changes}`` for one local delivery attempt of ``todo``."""
        # The Maildir files are links to (or copies of) the spool file: no read here.
        outcomes = yield self.local.deliver(entry, self.spool.source(entry.queue_id), todo)
        forwards = self._forwards(entry, outcomes) if self.remote is not None else {}
        now = self.clock.seconds()
        changes = {rcpt: self._settle(entry, rcpt, change, now)
                   for rcpt, change in outcomes.items()}
        changes.update(forwards)
        return changes

    def _forwards(self, entry, outcomes):
        """New recipients for the remote targets of local recipients (aliases
        that forward off the box); a recipient whose only remaining targets are
        remote is done here: its targets carry on as recipients of their own."""
        added = {}
        for rcpt, change in outcomes.items():
            for target in change.get("remote") or ():
                if target not in entry.recipients and target not in added:
                    added[target] = {"state": PENDING, "original": rcpt, "attempts": 0,
                                     "next_attempt": None, "last_error": ""}
            if change.get("last_error") == REMOTE_NOT_AVAILABLE:
                change.update(state=DELIVERED, last_error="", retry=False)
        return added

    # -- state transitions shared by local and remote results

    def _settle(self, entry, rcpt, change, now):
        """Complete one outcome: attempts, retry time, expiry, status; emit events."""
        retry = change.pop("retry", False)
        previous = entry.recipients.get(rcpt, {})
        change["attempts"] = previous.get("attempts", 0) + 1
        change["last_attempt"] = now
        qid = entry.queue_id
        if change["state"] == DEFERRED:
            if not retry:
                change["next_attempt"] = None
                return change
            expiry = self._expiry(entry)
            if expiry is None or now < expiry:
                when = now + self._backoff(change["attempts"])
                change["next_attempt"] = when if expiry is None else min(when, expiry)
                change.setdefault("status", _status_of(change["last_error"], "4.0.0"))
                events.emit("queue.deferred", queue_id=qid, recipient=rcpt,
                            reason=change["last_error"], next_attempt=change["next_attempt"])
                return change
            age = round(now - entry.envelope.received_at, 3)
            events.emit("queue.expired", queue_id=qid, recipient=rcpt, age=age)
            change.update(state=FAILED, status=EXPIRED, last_error=(
                f"{EXPIRED} delivery time expired; last error: {change['last_error']}"))
        if change["state"] == FAILED:
            change.setdefault("status", _status_of(change["last_error"], "5.0.0"))
            events.emit("delivery.failed", queue_id=qid, recipient=rcpt,
                        status=change["status"], reason=change["last_error"])
        change["next_attempt"] = None
        return change

    def _expiry(self, entry):
        if self.settings.max_age is None:
            return None
        return entry.envelope.received_at + self.settings.max_age

    def _backoff(self, attempts):
        step = self.retry_schedule[min(attempts, len(self.retry_schedule)) - 1]
        return step * (1.0 + self.settings.jitter * self.random())

    # -- remote delivery

    def _send_remote(self, entry, recipients):
        """One dispatcher job per route kind and destination domain (and per
        100 recipients)."""
        qid = entry.queue_id
        groups = {}
        for rcpt in recipients:
            key = (self.routing.kind(rcpt), domain_of(rcpt).lower())
            groups.setdefault(key, []).append(rcpt)
        busy = self._inflight.setdefault(qid, set())
        for (kind, domain), rcpts in groups.items():
            for chunk in _chunks(rcpts, MAX_RCPTS_PER_TRANSACTION):
                busy.update(chunk)
                d = self.outbound.submit(domain, _Attempt(self, qid, domain, chunk, kind))
                d.addCallbacks(self._attempted, self._attempt_failed,
                               callbackArgs=(qid, domain, chunk),
                               errbackArgs=(qid, domain, chunk))
                d.addBoth(self._attempt_over, qid, chunk)

    def _attempt(self, qid, domain, rcpts, kind=REMOTE):
        """In a dispatcher slot: (a Deferred of) the remote results, or None
        when the entry was held or deleted while the job waited for its slot."""
        entry = self.spool.get(qid)
        if entry is None or entry.held or not self.running:
            return None
        d = self.spool.read(qid)
        d.addCallback(self._deliver_remote, entry, domain, list(rcpts), kind)
        return d

    def _deliver_remote(self, message, entry, domain, rcpts, kind):
        return self.remote.deliver(entry.envelope, message, rcpts, domain, kind)

    def _attempted(self, results, qid, domain, rcpts):
        if results is None:
            return None
        outcomes = {}
        for result in results:
            if result.recipient in rcpts:
                outcomes[result.recipient] = _remote_outcome(result)
        for rcpt in rcpts:
            outcomes.setdefault(rcpt, {"state": DEFERRED, "retry": True,
                                       "last_error": "4.4.0 no result from the delivery"})
        return self._record(qid, outcomes)

    def _attempt_failed(self, failure, qid, domain, rcpts):
        if failure.check(defer.CancelledError) or not self.running:
            return None                     # stopping: the redo after a restart decides
        error = failure.value
        if getattr(error, "permanent", None) is not None and getattr(error, "status", None):
            # appliance.deliver.mx.RoutingError: NXDOMAIN, null MX (bounce) or SERVFAIL.
            state = FAILED if error.permanent else DEFERRED
            reason = f"{error.status} {one_line(getattr(error, 'text', str(error)))}"
            change = {"state": state, "status": error.status, "last_error": reason,
                      "retry": True}
        elif failure.check(StorageError):
            change = {"state": DEFERRED, "retry": True,
                      "last_error": f"4.3.0 spool read: {error.error}"}
        else:
            _log.failure("remote delivery of {queue_id} to {domain} failed", failure,
                         queue_id=qid, domain=domain)
            change = {"state": DEFERRED, "retry": True,
                      "last_error": f"4.3.0 internal error: {one_line(failure.getErrorMessage())}"}
        return self._record(qid, {rcpt: dict(change) for rcpt in rcpts})

    def _record(self, qid, outcomes):
        entry = self.spool.get(qid)
        if entry is None:
            return None                     # deleted while the delivery ran
        now = self.clock.seconds()
        changes = {rcpt: self._settle(entry, rcpt, change, now)
                   for rcpt, change in outcomes.items()}
        if self._finishes(entry, changes, settling=outcomes):
            # The last recipients delivered: a durable removal is the record
            # (no state write first; the entry cannot come back after a crash).
            return self.spool.remove(qid, durable=True)
        return self.spool.update(qid, changes)

    def _attempt_over(self, result, qid, rcpts):
        busy = self._inflight.get(qid)
        if busy is not None:
            busy.difference_update(rcpts)
            if not busy:
                del self._inflight[qid]
        # A StorageError was reported by the spool; a KeyError means the entry
        # was deleted while the delivery ran.
        if isinstance(result, Failure) and not result.check(StorageError, KeyError):
            _log.failure("recording the delivery of {queue_id} failed", result, queue_id=qid)
        # Report, remove or reschedule with what was just written.
        self.process(qid)
        return None

    # -- reports (DSNs)

    def _report(self, entry):
        """One DSN for newly failed recipients, one delay warning when due: a
        Deferred, or None when there is neither (the usual pass)."""
        if self.bouncer is None:
            return None
        failed = [r for r, st in entry.recipients.items()
                  if st["state"] == FAILED and not st.get("dsn")]
        if not failed and not self._delayed(entry, self.clock.seconds()):
            return None
        return self._send_reports(entry, failed)

    @defer.inlineCallbacks
    def _send_reports(self, entry, failed):
        if failed:
            yield self._report_failed(entry, failed)
        delayed = self._delayed(entry, self.clock.seconds())
        delayed = [r for r in delayed if not self.bouncer.unbounced_forward(entry, r)]
        if delayed:
            message = yield self.spool.read(entry.queue_id)
            yield self.bouncer.send(entry, DELAYED, entry.envelope.sender,
                                    reports(entry, delayed, DELAYED), message,
                                    retry_until=self._expiry(entry))
            yield self.spool.update(entry.queue_id, {}, flags={"delay_warned": True})

    @defer.inlineCallbacks
    def _report_failed(self, entry, failed):
        unbounced = [r for r in failed if self.bouncer.unbounced_forward(entry, r)]
        if unbounced:       # backscatter: never to a sender SPF did not confirm
            self.bouncer.drop(entry, unbounced, FORWARD_UNVERIFIED)
            yield self.spool.update(entry.queue_id, {r: {"dsn": "none"} for r in unbounced})
            failed = [r for r in failed if r not in unbounced]
            if not failed:
                return
        to, kind = self.bouncer.target(entry, failed)
        if to is None:
            self.bouncer.drop(entry, failed, kind)
            mark = "none"
        else:
            message = yield self.spool.read(entry.queue_id)
            mark = yield self.bouncer.send(entry, kind, to, reports(entry, failed, DSN_FAILED),
                                           message)
        yield self.spool.update(entry.queue_id, {r: {"dsn": mark} for r in failed})

    def _delayed(self, entry, now):
        """Recipients for the one delay warning, if it is due now."""
        due = self._warning_time(entry)
        if due is None or now < due:
            return []
        return [r for r, st in entry.recipients.items()
                if st["state"] == DEFERRED and st["next_attempt"] is not None]

    def _warning_time(self, entry):
        """When the delay warning is due (None: never, or already sent)."""
        if not self.settings.delay_warning or entry.flags.get("delay_warned") or \
                not entry.envelope.sender or self.bouncer is None:
            return None
        return entry.envelope.received_at + self.settings.delay_warning

    # -- scheduling

    def _schedule(self, qid):
        """Arm the next pass: now for pending recipients, else at the earliest
        retry (or delay warning) time."""
        entry = self.spool.get(qid)
        if entry is None or not self.running or qid in self._active or entry.held:
            return
        now = self.clock.seconds()
        unreported = self.bouncer is not None and any(
            st["state"] == FAILED and not st.get("dsn") for st in entry.recipients.values())
        if self._due(entry, now) or entry.finished() or unreported:
            self.process(qid)
            return
        busy = self._inflight.get(qid, ())
        times = [st["next_attempt"] for rcpt, st in entry.recipients.items()
                 if st["state"] == DEFERRED and st["next_attempt"] is not None
                 and rcpt not in busy]
        warning = self._warning_time(entry)
        if warning is not None and times:
            times.append(warning)
        if times:
            self._wake(qid, min(times))

    def _wake(self, qid, when):
        if self.running:
            self.wakeups.at(qid, when)

    # -- the admin shell's commands: appliance.queue.admin (QueueAdmin) does the
    # work; these three hooks are its way back into the scheduling.

    def held_changed(self, qid, held):
        if held:
            self.wakeups.cancel(qid)
        else:
            self._schedule(qid)

    def deleting(self, qid):
        self.wakeups.cancel(qid)

    def retry_now(self, qids):
        for one in qids:
            self._forced.add(one)
            self.process(one)

    def list(self):
        return self.admin.list()

    def show(self, qid):
        return self.admin.show(qid)

    def hold(self, qid):
        return self.admin.hold(qid)

    def release(self, qid):
        return self.admin.release(qid)

    def retry(self, qid=None):
        return self.admin.retry(qid)

    def delete(self, qid):
        return self.admin.delete(qid)


class _Attempt:
    """The work of one dispatcher job (a callable, so it starts only in its slot)."""

    __slots__ = ("runner", "qid", "domain", "recipients", "kind")

    def __init__(self, runner, qid, domain, recipients, kind=REMOTE):
        self.runner, self.qid, self.domain, self.recipients = runner, qid, domain, recipients
        self.kind = kind

    def __call__(self):
        return self.runner._attempt(self.qid, self.domain, self.recipients, self.kind)


def _remote_outcome(result):
    """The spool change for one RecipientResult (2xx / 4xx / 5xx)."""
    host = getattr(result, "remote_host", "") or ""
    text = one_line(result.text)
    status = result.status or f"{str(result.code)[0]}.0.0"
    if getattr(result, "from_remote", True):
        reply = f"{result.code} {text}"
        reason = f"host {host} said: {reply}" if host else reply
        diagnostic = f"smtp; {reply}"
    else:
        reason = f"{status} {text}" if not text.startswith(status) else text
        diagnostic = ""
    change = {"status": status, "remote_host": host, "diagnostic": diagnostic}
    if 200 <= result.code < 300:
        change.update(state=DELIVERED, last_error="")
    elif 500 <= result.code < 600:
        change.update(state=FAILED, last_error=reason)
    else:
        change.update(state=DEFERRED, last_error=reason, retry=True)
    return change

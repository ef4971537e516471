"""The queue runner: takes committed spool entries to their local mailboxes.

It works on an entry when the spool commits it (a spool listener), at start
(recovery after a crash or a restart), and when a deferred local recipient's
retry time comes. For each entry: read the message, deliver the recipients
still to do, then write their new states (or remove the entry when every
recipient is delivered). States are written only after the Maildir renames are
durable, and a redo rewrites the same Maildir file name, so a crash at any
point delivers each local copy exactly once.

Recipients for other hosts stay ``deferred`` in the spool for the outbound
queue; unknown ones stay ``failed`` for bounce handling. Neither is dropped.
"""

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from appliance import events
from appliance.deliver.local import LocalDelivery
from appliance.queue.store import DEFERRED, DELIVERED, PENDING, StorageError

_log = Logger(namespace="mailappliance.queue")

events.register("queue.recovered", "committed spool entries found at start", ("count",))

_FAILED = object()    # a pass that raised: retry after a pause, not at once

RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)   # local retries; the last repeats


class QueueRunner(service.Service):
    """Delivers spooled messages locally.

    ``spool``: appliance.queue.store.Spool; ``directory``: resolve /
    is_local_domain; ``deliverer``: appliance.deliver.maildir.MaildirDeliverer;
    ``clock``: an IReactorTime (task.Clock in tests).
    """

    name = "queue-runner"

    def __init__(self, spool, directory, deliverer, clock, retry_schedule=RETRY_SCHEDULE):
        self.spool = spool
        self.clock = clock
        self.local = LocalDelivery(directory, deliverer, clock)
        self.retry_schedule = tuple(retry_schedule)
        self._active = {}        # queue id -> Deferred of the pass in progress
        self._again = set()      # queue ids asked for while a pass was running
        self._timers = {}        # queue id -> DelayedCall of the next retry
        self._recovery_retry = None
        self.ready = None        # fires when the first recovery attempt is over
        spool.add_listener(self.process)      # ignored until the service runs

    def startService(self):
        super().startService()
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
        super().stopService()
        for timer in self._timers.values():
            if timer.active():
                timer.cancel()
        self._timers.clear()
        if self._recovery_retry is not None and self._recovery_retry.active():
            self._recovery_retry.cancel()
        return defer.DeferredList(list(self._active.values()))

    def process(self, qid):
        """Work on ``qid`` now (or right after the pass already running)."""
        if not self.running:
            return defer.succeed(None)
        if qid in self._active:
            self._again.add(qid)
            return self._active[qid]
        timer = self._timers.pop(qid, None)
        if timer is not None and timer.active():
            timer.cancel()
        d = defer.maybeDeferred(self._pass, qid)
        d.addErrback(self._pass_failed, qid)
        self._active[qid] = d
        d.addCallback(self._pass_done, qid)
        return d

    def _pass_failed(self, failure, qid):
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
            self._arm(qid, self.retry_schedule[0])
        else:
            self._schedule(qid)

    def _due(self, entry, now):
        return [rcpt for rcpt, st in entry.recipients.items()
                if st["state"] == PENDING or (st["state"] == DEFERRED and
                                              st["next_attempt"] is not None and
                                              st["next_attempt"] <= now)]

    @defer.inlineCallbacks
    def _pass(self, qid):
        entry = self.spool.get(qid)
        if entry is None:
            return
        todo = self._due(entry, self.clock.seconds())
        if todo:
            changes = yield self._deliver(entry, todo)
            states = [changes.get(rcpt, st)["state"] for rcpt, st in entry.recipients.items()]
            if any(state != DELIVERED for state in states):
                yield self.spool.update(qid, changes)
                return
        if todo or entry.done():
            # All delivered: removing the entry is the one state write needed.
            yield self.spool.remove(qid)

    @defer.inlineCallbacks
    def _deliver(self, entry, todo):
        """``{recipient: spool changes}`` for one delivery attempt of ``todo``."""
        try:
            message = yield self.spool.read(entry.queue_id)
        except StorageError as e:
            outcomes = {r: {"state": DEFERRED, "last_error": f"4.3.0 spool read: {e.error}",
                            "retry": True} for r in todo}
        else:
            outcomes = yield self.local.deliver(entry, message, todo)
        now = self.clock.seconds()
        for rcpt, change in outcomes.items():
            attempts = entry.recipients[rcpt].get("attempts", 0) + 1
            change["attempts"] = attempts
            retry = change.pop("retry", False)
            change["next_attempt"] = now + self._backoff(attempts) if retry else None
        return outcomes

    def _backoff(self, attempts):
        return self.retry_schedule[min(attempts, len(self.retry_schedule)) - 1]

    def _schedule(self, qid):
        """Arm the next pass: now for pending recipients, else at the earliest retry."""
        entry = self.spool.get(qid)
        if entry is None or not self.running or qid in self._active:
            return
        if entry.in_state(PENDING) or entry.done():
            self.process(qid)
            return
        times = [st["next_attempt"] for st in entry.recipients.values()
                 if st["state"] == DEFERRED and st["next_attempt"] is not None]
        if times:
            self._arm(qid, max(0.0, min(times) - self.clock.seconds()))

    def _arm(self, qid, delay):
        old = self._timers.pop(qid, None)
        if old is not None and old.active():
            old.cancel()
        if self.running:
            self._timers[qid] = self.clock.callLater(delay, self.process, qid)

"""The queue's admin operations (postqueue -p, postsuper -h/-H/-d, postqueue -f).

``QueueAdmin`` works on the spool's entries and tells the queue runner what
changed (``held_changed``, ``deleting``, ``retry_now``), so the runner keeps
the scheduling and this module keeps what an admin may ask: list, show,
select by sender / recipient domain / state, hold, release, retry, delete.
The admin command set (``appliance.admin.commands``) and ``QueueRunner``'s
own methods (which delegate here) are its callers.
"""

import re

from twisted.internet import defer

from appliance import events
from appliance.address import domain_of
from appliance.queue.store import QUEUE_ID

events.register("queue.held", "an admin put a message on hold", ("queue_id",))
events.register("queue.released", "an admin released a held message", ("queue_id",))
events.register("queue.deleted", "an admin deleted a message from the queue", ("queue_id",))
events.register("queue.retried", "an admin asked for delivery attempts now",
                ("queue_id", "count"))

HEADERS_SHOWN = 64 * 1024          # of a message's header block in `queue show`

__all__ = ["QueueAdmin", "QueueError", "HEADERS_SHOWN"]


class QueueError(Exception):
    """An admin request that cannot be done (unknown id ...); the text is one line."""


class QueueAdmin:
    """Admin operations over ``spool`` (a Spool) for ``runner`` (a QueueRunner:
    ``held_changed(qid, held)``, ``deleting(qid)``, ``retry_now(qids)``)."""

    def __init__(self, spool, clock, runner):
        self.spool = spool
        self.clock = clock
        self.runner = runner

    def entry(self, qid):
        """The SpoolEntry for ``qid``, or QueueError (also for ids of the wrong form)."""
        entry = self.spool.get(qid) if isinstance(qid, str) and QUEUE_ID.fullmatch(qid) \
            else None
        if entry is None:
            raise QueueError(f"no message {qid!r} in the queue")
        return entry

    def ids(self):
        """Every queue id, oldest first."""
        return self.spool.queue_ids()

    def list(self):
        """Every queued message, oldest first: id, sender, recipients and their
        states, size, age, last error, held."""
        return self.spool.entries()

    def iter_list(self):
        """The listing one summary at a time (a long queue streams)."""
        now = self.clock.seconds()
        for qid in self.spool.queue_ids():
            entry = self.spool.get(qid)
            if entry is not None:
                yield entry.summary(now)

    def select(self, sender=None, domain=None, held=None, auth_user=None):
        """Queue ids whose envelope sender is ``sender`` (an address, or
        ``@domain`` for any sender of that domain), that have a recipient in
        ``domain``, that are (not) held, or were submitted by ``auth_user``.
        Criteria combine (all must match)."""
        sender = sender.lower() if sender else None
        domain = domain.lower().lstrip("@") if domain else None
        auth_user = auth_user.lower() if auth_user else None
        chosen = []
        for qid in self.spool.queue_ids():
            entry = self.spool.get(qid)
            if entry is None:
                continue
            env = entry.envelope
            if sender is not None:
                mine = env.sender.lower()
                if sender.startswith("@"):
                    if domain_of(mine).lower() != sender[1:] or not mine:
                        continue
                elif mine != sender:
                    continue
            if domain is not None and not any(domain_of(r).lower() == domain
                                              for r in entry.recipients):
                continue
            if held is not None and entry.held != held:
                continue
            if auth_user is not None and (env.auth_user or "").lower() != auth_user:
                continue
            chosen.append(qid)
        return chosen

    def show(self, qid):
        """Deferred[dict]: the listing's fields, the envelope, each recipient's
        full state and the message's header block (text)."""
        try:
            entry = self.entry(qid)
        except QueueError as e:
            return defer.fail(e)
        info = entry.summary(self.clock.seconds())
        info["envelope"] = entry.envelope.to_json()
        info["states"] = {r: dict(st) for r, st in entry.recipients.items()}
        d = self.spool.read(qid)

        def headers(message):
            end = message.find(b"\r\n\r\n")
            if end < 0:
                end = message.find(b"\n\n")
            block = message[:end if end >= 0 else HEADERS_SHOWN][:HEADERS_SHOWN]
            info["headers"] = block.decode("utf-8", "replace")
            return info
        d.addCallback(headers)
        d.addErrback(self._gone, qid)
        return d

    def _gone(self, failure, qid):
        failure.trap(KeyError)
        raise QueueError(f"no message {qid!r} in the queue")

    def hold(self, qid):
        """Stop delivering ``qid`` until ``release`` (deliveries under way finish)."""
        return self._set_held(qid, True, "queue.held")

    def release(self, qid):
        return self._set_held(qid, False, "queue.released")

    def _set_held(self, qid, held, event):
        try:
            self.entry(qid)
        except QueueError as e:
            return defer.fail(e)
        d = self.spool.update(qid, {}, flags={"held": held})

        def done(_):
            events.emit(event, queue_id=qid)
            self.runner.held_changed(qid, held)
            return qid
        d.addCallback(done)
        return d

    def retry(self, qid=None):
        """Attempt the deferred recipients of ``qid`` (or of every message not
        held) now; returns how many messages were asked."""
        if qid is not None:
            qids = [self.entry(qid).queue_id]
        else:
            qids = [q for q in self.spool.queue_ids() if not self.spool.get(q).held]
        self.runner.retry_now(qids)
        events.emit("queue.retried", queue_id=qid or "", count=len(qids))
        return len(qids)

    def delete(self, qid):
        """Remove ``qid`` from the queue without any notification (postsuper -d)."""
        try:
            self.entry(qid)
        except QueueError as e:
            return defer.fail(e)
        self.runner.deleting(qid)
        d = self.spool.remove(qid)

        def done(_):
            events.emit("queue.deleted", queue_id=qid)
            return qid
        d.addCallback(done)
        return d


_ID_PREFIX = re.compile(r"[0-9A-Za-z]*")


def complete_ids(admin, prefix):
    """Queue ids starting with ``prefix`` (Tab completion in the shell)."""
    if not _ID_PREFIX.fullmatch(prefix or ""):
        return []
    return [q for q in admin.ids() if q.startswith(prefix)]

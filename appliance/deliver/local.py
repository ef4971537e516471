"""Local delivery: resolve each recipient, write one copy per local mailbox.

Given a spool entry and the recipients to work on, ``LocalDelivery.deliver``
asks the directory where each recipient goes (aliases and catch-alls
expanded), writes the message once into every local mailbox reached (a user
reached twice via aliases gets one copy), and answers with the new state of
each recipient. It never writes spool state itself: the queue runner does,
after the Maildir renames are durable, which is what makes local delivery
exactly once across crashes.

The first pass over a new entry usually finds the work done: the spool's
commit resolved the recipients and linked the message into their Maildirs in
its own batch (``route`` below, ``appliance.queue.store.Spool.set_router``);
``deliver`` then only turns those results into recipient states.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from appliance import events
from appliance.address import domain_of
from appliance.deliver.maildir import Delivered
from appliance.envelope import DEFERRED, DELIVERED, FAILED, Route

events.register("delivery.local", "a message was stored in a local Maildir",
                ("queue_id", "recipient", "mailbox", "size", "delay"))
events.register("delivery.local.failed", "a recipient failed permanently at local delivery",
                ("queue_id", "recipient", "reason"))
events.register("delivery.deferred", "a recipient could not be delivered now and waits",
                ("queue_id", "recipient", "reason"))

USER_UNKNOWN = "5.1.1 user unknown"
REMOTE_NOT_AVAILABLE = "remote delivery not yet available"


def _answer(lookup, *args):
    """``lookup(*args)``: its value, its Deferred, or the Failure it raised."""
    try:
        return lookup(*args)
    except Exception:  # noqa: BLE001 - a failed lookup is an answer too
        return Failure()


def _one_line(failure):
    text = f"{failure.type.__name__}: {failure.getErrorMessage()}"
    return " ".join(text.split())[:200]


class LocalDelivery:
    """Resolves recipients through ``directory`` and stores copies with ``maildir``."""

    def __init__(self, directory, maildir, clock):
        self.directory = directory
        self.maildir = maildir
        self.clock = clock

    def route(self, entry):
        """For the spool's commit of ``entry``: a Route (or a Deferred of one)
        with every recipient resolved and the local mailboxes to link, or
        None when a lookup failed (the first pass will see it and defer)."""
        recipients = list(entry.envelope.recipients)
        answers = [_answer(self.directory.resolve, rcpt) for rcpt in recipients]
        if any(isinstance(a, defer.Deferred) for a in answers):
            d = defer.DeferredList([defer.maybeDeferred(lambda a=a: a) for a in answers],
                                   consumeErrors=True)
            d.addCallback(lambda results: self._route(
                entry, recipients, [value if ok else None for ok, value in results]))
            return d
        return self._route(entry, recipients, answers)

    def _route(self, entry, recipients, answers):
        targets = {}
        for rcpt, found in zip(recipients, answers):
            if not isinstance(found, (list, tuple)):
                return None
            targets[rcpt] = list(found)
        mailboxes = self._mailboxes(entry, targets)
        links = self.maildir.commit_links(entry.envelope, mailboxes) if mailboxes else None
        # Complete: every recipient reaches local mailboxes only, so once the
        # links are durable there is nothing left to do for this entry.
        complete = links is not None and all(
            found and all(self._is_local(t) for t in found) for found in targets.values())
        return Route(targets, links, complete)

    def report(self, entry):
        """The delivery events of an entry its commit delivered and retired."""
        self._outcomes(entry, entry.resolved, entry.linked)
        entry.resolved = entry.linked = None

    def deliver(self, entry, message, recipients):
        """Fires with ``{recipient: changes}`` for the spool (state, last_error...).

        ``message``: what ``MaildirDeliverer.deliver`` takes (the spool's
        SpoolFile). A recipient is ``delivered`` when all its local mailboxes
        hold the message, ``failed`` when it resolves to nothing, ``deferred``
        when the directory or a Maildir failed (temporary) or when it has
        non-local targets (kept for the outbound queue).
        """
        resolved, entry.resolved = entry.resolved, None     # the commit's, used once
        if resolved is not None and all(rcpt in resolved for rcpt in recipients):
            targets = {rcpt: resolved[rcpt] for rcpt in recipients}
            return self._store(entry, message, targets)
        d = self._resolve_all(recipients)
        d.addCallback(lambda found: self._store(entry, message, found))
        return d

    def _store(self, entry, message, targets):
        mailboxes = self._mailboxes(entry, targets)
        linked, entry.linked = entry.linked or {}, None     # the commit's, used once
        stored = {m: linked[m] for m in mailboxes if m in linked}
        rest = [m for m in mailboxes if not isinstance(stored.get(m), Delivered)]
        if not rest:
            return defer.succeed(self._outcomes(entry, targets, stored))
        d = self.maildir.deliver(entry.envelope, message, rest)

        def done(results):
            stored.update(results)
            return self._outcomes(entry, targets, stored)
        d.addCallback(done)
        return d

    def _outcomes(self, entry, targets, stored):
        counted = set()     # mailboxes already reported for an earlier recipient
        return {rcpt: self._outcome(entry, rcpt, found, stored, counted)
                for rcpt, found in targets.items()}

    @defer.inlineCallbacks
    def _resolve_all(self, recipients):
        """``{recipient: list of targets or Failure}``, looked up concurrently."""
        ds = [defer.maybeDeferred(self.directory.resolve, rcpt) for rcpt in recipients]
        results = yield defer.DeferredList(ds, consumeErrors=True)
        found = {}
        for rcpt, (ok, value) in zip(recipients, results):
            if ok and not isinstance(value, (list, tuple)):
                value = Failure(TypeError(f"directory answered {type(value).__name__}"))
            found[rcpt] = list(value) if ok else value
        return found

    def _is_local(self, target):
        return self.directory.is_local_domain(domain_of(target))

    def _mailboxes(self, entry, targets):
        """Local mailboxes still lacking the message, each once (alias dedupe)."""
        done = {m for st in entry.recipients.values() for m in st.get("delivered_to", [])}
        wanted = []
        for found in targets.values():
            if isinstance(found, Failure):
                continue
            for target in found:
                if self._is_local(target) and target not in done and target not in wanted:
                    wanted.append(target)
        return wanted

    def _outcome(self, entry, rcpt, found, stored, counted):
        qid = entry.queue_id
        previous = list(entry.recipients.get(rcpt, {}).get("delivered_to", []))
        if isinstance(found, Failure):
            reason = "4.4.3 directory lookup failed: " + _one_line(found)
            return self._deferred(qid, rcpt, reason, previous, [])
        if not found:
            events.emit("delivery.local.failed", queue_id=qid, recipient=rcpt,
                        reason=USER_UNKNOWN)
            return {"state": FAILED, "last_error": USER_UNKNOWN}
        local = [t for t in found if self._is_local(t)]
        remote = [t for t in found if not self._is_local(t)]
        delivered, errors = previous, []
        for mailbox in local:
            result = stored.get(mailbox)    # None: stored by an earlier attempt
            if isinstance(result, Failure):
                errors.append(f"4.3.0 mailbox {mailbox}: " + _one_line(result))
                continue
            if mailbox not in delivered:
                delivered.append(mailbox)
            if result is not None and not result.existed and mailbox not in counted:
                counted.add(mailbox)
                events.emit("delivery.local", queue_id=qid, recipient=rcpt, mailbox=mailbox,
                            size=result.size,
                            delay=round(self.clock.seconds() - entry.envelope.received_at, 3))
        if errors:
            return self._deferred(qid, rcpt, "; ".join(errors), delivered, remote)
        if remote:
            return self._deferred(qid, rcpt, REMOTE_NOT_AVAILABLE, delivered, remote,
                                  retry=False)
        return {"state": DELIVERED, "last_error": "", "delivered_to": delivered,
                "next_attempt": None}

    def _deferred(self, qid, rcpt, reason, delivered, remote, retry=True):
        # "retry" is for the runner (local retry or not) and never reaches the spool.
        events.emit("delivery.deferred", queue_id=qid, recipient=rcpt, reason=reason)
        return {"state": DEFERRED, "last_error": reason, "delivered_to": delivered,
                "remote": remote, "retry": retry}

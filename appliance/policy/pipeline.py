"""The policy pipeline: every decision between a client's command and the spool.

A message passes the same stages on every SMTP listener, in order:

- MAIL: the relay rules (``appliance.policy.relay``: who may send as whom),
  then each extra stage's ``at_mail`` (rate limits);
- RCPT: the relay rules (local recipients, relaying), then each extra stage's
  ``at_rcpt`` (greylisting comes after recipient validation: an unknown user
  gets 550, never 451);
- DATA: the relay rules' content check (the submission From: rule), then by
  origin — decided once per message, here — the inbound SPF/DKIM/DMARC checks
  for mail from outside, or DKIM signing for ours (authenticated, or from
  ``[relay] trusted_networks``).

Mail from a trusted network that no authenticated user sent and that goes
to local recipients only is not signed: a signature vouches for mail that
leaves the site, and this is what a mailbox host receives from its edges
(SPEC §7), which checked it (their Authentication-Results come along) and
signed what their own users sent. Nor is it checked again: SPF would judge
the edge's address as the sender's.

A stage answers a ``Reply`` (a refusal) or None (go on), or a Deferred of
either. The first refusal ends the stage. Extra stages implement any of
``at_mail(session, sender)`` and ``at_rcpt(session, recipient)``.
"""

from twisted.internet import defer

from appliance.message import strip_forged
from appliance.headers import header_block
from appliance.net.peer import peer_in
from appliance.policy.checks import HEADER_TOO_BIG, MAX_HEADER_OCTETS, Facts, site_names

OURS = "ours"           # authenticated, or from a trusted network: signed, not checked
OUTSIDE = "outside"     # everyone else: checked, not signed


class Refused(Exception):
    """The message is refused after DATA with ``reply``; nothing was stored."""

    def __init__(self, reply):
        super().__init__(reply.text)
        self.reply = reply


def origin(session, trusted_networks):
    """OURS or OUTSIDE, for a message of ``session``."""
    if session.auth_user or peer_in(trusted_networks, session.peer_ip):
        return OURS
    return OUTSIDE


def _kept_unless_answered(answer, reply):
    return reply if answer is None else answer


class Pipeline:
    """The stages of one listener; see the module docstring.

    ``relay`` is an MXPolicy or SubmissionPolicy; ``checks`` an
    InboundChecks (or None: not checked); ``signer`` a Signer (or None: not
    signed); ``stages`` the extra stages, in order.
    """

    def __init__(self, relay, trusted_networks=(), checks=None, signer=None, stages=()):
        self.relay = relay
        config = getattr(relay, "config", None)
        self.hostname = config.server.hostname if config is not None else ""
        self.site = site_names(config) if config is not None else ()
        self.trusted_networks = trusted_networks
        self.checks = checks
        self.signer = signer
        self.stages = list(stages)

    def at_mail(self, session, sender):
        """The Reply to MAIL FROM ``sender``: a Reply when every stage
        answered at once (the usual case), else a Deferred firing with it.
        A stage that raises gives a failed Deferred."""
        try:
            reply = self.relay.check_sender(session, sender)
            return self._staged(reply, "at_mail", (session, sender), 0)
        except Exception:  # noqa: BLE001 - the caller's errback reports it
            return defer.fail()

    def at_rcpt(self, session, recipient):
        """The Reply to RCPT TO ``recipient``, or a Deferred firing with it
        (as ``at_mail``)."""
        try:
            reply = self.relay.check_recipient(session, recipient)
            return self._staged(reply, "at_rcpt", (session, recipient), 0)
        except Exception:  # noqa: BLE001 - the caller's errback reports it
            return defer.fail()

    def _staged(self, reply, step, args, first):
        """``reply``, then after a positive one each stage with ``step`` in
        turn from ``self.stages[first]``: a stage's None keeps the reply, a
        Reply replaces it. Answers that are plain values are taken here, in
        this call (no Deferred per stage: every MAIL and RCPT pays for
        them); from the first Deferred on, the rest follows it."""
        stages = self.stages
        for n in range(first, len(stages)):
            if isinstance(reply, defer.Deferred):
                return reply.addCallback(self._staged, step, args, n)
            if not reply.positive:
                return reply
            method = getattr(stages[n], step, None)
            if method is None:
                continue
            answer = method(*args)
            if isinstance(answer, defer.Deferred):
                answer.addCallback(_kept_unless_answered, reply)
                return answer.addCallback(self._staged, step, args, n + 1)
            if answer is not None:
                reply = answer
        return reply

    def at_data(self, session, envelope, body, received, context, body_digests=None):
        """A Deferred firing with the message to store: ``received`` (our
        trace header, bytes) + ``body``, checked or signed by origin; fails
        with ``Refused`` (or a signing error carrying its ``smtp_reply``).
        ``envelope.params["folder"]`` may be set (DMARC quarantine).
        ``context`` (session, peer_ip, queue_id) goes into the events.
        ``body_digests``: when ``body`` is only the header section and its
        blank line (the rest is in the spool's file: issue 17), the
        ``BodyDigests`` that DKIM signing and verification hash it with."""
        if len(header_block(body)) > MAX_HEADER_OCTETS:
            # Bounded work per message, whatever its origin: the passes over
            # the header lines below run on the reactor for our own mail.
            return defer.fail(Refused(HEADER_TOO_BIG))
        d = defer.maybeDeferred(self.relay.check_message, session, body)
        d.addCallback(self._content_checked, session, envelope, body, received, context,
                      {} if body_digests is None else {"body": body_digests})
        return d

    def _content_checked(self, refusal, session, envelope, body, received, context, digests):
        if refusal is not None:
            raise Refused(refusal)
        if origin(session, self.trusted_networks) == OURS:
            # Not checked, but an Authentication-Results naming us is a
            # forgery here too: local mailboxes and readers trust it. A user
            # writes none naming the site either; a trusted network's (an
            # edge's, SPEC §7) are kept.
            site = self.site if session.auth_user else ()
            message = received + strip_forged(body, self.hostname, site=site)[0]
            if self.signer is None or self._stays_here(session, envelope):
                return message
            return self.signer.sign(message, context, **digests)
        if self.checks is None:
            return received + strip_forged(body, self.hostname, site=self.site)[0]
        facts = Facts(session.peer_ip, session.helo, envelope.sender)
        d = self.checks.check(facts, body, context, **digests)
        d.addCallback(self._checked, envelope, received)
        return d

    def _stays_here(self, session, envelope):
        """Relayed to us by a trusted network for local recipients only (an
        edge's mail on its mailbox host): not ours to sign (module doc)."""
        if session.auth_user:
            return False
        local = self.relay.directory.is_local_domain
        try:
            return all(local(rcpt.rpartition("@")[2]) for rcpt in envelope.recipients)
        except Exception:  # noqa: BLE001 - in doubt, sign (as before this rule)
            return False

    @staticmethod
    def _checked(verdict, envelope, received):
        if verdict.refusal is not None:
            raise Refused(verdict.refusal)
        if verdict.folder is not None:
            envelope.params["folder"] = verdict.folder
        mailfrom = [r.result for r in verdict.spf if r.identity == "mailfrom"]
        if mailfrom:        # the bouncer asks: is the sender who it says? (backscatter)
            envelope.params["spf"] = mailfrom[0]
        return received + verdict.message

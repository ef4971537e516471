"""The defences as SMTP policy stages, and their replies.

``DefencePolicy(inner, defences)`` wraps a listener's policy (``MXPolicy``,
``SubmissionPolicy``: ``check_sender`` / ``check_recipient`` answering a
``Reply`` or a Deferred of one):

- MAIL: the inner policy first (AUTH required, sender ownership); then the
  message rate: per authenticated user (``messages_per_hour_per_user``),
  else per client network on the MX port (``messages_per_hour_per_ip``);
  over it ``451 4.7.1``. Nothing accepted is ever dropped for a limit: the
  client hears it before sending a body.
- RCPT: the inner policy first (unknown users stay ``550 5.1.1``, relay
  refusals ``554``); a recipient it accepts goes through greylisting
  (``451 4.7.1`` for a new triplet). Never for authenticated sessions.
"""

from twisted.internet import defer

from appliance.replies import Reply

MESSAGE_RATE = Reply(451, "4.7.1", "Too many messages from you, try again later")
GREYLISTED = Reply(451, "4.7.1", "Greylisted, please try again later")
BANNED = Reply(421, "4.7.0", "Your address is blocked, closing connection")
REFUSED = {
    "denied": Reply(421, "4.7.0", "Access denied"),
    "banned": Reply(421, "4.7.0", "Your address is blocked"),
    "busy": Reply(421, "4.7.0", "Too many connections from your address"),
    "rate": Reply(421, "4.7.0", "Too many connections from your address, slow down"),
}
TOO_MANY_JUNK = Reply(421, "4.7.0", "Too many commands that do not send mail, closing")

#: The IMAP and POP3 words for the same refusals.
REFUSED_TEXT = {
    "denied": "Access denied",
    "banned": "Your address is blocked",
    "busy": "Too many connections from your address",
    "rate": "Too many connections from your address, slow down",
}
BANNED_TEXT = "Your address is blocked, closing connection"
#: The ``kind`` of a protocol's limit event for a gate verdict.
LIMIT_KIND = {"busy": "connections_per_ip", "rate": "connections_per_minute_per_ip",
              "banned": "banned", "denied": "denied"}


def smtp_refusal(verdict):
    return REFUSED[verdict].to_bytes()


def imap_refusal(verdict):
    return b"* BYE [UNAVAILABLE] " + REFUSED_TEXT[verdict].encode("ascii") + b"\r\n"


def pop3_refusal(verdict):
    return b"-ERR [SYS/TEMP] " + REFUSED_TEXT[verdict].encode("ascii") + b"\r\n"


class DefencePolicy:
    """See the module doc; ``inner`` keeps every other rule."""

    def __init__(self, inner, defences):
        self.inner = inner
        self.defences = defences

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def check_sender(self, session, sender):
        d = defer.maybeDeferred(self.inner.check_sender, session, sender)
        d.addCallback(self._sender_rate, session, sender)
        return d

    def _sender_rate(self, reply, session, sender):
        if not reply.positive:
            return reply
        if not self.defences.mail_allowed(session.peer_ip, session.auth_user or None):
            return MESSAGE_RATE
        session.mail_from = "" if sender.is_null else sender.canonical()
        return reply

    def check_recipient(self, session, recipient):
        d = defer.maybeDeferred(self.inner.check_recipient, session, recipient)
        d.addCallback(self._greylist, session, recipient)
        return d

    def _greylist(self, reply, session, recipient):
        greylist = self.defences.greylist
        if not reply.positive or not greylist.applies(session.peer_ip, bool(session.auth_user)):
            return reply
        d = defer.maybeDeferred(greylist.check, session.peer_ip, session.mail_from,
                                recipient.canonical())
        d.addCallback(lambda passed: reply if passed else GREYLISTED)
        return d

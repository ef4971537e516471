"""The defences as SMTP policy stages, and the protocols' words for them.

``DefenceStage(defences)`` is an extra stage of every SMTP listener's
``Pipeline`` (``appliance.policy.pipeline``), asked after the relay rules:

- MAIL: the relay rules first (AUTH required, sender ownership); then the
  message rate: per authenticated user (``messages_per_hour_per_user``),
  else per client network on the MX port (``messages_per_hour_per_ip``);
  over it ``451 4.7.1``. Nothing accepted is ever dropped for a limit: the
  client hears it before sending a body.
- RCPT: the relay rules first (unknown users stay ``550 5.1.1``, relay
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


class DefenceStage:
    """The defences as an extra stage of ``appliance.policy.pipeline.Pipeline``
    (asked only after the relay rules accepted): see the module doc.
    ``at_mail`` / ``at_rcpt`` answer a refusal ``Reply`` or None."""

    def __init__(self, defences):
        self.defences = defences

    def at_mail(self, session, sender):
        if not self.defences.mail_allowed(session.peer_ip, session.auth_user or None):
            return MESSAGE_RATE
        session.mail_from = "" if sender.is_null else sender.canonical()
        return None

    def at_rcpt(self, session, recipient):
        greylist = self.defences.greylist
        if not greylist.applies(session.peer_ip, bool(session.auth_user)):
            return None
        d = defer.maybeDeferred(greylist.check, session.peer_ip, session.mail_from,
                                recipient.canonical())
        d.addCallback(lambda passed: None if passed else GREYLISTED)
        return d

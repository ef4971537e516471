"""Every SMTP reply the server gives, in one place.

A ``Reply`` is a value: code, enhanced status code and text. The status is
None only where RFC 2034 exempts a reply (the greeting, the HELO/EHLO answers)
and on the intermediate 354, which no RFC 3463 class (2, 4, 5) describes.
Texts never echo what the client sent, so nothing of theirs needs escaping.
"""

import functools
from collections import namedtuple


class Reply(namedtuple("Reply", "code status text")):
    """One reply; ``text`` may hold several lines separated by newlines."""

    __slots__ = ()

    @property
    def positive(self):
        return 200 <= self.code < 400

    def to_bytes(self):
        return _wire(self)


@functools.lru_cache(maxsize=256)       # most replies are the same few constants
def _wire(reply):
    lines = reply.text.split("\n")
    prefix = f"{reply.status} " if reply.status else ""
    out = [f"{reply.code}-{prefix}{line}\r\n" for line in lines[:-1]]
    out.append(f"{reply.code} {prefix}{lines[-1]}\r\n")
    return "".join(out).encode("utf-8")


def greeting(hostname):
    return Reply(220, None, f"{hostname} ESMTP mailappliance")


def ehlo(hostname, extensions):
    return Reply(250, None, "\n".join((hostname,) + tuple(extensions)))


def helo(hostname):
    return Reply(250, None, hostname)


def timeout(hostname):
    return Reply(421, "4.4.2", f"{hostname} Timeout")


def queued(queue_id):
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Sender ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient ok")
BYE = Reply(221, "2.0.0", "Bye")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY")
CANNOT_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")

# Syntax and sequence errors: these count towards [limits] max_errors.
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command unrecognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
BARE_CR_LF_COMMAND = Reply(500, "5.5.2", "Bare CR or LF not allowed (RFC 5321 2.3.8)")
EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
NO_ARGUMENTS = Reply(501, "5.5.4", "Syntax: no arguments allowed")
BAD_PARAMETER = Reply(501, "5.5.4", "Bad parameter value")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")
BAD_SENDER = Reply(553, "5.1.7", "Malformed sender address")
BAD_RECIPIENT = Reply(553, "5.1.3", "Malformed recipient address")
NON_ASCII_ADDRESS = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
NEED_HELO = Reply(503, "5.5.1", "Send EHLO or HELO first")
NESTED_MAIL = Reply(503, "5.5.1", "Sender already specified")
NEED_MAIL = Reply(503, "5.5.1", "Need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Need RCPT command")

# Message refusals after the final dot: nothing is stored.
BARE_CR_LF_DATA = Reply(550, "5.5.2", "Bare CR or LF not allowed (RFC 5321 2.3.8)")
DATA_LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long (RFC 5321 4.5.3.1.6)")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")

# Policy and resources.
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
NO_SPACE = Reply(452, "4.3.1", "Insufficient system storage")
LOOKUP_FAILED = Reply(451, "4.3.0", "Temporary lookup failure, try again later")
STORAGE_FAILED = Reply(451, "4.3.0", "Temporary storage failure, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing")

# Inbound SPF / DMARC (appliance.policy.checks), after DATA: nothing stored.
SPF_FAILED = Reply(550, "5.7.23", "SPF validation failed for the envelope sender")
DMARC_REJECTED = Reply(550, "5.7.1", "Unauthenticated mail refused per the From domain's "
                                     "DMARC policy")

# STARTTLS (RFC 3207).
READY_FOR_TLS = Reply(220, "2.0.0", "Ready to start TLS")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
TLS_ACTIVE = Reply(503, "5.5.1", "TLS already active")

# AUTH (RFC 4954) and the submission policy.
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested "
                                           "authentication mechanism")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEED_EHLO = Reply(503, "5.5.1", "Send EHLO first")
AUTH_ALREADY = Reply(503, "5.5.1", "Already authenticated")
AUTH_IN_TRANSACTION = Reply(503, "5.5.1", "AUTH not permitted during a mail transaction")
AUTH_SYNTAX = Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
AUTH_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot decode response")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
FROM_NOT_OWNED = Reply(550, "5.7.1", "From: header address not owned by the "
                                     "authenticated user")
FROM_MISSING = Reply(550, "5.7.1", "Message needs a From: header with an address")
HEADER_MALFORMED = Reply(550, "5.6.0", "Malformed header section: the message cannot be signed")


def challenge(data):
    """A SASL challenge; ``data`` is already base64 (str), may be empty."""
    return Reply(334, None, data)


# Closing the connection.
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Too many errors")
LINE_FLOOD = Reply(421, "4.7.0", "Line too long, closing connection")
INPUT_FLOOD = Reply(421, "4.7.0", "Too much input without waiting for replies")
TOO_MANY_AUTH_FAILURES = Reply(421, "4.7.0", "Too many authentication failures")

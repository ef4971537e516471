"""Our ``Received:`` trace header (RFC 5321 §4.4), safe from the client's bytes.

Everything the client chose (HELO name, addresses) goes through
``appliance.message.header_safe`` first: a CR, LF, NUL or any other control character would let
a client write headers of its own into ours (TWISTED-TRAPS T17).
"""

import datetime
import email.utils
import functools

from appliance.address import smtp_path
from appliance.message import header_safe


def protocol_name(esmtp, tls=False, auth=False, utf8=False):
    """The ``with`` keyword: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA (RFC 3848),
    or UTF8SMTP(S)(A) for an SMTPUTF8 transaction (RFC 6531 §4.3)."""
    name = "UTF8SMTP" if utf8 else "ESMTP" if esmtp else "SMTP"
    return name + ("S" if tls else "") + ("A" if auth else "")


@functools.lru_cache(maxsize=4)
def _date(second):
    """RFC 5322 date of a whole second (made once per second, not per message)."""
    return email.utils.format_datetime(
        datetime.datetime.fromtimestamp(second, datetime.timezone.utc))


def received_header(*, helo, peer_ip, hostname, with_, queue_id, recipients,
                    when, utf8=False):
    """The header line, folded, CRLF-terminated, as bytes.

    ``from helo ([ip])``: the reverse DNS name joins the brackets once the
    receiver looks it up (``(name [ip])``). ``recipients`` are canonical
    addresses; ``for`` names one only when there is exactly one (naming them
    all would disclose Bcc recipients).
    """
    lines = [
        f"Received: from {header_safe(helo)} ([{peer_ip}])",
        f"\tby {hostname} (mailappliance) with {with_} id {queue_id}",
    ]
    date = _date(int(when))
    if len(recipients) == 1:
        lines.append(f"\tfor {header_safe(smtp_path(recipients[0]), utf8)}; {date}")
    else:
        lines[-1] += ";"
        lines.append(f"\t{date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")

"""Delivery status notifications (RFC 3464): bounces and delay warnings.

A DSN is an ordinary message injected into the spool (``Spool.accept`` with a
new envelope from ``<>``), so it is durable the moment it exists and goes
through the same delivery, retries and failures as any other mail::

    multipart/report; report-type=delivery-status
      text/plain                 what happened, for a person
      message/delivery-status    Reporting-MTA, Arrival-Date, then per recipient
                                 Final-Recipient, Action, Status, Remote-MTA,
                                 Diagnostic-Code, Last-Attempt-Date
      text/rfc822-headers        the original message's header block

Who hears about a failure (``Bouncer.target``): the envelope sender; never
anyone for a null-sender message from outside (no bounce loops); for one of
our own DSNs that failed, the postmaster of the first local domain; and when
the DSN to the postmaster fails too, nobody: it is dropped with an event.

Forwarding aliases (``alias@ours -> private@elsewhere``) must not turn us
into a backscatter source nor leak where an alias leads:

- a failed forward of mail from outside whose MAIL FROM did not pass SPF
  (``params["spf"]`` set by the inbound checks) is not bounced: the sender
  is likely forged; it is dropped with a ``bounce.dropped`` event;
- a DSN to the sender names a forward target by the alias the sender
  wrote (Final-Recipient), without the remote server's reply or name: the
  private address is not revealed (to an outside sender nor to another
  local user); only the postmaster's copy of a failed DSN carries it.
"""

import dataclasses
import email.parser
import email.utils
import re
from datetime import datetime, timezone

from appliance import events
from appliance.envelope import Envelope, new_queue_id

events.register("bounce.sent", "a delivery status notification was queued",
                ("queue_id", "bounce_id", "recipients", "kind", "to"))
events.register("bounce.dropped", "a failure was reported to nobody (null sender, or the "
                "DSN to the postmaster itself failed)", ("queue_id", "recipients", "reason"))

BOUNCE_LISTENER = "bounce"     # Envelope.listener of the DSNs we make
FAILED, DELAYED, POSTMASTER = "failed", "delayed", "postmaster"   # DSN kinds
FORWARD_UNVERIFIED = "a forward failed; the sender did not pass SPF: not bounced (backscatter)"
FORWARD_FAILED = "delivery to a forwarding address failed"
FORWARD_DELAYED = "delivery to a forwarding address is delayed"
HEADERS_LIMIT = 64 * 1024      # of the original header block quoted in a DSN
FIELD_LIMIT = 900              # characters of a remote reply quoted in a field

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
_MESSAGE_ID = re.compile(r"<[!-;=?-~]{1,250}>")     # printable, no < > or spaces


@dataclasses.dataclass(frozen=True)
class Report:
    """One recipient's lines in a DSN."""

    address: str
    action: str                 # failed | delayed
    status: str                 # 5.1.1, 4.4.7 ...
    reason: str                 # one line for the human part
    diagnostic: str = ""        # "smtp; 550 5.1.1 ..." when a server said it
    remote_host: str = ""
    original: str = ""          # the address as the sender wrote it (alias expansion)
    last_attempt: float = None


def one_line(text, limit=FIELD_LIMIT):
    """``text`` without control characters (CR/LF from a remote reply included)."""
    return " ".join(_CONTROL.sub(" ", str(text)).split())[:limit]


def format_date(timestamp):
    """RFC 5322 date-time in UTC."""
    return email.utils.format_datetime(datetime.fromtimestamp(timestamp, timezone.utc))


def original_headers(message, limit=HEADERS_LIMIT):
    """The header block of ``message`` (CRLF lines, without the empty line)."""
    end = message.find(b"\r\n\r\n")
    block = message[:end + 2] if end >= 0 else message
    if len(block) > limit:
        cut = block.rfind(b"\r\n", 0, limit)
        block = block[:cut + 2] if cut > 0 else b""
    return block


def reports(entry, addresses, action):
    """``Report``s for ``addresses`` of a spool entry, from their recipient state."""
    found = []
    for address in addresses:
        state = entry.recipients[address]
        default = "5.0.0" if action == FAILED else "4.0.0"
        found.append(Report(
            address=address, action=action, status=state.get("status") or default,
            reason=one_line(state.get("last_error") or "unknown error"),
            diagnostic=one_line(state.get("diagnostic", "")),
            remote_host=one_line(state.get("remote_host", ""), 255),
            original=state.get("original", ""),
            last_attempt=state.get("last_attempt")))
    return found


def _clean(report):
    """The report with every field on one line: text from a remote server
    must not start new fields or headers."""
    return dataclasses.replace(report, **{
        name: one_line(getattr(report, name)) for name in (
            "address", "action", "status", "reason", "diagnostic", "remote_host", "original")})


def _address_type(address):
    return "rfc822" if address.isascii() else "utf-8"     # RFC 6533 for EAI addresses


def _fold(name, value):
    """``Name: value`` folded at spaces to keep lines short (CRLF SP continuations)."""
    words, lines, line = value.split(" "), [], f"{name}:"
    for word in words:
        if len(line) + 1 + len(word) > 76 and line != f"{name}:":
            lines.append(line)
            line = " " + word
        else:
            line += " " + word
    lines.append(line)
    return "\r\n".join(lines)


def _recipient_block(report, now):
    report = _clean(report)
    fields = []
    if report.original and report.original != report.address:
        fields.append(f"Original-Recipient: {_address_type(report.original)}; "
                      f"{report.original}")
    fields += [f"Final-Recipient: {_address_type(report.address)}; {report.address}",
               f"Action: {report.action}", f"Status: {report.status}"]
    if report.remote_host:
        fields.append(f"Remote-MTA: dns; {report.remote_host}")
    diagnostic = report.diagnostic or f"X-Mailappliance; {report.reason}"
    fields.append(_fold("Diagnostic-Code", diagnostic))
    fields.append(f"Last-Attempt-Date: {format_date(report.last_attempt or now)}")
    return fields


_INTRO = {
    FAILED: ("Undelivered Mail Returned to Sender",
             "I'm sorry to have to inform you that your message could not\r\n"
             "be delivered to one or more recipients. Its headers are attached below.\r\n"),
    DELAYED: ("Delayed Mail (still being retried)",
              "####################################################################\r\n"
              "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
              "####################################################################\r\n"
              "\r\n"
              "Your message could not be delivered yet to one or more recipients.\r\n"
              "Delivery will be tried again until {until}.\r\n"),
    POSTMASTER: ("Postmaster Copy: Undelivered Mail",
                 "A delivery status notification made by this system could not be\r\n"
                 "delivered either. The failed notification's headers are attached.\r\n"),
}


def build_dsn(*, kind, hostname, bounce_id, entry, recipients, headers, to, now,
              retry_until=None):
    """The DSN message (bytes, CRLF) about ``recipients`` (Reports) of ``entry``."""
    subject, intro = _INTRO[kind]
    boundary = f"{bounce_id}/{hostname}"
    envelope = entry.envelope
    human = [f"This is the mail system at host {hostname}.", "",
             intro.format(until=format_date(retry_until or now)).rstrip("\r\n"), ""]
    human += [f"<{r.address}>: {one_line(r.reason)}" for r in recipients]
    status = [f"Reporting-MTA: dns; {hostname}",
              f"X-Mailappliance-Queue-ID: {envelope.queue_id}",
              f"Arrival-Date: {format_date(envelope.received_at)}"]
    for report in recipients:
        status.append("")
        status.extend(_recipient_block(report, now))
        if report.action == DELAYED and retry_until is not None:
            status.append(f"Will-Retry-Until: {format_date(retry_until)}")
    head = [f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
            f"To: <{to}>",
            f"Subject: {subject}",
            f"Date: {format_date(now)}",
            f"Message-ID: <{bounce_id}@{hostname}>"]
    original_id = _message_id(headers)
    if original_id:
        head += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    head += ["Auto-Submitted: auto-replied",
             "MIME-Version: 1.0",
             f'Content-Type: multipart/report; report-type=delivery-status;\r\n'
             f'\tboundary="{boundary}"']
    parts = [
        "\r\n".join(head), "", "This is a MIME-encapsulated message.", "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8", "",
        "\r\n".join(human), "",
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status", "",
        "\r\n".join(status), "",
        f"--{boundary}",
        "Content-Description: Undelivered Message Headers",
        "Content-Type: text/rfc822-headers", "",
    ]
    text = "\r\n".join(parts) + "\r\n"
    tail = f"\r\n--{boundary}--\r\n"
    body = text.encode("utf-8") + headers + tail.encode("ascii")
    if not body.isascii():
        # UTF-8 addresses, replies or original headers: say so (RFC 6152).
        body = body.replace(b"\r\nMIME-Version: 1.0\r\n",
                            b"\r\nMIME-Version: 1.0\r\nContent-Transfer-Encoding: 8bit\r\n", 1)
    return body


def _message_id(headers):
    """The original Message-ID if it is a plain, safe ``<...>`` token."""
    parsed = email.parser.BytesHeaderParser().parsebytes(headers)
    value = parsed.get("Message-ID")
    match = _MESSAGE_ID.search(str(value)) if value is not None else None
    return match.group(0) if match else ""


class Bouncer:
    """Makes DSNs and queues them through ``queue`` (the QueueRunner: its
    ``accept``).

    ``hostname`` is the Reporting-MTA and MAILER-DAEMON's domain;
    ``postmaster`` gets the failures of our own DSNs.
    """

    def __init__(self, queue, clock, hostname, postmaster):
        self.queue = queue
        self.clock = clock
        self.hostname = hostname
        self.postmaster = postmaster

    @classmethod
    def from_config(cls, cfg, queue, clock):
        domain = cfg.server.domains[0] if cfg.server.domains else cfg.server.hostname
        return cls(queue, clock, cfg.server.hostname, f"postmaster@{domain}")

    @staticmethod
    def unbounced_forward(entry, recipient):
        """Is ``recipient`` a forward target whose failure must not be
        reported, the sender of the mail being unconfirmed (SPF not pass)?"""
        state = entry.recipients.get(recipient, {})
        if not state.get("original") or state["original"] == recipient:
            return False
        spf = (entry.envelope.params or {}).get("spf")
        return spf is not None and spf != "pass"

    @staticmethod
    def private(reports):
        """``reports`` as a sender may see them: a forward target is named by
        its alias, and nothing of the remote side (reply, host) is quoted."""
        return [dataclasses.replace(
            r, address=r.original, original="", remote_host="", diagnostic="",
            reason=f"{r.status} {FORWARD_FAILED if r.action == FAILED else FORWARD_DELAYED}")
            if r.original and r.original != r.address else r for r in reports]

    def target(self, entry, failed):
        """``(address, kind)`` to tell about ``failed`` recipients, or ``(None, reason)``."""
        envelope = entry.envelope
        if envelope.sender:
            return envelope.sender, FAILED
        if envelope.listener != BOUNCE_LISTENER:
            return None, "null sender: never bounced"
        if self.postmaster in failed:
            return None, "the notification to the postmaster failed"
        return self.postmaster, POSTMASTER

    def send(self, entry, kind, to, recipients, message, retry_until=None):
        """Queue the DSN; fires with its queue id once it is durable."""
        now = self.clock.seconds()
        bounce_id = new_queue_id(now)
        headers = original_headers(message)
        body = build_dsn(kind=kind, hostname=self.hostname, bounce_id=bounce_id, entry=entry,
                         recipients=recipients if kind == POSTMASTER else self.private(recipients),
                         headers=headers, to=to, now=now, retry_until=retry_until)
        params = {} if body.isascii() else {"BODY": "8BITMIME"}
        if not to.isascii():
            params["SMTPUTF8"] = None
        envelope = Envelope(queue_id=bounce_id, sender="", recipients=[to], received_at=now,
                            helo=self.hostname, listener=BOUNCE_LISTENER, size=len(body),
                            params=params)
        d = self.queue.accept(envelope, body)
        d.addCallback(self._sent, entry, kind, to, recipients)
        return d

    def _sent(self, bounce_id, entry, kind, to, recipients):
        events.emit("bounce.sent", queue_id=entry.queue_id, bounce_id=bounce_id,
                    recipients=[r.address for r in recipients], kind=kind, to=to)
        return bounce_id

    def drop(self, entry, addresses, reason):
        events.emit("bounce.dropped", queue_id=entry.queue_id, recipients=list(addresses),
                    reason=reason)

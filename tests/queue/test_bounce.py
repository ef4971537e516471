"""DSNs (RFC 3464): the message built, who receives it, how it enters the spool."""

import email
import email.policy

from twisted.internet import task

from appliance.envelope import Envelope
from appliance.queue.bounce import (BOUNCE_LISTENER, DELAYED, FAILED, POSTMASTER, Bouncer,
                                    Report, build_dsn, original_headers, reports)
from appliance.queue.store import SpoolEntry
from appliance.testing import FakeSpool, capture_events, make_config

HOST = "mail.example.test"
HEADERS = (b"Received: from client by mail.example.test\r\nFrom: Alice <alice@example.test>\r\n"
           b"Subject: quarterly numbers\r\nMessage-ID: <abc.123@example.test>\r\n")
MESSAGE = HEADERS + b"\r\nthe body, which a DSN never carries\r\n"


def entry(sender="alice@example.test", recipients=("a@remote.example",), listener="submission",
          states=None):
    envelope = Envelope(queue_id="0005f1e2d3c4b5a6deadbeef", sender=sender,
                        recipients=list(recipients), received_at=86400.0, listener=listener)
    made = SpoolEntry(envelope, len(MESSAGE), 86400.0)
    for address, fields in (states or {}).items():
        made.recipients.setdefault(address, {}).update(fields)
    return made


def build(kind=FAILED, recipients=None, headers=HEADERS, to="alice@example.test",
          retry_until=None):
    recipients = recipients or [Report(
        "a@remote.example", "failed", "5.1.1", "host mx.remote.example said: 550 5.1.1 no",
        "smtp; 550 5.1.1 no such user", "mx.remote.example", last_attempt=90000.0)]
    return build_dsn(kind=kind, hostname=HOST, bounce_id="00000000000001ffee", entry=entry(),
                     recipients=recipients, headers=headers, to=to, now=90061.0,
                     retry_until=retry_until)


def parse(data):
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_a_failure_dsn_has_the_rfc_3464_structure():
    data = build()
    message = parse(data)
    assert message["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert message["To"] == "<alice@example.test>"
    assert message["Subject"] == "Undelivered Mail Returned to Sender"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["Message-ID"] == f"<00000000000001ffee@{HOST}>"
    assert message["Date"] == "Fri, 02 Jan 1970 01:01:01 +0000"
    assert (message["In-Reply-To"], message["References"]) == (
        "<abc.123@example.test>", "<abc.123@example.test>")
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    human, status, headers = message.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_payload()
    assert f"This is the mail system at host {HOST}." in text
    assert "<a@remote.example>: host mx.remote.example said: 550 5.1.1 no" in text
    per_message, recipient = status.get_payload()
    assert dict(per_message.items()) == {
        "Reporting-MTA": f"dns; {HOST}", "X-Mailappliance-Queue-ID": "0005f1e2d3c4b5a6deadbeef",
        "Arrival-Date": "Fri, 02 Jan 1970 00:00:00 +0000"}
    assert dict(recipient.items()) == {
        "Final-Recipient": "rfc822; a@remote.example", "Action": "failed", "Status": "5.1.1",
        "Remote-MTA": "dns; mx.remote.example",
        "Diagnostic-Code": "smtp; 550 5.1.1 no such user",
        "Last-Attempt-Date": "Fri, 02 Jan 1970 01:00:00 +0000"}
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload().encode() == HEADERS
    assert b"the body" not in data


def test_every_line_is_crlf_terminated_and_short():
    long_reply = "5.7.1 " + "blocked " * 200
    data = build(recipients=[Report("a@remote.example", "failed", "5.7.1", long_reply,
                                    "smtp; 554 " + long_reply, "mx.remote.example")])
    assert data.endswith(b"\r\n")
    lines = data.split(b"\r\n")
    assert all(b"\n" not in line and b"\r" not in line for line in lines)
    assert max(len(line) for line in lines if not line.startswith(b"<a@remote")) <= 998
    recipient = parse(data).get_payload()[1].get_payload()[1]
    quoted = " ".join(recipient["Diagnostic-Code"].split())
    assert ("smtp; 554 " + long_reply).startswith(quoted) and 800 < len(quoted) <= 900


def test_text_from_a_remote_server_cannot_add_fields_or_headers():
    evil = "550 no\r\nBcc: victim@example.org\r\n\r\nAction: delivered"
    data = build(recipients=[Report("a@remote.example", "failed", "5.0.0", evil,
                                    "smtp; " + evil, "mx\r\nX-Evil: 1")])
    message = parse(data)
    assert message["Bcc"] is None
    recipient = message.get_payload()[1].get_payload()[1]
    assert recipient["Action"] == "failed" and recipient["X-Evil"] is None
    assert recipient["Remote-MTA"] == "dns; mx X-Evil: 1"


def test_a_delay_warning_says_it_is_only_a_warning_and_until_when():
    data = build(kind=DELAYED, retry_until=86400.0 * 6, recipients=[Report(
        "a@remote.example", "delayed", "4.4.1", "connect to mx: Connection refused")])
    message = parse(data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    human, status, _ = message.get_payload()
    assert "THIS IS A WARNING ONLY" in human.get_payload()
    assert "Wed, 07 Jan 1970 00:00:00 +0000" in human.get_payload()
    recipient = status.get_payload()[1]
    assert (recipient["Action"], recipient["Status"]) == ("delayed", "4.4.1")
    assert recipient["Will-Retry-Until"] == "Wed, 07 Jan 1970 00:00:00 +0000"
    assert recipient["Diagnostic-Code"] == "X-Mailappliance; connect to mx: Connection refused"
    assert recipient["Remote-MTA"] is None


def test_alias_expansion_shows_the_original_recipient_and_utf8_addresses_are_typed():
    data = build(recipients=[Report("jörg@bücher.example", "failed", "5.1.1", "gone",
                                    original="team@example.test")])
    recipient = parse(data).get_payload()[1].get_payload()[1]
    assert recipient["Original-Recipient"] == "rfc822; team@example.test"
    assert b"Final-Recipient: utf-8; j\xc3\xb6rg@b\xc3\xbccher.example" in data
    assert b"\r\nContent-Transfer-Encoding: 8bit\r\n" in data
    assert b"Content-Transfer-Encoding" not in build()


def test_an_unsafe_message_id_is_not_echoed():
    headers = b"Subject: x\r\nMessage-ID: <a b>\r\n"
    assert parse(build(headers=headers))["In-Reply-To"] is None


def test_original_headers_stop_at_the_body_and_are_capped_on_a_line_boundary():
    assert original_headers(MESSAGE) == HEADERS
    assert original_headers(b"Subject: no body") == b"Subject: no body"
    many = b"".join(b"X-Filler-%05d: %s\r\n" % (n, b"y" * 60) for n in range(2000))
    block = original_headers(many + b"\r\nbody", limit=10000)
    assert len(block) <= 10000 and block.endswith(b"\r\n") and many.startswith(block)


def test_reports_come_from_the_recipient_states():
    made = entry(recipients=["a@remote.example", "b@example.test"], states={
        "a@remote.example": {"state": "failed", "status": "5.1.10",
                             "last_error": "5.1.10 null MX\r\n", "remote_host": "",
                             "last_attempt": 90000.0},
        "b@example.test": {"state": "failed", "last_error": "5.1.1 user unknown"}})
    first, second = reports(made, ["a@remote.example", "b@example.test"], FAILED)
    assert (first.status, first.reason, first.last_attempt) == ("5.1.10", "5.1.10 null MX",
                                                                90000.0)
    assert (second.status, second.diagnostic, second.original) == ("5.0.0", "", "")


def test_who_hears_about_a_failure():
    bouncer = Bouncer(FakeSpool(), task.Clock(), HOST, "postmaster@example.test")
    assert bouncer.target(entry(), ["a@remote.example"]) == ("alice@example.test", FAILED)
    to, why = bouncer.target(entry(sender="", listener="mx"), ["a@remote.example"])
    assert to is None and "null sender" in why
    own = entry(sender="", listener=BOUNCE_LISTENER, recipients=["carol@far.example"])
    assert bouncer.target(own, ["carol@far.example"]) == ("postmaster@example.test",
                                                          POSTMASTER)
    to_postmaster = entry(sender="", listener=BOUNCE_LISTENER,
                          recipients=["postmaster@example.test"])
    to, why = bouncer.target(to_postmaster, ["postmaster@example.test"])
    assert to is None and "postmaster" in why


def test_a_dsn_enters_the_spool_from_the_null_sender():
    spool, clock = FakeSpool(), task.Clock()
    clock.advance(90061)
    bouncer = Bouncer.from_config(make_config(), spool, clock)
    assert bouncer.postmaster == "postmaster@example.test"
    assert bouncer.hostname == "mx.example.test"
    made = entry()
    report = reports(entry(states={"a@remote.example": {"state": "failed",
                                                        "last_error": "5.1.1 no"}}),
                     ["a@remote.example"], FAILED)
    with capture_events() as seen:
        ids = []
        bouncer.send(made, FAILED, "alice@example.test", report, MESSAGE).addCallback(
            ids.append)
    [(envelope, message)] = spool.accepted
    assert ids == [envelope.queue_id] and envelope.queue_id
    assert (envelope.sender, envelope.recipients, envelope.listener) == (
        "", ["alice@example.test"], BOUNCE_LISTENER)
    assert envelope.size == len(message) and envelope.received_at == 90061
    assert envelope.params == {}
    assert parse(message)["Message-ID"] == f"<{envelope.queue_id}@mx.example.test>"
    [sent] = seen.named("bounce.sent")
    assert sent == {**sent, "queue_id": made.queue_id, "bounce_id": envelope.queue_id,
                    "recipients": ["a@remote.example"], "kind": FAILED,
                    "to": "alice@example.test"}


def test_an_8bit_dsn_asks_for_8bitmime_and_smtputf8_when_needed():
    spool = FakeSpool()
    bouncer = Bouncer(spool, task.Clock(), HOST, "postmaster@example.test")
    report = [Report("a@remote.example", "failed", "5.1.1", "gone")]
    bouncer.send(entry(), FAILED, "jörg@bücher.example", report,
                 b"Subject: caf\xc3\xa9\r\n\r\nx\r\n")
    [(envelope, _)] = spool.accepted
    assert envelope.params == {"BODY": "8BITMIME", "SMTPUTF8": None}

"""The ESMTP server (appliance.receive.smtp), MX profile, over a StringTransport.

Each TWISTED-TRAPS item the receiver must close has a test whose docstring
names it and says what stock twisted.mail.smtp.ESMTP did.
"""

import re

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from appliance.events import EVENTS
from appliance import replies
from appliance.net.session import PAUSE_INPUT
from appliance.receive.smtp import SMTPFactory
from appliance.testing import (
    FakeDirectory, FakeSpool, SMTPHarness, capture_events, make_config)

USERS = {
    "alice@example.test": ["alice@example.test"],
    "bob@example.org": ["bob@example.org"],
    "team@example.test": ["alice@example.test", "carol@example.test"],
    "jörg@example.test": ["jörg@example.test"],
    "postmaster@example.test": ["alice@example.test"],
}
DOMAINS = ("example.test", "example.org")
ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3} ")


def make(config=None, directory=None, spool=None, peer="192.0.2.10", clock=None,
         **sections):
    return SMTPHarness(
        config=config or make_config(**sections),
        directory=directory if directory is not None else FakeDirectory(USERS, DOMAINS),
        spool=spool if spool is not None else FakeSpool(), peer=peer, clock=clock)


def greeted(**kwargs):
    h = make(**kwargs)
    h.send("EHLO client.test\r\n")
    h.replies()
    return h


def last(h):
    return h.replies()[-1]


def spool_of(h):
    return h.factory.queue


# -- greeting, EHLO and the small commands (T16) ---------------------------------

def test_banner_and_ehlo_advertise_exactly_our_extensions():
    """T16: stock ESMTP advertises only AUTH/STARTTLS (no SIZE, PIPELINING,
    8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8). AUTH is never offered on MX."""
    h = make(server={"max_message_size": "10M"})
    assert h.replies() == ["220 mx.example.test ESMTP mailappliance"]
    h.send("EHLO client.test\r\n")
    assert h.replies() == [
        "250-mx.example.test", "250-PIPELINING", f"250-SIZE {10 * 1024 * 1024}",
        "250-8BITMIME", "250-ENHANCEDSTATUSCODES", "250 SMTPUTF8"]


def test_helo_answers_plainly():
    h = make()
    h.replies()
    h.send("HELO client.test\r\n")
    assert h.replies() == ["250 mx.example.test"]


@pytest.mark.parametrize("command", ["EHLO", "HELO", "EHLO  ", "EHLO a.test b.test"])
def test_helo_and_ehlo_need_one_argument(command):
    """T16: stock accepts EHLO/HELO without an argument ("250 ... Hello")."""
    h = make()
    h.replies()
    h.send(command + "\r\n")
    assert last(h).startswith("501 5.5.4 ")
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert last(h) == "503 5.5.1 Send EHLO or HELO first"


def test_noop_rset_help_vrfy_quit():
    """T16: stock answers 500 to NOOP, VRFY and HELP."""
    h = greeted()
    h.send("NOOP\r\nRSET\r\nHELP\r\nVRFY alice\r\nQUIT\r\n")
    assert h.replies() == [
        "250 2.0.0 Ok", "250 2.0.0 Ok",
        "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY",
        "252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery",
        "221 2.0.0 Bye"]
    assert h.closed


def test_commands_after_quit_are_ignored():
    h = greeted()
    h.send("QUIT\r\nNOOP\r\n")
    assert h.replies() == ["221 2.0.0 Bye"]


def test_unknown_and_unoffered_commands():
    h = greeted()
    h.send("FOO bar\r\n\r\nEXPN staff\r\nSTARTTLS\r\nAUTH PLAIN AGFsaWNlAHB3\r\n")
    assert h.replies() == [
        "500 5.5.2 Command unrecognized", "500 5.5.2 Command unrecognized",
        "502 5.5.1 Command not implemented", "502 5.5.1 Command not implemented",
        "502 5.5.1 Command not implemented"]
    assert h.protocol.lookupMethod(b"STARTTLS") is None      # never the stock ext_STARTTLS
    assert h.protocol.lookupMethod("noop") == h.protocol.do_NOOP


def test_every_reply_but_greeting_and_ehlo_has_an_enhanced_code():
    """T16/RFC 2034: all replies carry an enhanced status code, except the
    greeting and the EHLO/HELO answers, which RFC 2034 exempts, and the
    intermediate 354 (RFC 3463 has classes 2, 4 and 5 only)."""
    h = make()
    h.send("EHLO c.test\r\n")
    h.replies()
    h.send("NOOP\r\nFOO\r\nMAIL FROM:<a@remote.test> SIZE=5\r\nMAIL FROM:<b@remote.test>\r\n"
           "RCPT TO:<alice@example.test>\r\nRCPT TO:<nobody@example.test>\r\n"
           "RCPT TO:<x@remote.test>\r\nRSET\r\nMAIL FROM:<a@remote.test>\r\n"
           "RCPT TO:<alice@example.test>\r\nDATA\r\nhi\r\n.\r\nHELP\r\nVRFY x\r\nQUIT\r\n")
    lines = h.replies()
    assert len(lines) == 15
    assert lines[10] == "354 End data with <CR><LF>.<CR><LF>"
    del lines[10]
    assert all(ENHANCED.match(line) for line in lines), lines


def test_sequence_errors():
    h = make()
    h.replies()
    h.send("MAIL FROM:<a@remote.test>\r\n")
    assert h.replies() == ["503 5.5.1 Send EHLO or HELO first"]
    h.send("EHLO c.test\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    assert h.replies()[-2:] == ["503 5.5.1 Need MAIL command", "503 5.5.1 Need MAIL command"]
    h.send("MAIL FROM:<a@remote.test>\r\nMAIL FROM:<a@remote.test>\r\nDATA\r\n")
    assert h.replies() == ["250 2.1.0 Sender ok", "503 5.5.1 Sender already specified",
                           "503 5.5.1 Need RCPT command"]


def test_rset_and_ehlo_end_the_transaction():
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRSET\r\nRCPT TO:<alice@example.test>\r\n")
    assert h.replies()[-1] == "503 5.5.1 Need MAIL command"
    h.send("MAIL FROM:<a@remote.test>\r\nEHLO c.test\r\nRCPT TO:<alice@example.test>\r\n")
    assert h.replies()[-1] == "503 5.5.1 Need MAIL command"
    h.send("RSET now\r\n")
    assert h.replies() == ["501 5.5.4 Syntax: no arguments allowed"]


# -- MAIL and RCPT syntax and parameters (T16, T18) ---------------------------------

@pytest.mark.parametrize("params, reply", [
    ("SIZE=100", "250 2.1.0 Sender ok"),
    ("BODY=8BITMIME", "250 2.1.0 Sender ok"),
    ("body=7bit SIZE=1", "250 2.1.0 Sender ok"),
    ("SMTPUTF8", "250 2.1.0 Sender ok"),
    ("SIZE=1025", "552 5.3.4 Message size exceeds fixed limit"),
    ("SIZE=abc", "501 5.5.4 Bad parameter value"),
    ("SIZE", "501 5.5.4 Bad parameter value"),
    ("BODY=BINARYMIME", "501 5.5.4 Bad parameter value"),
    ("SMTPUTF8=yes", "501 5.5.4 Bad parameter value"),
    ("SIZE=1 SIZE=2", "501 5.5.4 Bad parameter value"),
    ("RET=HDRS", "555 5.5.4 Unsupported parameter"),
    ("X-FOO=bar", "555 5.5.4 Unsupported parameter"),
])
def test_mail_parameters(params, reply):
    """T16: stock accepts any MAIL parameter and ignores SIZE."""
    h = greeted(server={"max_message_size": "1K"})
    h.send(f"MAIL FROM:<a@remote.test> {params}\r\n")
    assert h.replies() == [reply]


def test_rcpt_takes_no_parameters():
    """T16: stock accepts unknown RCPT parameters."""
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test> NOTIFY=NEVER\r\n")
    assert h.replies()[-1] == "555 5.5.4 Unsupported parameter"


def test_parameters_need_ehlo():
    h = make()
    h.send("HELO c.test\r\nMAIL FROM:<a@remote.test> SIZE=10\r\n")
    assert h.replies()[-1] == "555 5.5.4 Unsupported parameter"


@pytest.mark.parametrize("command, reply", [
    ("MAIL FROM:a@remote.test", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL TO:<a@remote.test>", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL FROM:<a@remote.test", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL FROM:<a@remote.test>SIZE=1", "501 5.5.4 Syntax: MAIL FROM:<address>"),
    ("MAIL FROM:<a..b@remote.test>", "553 5.1.7 Malformed sender address"),
    ("MAIL FROM:<jörg@remote.test>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
    ("MAIL FROM:<\xff@remote.test>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
])
def test_malformed_sender(command, reply):
    h = greeted()
    h.send(command.encode("latin-1") if "\xff" in command else command)
    h.send("\r\n")
    assert h.replies() == [reply]


def test_mail_from_tolerates_a_space_after_the_colon():
    h = greeted()
    h.send("mail from: <A@Remote.Test>\r\n")
    assert h.replies() == ["250 2.1.0 Sender ok"]


@pytest.mark.parametrize("path, reply", [
    ("<a b@example.test>", "553 5.1.3 Malformed recipient address"),
    (f"<{'a' * 65}@example.test>", "553 5.1.3 Malformed recipient address"),
    (f"<a@{'d' * 64}.test>", "553 5.1.3 Malformed recipient address"),
    ("<>", "553 5.1.3 Malformed recipient address"),
    ("<jörg@example.test>", "553 5.6.7 Non-ASCII address requires SMTPUTF8"),
    ("alice@example.test", "501 5.5.4 Syntax: RCPT TO:<address>"),
])
def test_malformed_recipient(path, reply):
    """T16: stock has no limits on local part, domain or path length."""
    h = greeted()
    h.send(f"MAIL FROM:<a@remote.test>\r\nRCPT TO:{path}\r\n")
    assert h.replies()[-1] == reply


def test_path_length_limit_over_the_wire():
    """T16: a 257-octet path is refused even though its parts are within limits."""
    domain = ".".join(["d" * 60] * 4) + ".test"         # 249 octets
    h = greeted()
    h.send(f"MAIL FROM:<a@remote.test>\r\nRCPT TO:<abcdef@{domain}>\r\n")
    assert h.replies()[-1] == "553 5.1.3 Malformed recipient address"


def test_non_ascii_addresses_with_smtputf8():
    h = greeted()
    h.send("MAIL FROM:<jörg@remote.test> SMTPUTF8\r\nRCPT TO:<Jörg@Example.test>\r\n"
           "DATA\r\nSubject: ü\r\n\r\nhi\r\n.\r\n")
    assert h.replies()[-1].startswith("250 2.0.0 Ok: queued as ")
    envelope, message = spool_of(h).accepted[0]
    assert envelope.recipients == ["jörg@example.test"]
    assert envelope.params == {"SMTPUTF8": True}
    assert b"with UTF8SMTP id" in message
    assert "for <jörg@example.test>;".encode() in message


def test_quoted_local_part_is_looked_up_unquoted():
    """T18: stock ``Address.dequote`` raises TypeError on Python 3 and the
    quotes stay: ``RCPT TO:<"alice"@example.test>`` would be looked up as
    ``"alice"`` and miss. We canonicalise before any lookup."""
    directory = FakeDirectory(USERS, DOMAINS)
    h = greeted(directory=directory)
    h.send('MAIL FROM:<"a b"@remote.test>\r\nRCPT TO:<"Alice"@Example.TEST>\r\n'
           "DATA\r\nhi\r\n.\r\n")
    assert h.codes() == [250, 250, 354, 250]
    envelope, _ = spool_of(h).accepted[0]
    assert envelope.sender == "a b@remote.test"
    assert envelope.recipients == ["alice@example.test"]
    assert directory.lookups == ["alice@example.test"]


def test_source_route_is_ignored():
    h = greeted()
    h.send("MAIL FROM:<@hop.test:a@remote.test>\r\nRCPT TO:<@hop.test,@hop2.test:alice@example.test>\r\n")
    assert h.codes() == [250, 250]


# -- MX policy -------------------------------------------------------------------

def test_local_user_accepted_unknown_user_refused():
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
           "RCPT TO:<team@example.test>\r\nRCPT TO:<nobody@example.test>\r\n")
    assert h.replies() == ["250 2.1.0 Sender ok", "250 2.1.5 Recipient ok",
                           "250 2.1.5 Recipient ok", "550 5.1.1 User unknown"]


def test_relay_refused_for_strangers():
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n"
           "RCPT TO:<x@[192.0.2.99]>\r\n")
    assert h.replies()[1:] == ["554 5.7.1 Relay access denied"] * 2


def test_trusted_network_may_relay():
    h = greeted(relay={"trusted_networks": "192.0.2.0/24"})
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<X@Elsewhere.test>\r\n"
           "RCPT TO:<nobody@example.test>\r\nDATA\r\nhi\r\n.\r\n")
    assert h.codes() == [250, 250, 550, 354, 250]
    assert spool_of(h).accepted[0][0].recipients == ["x@elsewhere.test"]


def test_trusted_network_matches_ipv4_mapped_peers():
    h = greeted(relay={"trusted_networks": "192.0.2.0/24"}, peer="::ffff:192.0.2.7")
    assert h.protocol.session.peer_ip == "192.0.2.7"
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<x@elsewhere.test>\r\n")
    assert h.codes() == [250, 250]


def test_null_sender_and_postmaster():
    h = greeted()
    h.send("MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\nDATA\r\nbounce\r\n.\r\n")
    assert h.codes() == [250, 250, 354, 250]
    envelope, _ = spool_of(h).accepted[0]
    assert envelope.sender == "" and envelope.recipients == ["postmaster@example.test"]


@pytest.mark.parametrize("hold", [False, True])
def test_directory_failure_is_temporary(hold):
    """A directory error (raised, or a failed Deferred) is 451 4.3.0, never 550."""
    directory = FakeDirectory(USERS, DOMAINS, hold=hold)
    h = greeted(directory=directory)
    if not hold:
        directory.error = ConnectionRefusedError("ldap down")
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    if hold:
        assert h.replies() == ["250 2.1.0 Sender ok"]
        directory.held[0][1].errback(ConnectionRefusedError("ldap down"))
    assert h.replies()[-1] == "451 4.3.0 Temporary lookup failure, try again later"


def test_too_many_recipients():
    """T16: stock has no recipient limit."""
    h = greeted(server={"max_recipients": "2"})
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
           "RCPT TO:<Alice@example.test>\r\nRCPT TO:<bob@example.org>\r\n"
           "RCPT TO:<team@example.test>\r\nDATA\r\nhi\r\n.\r\n")
    # SPEC §4: the duplicate counts too (the envelope holds it once).
    assert h.replies()[1:5] == ["250 2.1.5 Recipient ok", "250 2.1.5 Recipient ok",
                                "452 4.5.3 Too many recipients",
                                "452 4.5.3 Too many recipients"]
    assert spool_of(h).accepted[0][0].recipients == ["alice@example.test"]


def test_policy_crash_is_a_local_error_and_the_session_goes_on():
    class Broken:
        def check_sender(self, session, sender):
            raise RuntimeError("bug")

    clock_harness = make()
    factory = SMTPFactory(clock_harness.factory.config, FakeDirectory(USERS, DOMAINS),
                          FakeSpool(), clock_harness.clock, policy=Broken())
    h = SMTPHarness(factory)
    h.send("EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nNOOP\r\n")
    assert h.replies()[-2:] == ["451 4.3.0 Local error in processing", "250 2.0.0 Ok"]


# -- DATA, the spool and the Received header (T10, T17) ------------------------------

def transaction(h, body="Subject: test\r\n\r\nhello\r\n", rcpts=("alice@example.test",)):
    h.send("MAIL FROM:<sender@remote.test>\r\n"
           + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n" + body + ".\r\n")


def test_one_message_for_all_recipients():
    """Stock delivers one message object per recipient; we spool one message."""
    h = greeted()
    transaction(h, rcpts=("alice@example.test", "bob@example.org"))
    replies_ = h.replies()
    queue_id = replies_[-1].rsplit(" ", 1)[1]
    assert replies_[-1] == f"250 2.0.0 Ok: queued as {queue_id}"
    ((envelope, message),) = spool_of(h).accepted
    assert envelope.queue_id == queue_id
    assert envelope.sender == "sender@remote.test"
    assert envelope.recipients == ["alice@example.test", "bob@example.org"]
    assert (envelope.helo, envelope.peer_ip, envelope.listener) == ("client.test", "192.0.2.10", "mx")
    assert envelope.size == len(message)
    assert message.endswith(b"\r\nSubject: test\r\n\r\nhello\r\n")


def test_received_header():
    clock = Clock()
    clock.advance(1_700_000_000)
    h = greeted(clock=clock)
    transaction(h, body="..dot-stuffed\r\nplain\r\n")
    envelope, message = spool_of(h).accepted[0]
    assert message.decode() == (
        "Received: from client.test ([192.0.2.10])\r\n"
        f"\tby mx.example.test (mailappliance) with ESMTP id {envelope.queue_id}\r\n"
        "\tfor <alice@example.test>; Tue, 14 Nov 2023 22:13:20 +0000\r\n"
        ".dot-stuffed\r\nplain\r\n")


def test_received_header_names_no_recipient_when_several():
    h = make()
    h.send("HELO old.test\r\n")
    transaction(h, rcpts=("alice@example.test", "bob@example.org"))
    _, message = spool_of(h).accepted[0]
    header = message.split(b"\r\n")[:3]
    assert header[1].startswith(b"\tby mx.example.test (mailappliance) with SMTP id ")
    assert header[1].endswith(b";") and header[2].startswith(b"\tThu, 01 Jan 1970")
    assert b"alice" not in message and b"bob" not in message


def test_header_injection_through_helo():
    """T17: stock accepts ``EHLO a.test\\rX-Injected: 1`` and copies it
    verbatim into the Received header. A bare CR in a command is refused,
    and whatever HELO we keep is stripped of control characters."""
    h = make()
    h.send("EHLO a.test\rX-Injected: 1\r\n")
    assert h.replies()[-1] == "500 5.5.2 Bare CR or LF not allowed (RFC 5321 2.3.8)"
    h.send(b"EHLO a.test\x00X-Injected:\x0b1\x1b\r\n")          # control bytes, no CR/LF
    assert h.codes() == [250]
    transaction(h)
    _, message = spool_of(h).accepted[0]
    assert not re.search(rb"(^|\n)X-Injected", message)
    assert message.startswith(b"Received: from a.test?X-Injected:?1? ([192.0.2.10])\r\n")
    assert not re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", message.split(b"\r\n")[0])


def test_250_only_once_the_spool_has_it():
    """A 250 after DATA means on disk: nothing is answered (not even a
    pipelined NOOP, T9) until the spool's Deferred fires."""
    spool = FakeSpool(hold=True)
    h = greeted(spool=spool)
    transaction(h)
    h.send("NOOP\r\n")
    assert h.replies()[-1] == "354 End data with <CR><LF>.<CR><LF>"
    spool.release()
    lines = h.replies()
    assert lines[0].startswith("250 2.0.0 Ok: queued as ") and lines[1] == "250 2.0.0 Ok"
    assert h.transport.producerState == "producing"


def test_input_piling_up_behind_a_pending_answer_pauses_the_socket():
    """A few pipelined commands just wait in the buffer; past PAUSE_INPUT
    the transport stops reading, and reads again once the answer is sent."""
    spool = FakeSpool(hold=True)
    h = greeted(spool=spool)
    transaction(h)
    h.send("NOOP\r\n" * 10)
    assert h.transport.producerState == "producing"
    h.send("NOOP\r\n" * (PAUSE_INPUT // 6))
    assert h.transport.producerState == "paused"
    assert h.replies()[-1] == "354 End data with <CR><LF>.<CR><LF>"
    spool.release()
    assert h.transport.producerState == "producing"
    lines = h.replies()
    assert lines[0].startswith("250 2.0.0 Ok: queued as ")
    assert lines[1:] == ["250 2.0.0 Ok"] * (10 + PAUSE_INPUT // 6)


@pytest.mark.parametrize("hold", [False, True])
def test_storage_failure_is_temporary(hold):
    """T10: stock answers a failing eomReceived (disk full) with
    ``550 Could not send e-mail`` - a permanent bounce. It must be 451 4.3.0."""
    error = OSError(28, "No space left on device")
    spool = FakeSpool(hold=True) if hold else FakeSpool(error=error)
    h = greeted(spool=spool)
    with capture_events() as events:
        transaction(h)
        if hold:
            assert h.replies()[-1].startswith("354 ")
            spool.fail(error)
    assert h.replies()[-1] == "451 4.3.0 Temporary storage failure, try again later"
    assert spool.accepted == []
    (rejected,) = events.named("smtp.message.rejected")
    assert rejected["code"] == 451
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_no_space_at_mail():
    spool = FakeSpool(space=False)
    h = greeted(spool=spool)
    h.send("MAIL FROM:<a@remote.test> SIZE=4000\r\nRCPT TO:<alice@example.test>\r\n")
    assert h.replies() == ["452 4.3.1 Insufficient system storage", "503 5.5.1 Need MAIL command"]
    assert spool.space_queries == [4000]


def test_message_over_the_size_limit():
    """Counted while it arrives, refused with 552 after the final dot, nothing kept."""
    h = greeted(server={"max_message_size": "1K"})
    transaction(h, body="x" * 998 + "\r\n" + "y" * 100 + "\r\n")
    assert h.replies()[-1] == "552 5.3.4 Message size exceeds fixed limit"
    assert spool_of(h).accepted == []
    transaction(h, body=("x" * 126 + "\r\n") * 8)     # exactly 1024 octets: fine
    assert h.replies()[-1].startswith("250 2.0.0 Ok: queued as ")


def test_empty_message_is_accepted():
    h = greeted()
    transaction(h, body="")
    assert h.codes()[-1] == 250
    assert spool_of(h).accepted[0][1].count(b"\r\n") == 3     # just our Received


def test_data_takes_no_argument():
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA now\r\n")
    assert h.replies()[-1] == "501 5.5.4 Syntax: no arguments allowed"


# -- SMTP smuggling and line lengths (T7, T8) ----------------------------------------

SMUGGLED = ("MAIL FROM:<evil@attacker.test>\r\nRCPT TO:<alice@example.test>\r\n"
            "DATA\r\nFrom: ceo@example.test\r\n\r\nsmuggled\r\n")


@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r.\r\n", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"])
def test_smuggling_variants_never_end_data(fake_end):
    """Only <CRLF>.<CRLF> ends DATA. A fake end must not turn the rest of the
    body into commands; the message holding it is refused, nothing stored."""
    h = greeted()
    with capture_events() as events:
        h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
        h.send(b"Subject: x\r\n\r\nhello" + fake_end + SMUGGLED.encode() + b"\r\n.\r\n")
    assert h.replies() == [
        "250 2.1.0 Sender ok", "250 2.1.5 Recipient ok",
        "354 End data with <CR><LF>.<CR><LF>",
        "550 5.5.2 Bare CR or LF not allowed (RFC 5321 2.3.8)"]
    assert spool_of(h).accepted == []
    assert len(events.named("smtp.mail")) == 1          # the smuggled MAIL never ran
    assert [(e["kind"], e["detail"]) for e in events.named("smtp.protocol_error")] == [
        ("bare_cr_lf", "data")]
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_bare_lf_in_a_command():
    h = greeted()
    h.send("NOOP\nMAIL FROM:<a@remote.test>\r\n")
    assert h.replies() == ["500 5.5.2 Bare CR or LF not allowed (RFC 5321 2.3.8)"]


def test_long_line_in_data_does_not_leave_data():
    """T8: stock leaves DATA on a body line over its 16 KiB limit ("500 Line
    too long") and runs the rest of the body as commands. We stay in DATA,
    discard the excess, and refuse the message after the final dot."""
    h = greeted()
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    h.replies()
    h.send(b"Subject: x\r\n\r\n" + b"A" * 20_000 + b"\r\n" + SMUGGLED.encode())
    assert h.replies() == []                       # still in DATA: no command ran
    h.send(".\r\nNOOP\r\n")
    assert h.replies() == ["500 5.5.2 Line too long (RFC 5321 4.5.3.1.6)", "250 2.0.0 Ok"]
    assert spool_of(h).accepted == []


def test_text_line_of_exactly_1000_octets_is_fine():
    h = greeted()
    transaction(h, body="B" * 998 + "\r\n")
    assert h.codes()[-1] == 250


def test_long_command_line():
    """T16: 512 octets with CRLF at most; the excess never runs as a command."""
    h = greeted()
    h.send("NOOP " + "x" * 505 + "\r\n")              # 512 octets: fine
    h.send("NOOP " + "x" * 506 + "QUIT\r\nNOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok", "500 5.5.2 Line too long", "250 2.0.0 Ok"]
    assert not h.closed


def test_endless_line_without_crlf():
    """T7: stock buffers a line without CRLF without limit (+124 MB RSS for
    64 MiB). We keep at most one line's worth, answer 500 at once, and drop a
    client that goes on past 64 KiB."""
    h = greeted()
    for _ in range(60):
        h.send(b"z" * 1024)
        assert h.protocol._framer.buffered <= 512
    assert h.replies() == ["500 5.5.2 Line too long"]
    assert not h.closed
    for _ in range(5):
        h.send(b"z" * 1024)
    assert h.replies() == ["421 4.7.0 Line too long, closing connection"]
    assert h.closed


def test_too_many_errors():
    h = greeted(limits={"max_errors": "3"})
    with capture_events() as events:
        h.send("FOO\r\nMAIL FROM:x\r\nBAR\r\nNOOP\r\n")
    assert h.replies() == ["500 5.5.2 Command unrecognized",
                           "501 5.5.4 Syntax: MAIL FROM:<address>",
                           "500 5.5.2 Command unrecognized", "421 4.7.0 Too many errors"]
    assert h.closed
    assert [e["kind"] for e in events.named("smtp.limit")] == ["max_errors"]


# -- pipelining with asynchronous answers (T9) --------------------------------------

def test_pipelined_commands_wait_for_a_pending_lookup():
    """T9 (Twisted issue 8126): when validateTo returns an unfired Deferred,
    stock goes on with the buffered lines: DATA gets "503 Must have valid
    receiver", and the body line ``MAIL FROM:<evil@x>`` runs as a command.
    We stop reading until the RCPT is answered; replies stay in order."""
    directory = FakeDirectory(USERS, DOMAINS, hold=True)
    h = greeted(directory=directory)
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
           "RCPT TO:<bob@example.org>\r\nDATA\r\nMAIL FROM:<evil@attacker.test>\r\n.\r\n")
    assert h.replies() == ["250 2.1.0 Sender ok"]
    assert [address for address, _ in directory.held] == ["alice@example.test"]
    directory.release()
    assert h.replies() == ["250 2.1.5 Recipient ok"]
    directory.release()
    lines = h.replies()
    assert lines[:2] == ["250 2.1.5 Recipient ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert lines[2].startswith("250 2.0.0 Ok: queued as ") and len(lines) == 3
    assert h.transport.producerState == "producing"
    envelope, message = spool_of(h).accepted[0]
    assert envelope.sender == "a@remote.test"
    assert message.endswith(b"\r\nMAIL FROM:<evil@attacker.test>\r\n")


def test_pending_reply_is_not_a_client_timeout():
    directory = FakeDirectory(USERS, DOMAINS, hold=True)
    h = greeted(directory=directory)
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    h.clock.advance(3600)
    assert not h.closed
    directory.release()
    assert h.replies()[-1] == "250 2.1.5 Recipient ok"
    h.clock.advance(300)
    assert h.closed


def test_input_flood_while_a_reply_is_pending():
    directory = FakeDirectory(USERS, DOMAINS, hold=True)
    h = greeted(directory=directory)
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    h.replies()
    for _ in range(40):
        h.send(b"NOOP\r\n" * 10_000)
        if h.closed:
            break
    assert h.replies() == ["421 4.7.0 Too much input without waiting for replies"]
    assert h.closed


# -- timeouts (injected clock) --------------------------------------------------------

def test_idle_timeout():
    h = make()
    h.replies()
    with capture_events() as events:
        h.clock.advance(299)
        assert not h.closed
        h.clock.advance(1)
    assert h.replies() == ["421 4.4.2 mx.example.test Timeout"]
    assert h.closed
    assert events.named("smtp.timeout")[0]["phase"] == "idle"


def test_complete_commands_reset_the_command_timer():
    h = greeted(limits={"command_timeout": "60s"})
    for _ in range(10):
        h.clock.advance(50)
        h.send("NOOP\r\n")
    assert not h.closed


def test_trickling_does_not_reset_the_command_timer():
    h = greeted(limits={"command_timeout": "60s"})
    with capture_events() as events:
        for char in "NOOP":
            h.clock.advance(20)
            h.send(char)
    assert h.replies() == ["421 4.4.2 mx.example.test Timeout"]
    assert events.named("smtp.timeout")[0]["phase"] == "command"


def test_data_timeout_covers_the_whole_body():
    h = greeted(limits={"command_timeout": "60s", "data_timeout": "5m"})
    h.send("MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
    h.replies()
    with capture_events() as events:
        for _ in range(5):
            h.clock.advance(50)
            h.send("a line that keeps coming\r\n")
        assert not h.closed
        h.clock.advance(50)
    assert h.replies() == ["421 4.4.2 mx.example.test Timeout"]
    assert events.named("smtp.timeout")[0]["phase"] == "data"
    assert spool_of(h).accepted == []


# -- connection limits, allow and deny (T23) ------------------------------------------

def shared_factory(**sections):
    h = make(**sections)
    return h.factory, h


def test_connections_per_ip():
    """T23: stock policies.LimitConnectionsByPeer closes extra connections
    silently; the client sees no reason. We answer 421 4.7.0 first."""
    factory, first = shared_factory(limits={"connections_per_ip": "2"})
    second = SMTPHarness(factory)
    with capture_events() as events:
        third = SMTPHarness(factory)
    assert third.replies() == ["421 4.7.0 Too many connections from your address"]
    assert third.closed
    assert [e["kind"] for e in events.named("smtp.limit")] == ["connections_per_ip"]
    other = SMTPHarness(factory, peer="198.51.100.1")
    assert other.replies() == ["220 mx.example.test ESMTP mailappliance"]
    third.lose()                                    # the refused one was never counted
    second.lose()
    fourth = SMTPHarness(factory)
    assert fourth.replies() == ["220 mx.example.test ESMTP mailappliance"]
    assert factory.connections == 3
    for h in (first, other, fourth):
        h.lose()
    assert factory.connections == 0


def test_a_session_gives_its_place_back_once():
    """The factory keeps the sessions it let in: a second release of one, or
    the release of a refused one, frees nobody else's place."""
    factory, first = shared_factory(limits={"connections_per_ip": "1"})
    refused = SMTPHarness(factory)
    assert refused.codes() == [421]
    refused.lose()
    factory.release(first.protocol)
    factory.release(first.protocol)
    assert (factory.connections, factory.gate.count("192.0.2.10")) == (0, 0)
    again = SMTPHarness(factory)
    assert again.codes() == [220]
    assert factory.gate.count("192.0.2.10") == 1


def test_allowed_networks_are_never_limited():
    factory, _ = shared_factory(limits={"connections_per_ip": "1", "allow": "192.0.2.0/24"})
    for _ in range(5):
        assert SMTPHarness(factory).codes() == [220]


def test_denied_networks_are_refused_at_connect():
    factory, _ = shared_factory(limits={"deny": "203.0.113.0/24, 2001:db8::/32",
                                        "allow": "203.0.113.5/32"})
    with capture_events() as events:
        refused = [SMTPHarness(factory, peer=ip) for ip in ("203.0.113.5", "2001:db8::1")]
    for h in refused:
        assert h.replies() == ["421 4.7.0 Access denied"] and h.closed   # SPEC §4
    assert [e["peer_ip"] for e in events.named("smtp.denied")] == ["203.0.113.5", "2001:db8::1"]


# -- events --------------------------------------------------------------------------

def test_events_of_a_session():
    h = make()
    with capture_events() as events:
        h.send("EHLO client.test\r\n")
        transaction(h, rcpts=("alice@example.test", "nobody@example.test"))
        h.send("QUIT\r\n")
        h.lose()
    names = [r["event"] for r in events.records]
    assert names == ["smtp.helo", "smtp.mail", "smtp.rcpt.accepted", "smtp.rcpt.rejected",
                     "smtp.message.accepted", "smtp.disconnect"]
    for record in events.records:
        fields = set(record) - {"ts", "event"}
        assert fields == set(EVENTS[record["event"]][1]), record
        assert record["session"] == h.protocol.session_id
        assert record["peer_ip"] == "192.0.2.10"
    accepted = events.named("smtp.message.accepted")[0]
    assert accepted["recipients"] == ["alice@example.test"]
    assert accepted["sender"] == "sender@remote.test"
    rejected = events.named("smtp.rcpt.rejected")[0]
    assert (rejected["recipient"], rejected["code"]) == ("nobody@example.test", 550)
    assert events.named("smtp.disconnect")[0]["messages"] == 1


def test_every_event_we_emit_is_registered_with_its_fields():
    with capture_events() as events:
        h = make(limits={"max_errors": "2"})
        h.send("EHLO c.test\r\nFOO\r\n" + "x" * 600 + "\r\n")
        h.lose()
    assert {"smtp.connect", "smtp.protocol_error", "smtp.limit", "smtp.disconnect"} <= {
        r["event"] for r in events.records}
    for record in events.records:
        assert set(record) - {"ts", "event"} == set(EVENTS[record["event"]][1]), record


def test_passwords_never_reach_events():
    """AUTH is refused on MX; its argument must not be logged either."""
    h = greeted()
    with capture_events() as events:
        h.send("AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert "AGFsaWNlAHNlY3JldA" not in repr(events.records)


def test_replies_catalogue_is_consistent():
    for name in dir(replies):
        reply = getattr(replies, name)
        if isinstance(reply, replies.Reply):
            assert reply.status is None or str(reply.code)[0] == reply.status[0], name
            assert "\n" not in reply.text, name


def test_deferred_policy_answers_in_order():
    """A policy answering through Deferreds fired later keeps replies in order."""
    held = []

    class SlowPolicy:
        def check_sender(self, session, sender):
            d = defer.Deferred()
            held.append(d)
            return d

    base = make()
    factory = SMTPFactory(base.factory.config, FakeDirectory(USERS, DOMAINS), FakeSpool(),
                          base.clock, policy=SlowPolicy())
    h = SMTPHarness(factory)
    h.send("EHLO c.test\r\nMAIL FROM:<a@remote.test>\r\nNOOP\r\n")
    assert h.codes() == [220, 250]
    held.pop().callback(replies.Reply(550, "5.7.1", "Sender refused"))
    assert h.replies() == ["550 5.7.1 Sender refused", "250 2.0.0 Ok"]

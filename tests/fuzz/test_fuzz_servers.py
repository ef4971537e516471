"""Fuzz the SMTP (MX and submission), IMAP and POP3 servers over StringTransport + Clock.

Each input is a conversation: lines drawn from the protocol's commands with
hostile arguments, and random bytes. Lines are sent one at a time, the clock
is advanced past any reply delay, and each command must get exactly one
reply (SMTP: one final reply line; POP3: one +OK/-ERR; IMAP: one tagged
completion, or a BYE that ends the session). ``guard`` (conftest) holds the
no-traceback, time and memory bounds.
"""

import re

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from appliance.access.folders import MaildirStore
from appliance.access.imap.server import IMAPFactory
from appliance.access.pop3 import POP3Factory
from appliance.auth.sasl import Mechanisms
from appliance.receive.smtp import SMTPFactory
from appliance.receive.submission import SubmissionFactory
from appliance.testing import (FakeAccounts, FakeDirectory, FakeSpool, SMTPHarness,
                               TLSStringTransport, make_config)
from appliance.threads import synchronous_runner

ALICE, PASSWORD = "alice@example.test", "secret pw"
LIMITS = {"max_errors": "1000"}     # the conversation goes on: more to explore
SETTLE = 30.0                   # clock seconds after each line: past any reply delay


class FakeTLS:
    context = "the SSL context"


def payload(max_size=80):
    """Hostile argument text: no CRLF (that would make it two lines)."""
    return st.one_of(
        st.binary(max_size=max_size),
        st.text(max_size=max_size).map(lambda t: t.encode("utf-8")),
        st.sampled_from([b"", b" ", b"<>", b"<@>", b"\x00", b"\r", b"\n", b"\xff\xfe",
                         b"=?utf-8?q?x?=", b"*", b"%", b"(", b")", b"{5}", b"{99999999}",
                         b"\"", b"\\", b"a" * 600, b"." * 3, b"1:*", b"0", b"-1"]),
    ).map(lambda b: b.replace(b"\r\n", b""))


def lines_of(commands):
    return st.lists(st.one_of(commands, payload(200)), min_size=1, max_size=25)


def complete(data):
    return data.split(b"\r\n")[:-1]


class Conversation:
    """Lines in, complete reply lines out, over a StringTransport and a Clock."""

    def __init__(self, protocol, transport, clock):
        self.protocol, self.transport, self.clock = protocol, transport, clock
        self.seen = len(transport.value())

    def send(self, line):
        self.protocol.dataReceived(line + b"\r\n")
        self.clock.advance(SETTLE)
        new = complete(self.transport.value()[self.seen:])
        self.seen = len(self.transport.value())
        return new

    def say(self, line, cancel):
        """The replies to ``line``; a continuation ("+ ": a literal or a SASL
        challenge) that it opens is answered with ``cancel``."""
        new = self.send(line)
        if new and new[-1].startswith(b"+ "):
            new += self.send(cancel)
        return new


# -- SMTP ---------------------------------------------------------------------------------

SMTP_VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"RSET", b"NOOP",
              b"QUIT", b"VRFY", b"HELP", b"STARTTLS", b"AUTH", b"BDAT", b"EXPN", b"TURN",
              b"MAIL FROM:<a@example.test>", b"RCPT TO:<alice@example.test>",
              b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH XOAUTH2", b"."]
SMTP_LINES = lines_of(st.builds(lambda verb, space, arg: verb + space + arg,
                                st.sampled_from(SMTP_VERBS), st.sampled_from([b"", b" "]),
                                payload()))


def smtp_conversation(h, lines):
    """Every command line gets one final reply; DATA content none until the dot."""
    greeting = h.output()
    assert re.match(rb"220[ -]", greeting), greeting
    in_data = False
    for line in lines:
        if h.closed:
            break
        h.send(line + b"\r\n")
        h.clock.advance(SETTLE)
        finals = [r for r in complete(h.output()) if re.match(rb"\d{3} ", r)]
        if h.closed and len(finals) == 2 and finals[1].startswith(b"421"):
            finals = finals[:1]     # the answer, then 421 when that was one error too many
        if in_data and line != b".":
            assert finals == [], (line, finals)
            continue
        assert len(finals) == 1, (line, finals)
        in_data = finals[0].startswith(b"354")


@given(SMTP_LINES)
def test_fuzz_smtp_mx(guard, lines):
    with guard.check("SMTP MX"):
        factory = SMTPFactory(make_config(limits=LIMITS), FakeDirectory(), FakeSpool(), Clock(), "mx")
        smtp_conversation(SMTPHarness(factory), lines)


@given(SMTP_LINES)
def test_fuzz_smtp_submission(guard, lines):
    with guard.check("SMTP submission"):
        accounts = FakeAccounts({ALICE: PASSWORD})
        factory = SubmissionFactory(make_config(limits=LIMITS), FakeDirectory(), FakeSpool(), Clock(),
                                    "submissions", Mechanisms(accounts), FakeTLS(),
                                    implicit_tls=True)
        h = SMTPHarness(factory, transport_class=TLSStringTransport)
        smtp_conversation(h, [b"EHLO fuzz.test"] + lines)


# -- IMAP ---------------------------------------------------------------------------------

IMAP_VERBS = [b"CAPABILITY", b"NOOP", b"LOGOUT", b"STARTTLS", b"AUTHENTICATE PLAIN",
              b"LOGIN", b"SELECT", b"EXAMINE", b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE",
              b"UNSUBSCRIBE", b"LIST", b"LSUB", b"STATUS", b"APPEND", b"CHECK", b"CLOSE",
              b"EXPUNGE", b"SEARCH", b"FETCH", b"STORE", b"COPY", b"MOVE", b"UID FETCH",
              b"UID SEARCH", b"UID STORE", b"UNSELECT", b"IDLE", b"NAMESPACE", b"ID",
              b"ENABLE", b"XYZZY"]
IMAP_ARGS = st.lists(st.one_of(
    payload(40),
    st.sampled_from([b"INBOX", b"\"\"", b"\"*\"", b"%", b"1:*", b"*", b"1", b"(FLAGS)",
                     b"(BODY[] BODYSTRUCTURE ENVELOPE)", b"BODY[HEADER.FIELDS (FROM)]<0.5>",
                     b"+FLAGS (\\Seen)", b"ALL", b"OR OR OR", b"NOT", b"(UNSEEN SEEN)",
                     b"CHARSET UTF-8 TEXT x", b"\"a*b%c\"", b"Sent", b"(MESSAGES UNSEEN)"])),
    max_size=6).map(b" ".join)


@st.composite
def imap_command(draw):
    tag = draw(st.sampled_from([b"a", b"b1", b"*", b"", b"+", b"x" * 70]))
    return tag + b" " + draw(st.sampled_from(IMAP_VERBS)) + b" " + draw(IMAP_ARGS)


IMAP_LINES = lines_of(imap_command())


def imap_session(tmp_path):
    store = MaildirStore(str(tmp_path), synchronous_runner)
    accounts = FakeAccounts({ALICE: PASSWORD})
    clock = Clock()
    factory = IMAPFactory(make_config(str(tmp_path)), store, accounts, Mechanisms(accounts),
                          FakeTLS(), clock, implicit_tls=True)
    factory.startFactory()
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return factory, protocol, transport, clock


@given(IMAP_LINES, st.booleans())
def test_fuzz_imap(guard, tmp_path_factory, lines, logged_in):
    with guard.check("IMAP"):
        factory, protocol, transport, clock = imap_session(tmp_path_factory.mktemp("imap"))
        try:
            talk = Conversation(protocol, transport, clock)
            if logged_in:
                lines = [b"l LOGIN " + ALICE.encode() + b" \"" + PASSWORD.encode() + b"\"",
                         b"s SELECT INBOX"] + lines
            for line in lines:
                if transport.disconnecting:
                    break
                new = talk.say(line, b"*" if b"AUTHENTICATE" in line.upper() else b"DONE")
                tagged = [r for r in new if re.match(rb"(?![*+] )\S+ (OK|NO|BAD)\b", r)]
                other = [r for r in new if r.startswith((b"* BYE", b"* BAD"))]
                pending = protocol._literal is not None or bool(protocol._segments)
                assert len(tagged) <= 1, (line, new)
                assert tagged or other or pending, (line, new)
                assert not any(b"SERVERBUG" in r for r in new), (line, new)
        finally:
            protocol.connectionLost(None)
            factory.stopFactory()


# -- POP3 ---------------------------------------------------------------------------------

POP3_VERBS = [b"USER", b"PASS", b"APOP", b"STAT", b"LIST", b"RETR", b"DELE", b"NOOP", b"RSET",
              b"QUIT", b"TOP", b"UIDL", b"CAPA", b"STLS", b"AUTH", b"AUTH PLAIN", b"XTND"]
POP3_LINES = lines_of(st.builds(lambda verb, space, arg: verb + space + arg,
                                st.sampled_from(POP3_VERBS), st.sampled_from([b"", b" "]),
                                payload()))


@given(POP3_LINES, st.booleans())
def test_fuzz_pop3(guard, tmp_path_factory, lines, logged_in):
    with guard.check("POP3"):
        root = tmp_path_factory.mktemp("pop3")
        store = MaildirStore(str(root), synchronous_runner)
        accounts = FakeAccounts({ALICE: PASSWORD})
        clock = Clock()
        factory = POP3Factory(make_config(base_dir=str(root)), store, Mechanisms(accounts),
                              clock, "pop3s", tls=FakeTLS(), implicit_tls=True)
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000))
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        try:
            talk = Conversation(protocol, transport, clock)
            if logged_in:
                lines = [b"USER " + ALICE.encode(), b"PASS " + PASSWORD.encode()] + lines
            for line in lines:
                if transport.disconnecting:
                    break
                new = talk.say(line, b"*")
                status = [r for r in new if r.startswith((b"+OK", b"-ERR"))]
                assert len(status) >= 1, (line, new)
        finally:
            protocol.connectionLost(None)

"""POP3 over the Maildirs, driven over a StringTransport with a Clock.

The T21 items of TWISTED-TRAPS.md each have a test whose docstring says what
stock ``twisted.mail.pop3.POP3`` did. The maildrop is a real Maildir in a
temp dir, read through ``appliance.access.folders`` with a synchronous
runner, so what the tests see on disk is what the server would leave there.
"""

import base64
import json
import os
import time

import jwt
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from appliance.testing import oauth2_issuer
from appliance.testing import HandRunner
from appliance.access.folders import MaildirStore
from appliance.access.pop3 import (
    MAX_AUTH_FAILURES, POP3Factory, dot_stuffed, top_of)
from appliance.auth.accounts import BackendUnavailable
from appliance.auth.sasl import Mechanisms
from appliance.maildir import SUBDIRS, maildir_path
from appliance.threads import synchronous_runner
from appliance.testing import (Conversation, FakeAccounts, TLSStringTransport, capture_events,
                               clock_at, make_config)

ALICE, PASSWORD = "alice@example.test", "correct horse"
BOB, BOB_PASSWORD = "bob@example.test", "bobs password"
FIRST = b"From: a@example.org\nSubject: one\n\nHello\n"
SECOND = b"From: b@example.org\nSubject: two\n\nLine 1\n.hidden dot\nLine 3\n"
ISSUER, AUDIENCE = "https://id.example.test", "mail.example.test"


class FakeTLS:
    """Stands for ServerTLS: the protocol only hands it to startTLS."""

    context = "the SSL context"


# -- the world: a mail root, a store, factories, sessions -------------------------------

class World:
    def __init__(self, root, accounts=None, verifier=None, **limits):
        self.root = str(root)
        self.clock = Clock()
        self.store = MaildirStore(self.root, synchronous_runner, clock=clock_at(1700000000.0))
        self.accounts = accounts if accounts is not None else FakeAccounts(
            {ALICE: PASSWORD, BOB: BOB_PASSWORD})
        self.config = make_config(base_dir=self.root, limits=limits) if limits \
            else make_config(base_dir=self.root)
        self.mechanisms = Mechanisms(self.accounts, verifier)
        self.pop3 = self.factory("pop3")
        self.pop3s = self.factory("pop3s", implicit=True)
        self._mtime = 1600000000

    def factory(self, listener, implicit=False):
        return POP3Factory(self.config, self.store, self.mechanisms, self.clock, listener,
                           tls=FakeTLS(), implicit_tls=implicit)

    def deliver(self, data, address=ALICE):
        """A message in ``new/`` as delivery leaves it (LF line ends)."""
        path = maildir_path(self.root, address)
        for sub in SUBDIRS:
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self._mtime += 10
        name = f"{self._mtime}.Q{self._mtime}.mx.example.test"
        target = os.path.join(path, "new", name)
        with open(target, "wb") as handle:
            handle.write(data)
        os.utime(target, (self._mtime, self._mtime))
        return name

    def files(self, address=ALICE):
        path = maildir_path(self.root, address)
        return sorted(name for sub in ("new", "cur")
                      for name in os.listdir(os.path.join(path, sub)))

    def connect(self, factory=None, peer="192.0.2.10"):
        return Session(factory or self.pop3, peer)

    def under_tls(self, **kwargs):
        s = self.connect(**kwargs)
        s.send("STLS\r\n")
        assert s.lines() == ["+OK Begin TLS negotiation"]
        return s

    def logged_in(self, user=ALICE, password=PASSWORD, **kwargs):
        s = self.under_tls(**kwargs)
        s.send(f"USER {user}\r\nPASS {password}\r\n")
        lines = s.lines()
        assert lines[0] == "+OK Send PASS"
        assert lines[1].startswith("+OK Logged in"), lines
        return s


class Session(Conversation):
    def __init__(self, factory, peer):
        transport = TLSStringTransport(peerAddress=IPv4Address("TCP", peer, 40110))
        super().__init__(factory.buildProtocol(transport.getPeer()), transport)
        self.greeting = self.lines()

    def send(self, data):
        super().send(data)
        self.pump()

    def pump(self, limit=10000):
        """Let a registered pull producer (a RETR in progress) run to its end."""
        for _ in range(limit):
            producer = self.transport.producer
            if producer is None:
                return
            producer.resumeProducing()
        raise AssertionError("transfer did not end")



@pytest.fixture
def world(tmp_path):
    w = World(tmp_path / "mail")
    w.deliver(FIRST)
    w.deliver(SECOND)
    return w


def crlf_size(data):
    return len(data.replace(b"\n", b"\r\n"))


# -- greeting and CAPA ------------------------------------------------------------------

def test_greeting_names_the_host_and_offers_no_apop(world):
    s = world.connect()
    assert s.greeting == ["+OK mx.example.test POP3 ready"]
    assert "<" not in s.greeting[0]


def test_t21_capa_before_tls_lists_real_capabilities_only(world):
    """Stock CAPA: TOP USER UIDL PIPELINE CELERITY AUSPEX POTENCE, with USER
    offered in the clear, PIPELINE misspelt and no STLS."""
    s = world.connect()
    s.send("CAPA\r\n")
    assert s.lines() == ["+OK Capability list follows", "TOP", "UIDL", "RESP-CODES",
                         "AUTH-RESP-CODE", "PIPELINING", "STLS",
                         "IMPLEMENTATION mailappliance", "."]


def test_capa_under_tls_offers_user_and_sasl_not_stls(world):
    s = world.under_tls()
    s.send("CAPA\r\n")
    lines = s.lines()
    assert "USER" in lines and "SASL PLAIN LOGIN" in lines
    assert "STLS" not in lines


def test_capa_on_pop3s_and_after_login(world):
    s = world.connect(world.pop3s)
    s.send("CAPA\r\n")
    lines = s.lines()
    assert "USER" in lines and "STLS" not in lines
    s = world.logged_in()
    s.send("CAPA\r\n")
    lines = s.lines()
    assert "TOP" in lines and "UIDL" in lines
    assert not {"USER", "STLS"} & set(lines)
    assert not [line for line in lines if line.startswith("SASL")]


def test_capa_takes_no_argument(world):
    s = world.connect()
    s.send("CAPA x\r\n")
    assert s.lines() == ["-ERR No arguments expected"]


def test_oauth_mechanisms_are_listed_when_configured(tmp_path):
    w = World(tmp_path / "mail", verifier=object())
    s = w.under_tls()
    s.send("CAPA\r\n")
    assert "SASL PLAIN LOGIN XOAUTH2 OAUTHBEARER" in s.lines()


# -- STLS and TLS before passwords ---------------------------------------------------------

def test_stls_hands_the_context_to_the_transport_after_the_ok(world):
    s = world.connect()
    s.send("STLS\r\n")
    assert s.transport.tls is world.pop3.tls
    assert s.transport.written_before_tls.endswith(b"+OK Begin TLS negotiation\r\n")


def test_t21_user_and_pass_in_plaintext_are_refused(world):
    """Stock POP3 has no STLS and takes USER/PASS in the clear: a password
    sniffed on the wire. RFC 2595 §4: refuse until TLS."""
    s = world.connect()
    s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\n")
    assert s.lines() == ["-ERR [AUTH] TLS required: use STLS first"] * 2 + [
        "-ERR STAT is not valid in this state"]
    assert world.accounts.calls == []


def test_auth_in_plaintext_is_refused(world):
    s = world.connect()
    s.send("AUTH PLAIN " + plain() + "\r\nAUTH\r\n")
    assert s.lines() == ["-ERR [AUTH] TLS required: use STLS first"] * 2
    assert world.accounts.calls == []


def test_t21_commands_pipelined_after_stls_are_discarded(world):
    """Stock POP3 has no STLS; Twisted's SMTP/IMAP STARTTLS run what came in
    the same packet under TLS (T1/T3): here it is thrown away, and the
    session starts over."""
    s = world.connect()
    with capture_events() as events:
        s.send(f"STLS\r\nUSER {ALICE}\r\nPASS {PASSWORD}\r\n")
    assert s.lines() == ["+OK Begin TLS negotiation"]
    assert world.accounts.calls == []
    [discarded] = events.named("pop3.stls.discarded")
    assert discarded["octets"] == len(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n")
    s.send(f"PASS {PASSWORD}\r\n")
    assert s.lines() == ["-ERR USER first"]


def test_stls_twice_with_an_argument_on_pop3s_and_after_login(world):
    s = world.under_tls()
    s.send("STLS\r\n")
    assert s.lines() == ["-ERR Already under TLS"]
    s = world.connect()
    s.send("STLS now\r\n")
    assert s.lines() == ["-ERR No arguments expected"]
    s = world.connect(world.pop3s)
    s.send("STLS\r\n")
    assert s.lines() == ["-ERR Already under TLS"]
    s = world.logged_in()
    s.send("STLS\r\n")
    assert s.lines() == ["-ERR STLS is not valid in this state"]


def test_stls_without_a_tls_listener_is_not_offered(world):
    factory = POP3Factory(world.config, world.store, world.mechanisms, world.clock, "pop3")
    s = world.connect(factory)
    s.send("CAPA\r\nSTLS\r\n")
    lines = s.lines()
    assert "STLS" not in lines[:-1]
    assert lines[-1] == "-ERR STLS is not available here"


def test_handshake_completion_is_an_event(world):
    s = world.connect()
    with capture_events() as events:
        s.protocol.handshakeCompleted()
    [event] = events.named("pop3.tls")
    assert event["listener"] == "pop3" and event["implicit"] is False


# -- login ---------------------------------------------------------------------------------

def test_user_pass_login_opens_the_maildrop(world):
    s = world.under_tls()
    with capture_events() as events:
        s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n")
    size = crlf_size(FIRST) + crlf_size(SECOND)
    assert s.lines() == ["+OK Send PASS", f"+OK Logged in, 2 messages ({size} octets)"]
    [login] = events.named("pop3.login")
    assert login["account"] == ALICE and login["mechanism"] == "USER"
    assert login["messages"] == 2 and login["octets"] == size
    [success] = events.named("auth.success")
    assert success["listener"] == "pop3"


def test_login_on_pop3s_needs_no_stls(world):
    s = world.connect(world.pop3s)
    s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\n")
    lines = s.lines()
    assert lines[1].startswith("+OK Logged in")
    assert lines[2] == f"+OK 2 {crlf_size(FIRST) + crlf_size(SECOND)}"


def test_password_with_spaces_is_taken_whole(tmp_path):
    w = World(tmp_path / "mail", accounts=FakeAccounts({ALICE: "two  words "}))
    s = w.logged_in(password="two  words ")
    assert s.protocol.account.address == ALICE


def test_pass_without_user_and_commands_before_login(world):
    s = world.under_tls()
    s.send(f"PASS {PASSWORD}\r\nSTAT\r\nRETR 1\r\nLIST\r\n")
    assert s.lines() == ["-ERR USER first", "-ERR STAT is not valid in this state",
                         "-ERR RETR is not valid in this state",
                         "-ERR LIST is not valid in this state"]


def test_t21_failed_logins_are_limited_per_connection(world):
    """Stock POP3 answers every wrong PASS and waits for the next guess,
    forever, on one connection."""
    s = world.under_tls()
    with capture_events() as events:
        for attempt in range(MAX_AUTH_FAILURES):
            assert not s.closed
            s.send(f"USER {ALICE}\r\nPASS guess{attempt}\r\n")
    lines = s.lines()
    assert lines.count("-ERR [AUTH] Authentication failed") == MAX_AUTH_FAILURES - 1
    assert lines[-1] == "-ERR [AUTH] Authentication failed, too many failures, closing"
    assert s.closed
    failures = events.named("auth.failure")
    assert len(failures) == MAX_AUTH_FAILURES
    assert {f["mechanism"] for f in failures} == {"USER"}
    assert set(failures[0]) >= {"session", "peer_ip", "listener", "mechanism", "account",
                                "reason"}
    assert failures[0]["account"] == ALICE and failures[0]["peer_ip"] == "192.0.2.10"
    assert "guess" not in json.dumps(events.records)
    assert [e["kind"] for e in events.named("pop3.limit")] == ["auth_failures"]


def test_a_backend_outage_is_a_temporary_error_and_no_failure(tmp_path):
    w = World(tmp_path / "mail", accounts=FakeAccounts(error=BackendUnavailable("ldap down")))
    s = w.under_tls()
    with capture_events() as events:
        for _ in range(MAX_AUTH_FAILURES + 1):
            s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n")
    lines = s.lines()
    assert lines[-1] == "-ERR [SYS/TEMP] Authentication is unavailable, try again later"
    assert not s.closed
    assert not events.named("auth.failure")
    assert events.named("auth.unavailable")[0]["reason"] == "ldap down"


def test_pipelined_commands_wait_for_a_slow_backend(tmp_path):
    """Stock POP3 runs the commands that follow PASS while the login is
    still being checked ("not authenticated yet")."""
    w = World(tmp_path / "mail", accounts=FakeAccounts({ALICE: PASSWORD}, hold=True))
    w.deliver(FIRST)
    s = w.under_tls()
    s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\nQUIT\r\n")
    assert s.lines() == ["+OK Send PASS"]
    assert s.transport.producerState == "paused"
    w.accounts.release()
    s.pump()
    assert s.lines() == [f"+OK Logged in, 1 messages ({crlf_size(FIRST)} octets)",
                         f"+OK 1 {crlf_size(FIRST)}", "+OK Bye, 0 messages deleted"]


def test_empty_maildrop_when_no_mail_ever_came(world):
    s = world.logged_in(user=BOB, password=BOB_PASSWORD)
    s.send("STAT\r\nLIST\r\nUIDL\r\n")
    assert s.lines() == ["+OK 0 0", "+OK 0 messages (0 octets)", ".",
                         "+OK Unique-ID listing follows", "."]


# -- SASL AUTH (RFC 5034) -----------------------------------------------------------------

def plain(user=ALICE, password=PASSWORD, authzid=""):
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def b64(text):
    return base64.b64encode(text.encode()).decode()


def test_auth_plain_with_an_initial_response(world):
    s = world.under_tls()
    s.send(f"AUTH PLAIN {plain()}\r\n")
    assert s.lines()[0].startswith("+OK Logged in, 2 messages")


def test_auth_plain_with_an_empty_challenge(world):
    s = world.under_tls()
    s.send("AUTH PLAIN\r\n")
    assert s.lines() == ["+ "]
    s.send(plain() + "\r\n")
    assert s.lines()[0].startswith("+OK Logged in")


def test_auth_login(world):
    s = world.under_tls()
    s.send("AUTH LOGIN\r\n")
    assert s.lines() == ["+ " + b64("Username:")]
    s.send(b64(ALICE) + "\r\n")
    assert s.lines() == ["+ " + b64("Password:")]
    with capture_events() as events:
        s.send(b64(PASSWORD) + "\r\n")
    assert s.lines()[0].startswith("+OK Logged in")
    assert events.named("pop3.login")[0]["mechanism"] == "LOGIN"


def test_auth_cancel_malformed_and_foreign_authzid(world):
    s = world.under_tls()
    s.send("AUTH PLAIN\r\n*\r\n")
    assert s.lines() == ["+ ", "-ERR Authentication cancelled"]
    with capture_events() as events:
        s.send("AUTH PLAIN not-base64!\r\n")
        s.send(f"AUTH PLAIN {plain(authzid=BOB)}\r\n")
    assert s.lines() == ["-ERR [AUTH] Malformed SASL response",
                         "-ERR [AUTH] Authentication failed"]
    reasons = [e["reason"] for e in events.named("auth.failure")]
    assert reasons[0].startswith("malformed") and "authorization identity" in reasons[1]


def test_auth_without_arguments_lists_mechanisms_and_bad_syntax(world):
    s = world.under_tls()
    s.send("AUTH\r\nAUTH CRAM-MD5\r\nAUTH PLAIN a b\r\nAUTH P@\r\n")
    assert s.lines() == ["+OK Supported SASL mechanisms", "PLAIN", "LOGIN", ".",
                         "-ERR Unsupported SASL mechanism",
                         "-ERR AUTH syntax: AUTH mechanism [initial-response]",
                         "-ERR AUTH syntax: AUTH mechanism [initial-response]"]


def test_a_long_sasl_line_ends_the_exchange(world):
    s = world.under_tls()
    s.send("AUTH PLAIN\r\n")
    s.lines()
    s.send("A" * 20000 + "\r\nNOOP\r\n")
    assert s.lines() == ["-ERR Line too long", "-ERR NOOP is not valid in this state"]
    assert s.protocol.state == "COMMAND"


@pytest.fixture
def oauth(tmp_path):
    verifier, key = oauth2_issuer(tmp_path, ISSUER, AUDIENCE)
    payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 600, "email": ALICE,
               "email_verified": True,
               "scope": "x" * 600}
    return verifier, jwt.encode(payload, key, algorithm="ES256", headers={"kid": "k1"})


def test_xoauth2_with_a_long_token(tmp_path, oauth):
    verifier, token = oauth
    w = World(tmp_path / "mail", verifier=verifier)
    s = w.under_tls()
    response = b64(f"user={ALICE}\x01auth=Bearer {token}\x01\x01")
    assert len(response) > 1000
    s.send(f"AUTH XOAUTH2 {response}\r\n")
    assert s.lines() == ["+OK Logged in, 0 messages (0 octets)"]
    assert s.protocol.account.address == ALICE


# -- T21: arguments checked, never a crash ----------------------------------------------

@pytest.mark.parametrize("line, reply", [
    ("TOP 1", "-ERR TOP needs a message number and a line count"),
    ("TOP", "-ERR TOP needs a message number and a line count"),
    ("TOP 1 -1", "-ERR line count expected"),
    ("TOP x 1", "-ERR message number expected"),
    ("DELE 0", "-ERR no such message, only 2 in maildrop"),
    ("DELE", "-ERR DELE needs a message number"),
    ("DELE 3", "-ERR no such message, only 2 in maildrop"),
    ("RETR x", "-ERR message number expected"),
    ("RETR", "-ERR RETR needs a message number"),
    ("RETR 0", "-ERR no such message, only 2 in maildrop"),
    ("RETR 1 2", "-ERR One message number expected"),
    ("RETR 99999999999", "-ERR message number expected"),
    ("LIST -1", "-ERR message number expected"),
    ("UIDL 1x", "-ERR message number expected"),
    ("STAT 1", "-ERR No arguments expected"),
    ("RSET x", "-ERR No arguments expected"),
    ("APOP alice 0123", "-ERR APOP is not supported"),
    ("XYZZY", "-ERR Unknown command"),
    ("\x01\x02", "-ERR Unknown command"),
    ("USER alice", "-ERR USER is not valid in this state"),
])
def test_t21_missing_and_bad_arguments_get_an_error(world, line, reply):
    """Stock POP3: ``TOP 1`` and ``USER`` raise TypeError inside the
    handler and the connection is dropped; ``DELE 0`` deletes message -1,
    i.e. the LAST one (Python indexing); APOP is offered with a timestamp."""
    s = world.logged_in()
    s.send(line + "\r\nSTAT\r\nQUIT\r\n")
    lines = s.lines()
    assert lines[0] == reply
    assert lines[1] == f"+OK 2 {crlf_size(FIRST) + crlf_size(SECOND)}"
    assert lines[2] == "+OK Bye, 0 messages deleted"
    assert len(world.files()) == 2


def test_t21_user_without_a_name(world):
    """Stock POP3: ``USER`` alone raises TypeError and drops the connection."""
    s = world.under_tls()
    s.send("USER\r\nUSER \r\nNOOP\r\n")
    assert s.lines() == ["-ERR USER needs a name", "-ERR USER needs a name",
                         "-ERR NOOP is not valid in this state"]
    assert not s.closed


def test_too_many_protocol_errors_end_the_session(tmp_path):
    w = World(tmp_path / "mail", max_errors=3)
    s = w.connect()
    with capture_events() as events:
        s.send("FOO\r\nBAR\r\nBAZ\r\nCAPA\r\n")
    assert s.lines() == ["-ERR Unknown command"] * 3 + ["-ERR Too many errors, closing"]
    assert s.closed
    assert events.named("pop3.limit")[0]["kind"] == "max_errors"


def test_long_lines_and_bare_line_ends(world):
    s = world.connect()
    s.send("CAPA " + "x" * 600 + "\r\nCAPA\nNOOP\r\n")
    assert s.lines() == ["-ERR Line too long", "-ERR Bare CR or LF in a command line"]
    s.send("x" * (70 * 1024))
    assert s.lines()[-1] == "-ERR Line too long, closing"
    assert s.closed


# -- the TRANSACTION state --------------------------------------------------------------

def test_stat_list_and_uidl(world):
    s = world.logged_in()
    s.send("STAT\r\nLIST\r\nLIST 2\r\nUIDL\r\nUIDL 1\r\n")
    one, two = crlf_size(FIRST), crlf_size(SECOND)
    lines = s.lines()
    assert lines[:6] == [f"+OK 2 {one + two}", f"+OK 2 messages ({one + two} octets)",
                         f"1 {one}", f"2 {two}", ".", f"+OK 2 {two}"]
    assert lines[6] == "+OK Unique-ID listing follows"
    uidls = [line.split(" ")[1] for line in lines[7:9]]
    assert lines[9] == "." and lines[10] == f"+OK 1 {uidls[0]}"
    assert len(set(uidls)) == 2
    assert all(0x21 <= ord(c) <= 0x7e for u in uidls for c in u)


def uidl_listing(session):
    session.send("UIDL\r\n")
    return session.lines()[1:-1]


def test_uidl_is_stable_across_sessions_and_restarts(world):
    s = world.logged_in()
    first = uidl_listing(s)
    s.send("QUIT\r\n")
    s = world.logged_in()
    assert uidl_listing(s) == first
    s.send("QUIT\r\n")
    # A new store over the same root: what a restart sees.
    world.store = MaildirStore(world.root, synchronous_runner)
    world.pop3 = world.factory("pop3")
    world.deliver(b"Subject: three\n\nthird\n")
    s = world.logged_in()
    listing = uidl_listing(s)
    assert listing[:2] == first and len(listing) == 3


def test_retr_sends_crlf_lines_dot_stuffed(world):
    s = world.logged_in()
    with capture_events() as events:
        s.send("RETR 2\r\n")
    body = SECOND.replace(b"\n", b"\r\n")
    assert s.output() == (b"+OK %d octets\r\n" % len(body)
                          + body.replace(b"\r\n.hidden", b"\r\n..hidden") + b".\r\n")
    [event] = events.named("pop3.retrieve")
    assert event["account"] == ALICE and event["size"] == len(body)


def test_a_dot_line_on_a_chunk_boundary_is_stuffed(world):
    """Stock RETR stuffs each 16 KiB chunk on its own: a ``.`` line starting
    a chunk goes out as ``.``, the client sees the end of the message there
    and takes the rest for responses; CRLF on disk also became CR CR LF."""
    head = b"Subject: dots\r\n\r\n"
    filler = b"x" * (16384 - len(head) - 2) + b"\r\n"
    message = head + filler + b".\r\nafter the dot\r\n"
    world.deliver(message)
    s = world.logged_in()
    s.send("RETR 3\r\n")
    out = s.output()
    assert out.endswith(b"\r\n..\r\nafter the dot\r\n.\r\n")
    assert b"\r\r" not in out
    assert out.count(b"\r\n.\r\n") == 1


def test_dot_stuffing_and_top_helpers():
    assert dot_stuffed(b".a\nb\n.\n") == b"..a\r\nb\r\n..\r\n.\r\n"
    assert dot_stuffed(b"no final newline") == b"no final newline\r\n.\r\n"
    assert dot_stuffed(b"") == b".\r\n"
    message = b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\nl3\r\n"
    assert top_of(message, 0) == b"A: 1\r\nB: 2\r\n\r\n"
    assert top_of(message, 2) == b"A: 1\r\nB: 2\r\n\r\nl1\r\nl2\r\n"
    assert top_of(message, 10 ** 9) == message
    assert top_of(b"\r\nbody\r\n", 0) == b"\r\n"
    assert top_of(b"A: only headers", 5) == b"A: only headers\r\n"


def test_top(world):
    s = world.logged_in()
    s.send("TOP 2 0\r\nTOP 2 1\r\n")
    assert s.lines() == ["+OK Top of message follows", "From: b@example.org",
                         "Subject: two", "", ".",
                         "+OK Top of message follows", "From: b@example.org",
                         "Subject: two", "", "Line 1", "."]


def test_deleted_messages_are_hidden_until_rset(world):
    s = world.logged_in()
    two = crlf_size(SECOND)
    s.send("DELE 1\r\nDELE 1\r\nRETR 1\r\nLIST 1\r\nUIDL 1\r\nTOP 1 0\r\nSTAT\r\nLIST\r\n")
    assert s.lines() == ["+OK Message 1 deleted"] + ["-ERR message 1 already deleted"] * 5 + [
        f"+OK 1 {two}", f"+OK 1 messages ({two} octets)", f"2 {two}", "."]
    s.send("RSET\r\nSTAT\r\n")
    total = crlf_size(FIRST) + two
    assert s.lines() == [f"+OK 2 messages ({total} octets)", f"+OK 2 {total}"]


def test_dele_removes_nothing_until_quit(world):
    s = world.logged_in()
    s.send("DELE 1\r\nDELE 2\r\n")
    assert len(world.files()) == 2
    with capture_events() as events:
        s.send("QUIT\r\n")
        assert s.lines()[-1] == "+OK Bye, 2 messages deleted"
        assert s.closed
        s.lose()
    assert world.files() == []
    assert events.named("pop3.disconnect")[0]["deleted"] == 2


def test_a_dropped_connection_deletes_nothing(world):
    s = world.logged_in()
    s.send("DELE 1\r\nDELE 2\r\n")
    with capture_events() as events:
        s.lose()
    assert len(world.files()) == 2
    assert events.named("pop3.disconnect")[0]["deleted"] == 0
    s = world.logged_in()
    s.send("STAT\r\n")
    assert s.lines() == [f"+OK 2 {crlf_size(FIRST) + crlf_size(SECOND)}"]


def test_rset_undoes_dele_before_quit(world):
    s = world.logged_in()
    s.send("DELE 1\r\nRSET\r\nQUIT\r\n")
    assert s.lines()[-1] == "+OK Bye, 0 messages deleted"
    assert len(world.files()) == 2


def test_retrieved_messages_are_flagged_seen_at_quit(world):
    s = world.logged_in()
    s.send("RETR 1\r\nDELE 2\r\n")
    assert all(not name.endswith("S") for name in world.files())
    s.send("QUIT\r\n")
    [left] = world.files()
    assert left.endswith(":2,S")


def test_quit_before_login_just_closes(world):
    s = world.connect()
    s.send("QUIT\r\n")
    assert s.lines() == ["+OK Bye"] and s.closed


# -- the maildrop: lock and snapshot ------------------------------------------------------

def test_t21_a_second_session_finds_the_maildrop_locked(world):
    """Stock POP3 has no maildrop lock: two sessions of one user both list,
    delete and renumber the same messages."""
    first = world.logged_in()
    second = world.connect(world.pop3s)
    with capture_events() as events:
        second.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\nSTAT\r\n")
    assert second.lines() == ["+OK Send PASS", "-ERR [IN-USE] Maildrop is locked by another "
                              "session", "-ERR STAT is not valid in this state"]
    assert events.named("pop3.limit")[0]["kind"] == "in_use"
    assert not events.named("auth.failure")
    first.send("QUIT\r\n")
    first.lose()
    second.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n")
    assert second.lines()[-1].startswith("+OK Logged in")


def test_a_dropped_session_releases_the_lock(world):
    first = world.logged_in()
    first.lose()
    world.logged_in()


def test_other_users_are_not_locked_out(world):
    world.logged_in()
    world.logged_in(user=BOB, password=BOB_PASSWORD)


def test_the_view_stays_stable_while_new_mail_arrives(world):
    s = world.logged_in()
    later = b"Subject: later\n\nlate\n"
    world.deliver(later)
    s.send("STAT\r\nRETR 3\r\nDELE 2\r\nQUIT\r\n")
    lines = s.lines()
    assert lines[0] == f"+OK 2 {crlf_size(FIRST) + crlf_size(SECOND)}"
    assert lines[1] == "-ERR no such message, only 2 in maildrop"
    assert lines[-1] == "+OK Bye, 1 messages deleted"
    s = world.logged_in()
    s.send("LIST\r\n")
    assert s.lines()[0] == f"+OK 2 messages ({crlf_size(FIRST) + crlf_size(later)} octets)"


def test_a_message_expunged_by_imap_meanwhile(world):
    s = world.logged_in()
    folder = world.store.user(ALICE).folder("INBOX")
    folder.expunge([folder.messages[0].uid])
    s.send("RETR 1\r\nRETR 2\r\n")
    lines = s.lines()
    assert lines[0] == "-ERR Message 1 is no longer available"
    assert lines[1].startswith("+OK")
    s.send("DELE 1\r\nQUIT\r\n")
    assert s.lines()[-1] == "+OK Bye, 0 messages deleted"


def test_the_lock_is_released_if_the_client_leaves_during_login(tmp_path):
    w = World(tmp_path / "mail", accounts=FakeAccounts({ALICE: PASSWORD}, hold=True))
    s = w.under_tls()
    s.send(f"USER {ALICE}\r\nPASS {PASSWORD}\r\n")
    s.lose()
    w.accounts.release()
    w.accounts.hold = False
    w.logged_in()


def test_commands_wait_for_a_slow_disk_and_reading_resumes_after_quit(world):
    runner = HandRunner(hold=False)
    world.store = MaildirStore(world.root, runner)
    world.pop3 = world.factory("pop3")
    s = world.logged_in()
    runner.hold = True
    s.send("RETR 1\r\nDELE 1\r\nQUIT\r\n")
    assert s.lines() == [] and s.transport.producerState == "paused"
    runner.run_all()                    # the read
    s.pump()
    lines = s.lines()
    assert lines[0] == f"+OK {crlf_size(FIRST)} octets" and lines[-1] == "+OK Message 1 deleted"
    assert s.transport.producerState == "paused" and len(world.files()) == 2
    runner.run_all()                    # the expunge at QUIT
    assert s.lines() == ["+OK Bye, 1 messages deleted"]
    assert s.closed and len(world.files()) == 1
    # Reading goes on while closing: TLS waits for the client's close_notify.
    assert s.transport.producerState == "producing"


# -- timeouts and connection limits --------------------------------------------------------

def test_idle_timeout(world):
    s = world.logged_in()
    world.clock.advance(599)
    s.send("NOOP\r\n")
    assert s.lines() == ["+OK"]
    world.clock.advance(599)
    assert not s.closed
    with capture_events() as events:
        world.clock.advance(2)
    assert s.lines() == ["-ERR Disconnected for inactivity"] and s.closed
    assert events.named("pop3.limit")[0]["kind"] == "timeout"


def test_trickling_bytes_do_not_keep_a_session(world):
    s = world.connect()
    for _ in range(12):
        world.clock.advance(60)
        s.send("N")
    assert s.closed


def test_configured_timeout(tmp_path):
    w = World(tmp_path / "mail", pop3_timeout="30s")
    s = w.connect()
    w.clock.advance(31)
    assert s.closed


def test_a_reader_that_stops_reading_is_aborted(world):
    world.deliver(b"Subject: big\n\n" + b"y" * 100 + b"\n" * 100000)
    s = world.logged_in()
    s.protocol.dataReceived(b"RETR 3\r\n")
    producer = s.transport.producer
    producer.resumeProducing()          # one chunk taken, then the client stalls
    world.clock.advance(599)
    assert not s.closed
    producer.resumeProducing()          # progress resets the timer
    world.clock.advance(599)
    assert not s.closed
    world.clock.advance(2)
    assert s.transport.disconnected     # aborted: its buffer would never drain


def test_deny_networks_and_connections_per_ip(tmp_path):
    w = World(tmp_path / "mail", deny="198.51.100.0/24", connections_per_ip=2)
    s = w.connect(peer="198.51.100.7")
    assert s.greeting == ["-ERR Access denied"] and s.closed
    sessions = [w.connect() for _ in range(2)]
    third = w.connect()
    assert third.greeting == ["-ERR [SYS/TEMP] Too many connections from your address"]
    sessions[0].lose()
    assert w.connect().greeting[0].startswith("+OK")


def test_disconnect_event(world):
    s = world.logged_in()
    s.send("RETR 1\r\n")
    with capture_events() as events:
        world.clock.advance(5)
        s.lose()
    [event] = events.named("pop3.disconnect")
    assert event["account"] == ALICE and event["retrieved"] == 1 and event["deleted"] == 0

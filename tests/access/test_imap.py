"""IMAP4rev1 server (appliance.access.imap.server) driven over a StringTransport.

Each test of a TWISTED-TRAPS item says in its docstring what stock
``twisted.mail.imap4.IMAP4Server`` did.
"""

import os
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from appliance.testing import HandRunner as HeldRunner
from appliance import events
import appliance.deliver.local  # noqa: F401  (registers delivery.local)
from appliance.access.imap import server as imap_module
from appliance.access.imap.server import IMAPFactory
from appliance.access.folders import MaildirStore
from appliance.auth.accounts import BackendUnavailable
from appliance.auth.sasl import Mechanisms
from appliance.threads import synchronous_runner
from appliance.testing import (Conversation, FakeAccounts, StringTransport, TLSStringTransport,
                               capture_events, make_config)

USER = "alice@example.test"
PASSWORD = "secret pw"
MESSAGE = (b"From: Bob <bob@example.org>\nTo: alice@example.test\nSubject: hello there\n"
           b"Date: Mon, 1 Jan 2024 10:00:00 +0000\nMessage-ID: <m1@example.org>\n\n"
           b"Hello world\nsecond line\n")


class FakeTLS:
    """Stands in for ServerTLS: STARTTLS only needs ``context`` to work."""

    context = object()


class Env:
    def __init__(self, tmp_path, implicit_tls=True, accounts=None, runner=synchronous_runner,
                 **config):
        self.root = str(tmp_path / "mail")
        self.config = make_config(str(tmp_path), **config)
        self.clock = Clock()
        self.store = MaildirStore(self.root, runner)
        self.accounts = accounts if accounts is not None else FakeAccounts({USER: PASSWORD})
        self.factory = IMAPFactory(self.config, self.store, self.accounts,
                                   Mechanisms(self.accounts), FakeTLS(), self.clock,
                                   implicit_tls=implicit_tls)
        self.factory.startFactory()

    def session(self, peer="192.0.2.10", transport_class=TLSStringTransport):
        return Session(self, peer, transport_class)

    def deliver(self, data=MESSAGE, name=None, address=USER, folder="new"):
        """A message as delivery writes it (LF lines, in new/)."""
        user = self.store.user(address)
        path = os.path.join(user.path, folder)
        os.makedirs(path, exist_ok=True)
        name = name or f"{len(os.listdir(path)) + 1000}.Q{os.urandom(4).hex()}.mx"
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
        return name

    def close(self):
        self.factory.stopFactory()


class Session(Conversation):
    def __init__(self, env, peer, transport_class):
        self.env = env
        super().__init__(env.factory.buildProtocol(None),
                         transport_class(peerAddress=IPv4Address("TCP", peer, 40000)))
        self._tag = 0

    def lines(self):
        """The lines written since the last call, as bytes."""
        return self.output().split(b"\r\n")[:-1]

    def cmd(self, text):
        """Send one tagged command; the lines written in answer."""
        self._tag += 1
        tag = b"t%d" % self._tag
        self.send(tag + b" " + (text.encode() if isinstance(text, str) else text) + b"\r\n")
        return self.lines()

    def ok(self, text):
        lines = self.cmd(text)
        assert lines and lines[-1].startswith(b"t%d OK" % self._tag), lines
        return lines

    def login(self):
        return self.ok(f'LOGIN {USER} "{PASSWORD}"')


@pytest.fixture
def env(tmp_path):
    environment = Env(tmp_path)
    yield environment
    environment.close()


@pytest.fixture
def session(env):
    s = env.session()
    s.output()
    return s


@pytest.fixture
def selected(env, session):
    env.deliver()
    env.deliver(b"Subject: second\n\nbody two\n")
    session.login()
    session.ok("SELECT INBOX")
    return session


def tagged(lines):
    return lines[-1].split(b" ", 2)[1:] if lines else None


# -- greeting, capabilities, STARTTLS (T3, T4) ----------------------------------------------

def test_greeting_advertises_starttls_and_logindisabled_in_the_clear(tmp_path):
    env = Env(tmp_path, implicit_tls=False)
    greeting = env.session().output()
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
    assert b" STARTTLS" in greeting and b" LOGINDISABLED" in greeting
    assert b"AUTH=" not in greeting
    assert b"APPENDLIMIT=%d" % env.config.server.max_message_size in greeting


def test_login_before_starttls_is_refused(tmp_path):
    """Already right in stock (BAD); here NO [PRIVACYREQUIRED] as Dovecot says it."""
    s = Env(tmp_path, implicit_tls=False).session()
    lines = s.cmd(f"LOGIN {USER} x")
    assert lines[-1] == b"t1 NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS) first"


def test_authenticate_plain_before_starttls_is_refused(tmp_path):
    """T4: stock IMAP4Server accepted AUTHENTICATE PLAIN in the clear although it
    advertised LOGINDISABLED (the challengers were consulted, not the TLS state)."""
    env = Env(tmp_path, implicit_tls=False)
    s = env.session()
    s.output()
    lines = s.cmd("AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQgcHc=")
    assert lines == [b"t1 NO [PRIVACYREQUIRED] Authenticate over TLS (STARTTLS) first"]
    assert env.accounts.calls == []


def test_commands_pipelined_after_starttls_are_discarded(tmp_path):
    """T3: stock ran a LOGIN sent in the same packet as STARTTLS after the
    handshake, so the victim found itself logged in as the attacker."""
    env = Env(tmp_path, implicit_tls=False)
    s = env.session()
    s.output()
    with capture_events() as seen:
        s.send(f"a STARTTLS\r\nb LOGIN {USER} \"{PASSWORD}\"\r\nc SELECT INBOX\r\n")
    assert s.lines() == [b"a OK Begin TLS negotiation now"]
    assert s.transport.tls is FakeTLS.context or s.transport.tls is not None
    assert s.protocol.state == "unauth"
    assert env.accounts.calls == []
    assert seen.named("imap.starttls.discarded")[0]["octets"] > 0
    caps = s.cmd("CAPABILITY")[0]
    assert b"AUTH=PLAIN" in caps and b"STARTTLS" not in caps and b"LOGINDISABLED" not in caps
    s.login()


def test_starttls_twice_is_refused(tmp_path):
    s = Env(tmp_path, implicit_tls=False).session()
    s.ok("STARTTLS")
    assert tagged(s.cmd("STARTTLS"))[0] == b"BAD"


def test_starttls_without_a_tls_capable_transport(tmp_path):
    s = Env(tmp_path, implicit_tls=False).session(transport_class=StringTransport)
    greeting = s.output()
    assert b"STARTTLS" not in greeting
    assert s.cmd("STARTTLS")[-1] == b"t1 NO TLS not available"


# -- login and AUTHENTICATE -------------------------------------------------------------

def test_login_creates_the_special_folders(env, session):
    lines = session.login()
    assert lines[-1].startswith(b"t1 OK [CAPABILITY IMAP4rev1")
    listed = session.ok('LIST "" "*"')
    assert b'* LIST (\\HasNoChildren) "." "INBOX"' in listed
    for name, attribute in (("Sent", "Sent"), ("Drafts", "Drafts"), ("Trash", "Trash"),
                            ("Junk", "Junk")):
        assert f'* LIST (\\HasNoChildren \\{attribute}) "." "{name}"'.encode() in listed
    assert os.path.isdir(os.path.join(env.store.user(USER).path, ".Sent", "cur"))


def test_login_events(env, session):
    with capture_events() as seen:
        session.login()
    (login,) = seen.named("imap.login")
    assert login["account"] == USER and login["mechanism"] == "LOGIN"
    assert seen.named("auth.success")[0]["listener"] == "imap"


def test_bad_password_is_no_and_feeds_auth_failure(env, session):
    with capture_events() as seen:
        lines = session.cmd(f"LOGIN {USER} hunter2guess")
    assert lines == [b"t1 NO [AUTHENTICATIONFAILED] Authentication failed"]
    (event,) = seen.named("auth.failure")
    assert event["mechanism"] == "LOGIN" and event["account"] == USER
    assert event["listener"] == "imap" and event["peer_ip"] == "192.0.2.10"
    assert "session" in event and "reason" in event
    assert "hunter2guess" not in str(event)       # never the password


def test_three_failures_end_the_connection(env, session):
    for _ in range(2):
        session.cmd(f"LOGIN {USER} wrong")
    lines = session.cmd(f"LOGIN {USER} wrong")
    assert lines == [b"t3 NO [AUTHENTICATIONFAILED] Authentication failed",
                     b"* BYE Too many authentication failures"]
    assert session.closed


def test_backend_outage_at_login_is_unavailable(tmp_path):
    """T20: stock answered a failing checker with "BAD Server error: <exception text>"."""
    env = Env(tmp_path, accounts=FakeAccounts({USER: PASSWORD},
                                              error=BackendUnavailable("ldap down at 10.0.0.5")))
    s = env.session()
    s.output()
    with capture_events() as seen:
        lines = s.cmd(f"LOGIN {USER} x")
    assert lines == [b"t1 NO [UNAVAILABLE] Authentication is not available now, try later"]
    assert seen.named("auth.unavailable") and not seen.named("auth.failure")


def test_authenticate_plain_with_initial_response(env, session):
    lines = session.cmd("AUTHENTICATE PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQgcHc=")
    assert lines[-1].startswith(b"t1 OK [CAPABILITY")
    assert session.protocol.state == "auth"


def test_authenticate_plain_with_a_continuation(env, session):
    assert session.cmd("AUTHENTICATE PLAIN") == [b"+ "]
    session.send(b"AGFsaWNlQGV4YW1wbGUudGVzdABzZWNyZXQgcHc=\r\n")
    assert session.lines()[-1].startswith(b"t1 OK")


def test_authenticate_login_mechanism(env, session):
    assert session.cmd("AUTHENTICATE LOGIN") == [b"+ VXNlcm5hbWU6"]
    session.send(b"YWxpY2VAZXhhbXBsZS50ZXN0\r\n")
    assert session.lines() == [b"+ UGFzc3dvcmQ6"]
    session.send(b"c2VjcmV0IHB3\r\n")
    assert session.lines()[-1].startswith(b"t1 OK")


def test_authenticate_cancel_and_garbage(env, session):
    session.cmd("AUTHENTICATE PLAIN")
    session.send(b"*\r\n")
    assert session.lines() == [b"t1 BAD AUTHENTICATE cancelled"]
    session.cmd("AUTHENTICATE PLAIN")
    session.send(b"not base64!\r\n")
    assert session.lines() == [b"t2 BAD Malformed authentication exchange"]
    assert session.protocol.state == "unauth"


def test_authenticate_plain_with_another_authzid_fails(env, session):
    # "root\0alice@example.test\0secret pw"
    lines = session.cmd("AUTHENTICATE PLAIN cm9vdABhbGljZUBleGFtcGxlLnRlc3QAc2VjcmV0IHB3")
    assert lines == [b"t1 NO [AUTHENTICATIONFAILED] Authentication failed"]


def test_unknown_mechanism(env, session):
    assert session.cmd("AUTHENTICATE CRAM-MD5")[-1] == \
        b"t1 NO [CANNOT] Unsupported authentication mechanism"


def test_commands_need_the_right_state(env, session):
    assert session.cmd("SELECT INBOX") == [b"t1 BAD Command not valid in this state"]
    session.login()
    assert session.cmd("FETCH 1 FLAGS") == [b"t3 BAD Command not valid in this state"]
    assert session.cmd("LOGIN a b") == [b"t4 BAD Command not valid in this state"]


# -- limits: literals (T19), lines, nesting, timeouts --------------------------------------

def test_huge_append_literal_is_refused_before_the_continuation(env, session):
    """T19: stock answered "{4294967295}" with "+ Ready for 4294967295 octets"
    and spooled whatever came, without a cap."""
    session.login()
    lines = session.cmd("APPEND INBOX {4294967295}")
    assert lines == [b"t2 NO [TOOBIG] Literal too big"]
    assert not any(line.startswith(b"+") for line in lines)
    assert session.protocol.line_mode


def test_append_literal_just_over_appendlimit_is_refused(env, session):
    session.login()
    limit = env.config.server.max_message_size
    assert session.cmd("APPEND INBOX {%d}" % (limit + 1)) == [b"t2 NO [TOOBIG] Literal too big"]
    assert session.cmd("APPEND INBOX {%d}" % limit) == [b"+ Ready for literal data"]


def test_negative_literal_is_a_syntax_error(env, session):
    """T19: stock took "{-1}" as a literal size and misparsed what followed."""
    session.login()
    assert session.cmd("APPEND INBOX {-1}") == [b"t2 BAD Misplaced literal"]
    assert session.protocol.line_mode


def test_big_literal_outside_append_is_refused(env, session):
    assert session.cmd("LOGIN {100000}") == [b"t1 BAD Literal too big"]


def test_literal_for_a_command_not_allowed_now_is_refused_first(env, session):
    assert session.cmd("APPEND INBOX {10}") == [b"t1 BAD Command not valid in this state"]


def test_big_non_synchronizing_literal_ends_the_connection(env, session):
    session.login()
    lines = session.cmd("APPEND INBOX {5000+}")
    assert lines == [b"t2 BAD [TOOBIG] Non-synchronizing literal too big",
                     b"* BYE Cannot recover from a refused literal"]
    assert session.closed


def test_small_non_synchronizing_literal_is_read_without_continuation(env, session):
    session.send(b"t1 LOGIN {18+}\r\nalice@example.test {9+}\r\nsecret pw\r\n")
    assert session.lines()[-1].startswith(b"t1 OK")


def test_login_with_synchronizing_literals(env, session):
    assert session.cmd("LOGIN {18}") == [b"+ Ready for literal data"]
    session.send(b'alice@example.test "secret pw"\r\n')
    assert session.lines()[-1].startswith(b"t1 OK")


def test_overlong_line_disconnects(env, session):
    session.send(b"a NOOP " + b"x" * 20000 + b"\r\n")
    assert session.lines() == [b"* BYE [LIMIT] Line too long"]
    assert session.closed


def test_deep_nesting_is_a_plain_syntax_error(env, selected):
    """T20: stock recursed into nested search keys and answered
    "BAD SEARCH failed: maximum recursion depth exceeded ..."."""
    lines = selected.cmd("SEARCH " + "(" * 200 + "ALL" + ")" * 200)
    assert lines == [b"t3 BAD Nesting too deep"]
    lines = selected.cmd("SEARCH " + "NOT " * 1000 + "ALL")
    assert lines == [b"t4 BAD Search keys nested too deep"]


def test_unexpected_errors_do_not_leak_their_text(env, selected, monkeypatch):
    """T20: stock sent str(exception) to the client ("BAD Server error: ...")."""
    def broken(*args):
        raise RuntimeError("secret internal detail /var/lib/x")
    monkeypatch.setattr(imap_module, "render_batch", broken)
    lines = selected.cmd("FETCH 1 BODY[]")
    assert lines[-1] == b"t3 NO [SERVERBUG] Internal error"
    assert b"secret" not in b"".join(lines)


def test_preauth_timeout_is_one_minute(env, session):
    env.clock.advance(59)
    assert not session.closed
    env.clock.advance(2)
    assert session.lines() == [b"* BYE Autologout; idle for too long"]
    assert session.closed


def test_postauth_timeout_is_the_configured_idle_timeout(tmp_path):
    env = Env(tmp_path, limits={"imap_idle_timeout": "10m"})
    s = env.session()
    s.login()
    env.clock.advance(300)
    s.cmd("NOOP")
    env.clock.advance(599)
    assert not s.closed
    env.clock.advance(2)
    assert s.closed


def test_connection_limits(tmp_path):
    env = Env(tmp_path, limits={"connections_per_ip": "2", "deny": "198.51.100.0/24"})
    denied = env.session(peer="198.51.100.7")
    assert denied.lines() == [b"* BYE Access denied"] and denied.closed
    one, two = env.session(), env.session()
    third = env.session()
    assert third.lines() == [b"* BYE [UNAVAILABLE] Too many connections from your address"]
    one.lose()
    assert not env.session().closed
    assert not two.closed


def test_invalid_tags_and_unknown_commands(env, session):
    session.send(b"\r\n")
    assert session.lines() == [b"* BAD Invalid tag"]
    session.send(b"a+b NOOP\r\n")
    assert session.lines() == [b"* BAD Invalid tag"]
    assert session.cmd("FROBNICATE") == [b"t1 BAD Unknown command"]
    assert session.cmd("") == [b"t2 BAD Missing command"]


# -- ordering ------------------------------------------------------------------------------

def test_pipelined_commands_are_answered_in_order_while_the_disk_is_slow(tmp_path):
    """Stock Twisted ran every line at once: a NOOP behind a slow FETCH was
    answered before it."""
    runner = HeldRunner()
    env = Env(tmp_path, runner=runner)
    env.deliver()
    s = env.session()
    s.send(f"a LOGIN {USER} \"{PASSWORD}\"\r\n")
    runner.release()
    s.send(b"b SELECT INBOX\r\n")
    runner.release()
    s.output()
    s.send(b"c FETCH 1 BODY[]\r\nd NOOP\r\ne CAPABILITY\r\n")
    assert s.lines() == []
    assert s.protocol.paused
    runner.release()
    tags = [line.split(b" ")[0] for line in s.lines() if not line.startswith((b"*", b"Hello",
                                                                              b"second", b"From",
                                                                              b"To", b"Subj",
                                                                              b"Date", b"Mess"))]
    assert [t for t in tags if t in (b"c", b"d", b"e")] == [b"c", b"d", b"e"]


# -- mailbox names ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ['"../../etc"', '"/etc/passwd"', '"a/b"', "..", '"a..b"',
                                  '"."', '"~/x"', '"a\\\\b"'])
def test_traversal_names_are_refused(env, session, name):
    """Stock passed mailbox names to the account unchecked."""
    session.login()
    for command in ("SELECT", "CREATE", "DELETE", "SUBSCRIBE", "STATUS"):
        text = f"{command} {name}" + (" (MESSAGES)" if command == "STATUS" else "")
        line = session.cmd(text)[-1]
        assert re.match(rb"t\d+ (NO|BAD) ", line), (text, line)
    user_root = env.store.user(USER).path
    assert not os.path.exists(os.path.join(os.path.dirname(user_root), "etc"))


def test_nul_in_a_mailbox_name_is_refused(env, session):
    session.login()
    assert session.cmd("CREATE {3}") == [b"+ Ready for literal data"]
    session.send(b"a\x00b\r\n")
    assert session.lines() == [b"t2 NO [CANNOT] Invalid mailbox name"]
    assert session.cmd('CREATE "a\x00b"')[-1].startswith(b"t3 BAD")


def test_create_delete_rename_subscribe(env, session):
    session.login()
    session.ok("CREATE Work.")
    assert session.cmd("CREATE Work")[-1] == b"t3 NO [ALREADYEXISTS] Mailbox exists"
    session.ok("CREATE Work.Old")
    listed = session.ok('LIST "" "Work*"')
    assert b'* LIST (\\HasChildren) "." "Work"' in listed
    assert b'* LIST (\\HasNoChildren) "." "Work.Old"' in listed
    top = session.ok('LIST "" "%"')
    assert b'* LIST (\\HasChildren) "." "Work"' in top
    assert not any(b"Work.Old" in line for line in top)
    session.ok("SUBSCRIBE Work.Old")
    session.ok("RENAME Work Jobs")
    lsub = session.ok('LSUB "" "*"')
    assert b'* LSUB (\\HasNoChildren) "." "Jobs.Old"' in lsub
    session.ok("DELETE Jobs")
    listed = session.ok('LIST "" "*"')
    assert b'* LIST (\\Noselect \\HasChildren) "." "Jobs"' in listed
    assert session.cmd("DELETE Nope")[-1].endswith(b"NO [NONEXISTENT] Mailbox does not exist")
    assert session.cmd("DELETE INBOX")[-1].split(b" ")[1] == b"NO"
    assert session.cmd("CREATE inbox")[-1].split(b" ")[1] == b"NO"


def test_non_ascii_names_travel_in_modified_utf7(env, session):
    session.login()
    session.ok("CREATE Entw&APw-rfe")
    assert b'* LIST (\\HasNoChildren) "." "Entw&APw-rfe"' in session.ok('LIST "" "Entw*"')
    assert os.path.isdir(os.path.join(env.store.user(USER).path, ".Entw&APw-rfe"))


def test_list_with_empty_pattern_and_namespace(env, session):
    session.login()
    assert session.ok('LIST "" ""')[0] == b'* LIST (\\Noselect) "." ""'
    assert session.ok("NAMESPACE")[0] == b'* NAMESPACE (("" ".")) NIL NIL'
    assert b'"INBOX"' in session.ok('LIST "" "inbox"')[0]


# -- SELECT, STATUS, FETCH ---------------------------------------------------------------

def test_select_reports_the_mailbox(env, session):
    env.deliver()
    old = env.deliver(b"Subject: x\n\ny\n", folder="cur", name="50.Qold.mx:2,S")
    os.utime(os.path.join(env.store.user(USER).path, "cur", old), (1e9, 1e9))
    session.login()
    lines = session.ok("SELECT INBOX")
    assert b"* 2 EXISTS" in lines and b"* 1 RECENT" in lines
    assert b"* OK [UNSEEN 2] First unseen" in lines
    folder = env.store.user(USER).folder("INBOX")
    assert b"* OK [UIDVALIDITY %d] UIDs valid" % folder.uidvalidity in lines
    assert b"* OK [UIDNEXT 3] Predicted next UID" in lines
    assert b"* OK [PERMANENTFLAGS (\\Draft \\Flagged \\Answered \\Seen \\Deleted \\*)] Limited" \
        in lines
    assert lines[-1] == b"t2 OK [READ-WRITE] SELECT completed"
    assert session.ok("EXAMINE INBOX")[-1] == b"t3 OK [READ-ONLY] EXAMINE completed"


def test_select_missing_mailbox(env, session):
    session.login()
    assert session.cmd("SELECT Nope")[-1] == b"t2 NO [NONEXISTENT] Mailbox does not exist"
    assert session.protocol.state == "auth"


def test_status(env, session):
    env.deliver()
    session.login()
    lines = session.ok("STATUS INBOX (MESSAGES RECENT UIDNEXT UNSEEN)")
    assert lines[0] == b'* STATUS "INBOX" (MESSAGES 1 RECENT 1 UIDNEXT 2 UNSEEN 1)'
    assert session.cmd("STATUS INBOX (FOO)")[-1] == b"t3 BAD Unknown STATUS item"


def test_fetch_flags_envelope_size_date(env, selected):
    lines = selected.ok("FETCH 1 (FLAGS ENVELOPE RFC822.SIZE INTERNALDATE UID)")
    line = lines[0]
    assert line.startswith(b"* 1 FETCH (FLAGS (\\Recent) ENVELOPE (")
    assert b'"Mon, 1 Jan 2024 10:00:00 +0000" "hello there" (("Bob" NIL "bob" "example.org"))' \
        in line
    assert b'"<m1@example.org>")' in line
    size = len(MESSAGE.replace(b"\n", b"\r\n"))
    assert b"RFC822.SIZE %d" % size in line
    assert re.search(rb'INTERNALDATE "\d\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d \+0000"', line)
    assert line.endswith(b" UID 1)")


def test_fetch_body_sets_seen_and_peek_does_not(env, selected):
    lines = selected.ok("FETCH 1 BODY.PEEK[]")
    assert lines[0] == b"* 1 FETCH (BODY[] {%d}" % len(MESSAGE.replace(b"\n", b"\r\n"))
    assert b"FLAGS" not in b"".join(lines)
    lines = selected.ok("FETCH 1 BODY[TEXT]")
    assert lines[0] == b"* 1 FETCH (BODY[TEXT] {26}"
    assert lines[3] == b" FLAGS (\\Seen \\Recent))"
    assert selected.ok("FETCH 1 FLAGS")[0] == b"* 1 FETCH (FLAGS (\\Seen \\Recent))"


def test_fetch_partial_and_header_fields(env, selected):
    lines = selected.ok("FETCH 1 (BODY.PEEK[HEADER.FIELDS (Subject To)] BODY.PEEK[]<6.10>)")
    text = b"\r\n".join(lines)
    assert b"BODY[HEADER.FIELDS (SUBJECT TO)] {48}\r\nTo: alice@example.test\r\n" \
           b"Subject: hello there\r\n\r\n" in text
    assert b"BODY[]<6> {10}\r\nBob <bob@e)" in text


def test_uid_fetch_clamps_huge_ranges(env, selected):
    """Stock MessageSet iterated every number of 1:4294967295."""
    lines = selected.ok("UID FETCH 1:4294967295 (FLAGS)")
    assert lines[:2] == [b"* 1 FETCH (UID 1 FLAGS (\\Recent))", b"* 2 FETCH (UID 2 FLAGS (\\Recent))"]
    lines = selected.ok("UID FETCH 4000000000:* (FLAGS)")     # n:* includes the last UID
    assert lines[0] == b"* 2 FETCH (UID 2 FLAGS (\\Recent))"
    assert selected.ok("SEARCH 1:4294967295")[0] == b"* SEARCH 1 2"


def test_sequence_numbers_beyond_the_mailbox_are_bad(env, selected):
    assert selected.cmd("FETCH 1:3 FLAGS")[-1] == b"t3 BAD Invalid message sequence number"
    assert selected.cmd("FETCH 0 FLAGS")[-1] == b"t4 BAD Invalid sequence number"
    assert selected.cmd("FETCH 1 (FLAGS BODY[FOO])")[-1] == b"t5 BAD Invalid FETCH item"


def test_bodystructure_of_a_multipart(env, session):
    env.deliver(b"Subject: m\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=XX\n\n"
                b"pre\n--XX\nContent-Type: text/plain; charset=utf-8\n\nhi\n--XX\n"
                b"Content-Type: application/pdf; name=\"a b.pdf\"\n"
                b"Content-Disposition: attachment; filename=\"a b.pdf\"\n"
                b"Content-Transfer-Encoding: base64\n\nAAAA\n--XX--\n")
    session.login()
    session.ok("SELECT INBOX")
    line = session.ok("FETCH 1 BODYSTRUCTURE")[0]
    assert line == (b'* 1 FETCH (BODYSTRUCTURE (("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL '
                    b'"7BIT" 2 1 NIL NIL NIL NIL)("APPLICATION" "PDF" ("NAME" "a b.pdf") NIL NIL '
                    b'"BASE64" 4 NIL ("ATTACHMENT" ("FILENAME" "a b.pdf")) NIL NIL) "MIXED" '
                    b'("BOUNDARY" "XX") NIL NIL NIL))')
    text = b"\r\n".join(session.ok("FETCH 1 (BODY.PEEK[2] BODY.PEEK[2.MIME] BODY.PEEK[1])"))
    assert b"BODY[2] {4}\r\nAAAA" in text
    assert b"BODY[2.MIME] {" in text and b"Content-Transfer-Encoding: base64\r\n\r\n" in text
    assert b"BODY[1] {2}\r\nhi" in text


# -- STORE, EXPUNGE, COPY, MOVE, APPEND ------------------------------------------------

def test_store_and_flags_on_disk(env, selected):
    lines = selected.ok("STORE 1 +FLAGS (\\Seen \\Flagged $Work)")
    assert lines[0] == b"* 1 FETCH (FLAGS (\\Flagged \\Seen $Work \\Recent))"
    assert selected.ok("UID STORE 1 -FLAGS.SILENT (\\Flagged)") == [b"t4 OK completed"]
    assert selected.ok("STORE 1 FLAGS (\\Answered)")[0] == \
        b"* 1 FETCH (FLAGS (\\Answered \\Recent))"
    cur = os.listdir(os.path.join(env.store.user(USER).path, "cur"))
    assert any(name.endswith(":2,R") for name in cur)
    assert selected.cmd("STORE 1 +FLAGS (\\Bogus)")[-1] == b"t6 BAD Unknown system flag"


def test_expunge_and_uid_expunge(env, selected):
    selected.ok("STORE 1:2 +FLAGS.SILENT (\\Deleted)")
    lines = selected.ok("UID EXPUNGE 2")
    assert lines == [b"* 2 EXPUNGE", b"t4 OK completed"]
    assert selected.ok("EXPUNGE") == [b"* 1 EXPUNGE", b"t5 OK completed"]
    assert os.listdir(os.path.join(env.store.user(USER).path, "cur")) == []


def test_read_only_mailbox_refuses_changes(env, session):
    env.deliver()
    session.login()
    session.ok("EXAMINE INBOX")
    assert session.cmd("STORE 1 +FLAGS (\\Seen)")[-1] == b"t3 NO [READ-ONLY] Mailbox is read-only"
    assert session.ok("FETCH 1 BODY[]")[-1] == b"t4 OK completed"
    assert b"\\Seen" not in b"".join(session.ok("FETCH 1 FLAGS"))


def test_copy_and_move_answer_copyuid(env, selected):
    folder = env.store.user(USER).folder("Trash")
    lines = selected.ok("COPY 1:2 Trash")
    assert re.fullmatch(rb"t3 OK \[COPYUID \d+ 1:2 1:2\] COPY completed", lines[-1])
    lines = selected.ok("UID MOVE 1 Junk")
    assert re.fullmatch(rb"\* OK \[COPYUID \d+ 1 1\] Moved", lines[0])
    assert lines[1:] == [b"* 1 EXPUNGE", b"t4 OK MOVE completed"]
    assert selected.cmd("COPY 1 Nope")[-1] == b"t5 NO [TRYCREATE] No such mailbox"
    assert len(folder.messages) == 2


def test_append_with_flags_and_date(env, session):
    session.login()
    assert session.cmd('APPEND Sent (\\Seen) "17-Jul-1996 02:44:25 -0700" {12}') == \
        [b"+ Ready for literal data"]
    session.send(b"Subject: a\r\n\r\n")
    (line,) = session.lines()
    match = re.fullmatch(rb"t2 OK \[APPENDUID (\d+) 1\] APPEND completed", line)
    assert match
    session.ok("SELECT Sent")
    fetched = session.ok("FETCH 1 (FLAGS INTERNALDATE)")[0]
    assert fetched == b'* 1 FETCH (FLAGS (\\Seen) INTERNALDATE "17-Jul-1996 09:44:25 +0000")'


def test_append_to_a_missing_folder_asks_to_create(env, session):
    session.login()
    session.cmd("APPEND Nope {3}")
    session.send(b"x\r\n\r\n")
    assert session.lines() == [b"t2 NO [TRYCREATE] No such mailbox"]


def test_append_to_the_selected_mailbox_shows_exists(env, selected):
    selected.cmd("APPEND INBOX {3}")
    selected.send(b"x\r\n\r\n")
    lines = selected.lines()
    assert lines[0] == b"* 3 EXISTS"
    assert lines[-1].startswith(b"t3 OK [APPENDUID")


# -- SEARCH -----------------------------------------------------------------------------

def test_search_keys(env, selected):
    assert selected.ok("SEARCH ALL")[0] == b"* SEARCH 1 2"
    assert selected.ok('SEARCH SUBJECT "HELLO"')[0] == b"* SEARCH 1"
    assert selected.ok("SEARCH FROM bob")[0] == b"* SEARCH 1"
    assert selected.ok("SEARCH BODY two")[0] == b"* SEARCH 2"
    assert selected.ok("SEARCH OR SUBJECT second FROM bob")[0] == b"* SEARCH 1 2"
    assert selected.ok("SEARCH NOT (SUBJECT second)")[0] == b"* SEARCH 1"
    assert selected.ok("SEARCH SENTON 1-Jan-2024")[0] == b"* SEARCH 1"
    assert selected.ok("SEARCH LARGER 100")[0] == b"* SEARCH 1"
    selected.ok("STORE 2 +FLAGS (\\Seen)")
    assert selected.ok("UID SEARCH UNSEEN")[0] == b"* SEARCH 1"
    assert selected.ok("SEARCH CHARSET UTF-8 TEXT world")[0] == b"* SEARCH 1"
    assert selected.cmd("SEARCH CHARSET KOI8-R ALL")[-1] == \
        b"t14 NO [BADCHARSET (US-ASCII UTF-8)] Unsupported charset"
    assert selected.cmd("SEARCH FROB")[-1] == b"t15 BAD Unknown search key"


def test_search_with_a_literal(env, selected):
    assert selected.cmd("SEARCH CHARSET UTF-8 SUBJECT {5}") == [b"+ Ready for literal data"]
    selected.send(b"there\r\n")
    assert selected.lines()[0] == b"* SEARCH 1"


# -- several sessions, IDLE ----------------------------------------------------------------

def test_other_sessions_see_flags_and_expunges_when_allowed(env, selected):
    other = env.session()
    other.login()
    other.ok("SELECT INBOX")
    other.ok("STORE 1 +FLAGS (\\Deleted)")
    other.ok("EXPUNGE")
    lines = selected.ok("FETCH 2 FLAGS")                 # no EXPUNGE during FETCH
    assert not any(line.endswith(b"EXPUNGE") for line in lines)
    assert lines[0] == b"* 2 FETCH (FLAGS (\\Recent))"
    lines = selected.ok("NOOP")
    assert b"* 1 EXPUNGE" in lines


def test_idle_sees_a_delivery_at_once(env, selected):
    selected.cmd("IDLE")
    env.deliver(b"Subject: new\n\nx\n")
    events.emit("delivery.local", queue_id="q", recipient=USER, mailbox=USER, size=1, delay=0)
    assert selected.lines() == [b"* 3 EXISTS", b"* 3 RECENT"]
    selected.send(b"DONE\r\n")
    assert selected.lines() == [b"t3 OK IDLE terminated"]


def test_idle_polls_the_disk_without_a_tight_loop(env, selected):
    selected.cmd("IDLE")
    env.deliver(b"Subject: new\n\nx\n")         # another program wrote it: no event
    env.clock.advance(1)
    assert selected.lines() == []
    env.clock.advance(imap_module.IDLE_POLL)
    assert selected.lines() == [b"* 3 EXISTS", b"* 3 RECENT"]
    assert len(env.clock.getDelayedCalls()) == 2    # the next poll and the session timeout
    selected.send(b"done\r\n")
    assert selected.lines() == [b"t3 OK IDLE terminated"]
    assert len(env.clock.getDelayedCalls()) == 1


def test_idle_ends_on_anything_but_done(env, selected):
    selected.cmd("IDLE")
    selected.send(b"NOOP\r\n")
    assert selected.lines() == [b"t3 BAD Expected DONE"]


def test_uids_are_stable_across_a_restart(tmp_path):
    env = Env(tmp_path)
    env.deliver()
    s = env.session()
    s.login()
    s.ok("SELECT INBOX")
    s.ok("STORE 1 +FLAGS (\\Flagged)")
    s.lose()
    env.close()
    env.deliver(b"Subject: while down\n\nx\n")
    again = Env(tmp_path)
    s = again.session()
    s.login()
    lines = s.ok("SELECT INBOX")
    assert b"* 2 EXISTS" in lines
    assert s.ok("UID FETCH 1:* FLAGS")[:2] == [b"* 1 FETCH (UID 1 FLAGS (\\Flagged))",
                                              b"* 2 FETCH (UID 2 FLAGS (\\Recent))"]


def test_logout_and_disconnect_event(env, session):
    session.login()
    with capture_events() as seen:
        assert session.cmd("LOGOUT") == [b"* BYE Logging out", b"t2 OK LOGOUT completed"]
        session.lose()
    assert seen.named("imap.disconnect")[0]["account"] == USER
    assert env.factory.connections == 0


def test_id_and_capability_in_every_state(env, session):
    assert session.ok("ID NIL")[0] == b'* ID ("name" "mailappliance")'
    session.login()
    caps = session.ok("CAPABILITY")[0]
    assert b"AUTH=" not in caps and b"IDLE" in caps and b"UIDPLUS" in caps and b"MOVE" in caps


def test_flag_changes_by_another_session_show_on_noop(env, selected):
    other = env.session()
    other.login()
    other.ok("SELECT INBOX")
    other.ok("STORE 2 +FLAGS (\\Flagged)")
    assert selected.ok("NOOP")[:-1] == [b"* 2 FETCH (FLAGS (\\Flagged \\Recent))"]
    assert selected.ok("NOOP") == [b"t4 OK completed"]       # told once


def test_a_long_flag_history_falls_back_to_comparing_everything(env, selected, monkeypatch):
    from appliance.access import folders as maildir
    monkeypatch.setattr(maildir, "FLAG_LOG_LIMIT", 4)
    other = env.session()
    other.login()
    other.ok("SELECT INBOX")
    for _ in range(4):
        other.ok("STORE 1:2 +FLAGS (\\Seen)")
        other.ok("STORE 1:2 -FLAGS (\\Seen)")
    other.ok("STORE 1 +FLAGS (\\Answered)")
    assert selected.ok("NOOP")[:-1] == [b"* 1 FETCH (FLAGS (\\Answered \\Recent))"]


# -- what FETCH says about message structure (appliance.access.imap.mime) -----------------

NESTED = (b"Subject: outer\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
          b"--b1\r\nContent-Type: text/plain\r\n\r\nfirst\r\n"
          b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
          b"Subject: inner\r\nFrom: In <in@example.org>\r\n"
          b"Content-Type: multipart/alternative; boundary=b2\r\n\r\n"
          b"--b2\r\nContent-Type: text/plain\r\n\r\nplain\r\n"
          b"--b2\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--b2--\r\n"
          b"\r\n--b1--\r\n")


def test_sections_of_an_encapsulated_message():
    from appliance.access.imap import mime as imapmime
    root = imapmime.Part(NESTED)
    assert imapmime.section(root, [1], "") == b"first"
    assert imapmime.section(root, [2], "HEADER").startswith(b"Subject: inner\r\n")
    assert imapmime.section(root, [2, 1], "") == b"plain"
    assert imapmime.section(root, [2, 2], "MIME") == b"Content-Type: text/html\r\n\r\n"
    assert imapmime.section(root, [2, 3], "") is None
    assert imapmime.section(root, [1], "TEXT") is None          # not a message/rfc822
    assert imapmime.section(root, [], "HEADER.FIELDS", (b"subject",)) == \
        b"Subject: outer\r\n\r\n"
    structure = imapmime.body_structure(root, extended=False)
    assert structure.startswith(b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 1)'
                                b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" ')
    assert b'("Subject" NIL' not in structure
    assert b'"inner" ((In NIL' not in structure
    assert b'"inner" (("In" NIL "in" "example.org"))' in structure
    assert structure.endswith(b' "MIXED")')


def test_envelope_addresses_and_eight_bit_values():
    from appliance.access.imap import mime as imapmime
    headers = imapmime.Headers(
        "Subject: caf\u00e9\r\nFrom: \"Doe, J\" <j@x.org>, k@y.org (Kay)\r\n"
        "To: undisclosed-recipients:;\r\nCc: Team <team@x.org>\r\n\r\n".encode())
    envelope = imapmime.envelope(headers)
    assert envelope.startswith(b'(NIL {5}\r\ncaf\xc3\xa9 (("Doe, J" NIL "j" "x.org")'
                               b'("Kay" NIL "k" "y.org"))')
    # RFC 3501 §7.4.2: a group is a start marker with its name and an end marker.
    assert (b' ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))'
            b' (("Team" NIL "team" "x.org")) NIL NIL NIL)') in envelope


def test_digest_parts_default_to_message_rfc822():
    from appliance.access.imap import mime as imapmime
    root = imapmime.Part(b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
                         b"Subject: one\r\n\r\nx\r\n--d--\r\n")
    assert root.children[0].main == b"MESSAGE" and root.children[0].message is not None


def test_deep_mime_nesting_stops_at_the_cap():
    from appliance.access.imap import mime as imapmime
    raw = b"x"
    for level in range(60):
        raw = (b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (level, level)
               + raw + b"\r\n--b%d--\r\n" % level)
    structure = imapmime.body_structure(imapmime.Part(raw), extended=True)
    assert structure.count(b'"MIXED"') <= imapmime.MAX_DEPTH + 1


def test_sequence_sets_are_resolved_without_iterating():
    from appliance.access.imap.syntax import (Atom, SyntaxError_, parse_set, resolve_seqs,
                                             resolve_uids)
    uids = list(range(1, 10001, 2))
    assert resolve_uids(parse_set(Atom(b"1:4294967295")), uids) == list(range(len(uids)))
    assert resolve_uids(parse_set(Atom(b"4294967295:*")), uids) == [len(uids) - 1]
    assert resolve_uids(parse_set(Atom(b"2:4,9998")), uids) == [1]
    assert resolve_seqs(parse_set(Atom(b"*:1")), 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        resolve_seqs(parse_set(Atom(b"4")), 3)
    for bad_set in (b"0", b"1:4294967296", b"1,,2", b"-1", b"*:*x"):
        with pytest.raises(SyntaxError_):
            parse_set(Atom(bad_set))


def test_account_and_mailbox_provide_twisted_interfaces(env):
    """The Maildir account and mailbox are twisted.mail IAccount / IMailbox /
    IMessage providers (usable by other code written against those)."""
    from twisted.mail import imap4
    from zope.interface.verify import verifyObject
    from appliance.access.imap.mailbox import MaildirAccount
    env.deliver()
    user = env.store.user(USER)
    user.ensure()
    account = MaildirAccount(user)
    verifyObject(imap4.IAccount, account)
    views = []
    account.select("INBOX").addCallback(views.append)
    view = views[0]
    verifyObject(imap4.IMailbox, view)
    ((seq, message),) = view.fetch(imap4.MessageSet(1, None), uid=False)
    verifyObject(imap4.IMessage, message)
    assert message.getHeaders(False, "subject") == {"subject": "hello there"}
    assert message.getBodyFile().read() == b"Hello world\r\nsecond line\r\n"
    assert message.getSize() == len(MESSAGE.replace(b"\n", b"\r\n"))
    changed = []
    view.store(imap4.MessageSet(1), ["\\Seen"], 1, uid=True).addCallback(changed.append)
    assert changed == [{1: ["\\Seen", "\\Recent"]}]
    names = []
    account.listMailboxes("", "*").addCallback(names.append)
    assert [name for name, _ in names[0]] == ["INBOX", "Drafts", "Junk", "Sent", "Trash"]
    assert view.requestStatus(["MESSAGES", "UNSEEN"]) == {"MESSAGES": 1, "UNSEEN": 0}


def test_a_burst_of_deliveries_costs_two_scans(tmp_path):
    runner = HeldRunner()
    env = Env(tmp_path, runner=runner)
    s = env.session()
    s.send(f"a LOGIN {USER} \"{PASSWORD}\"\r\n")
    runner.release()
    s.send(b"b SELECT INBOX\r\nc IDLE\r\n")
    runner.release()
    s.output()
    for _ in range(5):
        env.deliver(b"Subject: burst\n\nx\n")
        events.emit("delivery.local", queue_id="q", recipient=USER, mailbox=USER, size=1,
                    delay=0)
    assert len(runner.held) == 1
    runner.step()
    assert s.lines() == [b"* 5 EXISTS", b"* 5 RECENT"]
    assert len(runner.held) == 1        # the one more scan asked for meanwhile
    runner.step()
    assert runner.held == [] and s.lines() == []

"""Defences end to end: the real server, clients bound to other loopback
addresses (127.0.0.x are ordinary outside hosts, SPEC §4), every protocol.

Bans from AUTH failures on submission, IMAP and POP3 refuse the client on
every listener (SMTP 421 4.7.0, IMAP * BYE, POP3 -ERR; implicit TLS ports
close without a handshake), end its open sessions, and survive a restart;
greylisting answers 451 4.7.1 after recipient validation and lets the retry
through after the delay; the per-user limit on submission; the allow list wins.
"""

import base64
import smtplib
import socket
import ssl

import pytest

from harness import wait_until

USER, PASSWORD = "alice@example.test", "correct horse battery staple"
LISTENERS = ("mx", "submission", "submissions", "imap", "imaps", "pop3", "pop3s")
TIMEOUT = 10


class LineClient:
    """A line client bound to ``source`` (127.0.0.x); STARTTLS-capable."""

    def __init__(self, server, listener, source):
        self.server = server
        self.sock = socket.create_connection((server.host, server.port(listener)),
                                             timeout=TIMEOUT, source_address=(source, 0))
        self.buffer = b""

    def line(self):
        while b"\r\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                raise EOFError(self.buffer)
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self):
        """An SMTP reply's lines (up to the one without a dash)."""
        lines = [self.line()]
        while lines[-1][3:4] == b"-":
            lines.append(self.line())
        return lines

    def send(self, text):
        self.sock.sendall(text.encode() + b"\r\n")

    def tls(self):
        self.sock = self.server.tls_context().wrap_socket(self.sock)
        self.buffer = b""

    def closed(self):
        """True when the server closed the connection (reading gives EOF)."""
        try:
            while True:
                if not self.sock.recv(4096):
                    return True
        except (ConnectionResetError, ssl.SSLError):
            return True
        except socket.timeout:
            return False

    def close(self):
        self.sock.close()


def greeting(server, listener, source):
    """The first line a client at ``source`` gets on ``listener`` (b"" on a close)."""
    client = LineClient(server, listener, source)
    try:
        return client.line()
    except (EOFError, ConnectionResetError):
        return b""
    finally:
        client.close()


def implicit_tls_refused(server, listener, source):
    """True when the implicit-TLS port closes on ``source`` without a handshake."""
    sock = socket.create_connection((server.host, server.port(listener)), timeout=TIMEOUT,
                                    source_address=(source, 0))
    try:
        server.tls_context().wrap_socket(sock)
    except (ssl.SSLError, ConnectionResetError, OSError):
        return True
    return False


def plain(password, user=USER):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def submission_session(server, source):
    client = LineClient(server, "submission", source)
    assert client.line().startswith(b"220 ")
    client.send("EHLO client.example")
    client.reply()
    client.send("STARTTLS")
    assert client.reply()[0].startswith(b"220")
    client.tls()
    client.send("EHLO client.example")
    client.reply()
    return client


def fail_logins(server, source, sessions, tries, password):
    """``sessions`` submission sessions from ``source``, each trying AUTH
    ``tries`` times with ``password(n, session)``; the first line of each reply."""
    replies = []
    for session in range(sessions):
        client = submission_session(server, source)
        for n in range(tries):
            client.send(f"AUTH PLAIN {plain(password(n, session))}")
            replies.append(client.reply()[0])
        client.close()
    return replies


def assert_refused_everywhere(server, source):
    assert greeting(server, "mx", source).startswith(b"421 4.7.0")
    assert greeting(server, "submission", source).startswith(b"421 4.7.0")
    assert greeting(server, "imap", source).startswith(b"* BYE")
    assert greeting(server, "pop3", source).startswith(b"-ERR")
    assert implicit_tls_refused(server, "submissions", source)
    assert implicit_tls_refused(server, "imaps", source)
    assert implicit_tls_refused(server, "pop3s", source)


@pytest.fixture
def server(mailserver_factory):
    return mailserver_factory(listeners=LISTENERS, overrides={"limits": {
        "auth_failures_before_ban": "3", "allow": "127.0.0.1, 127.0.0.200"}})


def test_submission_failures_ban_on_every_listener_end_open_sessions_and_survive_restart(
        server):
    source = "127.0.0.21"
    idle = LineClient(server, "imap", source)       # an open session of the same client
    assert idle.line().startswith(b"* OK")
    one = submission_session(server, source)
    for n in range(2):
        one.send(f"AUTH PLAIN {plain(f'wrong {n}')}")
        assert one.reply()[0].startswith(b"535")
    one.close()
    two = submission_session(server, source)
    two.send(f"AUTH PLAIN {plain('wrong 3')}")
    assert two.reply()[0].startswith(b"535")        # the failure is answered...
    assert two.reply()[0].startswith(b"421 4.7.0")  # ...then the ban closes the session
    assert idle.line().startswith(b"* BYE")         # and the other open session
    assert_refused_everywhere(server, source)
    assert greeting(server, "mx", "127.0.0.22").startswith(b"220 ")    # a neighbour is not
    bans = wait_until(lambda: server.events("defence.ban"), 5, what="the ban event")
    assert [b["network"] for b in bans] == ["127.0.0.21/32"]
    # Written in a thread within milliseconds of the ban (not before the
    # reply: a kill -9 in that instant would lose it).
    wait_until(lambda: (server.data_dir / "defence" / "bans.json").exists(), 5,
               what="the ban on disk")
    server.kill()
    server.start()
    assert greeting(server, "mx", source).startswith(b"421 4.7.0")
    assert greeting(server, "imap", source).startswith(b"* BYE")


def test_the_same_wrong_password_again_never_bans(server):
    source = "127.0.0.23"
    replies = fail_logins(server, source, 3, 2, lambda n, session: "stale app password")
    assert all(reply.startswith(b"535") for reply in replies)
    assert greeting(server, "mx", source).startswith(b"220 ")


def test_imap_login_failures_ban(server):
    source = "127.0.0.31"
    for n in range(3):
        client = LineClient(server, "imap", source)
        assert client.line().startswith(b"* OK")
        client.send("a STARTTLS")
        assert client.line().startswith(b"a OK")
        client.tls()
        client.send(f'b LOGIN {USER} "wrong {n}"')
        assert client.line().startswith(b"b NO")
        client.close()
    assert_refused_everywhere(server, source)


def test_pop3_pass_failures_ban(server):
    source = "127.0.0.41"
    client = LineClient(server, "pop3", source)
    assert client.line().startswith(b"+OK")
    client.send("STLS")
    assert client.line().startswith(b"+OK")
    client.tls()
    for n in range(2):
        client.send(f"USER {USER}")
        assert client.line().startswith(b"+OK")
        client.send(f"PASS wrong {n}")
        assert client.line().startswith(b"-ERR")
    client.close()
    client = LineClient(server, "pop3", source)
    client.line()
    client.send("STLS")
    client.line()
    client.tls()
    client.send(f"USER {USER}")
    client.line()
    client.send("PASS wrong again")
    assert client.line().startswith(b"-ERR")
    assert client.closed()
    assert_refused_everywhere(server, source)


def test_the_allow_list_wins(server):
    source = "127.0.0.200"
    fail_logins(server, source, 3, 3, lambda n, session: f"wrong {n} {session}")
    assert greeting(server, "mx", source).startswith(b"220 ")
    assert server.events("defence.ban") == []


def test_greylisting_after_recipient_validation_and_the_retry_passes(mailserver_factory):
    server = mailserver_factory(listeners=("mx",), overrides={
        "checks": {"greylist": "on", "greylist_delay": "2s", "greylist_window": "1m"}})
    source = "127.0.0.51"

    def attempt():
        with smtplib.SMTP(server.host, server.mx_port, timeout=TIMEOUT,
                          source_address=(source, 0)) as client:
            client.ehlo("sender.example.net")
            client.mail("news@sender.example.net")
            unknown = client.rcpt("nobody@example.test")
            known = client.rcpt(USER)
            if known[0] == 250:
                client.data(b"Subject: greylisted\r\n\r\nhello\r\n")
            return unknown, known

    unknown, known = attempt()
    assert unknown[0] == 550                        # never 451 for an unknown user
    assert known[0] == 451 and known[1].startswith(b"4.7.1")
    unknown, known = attempt()
    assert known[0] == 451                          # too early
    wait_until(lambda: attempt()[1][0] == 250, 10, interval=0.5, what="the retry to pass")
    server.wait_for_messages(USER, 1)
    assert greeting(server, "mx", "127.0.0.1").startswith(b"220")
    def decisions():
        found = [e.get("how") or e.get("reason") for e in server.events()
                 if e["event"].startswith("defence.greylist.")]
        return found if "retry" in found else None
    assert wait_until(decisions, 5, what="the greylist events")[:2] == ["new", "early"]


def test_the_per_user_limit_on_submission(mailserver_factory):
    server = mailserver_factory(listeners=("mx", "submission"), overrides={
        "limits": {"messages_per_hour_per_user": "2"}})
    context = server.tls_context()
    answers = []
    with smtplib.SMTP(server.host, server.port("submission"), timeout=TIMEOUT,
                      source_address=("127.0.0.61", 0)) as client:
        client.starttls(context=context)
        client.login(USER, PASSWORD)
        for _ in range(3):
            code, text = client.mail(USER)
            answers.append((code, text[:5]))
            client.rset()
    assert answers == [(250, answers[0][1]), (250, answers[1][1]), (451, b"4.7.1")]
    limit = wait_until(lambda: [e for e in server.events("defence.limit")
                                if e["kind"] == "messages_per_hour_per_user"], 5,
                       what="the limit event")
    assert limit[0]["key"] == USER


def test_deny_and_connection_rate(mailserver_factory):
    server = mailserver_factory(listeners=("mx", "imap", "pop3"), overrides={"limits": {
        "deny": "127.0.0.71", "connections_per_minute_per_ip": "3"}})
    assert greeting(server, "mx", "127.0.0.71").startswith(b"421")
    assert greeting(server, "imap", "127.0.0.71").startswith(b"* BYE")
    source = "127.0.0.72"
    firsts = [greeting(server, name, source) for name in ("mx", "imap", "pop3", "mx")]
    assert firsts[0].startswith(b"220") and firsts[1].startswith(b"* OK")
    assert firsts[2].startswith(b"+OK") and firsts[3].startswith(b"421 4.7.0")

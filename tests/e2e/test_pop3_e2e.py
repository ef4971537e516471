"""POP3 from outside: the real server, real TLS, poplib and curl.

Mail reaches the mailbox through the real MX path (smtplib to the mx port,
the spool, the queue runner, Maildir delivery); poplib reads it with STLS on
the pop3 port and with implicit TLS on pop3s, verifying the server's
self-signed certificate; curl is the independent client (SASL over pop3s).
Deletions happen at QUIT only, UIDLs survive a restart, a second session of
the same user finds the maildrop locked. The last test does the same against
the LDAP backend (a real slapd from tests/ldap_server.py); the others share
one server, a mailbox each (conftest's ``shared_server``).
"""

import poplib
import socket
from email import policy
from email.parser import BytesParser

import pytest


import ldap_server
from harness import HOSTNAME, mailboxes, wait_until  # noqa: E402

ALICE = "alice@example.test"          # the LDAP directory's user
LISTENERS = ("mx", "pop3", "pop3s")
TIMEOUT = 30
USERS = mailboxes("pop", 16)



def fill(server, count, recipient=None):
    recipient = recipient or server.user
    for n in range(count):
        server.send_through_mx(f"message {n + 1}",
                               f"body of message {n + 1}\n.a line starting with a dot\n.\nend\n",
                               recipient)
    return server.wait_for_messages(recipient, count)


def pop3_stls(server):
    client = poplib.POP3(server.host, server.port("pop3"), timeout=TIMEOUT)
    client.stls(server.tls_context())
    return client


def pop3s(server):
    return poplib.POP3_SSL(server.host, server.port("pop3s"), context=server.tls_context(),
                           timeout=TIMEOUT)


def login(client, server, user=None, password=None):
    client.user(user or server.user)
    client.pass_(password or server.password)
    return client


def parse(lines):
    return BytesParser(policy=policy.default).parsebytes(b"\n".join(lines) + b"\n")


# -- STLS on the pop3 port ---------------------------------------------------------------

def test_poplib_with_stls_reads_and_deletes_at_quit(server):
    fill(server, 2)
    client = poplib.POP3(server.host, server.port("pop3"), timeout=TIMEOUT)
    capabilities = client.capa()
    assert "STLS" in capabilities and "USER" not in capabilities
    with pytest.raises(poplib.error_proto, match="TLS required"):
        client.user(server.user)
    client.stls(server.tls_context())
    assert "USER" in client.capa() and "STLS" not in client.capa()
    login(client, server)
    count, size = client.stat()
    assert count == 2
    _, listing, _ = client.list()
    assert sum(int(line.split()[1]) for line in listing) == size
    _, lines, octets = client.retr(1)
    message = parse(lines)
    assert message["Subject"] == "message 1"
    body = message.get_content()
    assert ".a line starting with a dot\n.\nend" in body
    assert int(listing[0].split()[1]) == len(b"\r\n".join(lines)) + 2
    client.dele(1)
    client.dele(2)
    assert len(server.messages(server.user)) == 2     # nothing removed before QUIT
    assert client.quit().startswith(b"+OK")
    assert server.messages(server.user) == []
    [event] = wait_until(lambda: [e for e in server.events("pop3.disconnect", since=server.since)
                                  if e.get("deleted")], TIMEOUT, what="pop3.disconnect")
    assert event["deleted"] == 2 and event["retrieved"] == 1


def test_a_dropped_connection_deletes_nothing(server):
    fill(server, 1)
    client = login(pop3_stls(server), server)
    client.dele(1)
    client.close()                      # gone without QUIT
    wait_until(lambda: server.events("pop3.disconnect", since=server.since), TIMEOUT,
               what="pop3.disconnect")
    client = login(pop3_stls(server), server)   # the lock went with the connection
    assert client.stat()[0] == 1
    client.quit()
    assert len(server.messages(server.user)) == 1


def test_commands_sent_with_stls_are_discarded(server):
    fill(server, 1)
    with socket.create_connection((server.host, server.port("pop3")), timeout=TIMEOUT) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"+OK")
        raw.sendall(f"STLS\r\nUSER {server.user}\r\nPASS {server.password}\r\n".encode())
        assert reader.readline() == b"+OK Begin TLS negotiation\r\n"
        tls = server.tls_context().wrap_socket(raw, server_hostname=HOSTNAME)
        tls_reader = tls.makefile("rb")
        tls.sendall(b"STAT\r\n")
        assert tls_reader.readline() == b"-ERR STAT is not valid in this state\r\n"
        tls.sendall(b"QUIT\r\n")
        assert tls_reader.readline().startswith(b"+OK")
        tls_reader.close()
        tls.close()
        reader.close()
    wait_until(lambda: server.events("pop3.stls.discarded", since=server.since), TIMEOUT,
               what="pop3.stls.discarded")


# -- implicit TLS on pop3s ---------------------------------------------------------------

def test_pop3s_uidl_is_stable_across_sessions_and_a_restart(server):
    fill(server, 2)
    client = login(pop3s(server), server)
    first = client.uidl()[1]
    client.quit()
    server.send_through_mx("third", "while nobody reads\n", server.user)
    server.wait_for_messages(server.user, 3)
    server.restart()
    client = login(pop3s(server), server)
    listing = client.uidl()[1]
    assert listing[:2] == first and len(listing) == 3
    _, lines, _ = client.top(3, 0)
    assert parse(lines)["Subject"] == "third"
    client.quit()


def test_the_maildrop_is_locked_against_a_second_session(server):
    fill(server, 1)
    first = login(pop3s(server), server)
    second = pop3_stls(server)
    second.user(server.user)
    with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
        second.pass_(server.password)
    first.quit()
    second.user(server.user)
    second.pass_(server.password)
    assert second.stat()[0] == 1
    second.quit()


def test_new_mail_waits_for_the_next_session(server):
    fill(server, 1)
    client = login(pop3s(server), server)
    server.send_through_mx("late", "arrived during the session\n", server.user)
    server.wait_for_messages(server.user, 2)
    assert client.stat()[0] == 1
    client.quit()
    client = login(pop3s(server), server)
    assert client.stat()[0] == 2
    client.quit()


def test_wrong_passwords_are_limited_and_logged(server):
    client = pop3s(server)
    for attempt in range(2):
        client.user(server.user)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_(f"guess {attempt}")
    client.user(server.user)
    with pytest.raises(poplib.error_proto, match="too many failures"):
        client.pass_("guess 2")
    with pytest.raises((poplib.error_proto, OSError, EOFError)):
        client.noop()
    def failures_now():
        return server.events("auth.failure", since=server.since)
    failures = wait_until(lambda: len(failures_now()) >= 3 and failures_now(), TIMEOUT,
                          what="3 auth.failure")
    assert len(failures) == 3
    assert {f["listener"] for f in failures} == {"pop3s"}
    assert all("guess" not in str(f) for f in failures)


# -- curl ------------------------------------------------------------------------------

def test_curl_lists_and_retrieves_over_pop3s(server):
    fill(server, 2)
    listing = server.curl("pop3s", "")
    assert [line.split()[0] for line in listing.splitlines()] == [b"1", b"2"]
    message = server.curl("pop3s", "2")
    parsed = BytesParser(policy=policy.default).parsebytes(message.replace(b"\r\n", b"\n"))
    assert parsed["Subject"] == "message 2"
    assert ".a line starting with a dot\n.\nend" in parsed.get_content()
    logins = wait_until(lambda: server.events("pop3.login", since=server.since), TIMEOUT,
                        what="pop3.login")
    assert {e["mechanism"] for e in logins} <= {"PLAIN", "LOGIN", "USER"}


def test_curl_deletes_with_dele_and_stls(server):
    fill(server, 1)
    server.curl("pop3", "1", "--ssl-reqd", "--request", "DELE", "--list-only")
    assert server.messages(server.user) == []


# -- the LDAP backend ---------------------------------------------------------------------

def test_pop3s_with_the_ldap_backend(mailserver_factory, slapd):
    server = mailserver_factory(listeners=LISTENERS, users=(),
                                overrides={"auth": slapd.auth_section("starttls")})
    fill(server, 1, ALICE)
    password = ldap_server.USERS["alice"][0]
    client = login(pop3s(server), server, ALICE, password)
    _, lines, _ = client.retr(1)
    assert parse(lines)["Subject"] == "message 1"
    client.dele(1)
    client.quit()
    assert server.messages(ALICE) == []
    client = pop3s(server)
    client.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
        client.pass_("not the password")
    client.quit()

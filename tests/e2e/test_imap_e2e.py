"""IMAP from outside: the real server, real TLS, imaplib and curl.

Mail reaches the mailbox through the real MX path (smtplib to the mx port,
the spool, the queue runner, Maildir delivery). imaplib reads, flags, moves
and deletes it with STARTTLS on the imap port and with implicit TLS on imaps,
verifying the server's self-signed certificate; curl is the independent
client. Flags and UIDs survive a restart, IDLE hears of a delivery, traversal
names and a huge literal are refused. The last test logs in against the LDAP
backend (a real slapd from tests/ldap_server.py). The other tests share one
server, a mailbox each (conftest's ``shared_server``).
"""

import imaplib
import re
import socket
import time

import pytest


import ldap_server
from harness import mailboxes, wait_until  # noqa: E402

ALICE = "alice@example.test"          # the LDAP directory's user
LISTENERS = ("mx", "imap", "imaps")
TIMEOUT = 30
USERS = mailboxes("imap", 16)



def fill(server, count):
    have = len(server.messages(server.user))
    for number in range(have + 1, have + count + 1):
        server.send_through_mx(f"message {number}", f"body of message {number}\n", server.user)
        server.wait_for_messages(server.user, number)


def imap_starttls(server):
    client = imaplib.IMAP4(server.host, server.port("imap"), timeout=TIMEOUT)
    assert "LOGINDISABLED" in client.capabilities
    client.starttls(ssl_context=server.tls_context())
    client.login(server.user, server.password)
    return client


def imaps(server, user=None, password=None):
    client = imaplib.IMAP4_SSL(server.host, server.port("imaps"),
                               ssl_context=server.tls_context(), timeout=TIMEOUT)
    client.login(user or server.user, password or server.password)
    return client


def uid_flags(client):
    typ, data = client.uid("FETCH", "1:*", "(FLAGS)")
    assert typ == "OK"
    found = {}
    for item in data:
        line = item if isinstance(item, bytes) else item[0]
        m = re.search(rb"UID (\d+) FLAGS \(([^)]*)\)|FLAGS \(([^)]*)\) UID (\d+)", line)
        uid = int(m.group(1) or m.group(4))
        flags = (m.group(2) if m.group(1) else m.group(3)).split()
        found[uid] = sorted(f for f in flags if f != b"\\Recent")
    return found


def test_read_flag_move_delete_over_starttls(server):
    fill(server, 3)
    client = imap_starttls(server)
    typ, data = client.select("INBOX")
    assert (typ, data) == ("OK", [b"3"])
    typ, data = client.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert data[0][1].strip() == b"Subject: message 2"
    typ, data = client.fetch("1", "(RFC822)")
    assert b"body of message 1" in data[0][1]
    assert b"\\Seen" in client.fetch("1", "(FLAGS)")[1][0]
    client.store("3", "+FLAGS", "(\\Flagged)")
    typ, data = client.uid("MOVE", "2", "Trash")
    assert typ == "OK"
    client.store("1", "+FLAGS", "(\\Deleted)")
    typ, data = client.expunge()
    assert typ == "OK" and data == [b"2", b"1"]      # the MOVE's EXPUNGE, then ours
    assert client.search(None, "ALL")[1] == [b"1"]
    client.select("Trash")
    assert client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0][1].strip() == \
        b"Subject: message 2"
    client.logout()
    names = sorted(p.name for p in server.messages(server.user))
    assert len(names) == 1 and names[0].endswith(":2,F")


def test_flags_and_uids_survive_a_restart(server):
    fill(server, 2)
    client = imaps(server)
    client.select("INBOX")
    validity = client.response("UIDVALIDITY")[1][0]
    client.uid("STORE", "2", "+FLAGS", "(\\Answered $Work)")
    before = uid_flags(client)
    client.logout()
    server.stop()
    server.start()
    fill(server, 1)          # delivered after the restart: the next UID
    client = imaps(server)
    client.select("INBOX")
    assert client.response("UIDVALIDITY")[1][0] == validity
    after = uid_flags(client)
    assert {uid: after[uid] for uid in before} == before
    assert after[2] == [b"$Work", b"\\Answered"]
    assert sorted(after) == [1, 2, 3]
    client.logout()


def test_idle_sees_a_delivery(server):
    fill(server, 1)
    client = imaps(server)
    client.select("INBOX")
    tag = client._new_tag()
    client.send(tag + b" IDLE\r\n")
    assert client.readline().startswith(b"+")
    server.send_through_mx("while idling", "hello\n", server.user)
    client.sock.settimeout(TIMEOUT)
    line = client.readline()
    assert line == b"* 2 EXISTS\r\n"
    client.send(b"DONE\r\n")
    while not line.startswith(tag):
        line = client.readline()
    assert b"OK" in line
    client.logout()


def test_traversal_names_are_refused(server):
    client = imaps(server)
    for name in ('"../../etc"', '"/etc"', '"a/b"', '".."'):
        typ, data = client._simple_command("CREATE", name)
        assert typ == "NO", (name, typ, data)
        typ, data = client.select(name)
        assert typ == "NO"
    client.logout()
    mail_root = server.data_dir / "mail"
    assert sorted(p.name for p in mail_root.iterdir()) == ["example.test"]
    assert not (server.data_dir / "etc").exists()


def test_huge_literal_is_refused_before_the_continuation(server):
    raw = socket.create_connection((server.host, server.port("imaps")), timeout=TIMEOUT)
    sock = server.tls_context().wrap_socket(raw)
    stream = sock.makefile("rb")
    assert stream.readline().startswith(b"* OK [CAPABILITY")
    sock.sendall(b'a LOGIN "%s" "%s"\r\n' % (server.user.encode(), server.password.encode()))
    assert stream.readline().startswith(b"a OK")
    sock.sendall(b"b APPEND INBOX {4294967295}\r\n")
    assert stream.readline() == b"b NO [TOOBIG] Literal too big\r\n"
    sock.sendall(b"c APPEND INBOX {-1}\r\n")
    assert stream.readline().startswith(b"c BAD")
    sock.sendall(b"d NOOP\r\n")
    assert stream.readline() == b"d OK completed\r\n"
    sock.close()


def test_appendlimit_is_advertised_and_append_works(server):
    client = imaps(server)
    typ, data = client.capability()
    assert b"APPENDLIMIT=26214400" in data[0]
    message = f"From: {server.user}\r\nSubject: draft\r\n\r\nunfinished\r\n".encode()
    typ, data = client.append("Drafts", "(\\Draft)", None, message)
    assert typ == "OK" and b"APPENDUID" in data[0]
    client.select("Drafts")
    assert client.fetch("1", "(BODY.PEEK[])")[1][0][1] == message
    client.logout()


def test_starttls_discards_pipelined_login(server):
    """T3 against the real listener: a LOGIN in the same packet as STARTTLS never runs."""
    raw = socket.create_connection((server.host, server.port("imap")), timeout=TIMEOUT)
    stream = raw.makefile("rb")
    stream.readline()
    raw.sendall(b'a STARTTLS\r\nb LOGIN "%s" "%s"\r\n' % (server.user.encode(),
                                                          server.password.encode()))
    assert stream.readline() == b"a OK Begin TLS negotiation now\r\n"
    sock = server.tls_context().wrap_socket(raw)
    sock.sendall(b"c CAPABILITY\r\n")
    reply = sock.recv(4096)
    assert reply.startswith(b"* CAPABILITY") and b"AUTH=PLAIN" in reply   # still not logged in
    sock.close()
    wait_until(lambda: server.events("imap.starttls.discarded", since=server.since), TIMEOUT,
               what="imap.starttls.discarded")
    assert not server.events("imap.login", since=server.since)


# -- curl --------------------------------------------------------------------------------

def test_curl_lists_and_fetches_over_imaps(server):
    fill(server, 2)
    listing = server.curl("imaps", "")
    assert b'"INBOX"' in listing and b"\\Sent" in listing
    message = server.curl("imaps", "INBOX/;UID=2")
    assert b"Subject: message 2" in message and b"body of message 2" in message
    search = server.curl("imaps", "INBOX?SUBJECT%20%22message%201%22")
    assert search.strip() == b"* SEARCH 1"


def test_curl_with_starttls_and_a_custom_command(server):
    fill(server, 1)
    status = server.curl("imap", "", "--ssl-reqd", "--request", "STATUS INBOX (MESSAGES)")
    assert status.strip() == b'* STATUS "INBOX" (MESSAGES 1)'


# -- the LDAP backend ------------------------------------------------------------------------

def test_imaps_with_the_ldap_backend(mailserver_factory, own_slapd):
    server = mailserver_factory(listeners=LISTENERS, users=(),
                                overrides={"auth": own_slapd.auth_section("starttls")})
    server.user = ALICE
    fill(server, 1)
    password = ldap_server.USERS["alice"][0]
    client = imaps(server, ALICE, password)
    client.select("INBOX")
    assert b"message 1" in client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[1][0][1]
    client.logout()
    client = imaplib.IMAP4_SSL(server.host, server.port("imaps"),
                               ssl_context=server.tls_context(), timeout=TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED"):
        client.login(ALICE, "not the password")
    client.logout()
    own_slapd.stop()
    start = time.monotonic()
    client = imaplib.IMAP4_SSL(server.host, server.port("imaps"),
                               ssl_context=server.tls_context(), timeout=TIMEOUT)
    with pytest.raises(imaplib.IMAP4.error, match=r"UNAVAILABLE"):
        client.login(ALICE, password)
    assert time.monotonic() - start < TIMEOUT
    client.logout()

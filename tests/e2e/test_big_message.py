"""A 20 MiB message through the real server (issue 17): streamed to the
spool as it arrives, delivered byte for byte, read back over IMAP; the
server's peak memory grows by far less than the message; a client that
leaves mid-DATA or sends too much leaves no file behind."""

import imaplib
import smtplib
import socket
import time
import uuid

import pytest

from harness import wait_until

SENDER = "sender@example.org"
LINE = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?\r\n"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def mailserver(module_mailserver_factory):
    return module_mailserver_factory()


def big_message(to, marker, size):
    head = (f"From: {SENDER}\r\nTo: {to}\r\nSubject: big {marker}\r\n"
            f"Message-ID: <{marker}@client.example.org>\r\n\r\n").encode()
    lines = [LINE] * (size // len(LINE))
    lines[1::50] = [b"." + LINE] * len(lines[1::50])     # a dot to stuff now and then
    return head + b"".join(lines) + f"marker {marker}\r\n".encode()


def leftovers(server):
    return [p.name for p in (server.data_dir / "queue").iterdir()
            if p.name.startswith("incoming.")]


def test_twenty_mib_arrive_intact_in_the_maildir_and_over_imap(mailserver):
    marker = uuid.uuid4().hex
    message = big_message(mailserver.user, marker, 20 * MiB)
    before = mailserver.rss_kib("VmHWM")
    with smtplib.SMTP(mailserver.host, mailserver.mx_port, timeout=60) as client:
        assert client.sendmail(SENDER, [mailserver.user], message) == {}
    grown = mailserver.rss_kib("VmHWM") - before
    print(f"peak RSS before {before} KiB, grown by {grown} KiB")
    wait_until(lambda: mailserver.messages(mailserver.user), 30, what="the delivery")
    [path] = mailserver.messages(mailserver.user)
    stored = path.read_bytes()
    # The Maildir form: Return-Path, our Received, then the message with LF.
    assert stored.startswith(f"Return-Path: <{SENDER}>\n".encode())
    assert stored.endswith(message.replace(b"\r\n", b"\n"))
    assert b"\r" not in stored
    received = stored[:len(stored) - len(message.replace(b"\r\n", b"\n"))]
    assert received.count(b"Received: ") == 1
    assert leftovers(mailserver) == []
    # Was ~110 MiB for one 20 MiB message (issue 17); the body is never
    # held whole now. A generous bound: the machine's allocator and the
    # IMAP and delivery paths' own buffers vary.
    assert grown < 16 * 1024, f"peak RSS grew by {grown} KiB"

    client = imaplib.IMAP4(mailserver.host, mailserver.port("imap"), timeout=60)
    client.starttls(ssl_context=mailserver.tls_context())
    client.login(mailserver.user, mailserver.password)
    client.select("INBOX")
    typ, data = client.uid("FETCH", "1:*", "(BODY.PEEK[])")
    client.logout()
    assert typ == "OK"
    fetched = data[0][1]
    assert fetched.endswith(message)
    assert fetched == stored.replace(b"\n", b"\r\n")      # the file as it is, CRLF


def test_a_client_that_leaves_mid_data_leaves_no_file(mailserver):
    with socket.create_connection((mailserver.host, mailserver.mx_port), timeout=30) as sock:
        sock.recv(1024)
        for command in (b"EHLO client.test\r\n", f"MAIL FROM:<{SENDER}>\r\n".encode(),
                        f"RCPT TO:<{mailserver.user}>\r\n".encode(), b"DATA\r\n"):
            sock.sendall(command)
            time.sleep(0.05)
            sock.recv(4096)
        sock.sendall(big_message(mailserver.user, "gone", 4 * MiB))
        wait_until(lambda: leftovers(mailserver), 10, what="the body file")
    wait_until(lambda: not leftovers(mailserver), 10, what="the body file to go")


def test_a_message_over_the_size_limit_leaves_no_file(mailserver_factory):
    server = mailserver_factory(overrides={"server": {"max_message_size": "2M"}})
    with smtplib.SMTP(server.host, server.mx_port, timeout=60) as client:
        client.ehlo("client.test")
        client.mail(SENDER)
        client.rcpt(server.user)
        code, _ = client.data(big_message(server.user, "big", 3 * MiB))
    assert code == 552
    assert leftovers(server) == [] and server.messages(server.user) == []

"""The MX port from outside: real sockets, the real server, real Maildirs.

One server for the module: each test finds its own message by its marker.
"""

import shutil
import smtplib
import socket
import subprocess
import uuid
from email import policy

import pytest

from harness import HOSTNAME, email_message, header_values, wait_until

SENDER = "sender@example.org"
CLIENT_NAME = "client.example.org"


@pytest.fixture(scope="module")
def mailserver(module_mailserver_factory):
    return module_mailserver_factory()


def make_message(to, subject, marker):
    return email_message(SENDER, to, subject, f"marker {marker}\n", marker,
                         "client.example.org")


def send(server, msg, to):
    with smtplib.SMTP(server.host, server.mx_port, local_hostname=CLIENT_NAME,
                      timeout=15) as client:
        # policy.SMTP: CRLF line ends, as a real client sends (bare LF is refused).
        return client.sendmail(SENDER, [to], msg.as_bytes(policy=policy.SMTP))


def the_one_message_with(server, address, marker):
    """The single delivered file whose body carries ``marker``."""
    def found():
        return [p for p in server.messages(address) if marker.encode() in p.read_bytes()]
    wait_until(found, 20, what=f"a message with {marker} for {address}")
    server.wait_spool_empty()
    files = found()
    assert len(files) == 1, f"{len(files)} messages carry {marker}"
    return files[0]


def test_smtplib_message_lands_in_the_maildir_with_our_received_header(mailserver):
    marker = uuid.uuid4().hex
    refused = send(mailserver, make_message(mailserver.user, "hello", marker), mailserver.user)
    assert refused == {}

    path = the_one_message_with(mailserver, mailserver.user, marker)
    assert path.parent == mailserver.maildir(mailserver.user) / "new"
    received = header_values(path, "Received")
    assert received, "no Received header"
    assert f"by {HOSTNAME}" in received[0]
    assert CLIENT_NAME in received[0]
    assert header_values(path, "Subject") == ["hello"]
    assert header_values(path, "Message-ID") == [f"<{marker}@client.example.org>"]
    started = mailserver.events("listener.started")
    assert [e["address"] for e in started if e["name"] == "mx"] == [
        f"{mailserver.host}:{mailserver.mx_port}"]


@pytest.mark.skipif(shutil.which("swaks") is None, reason="swaks is not installed")
def test_swaks_message_lands_in_the_maildir(mailserver):
    marker = uuid.uuid4().hex
    result = subprocess.run(
        ["swaks", "--server", mailserver.host, "--port", str(mailserver.mx_port),
         "--helo", CLIENT_NAME, "--from", SENDER, "--to", mailserver.user,
         "--header", f"Subject: swaks {marker}", "--body", f"marker {marker}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr

    path = the_one_message_with(mailserver, mailserver.user, marker)
    assert f"by {HOSTNAME}" in header_values(path, "Received")[0]
    assert header_values(path, "Subject") == [f"swaks {marker}"]


def refusal(server, to):
    """(code, reply text) the MX port gives for RCPT TO:<to>."""
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(server, make_message(to, "refused", uuid.uuid4().hex), to)
    return refused.value.recipients[to]


def test_unknown_local_user_is_refused_with_550_5_1_1(mailserver):
    code, text = refusal(mailserver, "nobody@example.test")
    assert code == 550
    assert text.startswith(b"5.1.1")


def test_relay_to_a_foreign_domain_is_refused_with_5_7_1(mailserver):
    code, text = refusal(mailserver, "victim@elsewhere.example")
    assert code == 554
    assert text.startswith(b"5.7.1")
    assert mailserver.spool_files() == []


class RawClient:
    """A bare SMTP client: send exact bytes, read replies one by one."""

    def __init__(self, host, port):
        self.sock = socket.create_connection((host, port), timeout=15)
        self.reader = self.sock.makefile("rb")

    def reply(self):
        """One (possibly multi-line) reply as (code, [lines]); (None, []) at EOF."""
        lines = []
        while True:
            line = self.reader.readline()
            if not line:
                return None, lines
            lines.append(line.rstrip(b"\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), lines

    def command(self, data):
        self.sock.sendall(data)
        return self.reply()

    def close(self):
        self.reader.close()
        self.sock.close()


# End-of-data lookalikes that are not <CRLF>.<CRLF> (SMTP smuggling).
FAKE_ENDS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]


def smuggle(server, fake_end, tag):
    """One transaction whose body hides a second one behind ``fake_end``.

    Returns the reply codes the server sent after DATA's 354.
    """
    client = RawClient(server.host, server.mx_port)
    try:
        assert client.reply()[0] == 220
        assert client.command(f"EHLO {CLIENT_NAME}\r\n".encode())[0] == 250
        assert client.command(f"MAIL FROM:<{SENDER}>\r\n".encode())[0] == 250
        assert client.command(f"RCPT TO:<{server.user}>\r\n".encode())[0] == 250
        assert client.command(b"DATA\r\n")[0] == 354
        body = (f"Subject: outer {tag}\r\n\r\nouter body".encode() + fake_end
                + f"MAIL FROM:<evil@example.org>\r\nRCPT TO:<{server.user}>\r\nDATA\r\n"
                  f"Subject: smuggled {tag}\r\n\r\nsmuggled body\r\n.\r\nQUIT\r\n".encode())
        client.sock.sendall(body)
        codes = []
        while True:
            code, _ = client.reply()
            if code is None:
                return codes
            codes.append(code)
            if code == 221:
                return codes
    finally:
        client.close()


def test_smuggled_end_of_data_never_makes_a_second_message(mailserver):
    for number, fake_end in enumerate(FAKE_ENDS):
        codes = smuggle(mailserver, fake_end, number)
        # One reply for the real end of data, one for QUIT: the hidden
        # MAIL / RCPT / DATA were body text, never commands.
        # (The server may also close after refusing the message: no 221 then.)
        assert 354 not in codes, (fake_end, codes)
        assert codes[:1] and codes[1:] in ([], [221]), (fake_end, codes)

    # A last, ordinary message: once it is delivered, everything before it is too.
    marker = uuid.uuid4().hex
    send(mailserver, make_message(mailserver.user, "barrier", marker), mailserver.user)
    the_one_message_with(mailserver, mailserver.user, marker)

    subjects = [header_values(p, "Subject") for p in mailserver.messages(mailserver.user)]
    assert not [s for s in subjects if s and s[0].startswith("smuggled")], subjects
    outer = [s for s in subjects if s and s[0].startswith("outer")]
    assert len(outer) <= len(FAKE_ENDS), subjects

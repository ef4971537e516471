"""Inbound SPF / DKIM / DMARC through the real server's MX port.

The server runs with ``[checks]`` on and ``[dns] nameservers`` pointed at the
test DNS server (tests/dns_server.py, in this process), which holds the SPF,
DKIM and DMARC records; messages are signed by dkimpy with a test key.
Clients connect from 127.0.0.1, which the SPF records of good.test allow.

The tests share one server (a server start is most of an end-to-end test's
time); each has a mailbox of its own (``server.user``) and reads only the
events stamped after it began (``server.since``).
"""

import base64
import random
import smtplib
import socket
import threading
import time
import uuid
from email import policy
from email.message import EmailMessage

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


from harness import HOSTNAME, header_values, mailboxes, wait_until  # noqa: E402

CLIENT_NAME = "client.good.test"
KEY = rsa.generate_private_key(65537, 2048)


def _key_txt(public_key):
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    return " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))


def _huge_key():
    """16384 bits with a 16380-bit exponent: ~8 s of pow() per signature, stock."""
    rng = random.Random(24)
    modulus = rng.getrandbits(16384) | 1 | (1 << 16383)
    exponent = rng.getrandbits(16380) | 1 | (1 << 16379)
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


ZONES = {
    "good.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "client.good.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    "sel._domainkey.good.test": {"TXT": [_key_txt(KEY.public_key())]},
    "huge._domainkey.good.test": {"TXT": [_key_txt(_huge_key())]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "quarantine.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "hang.test": "HANG",
}


USERS = mailboxes("checks", 12)


@pytest.fixture(scope="module")
def shared_server(module_mailserver_factory, dns):
    srv = module_mailserver_factory(listeners=("mx",), users=USERS, overrides={
        "checks": {"spf": "on", "dkim": "on", "dmarc": "enforce"},
        "dns": {"nameservers": dns.address, "timeout": "3s"},
    })
    return srv


@pytest.fixture
def server(shared_server):
    """The shared server; ``server.user``: a mailbox no other test touches;
    ``server.since``: when this test began (with nothing left in the spool)."""
    shared_server.wait_spool_empty()
    return shared_server.for_next_test()


def make_message(to, from_, marker, extra_headers=()):
    msg = EmailMessage()
    msg["From"] = from_
    msg["To"] = to
    msg["Subject"] = f"check {marker}"
    msg["Message-ID"] = f"<{marker}@good.test>"
    for name, value in extra_headers:
        msg[name] = value
    msg.set_content(f"marker {marker}\n")
    return msg.as_bytes(policy=policy.SMTP)


def sign(data, selector="sel"):
    return dkim.sign(data, selector.encode(), b"good.test", KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()), canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[b"from", b"to", b"subject", b"message-id"]) + data


def send(server, sender, to, data):
    with smtplib.SMTP(server.host, server.mx_port, local_hostname=CLIENT_NAME,
                      timeout=30) as client:
        return client.sendmail(sender, [to], data)


def delivered(server, address, marker, folder=None):
    """The one message file carrying ``marker``, in the inbox or ``folder``."""
    maildir = server.maildir(address) / (f".{folder}" if folder else "")

    def found():
        new = maildir / "new"
        return [p for p in new.iterdir() if marker.encode() in p.read_bytes()] \
            if new.is_dir() else []

    return wait_until(found, 20, what=f"a message with {marker} in {maildir}")[0]


def test_signed_mail_passes_with_our_header_on_top_and_forgeries_removed(server):
    marker = uuid.uuid4().hex
    forged = ("Authentication-Results", f"{HOSTNAME}; dkim=pass; dmarc=pass")
    data = sign(make_message(server.user, "Alice <alice@good.test>", marker, [forged]))
    assert send(server, "bounce@good.test", server.user, data) == {}
    path = delivered(server, server.user, marker)
    [ours] = header_values(path, "Authentication-Results")
    assert ours.startswith(f"{HOSTNAME};")
    for clause in ("spf=pass smtp.mailfrom=bounce@good.test", "spf=pass smtp.helo=" + CLIENT_NAME,
                   "dkim=pass header.d=good.test", "dmarc=pass"):
        assert clause in " ".join(ours.split()), ours
    wait_until(lambda: server.events("check.dmarc", since=server.since), 10, what="check.dmarc")
    results = {e["event"]: e["result"] for e in server.events(since=server.since)
               if e["event"].startswith("check.") and e.get("identity") != "helo"}
    assert results == {"check.spf": "pass", "check.dkim": "pass", "check.dmarc": "pass"}


def test_spoofing_a_p_reject_domain_is_refused_and_nothing_stored(server):
    marker = uuid.uuid4().hex
    with pytest.raises(smtplib.SMTPDataError) as refused:
        send(server, "x@soft.test", server.user,
             make_message(server.user, "ceo@good.test", marker))
    assert refused.value.smtp_code == 550
    assert refused.value.smtp_error.startswith(b"5.7.1")
    [event] = wait_until(lambda: server.events("check.dmarc", since=server.since), 10,
                         what="check.dmarc")
    assert (event["domain"], event["result"], event["action"]) == ("good.test", "fail", "reject")
    assert server.spool_files() == [] and server.messages(server.user) == []


def test_p_quarantine_lands_in_the_junk_folder(server):
    marker = uuid.uuid4().hex
    assert send(server, "x@quarantine.test", server.user,
                make_message(server.user, "x@quarantine.test", marker)) == {}
    path = delivered(server, server.user, marker, folder="Junk")
    assert (path.parent.parent / "maildirfolder").is_file()
    [ours] = header_values(path, "Authentication-Results")
    assert "dmarc=fail (p=quarantine dis=quarantine)" in " ".join(ours.split())
    assert server.messages(server.user) == []           # not in the inbox


def _timed_session(server):
    """Seconds for the greeting and for the EHLO reply of a new session."""
    with socket.create_connection((server.host, server.mx_port), timeout=10) as sock:
        reader = sock.makefile("rb")
        started = time.monotonic()
        assert reader.readline().startswith(b"220 ")
        greeting = time.monotonic() - started
        started = time.monotonic()
        sock.sendall(b"EHLO other.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        ehlo = time.monotonic() - started
        sock.sendall(b"QUIT\r\n")
        return greeting, ehlo


@pytest.mark.parametrize("sender, selector", [("x@hang.test", "sel"), ("x@good.test", "huge")])
def test_other_sessions_are_answered_while_a_check_is_slow(server, sender, selector):
    """T24: a DNS server that never answers, or a 16384-bit key with a huge
    exponent, must not hold up the rest of the server."""
    marker = uuid.uuid4().hex
    data = sign(make_message(server.user, "Alice <alice@good.test>", marker),
                selector=selector)
    outcome = []

    def first_client():
        started = time.monotonic()
        try:
            send(server, sender, server.user, data)
            outcome.append(("250", time.monotonic() - started))
        except smtplib.SMTPResponseException as exc:
            outcome.append((str(exc.smtp_code), time.monotonic() - started))

    thread = threading.Thread(target=first_client, daemon=True)
    thread.start()
    wait_until(lambda: server.events("smtp.rcpt.accepted", since=server.since), 10,
               what="the first RCPT")
    time.sleep(0.3)                 # the body and its final dot are on their way
    timings = [_timed_session(server) for _ in range(3)]
    assert max(max(t) for t in timings) < 1.0, timings
    if selector == "sel":
        assert thread.is_alive()    # the first message is still waiting on the DNS
    thread.join(30)
    assert outcome, "the first client got no answer"
    assert outcome[0][0] == "250"     # DMARC passes: aligned SPF (huge) or DKIM (hang)
    if selector == "huge":
        [dkim_event] = wait_until(lambda: server.events("check.dkim", since=server.since), 10,
                                  what="check.dkim")
        assert dkim_event["reason"] == "key over 4096 bits"
    else:
        assert outcome[0][1] > 2.5                    # it did wait for the DNS timeout
        spf = wait_until(lambda: [e for e in server.events("check.spf", since=server.since)
                                  if e["identity"] == "mailfrom"], 10, what="check.spf")
        assert spf[0]["result"] == "temperror"


def big_body(marker):
    """A body past what DATA keeps in memory (issue 17): it streams to a spool file."""
    line = b"a line of a big message, signed all the way down \t \r\n"
    return line * (3 * 1024 * 1024 // len(line)) + f"marker {marker}\r\n".encode()


def body_files(server):
    return [p for p in (server.data_dir / "queue").iterdir() if p.name.startswith("incoming.")]


def test_a_big_signed_message_streamed_to_the_spool_passes_dkim(server):
    marker = uuid.uuid4().hex
    head = (f"From: Alice <alice@good.test>\r\nTo: {server.user}\r\nSubject: big {marker}\r\n"
            f"Message-ID: <{marker}@good.test>\r\n\r\n").encode()
    data = sign(head + big_body(marker))
    assert send(server, "bounce@good.test", server.user, data) == {}
    path = delivered(server, server.user, marker)
    [ours] = header_values(path, "Authentication-Results")
    assert "dkim=pass header.d=good.test" in " ".join(ours.split()), ours
    assert path.read_bytes().endswith(data.replace(b"\r\n", b"\n"))
    assert body_files(server) == []


def test_a_big_message_with_a_changed_body_is_refused_and_leaves_no_file(server):
    marker = uuid.uuid4().hex
    head = (f"From: Alice <alice@good.test>\r\nTo: {server.user}\r\nSubject: big {marker}\r\n"
            f"Message-ID: <{marker}@good.test>\r\n\r\n").encode()
    data = sign(head + big_body(marker)).replace(b"signed all the way", b"changed on the way", 1)
    with pytest.raises(smtplib.SMTPDataError) as refused:     # SPF is not aligned here:
        send(server, "bounce@soft.test", server.user, data)    # DMARC rests on DKIM
    assert refused.value.smtp_code == 550       # DKIM fails, so DMARC p=reject
    wait_until(lambda: server.events("check.dkim", since=server.since), 10, what="check.dkim")
    [dkim_event] = server.events("check.dkim", since=server.since)
    assert (dkim_event["result"], dkim_event["reason"]) == ("fail", "body hash did not verify")
    assert body_files(server) == [] and not server.messages(server.user)

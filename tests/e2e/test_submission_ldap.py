"""Submission against the LDAP backend: the real server, a real slapd, smtplib.

The server authenticates on 587/465 against a own_slapd of the test's own
(tests/ldap_server.py, StartTLS with a verified certificate); the mail goes to
another domain, so it is accepted and queued whatever the outbound side does.
"""

import smtplib
import uuid
from email import policy
from email.message import EmailMessage

import pytest


import ldap_server
from harness import wait_until  # noqa: E402

ALICE = "alice@example.test"
ALICE_PASSWORD = ldap_server.USERS["alice"][0]
RECIPIENT = "friend@example.net"


@pytest.fixture
def server(mailserver_factory, own_slapd):
    return mailserver_factory(listeners=("mx", "submission", "submissions"),
                              overrides={"auth": own_slapd.auth_section("starttls")}, users=())


def message(sender):
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = RECIPIENT
    msg["Subject"] = "via ldap"
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
    msg.set_content("hello\n")
    return msg.as_bytes(policy=policy.SMTP)


def submission(server):
    client = smtplib.SMTP(server.host, server.port("submission"), timeout=30)
    client.ehlo("client.example.test")
    client.starttls(context=server.tls_context())
    client.ehlo("client.example.test")
    return client


def auth_plain(client, user, password):
    client.user, client.password = user, password
    return client.auth("PLAIN", client.auth_plain)


def test_auth_plain_on_587_with_ldap_and_send(server):
    with submission(server) as client:
        code, _ = auth_plain(client, ALICE, ALICE_PASSWORD)
        assert code == 235
        # the alias from mailAlternateAddress is one of alice's addresses
        assert client.sendmail("postmaster@example.test", [RECIPIENT],
                               message("postmaster@example.test")) == {}
        # another user's address is not
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("bob@example.test", [RECIPIENT], message("bob@example.test"))
        assert refused.value.smtp_code == 553
    # the event log is flushed about once a second
    success = wait_until(lambda: server.events("auth.success"), 10, what="auth.success")
    assert [r["account"] for r in success] == [ALICE]


def test_smtps_on_465_with_ldap(server):
    with smtplib.SMTP_SSL(server.host, server.port("submissions"), timeout=30,
                          context=server.tls_context()) as client:
        client.ehlo("client.example.test")
        code, _ = auth_plain(client, ALICE, ALICE_PASSWORD)
        assert code == 235
        assert client.sendmail(ALICE, [RECIPIENT], message(ALICE)) == {}


def test_wrong_password_and_injection_are_535(server):
    for user, password in [(ALICE, "wrong"), ("*)(mail=*", ALICE_PASSWORD),
                           ("alic*@example.test", ALICE_PASSWORD)]:
        # one connection each: the server closes after a few failures
        with submission(server) as client:
            with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
                auth_plain(client, user, password)
        assert failed.value.smtp_code == 535
        assert b"5.7.8" in failed.value.smtp_error


def test_ldap_down_is_454_then_recovers(server, own_slapd):
    own_slapd.stop()
    with submission(server) as client:
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            auth_plain(client, ALICE, ALICE_PASSWORD)
        assert failed.value.smtp_code == 454
        assert b"4.7.0" in failed.value.smtp_error
    wait_until(lambda: server.events("ldap.unavailable"), 10, what="ldap.unavailable")
    assert ALICE_PASSWORD not in server.events_path.read_text(encoding="utf-8")

    own_slapd.start()                       # back on the same ports
    with submission(server) as client:
        code, _ = auth_plain(client, ALICE, ALICE_PASSWORD)
        assert code == 235

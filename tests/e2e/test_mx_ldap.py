"""The MX port with the LDAP backend: the real server, a real slapd, smtplib.

The directory is the source of truth for who exists: mail for an entry's
primary address, for any of its alternate addresses (mailAlternateAddress)
and for their +tag forms lands in the primary address's Maildir; an address
no entry holds is 550 5.1.1; an unreachable directory is 451 4.3.0 at RCPT.
"""

import smtplib
import uuid
from email import policy
from email.message import EmailMessage

import pytest



ALICE = "alice@example.test"
BOB = "bob@example.test"
SENDER = "someone@remote.example"


@pytest.fixture
def server(mailserver_factory, own_slapd):
    return mailserver_factory(listeners=("mx",),
                              overrides={"auth": own_slapd.auth_section("starttls")}, users=())


def message(to, subject):
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@remote.example>"
    msg.set_content("hello over the MX port\n")
    return msg.as_bytes(policy=policy.SMTP)


def mx(server):
    client = smtplib.SMTP(server.host, server.mx_port, timeout=30)
    client.ehlo("client.remote.example")
    return client


def test_mail_for_ldap_addresses_lands_in_the_primary_maildir(server):
    with mx(server) as client:
        refused = client.sendmail(SENDER, ["Postmaster@example.test",
                                           "alice+lists@example.test", BOB,
                                           "nobody@example.test"],
                                  message("postmaster@example.test", "alternate"))
    assert refused["nobody@example.test"][0] == 550
    assert b"5.1.1" in refused["nobody@example.test"][1]
    assert set(refused) == {"nobody@example.test"}
    # the alternate and the +tag form are one mailbox: one copy
    [stored] = server.wait_for_messages(ALICE, 1)
    assert b"Subject: alternate" in stored.read_bytes()
    server.wait_for_messages(BOB, 1)
    assert not server.maildir("postmaster@example.test").exists()
    server.wait_spool_empty()
    assert len(server.messages(ALICE)) == 1


def test_ldap_down_is_451_at_rcpt_then_mail_flows_again(server, own_slapd):
    own_slapd.stop()
    with mx(server) as client:
        client.mail(SENDER)
        code, text = client.rcpt(ALICE)
        assert (code, text[:5]) == (451, b"4.3.0")
        code, text = client.rcpt("nobody@example.test")
        assert code == 451                  # unknown cannot be told while LDAP is down
    own_slapd.start()                           # back on the same ports
    with mx(server) as client:
        assert client.sendmail(SENDER, [ALICE], message(ALICE, "after the outage")) == {}
    [stored] = server.wait_for_messages(ALICE, 1)
    assert b"Subject: after the outage" in stored.read_bytes()

"""An edge appliance relaying to its mailbox host (SPEC §7), over real sockets.

Two real servers (twistd, loopback): the mailbox host keeps the Maildirs and
serves IMAP; the edge (``[relay] mailbox_host``) has no Maildirs and no IMAP,
checks every recipient against its own copy of the users file and relays the
mail for the local domains to the mailbox host through its queue. The
mailbox host trusts its edge (``[relay] trusted_networks``): no greylisting,
no re-judging the edge's address as the sender's. ``[queue] retry = 1s`` on
the edge drives the retry after the mailbox host was down.

The mailbox host's ``[limits] allow`` is empty here (the harness allows
127.0.0.1, where the edge connects from): what lets the edge through is
``trusted_networks`` alone.
"""

import email
import email.policy
import imaplib
import smtplib
import subprocess
import uuid

import pytest

from harness import REPO_ROOT, MailServer, wait_until

TIMEOUT = 30
BOB = "bob@example.test"
BOB_PW = "bob's password, long enough"
ALICE = "alice@example.test"
ALICE_PW = "correct horse battery staple"
CAROL = "carol@example.net"
USERS = ((ALICE, ALICE_PW), (BOB, BOB_PW))
EDGE_HOST = "edge1.example.test"
OUTSIDE = "127.0.0.9"         # a client that is not the edge


def mailbox_host(factory, start=True, **checks):
    return factory(listeners=("mx", "imap"), users=USERS, start=start, overrides={
        "relay": {"trusted_networks": "127.0.0.1/32"},
        "limits": {"allow": ""},
        "checks": checks,
    })


def edge(factory, mailbox, smarthost="", **checks):
    return factory(listeners=("mx", "submission"), users=USERS, overrides={
        "server": {"hostname": EDGE_HOST},
        "relay": {"mailbox_host": f"127.0.0.1:{mailbox.mx_port}", "smarthost": smarthost},
        "queue": {"retry": "1s", "delay_warning": "0"},
        "checks": checks,
    })


def message(marker, sender="friend@example.net", to=BOB, extra=""):
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@example.net>\r\n{extra}\r\n"
            f"the body of {marker}\r\n").encode("ascii")


def send(server, marker, rcpts=(BOB,), sender="friend@example.net", extra="",
         source=None):
    with smtplib.SMTP(server.host, server.mx_port, timeout=TIMEOUT,
                      source_address=(source, 0) if source else None) as client:
        client.ehlo("client.example.net")
        return client.sendmail(sender, list(rcpts), message(marker, sender, rcpts[0], extra))


def imap_subjects(server, user, password):
    """The subjects in the user's INBOX, read over IMAP (STARTTLS) on ``server``."""
    client = imaplib.IMAP4(server.host, server.port("imap"), timeout=TIMEOUT)
    try:
        client.starttls(ssl_context=server.tls_context())
        client.login(user, password)
        client.select("INBOX", readonly=True)
        typ, data = client.search(None, "ALL")
        assert typ == "OK"
        subjects = []
        for number in data[0].split():
            typ, fetched = client.fetch(number, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK"
            subjects.append(fetched[0][1].decode().split(":", 1)[1].strip())
        return subjects
    finally:
        client.logout()


def events_soon(server, name, count=1, timeout=TIMEOUT):
    """The events ``name`` once at least ``count`` are written (the log is
    flushed a moment after the fact)."""
    return wait_until(lambda: len(server.events(name)) >= count and server.events(name),
                      timeout, what=f"{count} {name} event(s)")


def delivered(server, address, marker, timeout=TIMEOUT):
    """The parsed message with Subject ``marker`` once it is in the Maildir."""
    def found():
        for path in server.messages(address):
            parsed = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
            if parsed["Subject"] == marker:
                return parsed
        return None
    return wait_until(found, timeout, what=f"{marker} in {address}'s Maildir")


def test_edge_relays_to_the_mailbox_host_readable_over_imap(mailserver_factory):
    # Both check DKIM: the edge checks what comes from outside, the mailbox
    # host checks nothing its edge (a trusted network) relays.
    mailbox = mailbox_host(mailserver_factory, dkim="on")
    front = edge(mailserver_factory, mailbox, dkim="on")
    assert "imap" not in front.ports
    forged = (f"Authentication-Results: {mailbox.sections['server']['hostname']}; spf=pass\r\n"
              "Authentication-Results: edge2.example.test; dkim=pass\r\n")
    assert send(front, "via the edge", extra=forged) == {}
    parsed = delivered(mailbox, BOB, "via the edge")
    assert "via the edge" in imap_subjects(mailbox, BOB, BOB_PW)
    # The edge spooled it and emptied its queue; it has no Maildirs at all.
    front.wait_spool_empty()
    assert not (front.data_dir / "mail").exists()
    [relayed] = [e for e in events_soon(front, "delivery.remote") if e["recipient"] == BOB]
    assert relayed["code"] == 250 and relayed["remote_ip"] == "127.0.0.1"
    # The Received chain: the mailbox host's (from the edge) above the edge's.
    received = parsed.get_all("Received")
    assert "by mail.example.test" in received[0] and f"from {EDGE_HOST}" in received[0]
    assert f"by {EDGE_HOST}" in received[1] and "from client.example.net" in received[1]
    # The edge's own Authentication-Results arrive, and only them: the forged
    # ones naming the site are gone, and the mailbox host added none.
    results = parsed.get_all("Authentication-Results")
    assert [r.split(";")[0].strip() for r in results] == [EDGE_HOST]
    assert "dkim=none" in results[0]


def test_unknown_recipient_is_refused_at_rcpt_on_the_edge(mailserver_factory):
    mailbox = mailbox_host(mailserver_factory)
    front = edge(mailserver_factory, mailbox)
    with smtplib.SMTP(front.host, front.mx_port, timeout=TIMEOUT) as client:
        client.ehlo("client.example.net")
        client.mail("friend@example.net")
        code, text = client.rcpt("nobody@example.test")
        assert (code, text.split()[0]) == (550, b"5.1.1")
        assert client.rcpt(BOB)[0] == 250
        # Another domain is still no open relay on the edge.
        assert client.rcpt("someone@elsewhere.example")[0] in (550, 554)
    assert not front.spool_files()


def test_mailbox_host_down_mail_waits_on_the_edge_then_arrives(mailserver_factory):
    mailbox = mailbox_host(mailserver_factory, start=False)
    front = edge(mailserver_factory, mailbox)
    assert send(front, "while it was down") == {}
    deferred = wait_until(lambda: [e for e in front.events("queue.deferred")
                                   if e["recipient"] == BOB], TIMEOUT,
                          what="the relay to be deferred")
    assert "4.4.1" in deferred[0]["reason"]
    assert front.spool_files()             # spooled durably, waiting
    assert not front.events("delivery.failed")
    mailbox.start()
    delivered(mailbox, BOB, "while it was down")
    front.wait_spool_empty()
    assert not front.events("delivery.failed")


def test_submission_on_the_edge_relays_local_mail_and_sends_the_rest_out(
        mailserver_factory):
    # "world": another domain's server, reached through the edge's smarthost.
    world = mailserver_factory(listeners=("mx",), users=((CAROL, "carol's password"),),
                               overrides={"server": {"hostname": "mx.example.net",
                                                     "domains": "example.net"}})
    mailbox = mailbox_host(mailserver_factory)
    front = edge(mailserver_factory, mailbox, smarthost=f"127.0.0.1:{world.mx_port}")
    with smtplib.SMTP(front.host, front.port("submission"), timeout=TIMEOUT) as client:
        client.starttls(context=front.tls_context())
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, [BOB, CAROL], message("submitted on the edge", sender=ALICE))
    inside = delivered(mailbox, BOB, "submitted on the edge")
    outside = delivered(world, CAROL, "submitted on the edge")
    received = inside.get_all("Received")
    assert "by mail.example.test" in received[0] and f"from {EDGE_HOST}" in received[0]
    assert "ESMTPSA" in received[1] and f"by {EDGE_HOST}" in received[1]
    assert f"from {EDGE_HOST}" in outside.get_all("Received")[0]
    # One transaction each way: the local domain to the mailbox host, the
    # other domain out (through the smarthost here, by MX without one).
    relayed = {e["recipient"]: e["code"] for e in events_soon(front, "delivery.remote", 2)}
    assert relayed == {BOB: 250, CAROL: 250}
    assert not (front.data_dir / "mail").exists()


def test_mailbox_host_does_not_greylist_its_edge(mailserver_factory):
    mailbox = mailbox_host(mailserver_factory, greylist="on", greylist_delay="1h")
    front = edge(mailserver_factory, mailbox)
    # Greylisting is on: an outside client sending straight to the mailbox host waits.
    with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
        send(mailbox, "straight in", source=OUTSIDE)
    assert refused.value.recipients[BOB][0] == 451
    # The edge, a trusted network, is not greylisted: delivered at the first try.
    assert send(front, "through the edge") == {}
    delivered(mailbox, BOB, "through the edge")
    assert not front.events("queue.deferred")
    greylisted = events_soon(mailbox, "defence.greylist.deferred")
    assert [e["peer_ip"] for e in greylisted] == [OUTSIDE]


def test_an_edge_asked_to_serve_imap_refuses_to_start_with_one_line(tmp_path):
    server = MailServer(tmp_path, listeners=("mx", "imap"),
                        overrides={"relay": {"mailbox_host": "127.0.0.1:2600"}})
    result = subprocess.run(server.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("mailappliance:")]
    assert line.startswith("mailappliance: [listen] imap: this appliance is an edge")

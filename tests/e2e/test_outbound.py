"""Outbound from outside: the real server routes by DNS, delivers, retries and bounces.

Every remote part is real and on loopback:

- a DNS server of the test's own (tests/dns_server.py) is ``[dns] nameservers``;
- remote MXes listen on other loopback addresses, all on one port, which is
  ``[outbound] port``: a stock Postfix (tests/e2e/postfix_mx.py) on 127.0.0.2
  accepting for any domain, and a small scripted SMTP server on 127.0.0.3 that
  answers each recipient as the test says (4xx, 5xx, or a slow 250);
  nothing listens on 127.0.0.4 (connection refused).

Mail enters on the MX port from a trusted network (``[relay] trusted_networks``)
with alice@example.test, a local user, as the sender, so every DSN lands in
her Maildir where the test reads it.
"""

import email
import email.policy
import json
import smtplib
import socket
import socketserver
import threading
import uuid
from email.message import EmailMessage

import pytest


from harness import free_ports, wait_until  # noqa: E402
from postfix_mx import postfix_available, running_postfix_mx  # noqa: E402

POSTFIX_IP, SCRIPTED_IP, DEAD_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
SENDER = "alice@example.test"
ZONES = {
    "postfix.test": {"MX": [(10, "mx.postfix.test")]},
    "mx.postfix.test": {"A": [POSTFIX_IP]},
    "fallback.test": {"MX": [(10, "dead.fallback.test"), (20, "mx.postfix.test")]},
    "dead.fallback.test": {"A": [DEAD_IP]},
    "scripted.test": {"MX": [(10, "mx.scripted.test")]},
    "mx.scripted.test": {"A": [SCRIPTED_IP]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
}
WAIT = 30.0


class ScriptedMX(socketserver.ThreadingTCPServer):
    """An SMTP server whose RCPT replies are scripted per recipient.

    ``replies[address]`` is a list of replies used one per attempt; when it
    is empty the recipient is accepted. ``data_delay`` holds the reply to the
    final dot (to see concurrent sessions). Records every transaction that
    ended with a 250 after DATA as ``(sender, accepted recipients, data)``.
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address):
        super().__init__(address, _ScriptedSession)
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.replies = {}
            self.data_delay = 0.0
            self.deliveries = []
            self.active = 0
            self.peak = 0
            self.rcpt_log = []            # (address, code) in arrival order

    def next_reply(self, address):
        with self.lock:
            queued = self.replies.get(address) or []
            reply = queued.pop(0) if queued else "250 2.1.5 ok"
            self.rcpt_log.append((address, int(reply[:3])))
            return reply

    def delivered_to(self, address):
        with self.lock:
            return [d for d in self.deliveries if address in d[1]]

    def session(self, delta):
        with self.lock:
            self.active += delta
            self.peak = max(self.peak, self.active)


class _ScriptedSession(socketserver.StreamRequestHandler):
    timeout = 30

    def reply(self, text):
        self.wfile.write(text.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self):
        server = self.server
        server.session(+1)
        try:
            self.converse(server)
        except OSError:
            pass
        finally:
            server.session(-1)

    def converse(self, server):
        self.reply("220 mx.scripted.test ESMTP scripted")
        sender, accepted = None, []
        for _ in range(1000):                    # bounded: a test session is short
            line = self.rfile.readline(4096)
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.reply("250-mx.scripted.test\r\n250-SIZE 52428800\r\n250 8BITMIME")
            elif verb == b"MAIL":
                sender, accepted = line.split(b":", 1)[1].strip().decode(), []
                self.reply("250 2.1.0 ok")
            elif verb == b"RCPT":
                address = line.split(b":", 1)[1].strip().split(b" ")[0].strip(b"<>").decode()
                answer = server.next_reply(address)
                if answer.startswith("250"):
                    accepted.append(address)
                self.reply(answer)
            elif verb == b"DATA":
                self.reply("354 go ahead")
                data = self.read_data()
                if server.data_delay:             # a slow MX: sessions overlap
                    threading.Event().wait(server.data_delay)
                with server.lock:
                    server.deliveries.append((sender, list(accepted), data))
                self.reply("250 2.0.0 queued")
            elif verb == b"RSET":
                sender, accepted = None, []
                self.reply("250 2.0.0 ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("250 2.0.0 ok")

    def read_data(self):
        lines = []
        for _ in range(100000):
            line = self.rfile.readline(65536)
            if not line or line == b".\r\n":
                break
            lines.append(line)
        return b"".join(lines)


@pytest.fixture(scope="module")
def mx_port():
    for _ in range(20):
        port = free_ports(1, SCRIPTED_IP)[0]
        if _port_free(POSTFIX_IP, port) and _port_free(DEAD_IP, port):
            return port
    pytest.fail("no port free on every test MX address")


def _port_free(host, port):
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def scripted(mx_port):
    server = ScriptedMX((SCRIPTED_IP, mx_port))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def postfix(mx_port):
    why = postfix_available()
    if why:
        pytest.skip(why)
    with running_postfix_mx(mx_port, POSTFIX_IP, "outbound-postfix-") as instance:
        yield instance


@pytest.fixture
def server(mailserver_factory, dns, mx_port, scripted):
    scripted.reset()

    def make(**queue):
        settings = {"retry": "1s", "max_age": "1h", "delay_warning": "0"}
        settings.update(queue)
        return mailserver_factory(listeners=("mx",), overrides={
            "dns": {"nameservers": dns.address, "timeout": "2s"},
            "outbound": {"port": mx_port, "tls": "opportunistic"},
            "relay": {"trusted_networks": "127.0.0.0/8"},
            "queue": settings,
        })
    return make


def send(server, recipients, subject="outbound test"):
    marker = uuid.uuid4().hex
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{marker}@example.test>"
    msg.set_content(f"marker {marker}\n.leading dot line\n")
    with smtplib.SMTP(server.host, server.mx_port, timeout=15) as client:
        refused = client.sendmail(SENDER, recipients, msg.as_bytes(policy=email.policy.SMTP))
    assert refused == {}
    return marker


def dsns(server):
    """The DSNs in alice's Maildir, parsed, and their delivery-status blocks."""
    found = []
    for path in server.messages(SENDER):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
        if message.get_content_type() == "multipart/report":
            blocks = [dict(b.items()) for b in message.get_payload()[1].get_payload()]
            found.append((message, blocks))
    return found


def wait_for_event(server, name, predicate=lambda e: True, timeout=WAIT):
    return wait_until(lambda: [e for e in server.events(name) if predicate(e)], timeout,
                      what=f"event {name}")


def queue_states(server):
    """``{recipient: state dict}`` over every spool entry's state file."""
    states = {}
    for path in (server.data_dir / "queue").glob("*.json"):
        states.update(json.loads(path.read_text())["recipients"])
    return states


def test_delivery_through_a_real_postfix_mx(server, postfix):
    mail = server()
    marker = send(mail, ["bob@postfix.test"])
    [path] = wait_until(lambda: postfix.messages_for("bob@postfix.test"), WAIT,
                        what="the message at Postfix")
    data = path.read_bytes()
    assert marker.encode() in data
    assert b"\n..leading dot line" not in data and b"\n.leading dot line" in data
    assert b"by mail.example.test" in data                  # our Received header went along
    mail.wait_spool_empty()
    [event] = wait_for_event(mail, "delivery.remote")
    assert (event["recipient"], event["code"], event["remote_host"]) == (
        "bob@postfix.test", 250, "mx.postfix.test")
    assert dsns(mail) == []


def test_a_refusing_mx_falls_back_to_the_next_one(server, postfix):
    mail = server()
    marker = send(mail, ["carol@fallback.test"])
    [path] = wait_until(lambda: postfix.messages_for("carol@fallback.test"), WAIT,
                        what="the message at the second MX")
    assert marker.encode() in path.read_bytes()
    [attempt] = wait_for_event(mail, "delivery.remote.attempt")
    assert attempt["ip"] == DEAD_IP
    mail.wait_spool_empty()


def test_a_4xx_is_retried_and_then_delivered(server, scripted):
    scripted.replies["dave@scripted.test"] = ["451 4.2.0 mailbox busy, try later"]
    mail = server()
    marker = send(mail, ["dave@scripted.test"])
    wait_until(lambda: scripted.delivered_to("dave@scripted.test"), WAIT,
               what="the retried delivery")
    [(_, accepted, data)] = scripted.delivered_to("dave@scripted.test")
    assert marker.encode() in data and accepted == ["dave@scripted.test"]
    assert [code for address, code in scripted.rcpt_log] == [451, 250]
    [deferred] = wait_for_event(mail, "queue.deferred")
    assert "451 4.2.0 mailbox busy" in deferred["reason"]
    mail.wait_spool_empty()
    assert dsns(mail) == []


def test_a_5xx_bounces_into_the_senders_maildir(server, scripted):
    scripted.replies["erin@scripted.test"] = ["550 5.1.1 <erin@scripted.test>: no such user"]
    mail = server()
    send(mail, ["erin@scripted.test", "frank@scripted.test"], subject="to erin")
    wait_until(lambda: dsns(mail), WAIT, what="a DSN for alice")
    [(message, blocks)] = dsns(mail)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@mail.example.test>"
    assert message["Return-Path"] == "<>"
    per_message, recipient = blocks
    assert per_message["Reporting-MTA"] == "dns; mail.example.test"
    assert recipient["Final-Recipient"] == "rfc822; erin@scripted.test"
    assert (recipient["Action"], recipient["Status"]) == ("failed", "5.1.1")
    assert recipient["Remote-MTA"] == "dns; mx.scripted.test"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 <erin@scripted.test>: no such user"
    assert "Subject: to erin" in message.get_payload()[2].get_payload()
    assert [d[1] for d in scripted.deliveries] == [["frank@scripted.test"]]
    mail.wait_spool_empty()
    [sent] = wait_for_event(mail, "bounce.sent")
    assert sent["recipients"] == ["erin@scripted.test"]


def test_a_null_mx_bounces_at_once_with_5_1_10(server, scripted):
    mail = server()
    send(mail, ["gina@nullmx.test"])
    wait_until(lambda: dsns(mail), WAIT, what="a DSN for alice")
    [(_, blocks)] = dsns(mail)
    assert (blocks[1]["Final-Recipient"], blocks[1]["Status"]) == ("rfc822; gina@nullmx.test",
                                                                    "5.1.10")
    assert scripted.rcpt_log == []
    mail.wait_spool_empty()


def test_a_servfail_defers_without_bouncing(server):
    mail = server(retry="1h")
    send(mail, ["hank@broken.test"])
    [deferred] = wait_for_event(mail, "queue.deferred")
    assert deferred["reason"].startswith("4.4.3")
    state = queue_states(mail)["hank@broken.test"]
    assert state["state"] == "deferred" and state["next_attempt"] > deferred["ts"]
    assert dsns(mail) == []


def test_a_restart_resumes_the_deferred_recipients_only(server, scripted):
    scripted.replies["late@scripted.test"] = ["451 4.3.0 not now"] * 1000
    mail = server(retry="2s")
    marker = send(mail, ["early@scripted.test", "late@scripted.test"])
    wait_until(lambda: scripted.delivered_to("early@scripted.test"), WAIT,
               what="the first recipient")
    wait_for_event(mail, "queue.deferred")
    mail.stop()
    assert queue_states(mail)["early@scripted.test"]["state"] == "delivered"
    scripted.replies["late@scripted.test"] = []         # accepted from now on
    mail.start()
    wait_until(lambda: scripted.delivered_to("late@scripted.test"), WAIT,
               what="the deferred recipient after the restart")
    mail.wait_spool_empty()
    assert len(scripted.delivered_to("early@scripted.test")) == 1
    [(_, accepted, data)] = scripted.delivered_to("late@scripted.test")
    assert accepted == ["late@scripted.test"] and marker.encode() in data
    assert [a for a, code in scripted.rcpt_log if code == 250].count("early@scripted.test") == 1


def test_per_domain_concurrency_is_respected(server, scripted):
    scripted.data_delay = 0.3
    mail = server(per_domain="2", concurrency="10")
    recipients = [f"user{n}@scripted.test" for n in range(8)]
    for address in recipients:
        send(mail, [address])
    wait_until(lambda: len(scripted.deliveries) >= 8, WAIT, what="eight deliveries")
    assert sorted(d[1][0] for d in scripted.deliveries) == sorted(recipients)
    assert 1 <= scripted.peak <= 2
    mail.wait_spool_empty()

"""The live auditor in the real server: attacks from 127.0.0.x "outside" hosts.

One server for the module (low thresholds, a webhook to a small HTTP server
in this process, the postmaster a real user); each test plays one attacker
from its own loopback address and reads the server's event log. The last
test replays that log with ``mailappliance audit --json`` and expects exactly
the findings the live auditor raised.
"""

import base64
import http.server
import json
import smtplib
import ssl
import threading
import uuid
from email.message import EmailMessage

import pytest

from harness import MailServer, wait_until

ALICE, ALICE_PW = "alice@example.test", "alice password"
BOB, BOB_PW = "bob@example.test", "bob password"
POSTMASTER = "postmaster@example.test"
LISTENERS = ("mx", "submission")


class Hook(http.server.BaseHTTPRequestHandler):
    received = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Hook.received.append((self.path, self.headers.get("Content-Type"), json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/alerts"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, webhook):
    overrides = {"audit": {"harvest_threshold": 5, "relay_probe_threshold": 3,
                           "spray_threshold": 4, "account_attack_threshold": 4,
                           "send_spike": 3, "alert_interval": "1h", "webhook": webhook},
                 "limits": {"auth_failures_before_ban": 50}}
    mail = MailServer(tmp_path_factory.mktemp("audit"), listeners=LISTENERS,
                      overrides=overrides)
    for address, password in ((ALICE, ALICE_PW), (BOB, BOB_PW), (POSTMASTER, "pm pw")):
        mail.add_user(address, password)
    mail.start()
    yield mail
    mail.stop()
    print(mail.output()[-20000:])


def alerts(server, rule):
    return [a for a in server.events("audit.alert") if a["rule"] == rule]


def wait_alert(server, rule, timeout=10):
    return wait_until(lambda: alerts(server, rule), timeout, what=f"an {rule} alert")


def mx_client(server, source):
    return smtplib.SMTP(server.host, server.mx_port, timeout=10,
                        source_address=(source, 0))


def submission(server, source):
    client = smtplib.SMTP(server.host, server.port("submission"), timeout=10,
                          source_address=(source, 0))
    client.ehlo("client.example.net")
    client.starttls(context=server.tls_context())
    client.ehlo("client.example.net")
    return client


def failed_logins(server, source, accounts):
    """One wrong password per account, three tries a connection (then 421);
    -> the codes answered (a ban ends the session with 421)."""
    codes = []
    for start in range(0, len(accounts), 3):
        client = submission(server, source)
        try:
            for account in accounts[start:start + 3]:
                token = base64.b64encode(f"\0{account}\0wrong password".encode()).decode()
                code, _ = client.docmd("AUTH", "PLAIN " + token)
                codes.append(code)
                if code == 421:
                    return codes
        finally:
            try:
                client.quit()
            except smtplib.SMTPException:
                pass
    return codes


def until_closed(client, commands):
    """The codes of ``commands`` (callables on ``client``) until one is 421."""
    codes = []
    for command in commands:
        codes.append(command(client)[0])
        if codes[-1] == 421:
            break
    return codes


def assert_banned(server, source, rule):
    """The auditor's ban is a real one (appliance.defence): an event, and the
    next connection from ``source`` is refused at connect."""
    bans = wait_until(lambda: [e for e in server.events("defence.ban")
                               if e["network"] == f"{source}/32"], 5, what="the ban")
    assert bans[0]["rule"] == rule
    try:
        with mx_client(server, source) as client:
            code = client.noop()[0]
    except smtplib.SMTPConnectError as error:
        code = error.smtp_code
    except smtplib.SMTPServerDisconnected:
        code = 421
    assert code == 421


def test_recipient_harvesting_is_an_alert_and_a_ban(server):
    with mx_client(server, "127.0.0.21") as client:
        client.ehlo("harvester.example.net")
        client.mail("x@example.net")
        codes = until_closed(client, [lambda c, n=n: c.rcpt(f"nobody{n}@example.test")
                                      for n in range(6)])
    # The fifth unknown recipient bans the client: the ban ends the session.
    assert codes == [550] * 4 + [421]
    [alert] = wait_alert(server, "harvesting")
    assert (alert["peer_ip"], alert["count"], alert["action"]) == ("127.0.0.21", 5, "ban")
    assert_banned(server, "127.0.0.21", "harvesting")


def test_relay_probing_is_an_alert_and_a_ban(server):
    with mx_client(server, "127.0.0.22") as client:
        client.ehlo("prober.example.net")
        client.mail("x@example.net")
        codes = until_closed(client, [lambda c, d=d: c.rcpt(f"victim@{d}")
                                      for d in ("example.org", "example.com", "example.net")])
    assert codes == [554, 554, 421]
    [alert] = wait_alert(server, "relay_probe")
    assert (alert["peer_ip"], alert["count"], alert["action"]) == ("127.0.0.22", 3, "ban")
    assert_banned(server, "127.0.0.22", "relay_probe")


def test_password_spraying_is_an_alert_and_a_ban(server):
    codes = failed_logins(server, "127.0.0.23", [f"user{n}@example.test" for n in range(4)])
    assert codes == [535, 535, 535, 421]        # the fourth account: banned, session ended
    [alert] = wait_alert(server, "spraying")
    assert (alert["peer_ip"], alert["count"], alert["action"]) == ("127.0.0.23", 4, "ban")
    assert_banned(server, "127.0.0.23", "spraying")


def test_an_account_attacked_from_many_networks_still_logs_in(server):
    for n in range(4):
        assert failed_logins(server, f"127.0.0.{30 + n}", [BOB]) == [535]
    [alert] = wait_alert(server, "account_attack")
    assert (alert["account"], alert["peer_ip"], alert["action"]) == (BOB, "", "none")
    client = submission(server, "127.0.0.34")
    try:
        code, _ = client.login(BOB, BOB_PW)     # never a lockout
        assert code == 235
    finally:
        client.quit()


def test_a_send_spike_holds_the_user_s_further_mail(server):
    client = submission(server, "127.0.0.40")
    try:
        client.login(ALICE, ALICE_PW)
        for n in range(5):
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = ALICE, BOB, f"spike {n}"
            msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.test>"
            msg.set_content("buy now\n")
            client.send_message(msg)
    finally:
        client.quit()
    [alert] = wait_alert(server, "send_spike")
    assert (alert["account"], alert["count"], alert["action"]) == (ALICE, 3, "hold")
    held = wait_until(lambda: len(server.events("audit.held")) >= 2 and
                      server.events("audit.held"), 10, what="held messages")
    assert len(held) == 2 and {e["account"] for e in held} == {ALICE}
    # The two after the spike wait in the queue on hold; the first three arrived.
    assert len(server.wait_for_messages(BOB, 3)) == 3
    for event in held:
        state = json.loads((server.data_dir / "queue" / f"{event['queue_id']}.json")
                           .read_text())
        assert state["flags"]["held"] is True
    assert json.loads((server.data_dir / "audit" / "holds.json").read_text())[ALICE][
        "rule"] == "send_spike"
    assert len(server.messages(BOB)) == 3


def test_the_digest_reaches_the_postmaster_s_mailbox(server):
    [digest] = server.wait_for_messages(POSTMASTER, 1, timeout=20)
    text = digest.read_text()
    assert "Subject: [mailappliance]" in text and "harvesting" in text
    assert "127.0.0.21" in text
    # alert_interval = 1h: the alerts raised since then wait for the next one.
    assert len(server.events("audit.digest_sent")) == 1


def test_each_alert_is_posted_to_the_webhook(server):
    wanted = {a["alert_id"] for a in server.events("audit.alert")}
    wait_until(lambda: wanted <= {body["alert_id"] for _, _, body in Hook.received}, 20,
               what="every alert at the webhook")
    path, content_type, body = next(r for r in Hook.received if r[2]["rule"] == "harvesting")
    assert path == "/alerts" and content_type == "application/json"
    assert body["peer_ip"] == "127.0.0.21" and body["action"] == "ban"
    alerts_file = server.data_dir / "audit" / "alerts.json"
    kept = [json.loads(line) for line in alerts_file.read_text().splitlines()]
    assert {a["alert_id"] for a in kept} >= wanted


def test_the_offline_replay_of_the_live_log_finds_the_same(server):
    live = [{k: a[k] for k in ("rule", "peer_ip", "account", "count", "window", "action")}
            for a in server.events("audit.alert")]
    assert {a["rule"] for a in live} >= {"harvesting", "relay_probe", "spraying",
                                         "account_attack", "send_spike"}
    result = server.cli("audit", "--json", str(server.events_path))
    assert result.returncode == 0, result.stderr
    offline = [{k: f[k] for k in ("rule", "peer_ip", "account", "count", "window", "action")}
               for f in json.loads(result.stdout)["findings"]]
    assert offline == live

"""DKIM out, from outside: submitted mail reaches a real Postfix signed, and verifies.

The real server signs what alice submits on the submission port (STARTTLS +
AUTH) and delivers it through DNS routing to a stock Postfix on 127.0.0.2
(tests/e2e/postfix_mx.py). The keys are the ones the server made on its
first start; ``mailappliance dns-records`` prints their TXT records, which go
into the test DNS server exactly as printed. The message as Postfix stored it
must then verify with Perl's Mail::DKIM (Net::DNS asking that DNS server) and
with dkimpy.
"""

import email.policy
import email.utils
import smtplib
import ssl
import uuid
from email.message import EmailMessage

import dns.rdatatype as rdatatype
import dns.zone as dnszone
import pytest

from appliance.policy.keys import KeyStore
from dkim_tools import (  # noqa: E402
    dkimpy_results, dnsfunc_server, mail_dkim_missing, mail_dkim_verify, opendkim_missing,
    opendkim_verify)
from harness import free_ports, wait_until  # noqa: E402
from postfix_mx import postfix_available, running_postfix_mx  # noqa: E402

POSTFIX_IP = "127.0.0.2"
ALICE, PASSWORD = "alice@example.test", "alice's password"
BOB = "bob@postfix.test"
ZONES = {
    "postfix.test": {"MX": [(10, "mx.postfix.test")]},
    "mx.postfix.test": {"A": [POSTFIX_IP]},
}
WAIT = 30.0


@pytest.fixture(scope="module")
def postfix():
    why = postfix_available() or mail_dkim_missing()
    if why:
        pytest.skip(why)
    port = free_ports(1, POSTFIX_IP)[0]
    with running_postfix_mx(port, POSTFIX_IP, "dkim-postfix-") as instance:
        yield instance


def publish_dns_records(server, dns):
    """Run ``mailappliance dns-records`` and serve every record it printed."""
    result = server.cli("dns-records")
    assert result.returncode == 0, result.stderr
    zone = dns.zones.copy()
    parsed = dns_zone(result.stdout)
    for name, node in parsed.nodes.items():
        entry = zone.setdefault(name.to_text(omit_final_dot=True), {})
        for rdataset in node.rdatasets:
            entry[rdatatype.to_text(rdataset.rdtype)] = [r.to_text() for r in rdataset]
    dns.zones = zone
    return result.stdout


def dns_zone(text):
    return dnszone.from_text(text, origin=".", relativize=False, check_origin=False)


def submit(server, marker, big=False):
    msg = EmailMessage()
    msg["From"] = f"Alice <{ALICE}>"
    msg["To"] = BOB
    msg["Subject"] = f"signed {marker}"
    msg["Message-ID"] = f"<{marker}@example.test>"
    msg["Date"] = email.utils.formatdate()
    text = f"marker {marker}\n.a leading dot\ntrailing spaces   \n"
    if big:     # past what DATA keeps in memory: signed from the spool file (issue 17)
        text += "a long body line with  double  spaces\t and a tab \n" * 60000
    msg.set_content(text)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE          # the self-signed certificate of data_dir
    with smtplib.SMTP(server.host, server.port("submission"), timeout=15) as client:
        client.starttls(context=context)
        client.login(ALICE, PASSWORD)
        refused = client.sendmail(ALICE, [BOB], msg.as_bytes(policy=email.policy.SMTP))
    assert refused == {}


def delivered(postfix, marker):
    """The message with ``marker`` as Postfix stored it, with CRLF line ends."""
    [path] = wait_until(lambda: [p for p in postfix.messages_for(BOB)
                                 if marker.encode() in p.read_bytes()], WAIT,
                        what="the message at Postfix")
    return path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.mark.parametrize("algorithm, expected, big", [
    ("rsa-sha256", {("mail", "rsa-sha256")}, False),
    ("ed25519-sha256", {("mail", "rsa-sha256"), ("mail-ed25519", "ed25519-sha256")}, False),
    ("ed25519-sha256", {("mail", "rsa-sha256"), ("mail-ed25519", "ed25519-sha256")}, True),
])
def test_submitted_mail_verifies_at_the_remote_end(mailserver_factory, dns, postfix,
                                                   algorithm, expected, big):
    server = mailserver_factory(
        listeners=("mx", "submission"), users=((ALICE, PASSWORD),),
        overrides={"dns": {"nameservers": dns.address, "timeout": "2s"},
                   "outbound": {"port": postfix.port, "tls": "opportunistic"},
                   "dkim": {"algorithm": algorithm}})
    printed = publish_dns_records(server, dns)
    assert "new DKIM key" not in printed          # made at start-up, before the first message
    marker = uuid.uuid4().hex
    submit(server, marker, big)
    stored = delivered(postfix, marker)
    assert len(stored) > 2 * 1024 * 1024 if big else len(stored) < 64 * 1024

    overall, signatures = mail_dkim_verify(stored, dns.host, dns.port)
    assert overall == "pass"
    assert signatures[("mail", "rsa-sha256")] == "pass"
    results = dkimpy_results(stored, dnsfunc_server(dns.host, dns.port))
    assert results == {key: True for key in expected}       # one signature per key, once
    if not opendkim_missing():      # an independent verifier of Ed25519 too
        keys = KeyStore(str(server.data_dir / "dkim")).keys()
        assert opendkim_verify(stored, keys) == {key: "pass" for key in expected}

    # Events reach the file within a flush interval, not before the reply.
    [accepted] = wait_until(lambda: server.events("smtp.message.accepted"), 10,
                            what="smtp.message.accepted")
    signed = wait_until(lambda: server.events("dkim.signed"), 10, what="dkim.signed")
    assert {(e["selector"], e["algorithm"]) for e in signed} == expected
    assert {e["queue_id"] for e in signed} == {accepted["queue_id"]}
    assert {e["domain"] for e in signed} == {"example.test"}
    server.wait_spool_empty()


def test_a_rotated_key_signs_the_next_message_and_dns_records_lists_both(
        mailserver_factory, dns, postfix):
    server = mailserver_factory(
        listeners=("mx", "submission"), users=((ALICE, PASSWORD),),
        overrides={"dns": {"nameservers": dns.address, "timeout": "2s"},
                   "outbound": {"port": postfix.port}})
    rotated = server.cli("dkim", "rotate", "example.test")
    assert rotated.returncode == 0, rotated.stderr
    selector = rotated.stdout.splitlines()[1].split()[2].split(".")[0]
    printed = publish_dns_records(server, dns)
    assert f"{selector}._domainkey.example.test." in printed
    assert "\nmail._domainkey.example.test." in printed     # the retired one stays published
    marker = uuid.uuid4().hex
    submit(server, marker)                      # no restart: the server rereads the index
    stored = delivered(postfix, marker)
    overall, signatures = mail_dkim_verify(stored, dns.host, dns.port)
    assert overall == "pass" and signatures == {(selector, "rsa-sha256"): "pass"}

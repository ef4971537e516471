"""What a mailbox host trusts of its edges (SPEC §7), and what nobody else
may claim: Authentication-Results naming the site, DKIM signing of relayed mail.

- Mail from a trusted network (an edge) is not checked again (SPF would
  judge the edge's address as the sender's) and keeps the edge's
  Authentication-Results; for local recipients only it is not signed (the
  edge signed what its users sent; a mailbox host must not vouch for a
  stranger's message that an edge relayed).
- Mail from outside (or from an authenticated user) loses every
  Authentication-Results naming our site (a local domain or a name under
  one, an edge's mailbox host) as its authserv-id: only our own appliances
  write those (RFC 8601 §5).
"""

from twisted.internet import defer, task

from appliance.envelope import Envelope, Session
from appliance.message import claims_authserv_id, strip_forged
from appliance.policy.checks import site_names
from appliance.policy.pipeline import Pipeline
from appliance.policy.relay import MXPolicy
from appliance.receive.smtp import SMTPFactory
from appliance.testing import FakeDirectory, FakeSpool, SMTPHarness, make_config

EDGE_IP = "192.0.2.25"
OUTSIDE_IP = "198.51.100.7"
SITE_RESULTS = (b"Authentication-Results: edge1.example.test; dkim=pass header.d=good.test\r\n"
                b"Authentication-Results: example.test; spf=pass\r\n"
                b"Authentication-Results: elsewhere.test; spf=pass\r\n")


def message(extra=b""):
    return (b"From: Alice <alice@example.test>\r\nTo: bob@example.test\r\n"
            b"Subject: hi\r\nMessage-ID: <1@example.test>\r\n" + extra + b"\r\nHi.\r\n")


class RecordingSigner:
    def __init__(self):
        self.signed = []

    def sign(self, message, context):
        self.signed.append(message)
        return defer.succeed(b"DKIM-Signature: test\r\n" + message)


def mx_factory(spool, signer):
    config = make_config(relay={"trusted_networks": "192.0.2.0/24"})
    factory = SMTPFactory(config, FakeDirectory(["bob@example.test"]), spool, task.Clock())
    factory.signer = signer
    return factory


def send(harness, msg, rcpts=("bob@example.test",)):
    harness.send("EHLO peer.example.test\r\nMAIL FROM:<x@good.test>\r\n"
                 + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n")
    harness.send(msg + b".\r\n")
    return harness.replies()


def test_site_names_are_the_local_domains_and_an_edges_mailbox_host():
    assert site_names(make_config(server={"domains": "example.test, bücher.test"})) == (
        "example.test", "xn--bcher-kva.test")
    edge = make_config(relay={"mailbox_host": "mbox.internal.lan:25"})
    assert "mbox.internal.lan" in site_names(edge)
    assert site_names(make_config(server={"domains": "example.test"},
                                  relay={"mailbox_host": "192.0.2.1"})) == ("example.test",)


def test_a_name_under_a_site_domain_is_claimed_a_lookalike_is_not():
    site = ("example.test",)
    assert claims_authserv_id(" edge2.example.test; spf=pass", "mx.other.test", site)
    assert claims_authserv_id(' "Example.Test." 1; none', "mx.other.test", site)
    assert not claims_authserv_id(" notexample.test; spf=pass", "mx.other.test", site)
    assert not claims_authserv_id(" example.test.evil.net; spf=pass", "mx.other.test", site)
    stripped, count = strip_forged(message(SITE_RESULTS), "mail.example.test", site=site)
    assert count == 2 and b"elsewhere.test" in stripped and b"edge1" not in stripped


def test_an_outsider_cannot_pass_results_off_as_an_edges():
    spool, signer = FakeSpool(), RecordingSigner()
    harness = SMTPHarness(mx_factory(spool, signer), peer=OUTSIDE_IP)
    assert send(harness, message(SITE_RESULTS))[-1].startswith("250 ")
    [(_, stored)] = spool.accepted
    assert b"edge1.example.test" not in stored
    assert b"Authentication-Results: example.test" not in stored
    assert b"Authentication-Results: elsewhere.test; spf=pass" in stored
    assert signer.signed == []


def test_the_edges_results_arrive_unchecked_and_unsigned_for_local_recipients():
    spool, signer = FakeSpool(), RecordingSigner()
    harness = SMTPHarness(mx_factory(spool, signer), peer=EDGE_IP)
    edge_results = b"Authentication-Results: edge1.example.test; dkim=none\r\n"
    forged_ours = b"Authentication-Results: mx.example.test; spf=pass\r\n"
    assert send(harness, message(edge_results + forged_ours))[-1].startswith("250 ")
    [(_, stored)] = spool.accepted
    assert edge_results in stored              # trusted: the edge's own, kept
    assert forged_ours not in stored           # our own name: never from elsewhere
    assert signer.signed == []                 # stays here: not ours to sign


def test_a_trusted_peers_mail_that_leaves_is_still_signed():
    spool, signer = FakeSpool(), RecordingSigner()
    harness = SMTPHarness(mx_factory(spool, signer), peer=EDGE_IP)
    replies = send(harness, message(), rcpts=("bob@example.test", "carol@remote.test"))
    assert replies[-1].startswith("250 ")
    [(_, stored)] = spool.accepted
    assert stored.startswith(b"DKIM-Signature: test\r\n") and len(signer.signed) == 1


def test_an_authenticated_users_local_mail_is_signed_as_before():
    config = make_config(relay={"trusted_networks": "192.0.2.0/24"})
    signer = RecordingSigner()
    pipeline = Pipeline(MXPolicy(config, FakeDirectory(["bob@example.test"])),
                        config.relay.trusted_networks, signer=signer)
    envelope = Envelope(queue_id="Q1", sender="alice@example.test",
                        recipients=["bob@example.test"], received_at=0.0)
    session = Session(peer_ip=OUTSIDE_IP, auth_user="alice@example.test")
    results = []
    pipeline.at_data(session, envelope, message(), b"Received: x\r\n", {}).addBoth(
        results.append)
    assert results[0].startswith(b"DKIM-Signature: test\r\n") and len(signer.signed) == 1


def test_an_authenticated_user_cannot_pass_results_off_as_the_sites_either():
    config = make_config(relay={"trusted_networks": "192.0.2.0/24"})
    pipeline = Pipeline(MXPolicy(config, FakeDirectory(["bob@example.test"])),
                        config.relay.trusted_networks)
    envelope = Envelope(queue_id="Q1", sender="alice@example.test",
                        recipients=["bob@example.test"], received_at=0.0)
    results = []
    pipeline.at_data(Session(peer_ip=OUTSIDE_IP, auth_user="alice@example.test"), envelope,
                     message(SITE_RESULTS), b"Received: x\r\n", {}).addBoth(results.append)
    assert b"edge1.example.test" not in results[0]
    assert b"Authentication-Results: example.test" not in results[0]
    assert b"Authentication-Results: elsewhere.test; spf=pass" in results[0]

"""DKIM signing: the key store, the signatures, and the step before the spool.

Signatures are checked with dkimpy and with Perl's Mail::DKIM (an independent
implementation) reading the keys from the test DNS server.
"""

import base64
import calendar
import json
import os
import stat

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from twisted.internet.task import Clock

import dns_server
from appliance.testing import HandRunner as HeldThreads
from appliance.auth.sasl import Mechanisms
from appliance.envelope import Session
from appliance.policy import keys as keysmod
from appliance.policy.dkim_sign import (
    SigningFailed, Signer, ascii_forms, cannot_be_local, headers_to_sign, sign_message,
    signing_domain)
from appliance.policy.keys import KeyService, KeyStore, KeyStoreError, check_rsa_size
from appliance.receive.smtp import SMTPFactory
from appliance.receive.submission import SubmissionFactory
from appliance.policy.pipeline import OURS, OUTSIDE, origin
from appliance.testing import (
    FakeAccounts, FakeDirectory, FakeSpool, SMTPHarness, TLSStringTransport, capture_events,
    clock_at, make_config)
from dkim_tools import (
    dkimpy_results, dnsfunc_from, mail_dkim_missing, mail_dkim_verify, zones_for)

DAY = calendar.timegm((2026, 1, 15, 12, 0, 0))
LOCAL = frozenset({"example.test", "example.org", "bücher.test"})
MESSAGE = (b"Received: from client.test ([192.0.2.10])\r\n"
           b"\tby mx.example.test (mailappliance) with ESMTPSA id 1\r\n"
           b"From: Alice <alice@example.test>\r\n"
           b"To: Bob <bob@remote.test>\r\n"
           b"Cc: carol@remote.test\r\n"
           b"Subject: signed\r\n"
           b"Date: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n"
           b"MIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n"
           b"X-Mailer: test\r\n"
           b"\r\n"
           b"Hello Bob,\r\n"
           b"..a stuffed line stays as it is stored\r\n")


@pytest.fixture
def key_dir(tmp_path):
    return str(tmp_path / "dkim")


def store_in(key_dir, algorithm="rsa-sha256", clock=None):
    return KeyStore(key_dir, algorithm, "mail", clock=clock or clock_at(DAY))


def tags_of(signature):
    """The tags of one DKIM-Signature header line (bytes), whitespace removed."""
    value = signature.split(b":", 1)[1]
    tags = {}
    for part in value.split(b";"):
        name, _, text = part.partition(b"=")
        tags[name.strip().decode()] = b"".join(text.split()).decode()
    return tags


def signatures_of(message):
    return [value for name, value in dkim.DKIM(message).headers
            if name.lower() == b"dkim-signature"]


# -- the key store ------------------------------------------------------------------

def test_first_start_makes_one_private_rsa_2048_key_per_domain(key_dir):
    store = store_in(key_dir)
    made = store.ensure(["example.test", "example.org"])
    assert [(k.domain, k.selector, k.algorithm, k.state) for k in made] == [
        ("example.test", "mail", "rsa-sha256", "active"),
        ("example.org", "mail", "rsa-sha256", "active")]
    assert stat.S_IMODE(os.stat(key_dir).st_mode) == 0o700
    for key in made:
        path = os.path.join(key_dir, key.file)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with open(path, "rb") as handle:
            pem = handle.read()
        assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")     # openssl and dkimpy read it
        private = serialization.load_pem_private_key(pem, password=None)
        assert private.key_size == 2048
        assert keysmod.public_base64(private.public_key()) == key.public
        assert key.txt == f"v=DKIM1; k=rsa; p={key.public}"
    with open(os.path.join(key_dir, "keys.json"), encoding="utf-8") as handle:
        index = json.load(handle)
    assert [(e["domain"], e["selector"], e["state"]) for e in index["keys"]] == [
        ("example.test", "mail", "active"), ("example.org", "mail", "active")]
    assert stat.S_IMODE(os.stat(os.path.join(key_dir, "keys.json")).st_mode) == 0o600


def test_keys_are_made_once_and_found_again_by_a_new_store(key_dir):
    first = store_in(key_dir).ensure(["example.test"])
    again = store_in(key_dir)
    assert again.ensure(["example.test"]) == []
    assert again.keys() == first
    assert again.signing_keys("EXAMPLE.test.")[0].key == first[0]


def test_ed25519_keeps_an_rsa_key_beside_it_for_dual_signing(key_dir):
    made = store_in(key_dir, "ed25519-sha256").ensure(["example.test"])
    assert [(k.selector, k.algorithm, k.key_type) for k in made] == [
        ("mail", "rsa-sha256", "rsa"), ("mail-ed25519", "ed25519-sha256", "ed25519")]
    raw = base64.b64decode(made[1].public)
    assert len(raw) == 32 and made[1].txt.startswith("v=DKIM1; k=ed25519; p=")


def test_switching_to_ed25519_later_adds_the_ed25519_key_only(key_dir):
    [rsa] = store_in(key_dir).ensure(["example.test"])
    made = store_in(key_dir, "ed25519-sha256").ensure(["example.test"])
    assert [k.algorithm for k in made] == ["ed25519-sha256"]
    assert store_in(key_dir).active("example.test") == [rsa] + made


def test_an_idn_domain_is_kept_in_a_labels(key_dir):
    [key] = store_in(key_dir).ensure(["bücher.test"])
    assert key.domain == "xn--bcher-kva.test"
    assert key.dns_name == "mail._domainkey.xn--bcher-kva.test"
    assert store_in(key_dir).signing_keys("bücher.test")[0].key == key


def test_rotate_makes_a_dated_selector_and_retires_the_old_key(key_dir):
    store = store_in(key_dir)
    [old] = store.ensure(["example.test"])
    made, retired = store.rotate("example.test")
    assert [k.selector for k in made] == ["mail-20260115"]
    assert [(k.selector, k.state) for k in retired] == [("mail", "retired")]
    made_again, _ = store.rotate("example.test")
    assert [k.selector for k in made_again] == ["mail-20260115b"]
    assert [k.selector for k in store.active("example.test")] == ["mail-20260115b"]
    assert [(k.selector, k.state) for k in store.keys("example.test")] == [
        ("mail", "retired"), ("mail-20260115", "retired"), ("mail-20260115b", "active")]
    assert os.path.exists(os.path.join(key_dir, old.file))     # kept until removed
    assert store.signing_keys("example.test")[0].key.selector == "mail-20260115b"


def test_rotate_with_ed25519_renews_both_keys(key_dir):
    store = store_in(key_dir, "ed25519-sha256")
    store.ensure(["example.test"])
    made, retired = store.rotate("example.test")
    assert sorted((k.selector, k.algorithm) for k in made) == [
        ("mail-20260115", "rsa-sha256"), ("mail-20260115-ed25519", "ed25519-sha256")]
    assert sorted(k.selector for k in retired) == ["mail", "mail-ed25519"]


def test_a_rotation_by_another_process_applies_without_a_restart(key_dir):
    server = store_in(key_dir)
    server.ensure(["example.test"])
    assert server.signing_keys("example.test")[0].key.selector == "mail"
    store_in(key_dir).rotate("example.test")           # the CLI or the admin shell
    assert server.signing_keys("example.test")[0].key.selector == "mail-20260115"


def test_the_admin_shell_rotates_in_a_thread_and_announces_on_the_reactor(key_dir):
    store = store_in(key_dir)
    store.ensure(["example.test"])
    threads = HeldThreads()
    with capture_events() as seen:
        d = keysmod.rotate_in_thread(store, "example.test", threads)
        assert seen.named("dkim.key_created") == [] and len(threads.calls) == 1
        threads.run_all()
    made = d.result
    assert [k.selector for k in made] == ["mail-20260115"]
    assert [e["selector"] for e in seen.named("dkim.key_created")] == ["mail-20260115"]
    assert [e["selector"] for e in seen.named("dkim.key_retired")] == ["mail"]
    failed = keysmod.rotate_in_thread(store, "other.test", threads)
    threads.run_all()
    assert failed.result.check(KeyStoreError)
    failed.addErrback(lambda _: None)


def test_only_a_retired_key_can_be_removed(key_dir):
    store = store_in(key_dir)
    store.ensure(["example.test"])
    with pytest.raises(KeyStoreError, match="is the active key"):
        store.remove("example.test", "mail")
    _, [old] = store.rotate("example.test")
    assert store.remove("example.test", "mail").selector == "mail"
    assert not os.path.exists(os.path.join(key_dir, old.file))
    assert [k.selector for k in store.keys()] == ["mail-20260115"]
    with pytest.raises(KeyStoreError, match="no DKIM key mail._domainkey.example.test"):
        store.remove("example.test", "mail")


def test_rotating_a_domain_without_keys_is_an_error(key_dir):
    store = store_in(key_dir)
    store.ensure(["example.test"])
    with pytest.raises(KeyStoreError, match="no DKIM key for other.test"):
        store.rotate("other.test")


def test_a_key_file_that_is_not_the_published_key_is_refused(key_dir):
    store = store_in(key_dir)
    [key] = store.ensure(["example.test"])
    other, _ = keysmod.generate("rsa-sha256")
    with open(os.path.join(key_dir, key.file), "wb") as handle:
        handle.write(other)
    with pytest.raises(KeyStoreError, match="does not match the public key"):
        store_in(key_dir).signing_keys("example.test")


def test_a_damaged_index_is_one_clear_error(key_dir):
    store_in(key_dir).ensure(["example.test"])
    with open(os.path.join(key_dir, "keys.json"), "w", encoding="utf-8") as handle:
        handle.write("{not json")
    with pytest.raises(KeyStoreError) as caught:
        store_in(key_dir).keys()
    assert "keys.json is not a key index" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_rsa_key_sizes_are_bounded_t24():
    """T24: dkimpy would use any key; over 4096 bits costs seconds per signature."""
    for bits in (1024, 2048, 4096):
        check_rsa_size(bits)
    for bits in (512, 1023, 4097, 16384):
        with pytest.raises(ValueError, match="allowed: 1024..4096"):
            check_rsa_size(bits)


def test_the_key_service_makes_keys_before_the_listeners_and_announces_them(key_dir):
    service = KeyService(store_in(key_dir), ("example.test",), fail=pytest.fail)
    with capture_events() as seen:
        service.privilegedStartService()
        service.startService()
    assert [(e["domain"], e["selector"], e["algorithm"]) for e in seen.named(
        "dkim.key_created")] == [("example.test", "mail", "rsa-sha256")]


def test_an_unusable_key_dir_stops_start_up_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    failures = []

    def fail(message):
        failures.append(message)
        raise SystemExit(1)

    service = KeyService(store_in(str(blocker / "dkim")), ("example.test",), fail)
    with pytest.raises(SystemExit):
        service.privilegedStartService()
    [message] = failures
    assert message.startswith("[dkim] key_dir: cannot create") and "\n" not in message


# -- what is signed, and how ------------------------------------------------------------

@pytest.fixture(scope="module")
def dual_keys(tmp_path_factory):
    store = store_in(str(tmp_path_factory.mktemp("dual") / "dkim"), "ed25519-sha256")
    store.ensure(["example.test"])
    return store


def test_the_signature_is_relaxed_without_l_and_over_signs_from(dual_keys):
    [rsa] = [k for k in dual_keys.signing_keys("example.test") if k.key.key_type == "rsa"]
    signed = sign_message(MESSAGE, [rsa])
    assert signed.endswith(MESSAGE) and signed.startswith(b"DKIM-Signature: ")
    [signature] = signatures_of(signed)
    tags = tags_of(b"DKIM-Signature:" + signature)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "rsa-sha256", "relaxed/relaxed", "example.test", "mail")
    assert "l" not in tags
    assert tags["h"].split(":") == ["from", "to", "cc", "subject", "date", "message-id",
                                    "mime-version", "content-type", "from"]
    assert dkimpy_results(signed, dnsfunc_from(dual_keys.keys())) == {
        ("mail", "rsa-sha256"): True}


def test_headers_are_signed_as_often_as_they_occur():
    message = (b"From: a@example.test\r\nTo: b@remote.test\r\nTo: c@remote.test\r\n"
               b"Subject: two\r\n  folded\r\nReferences: <x@y>\r\nX-Other: 1\r\n\r\nbody\r\n")
    assert headers_to_sign(message) == [b"from", b"to", b"to", b"subject", b"references",
                                        b"from"]


def test_dual_signatures_both_verify_with_dkimpy(dual_keys):
    signed = sign_message(MESSAGE, dual_keys.signing_keys("example.test"))
    assert len(signatures_of(signed)) == 2
    assert dkimpy_results(signed, dnsfunc_from(dual_keys.keys())) == {
        ("mail", "rsa-sha256"): True, ("mail-ed25519", "ed25519-sha256"): True}


def test_a_changed_or_added_header_breaks_both_signatures(dual_keys):
    signed = sign_message(MESSAGE, dual_keys.signing_keys("example.test"))
    dnsfunc = dnsfunc_from(dual_keys.keys())
    forged_subject = signed.replace(b"Subject: signed", b"Subject: forged")
    second_from = signed.replace(b"From: Alice", b"From: Mallory <m@evil.test>\r\nFrom: Alice")
    appended = signed + b"P.S. added on the way\r\n"       # no l=: the body is all signed
    for forged in (forged_subject, second_from, appended):
        assert set(dkimpy_results(forged, dnsfunc).values()) == {False}


def test_mail_dkim_verifies_our_signatures_through_dns(dual_keys):
    missing = mail_dkim_missing()
    if missing:
        pytest.skip(missing)
    signed = sign_message(MESSAGE, dual_keys.signing_keys("example.test"))
    with dns_server.DNSServer(zones_for(dual_keys.keys())) as dns:
        overall, signatures = mail_dkim_verify(signed, dns.host, dns.port)
        forged, _ = mail_dkim_verify(signed.replace(b"Hello Bob", b"Hello Eve"),
                                     dns.host, dns.port)
    assert overall == "pass"
    assert signatures[("mail", "rsa-sha256")] == "pass"
    # Debian 12's Mail::DKIM predates Ed25519: it cannot say, dkimpy does (above).
    assert signatures[("mail-ed25519", "ed25519-sha256")] == "invalid"
    assert forged == "fail"


@pytest.mark.parametrize("from_header, domain", [
    (b"From: Alice <alice@example.test>", "example.test"),
    (b"From: alice@EXAMPLE.ORG", "example.org"),
    (b"From: a@example.test, b@example.test", "example.test"),
    (b"From: =?utf-8?q?B=C3=BCcher?= <info@xn--bcher-kva.test>", "bücher.test"),
    (b"From: someone@remote.test", None),
    (b"From: a@example.test, b@example.org", None),      # two domains: whose signature?
    (b"From: a@example.test\r\nFrom: b@example.test", "example.test"),
    (b"From: <broken@", None),
    (b"Sender: alice@example.test", None),               # no From: at all
])
def test_the_signing_domain_is_the_one_local_from_domain(from_header, domain):
    message = from_header + b"\r\nSubject: x\r\n\r\nbody\r\n"
    assert signing_domain(message, LOCAL) == domain


@pytest.mark.parametrize("from_header, decided", [
    (b"From: someone@remote.test", True),
    (b"From: Someone <s@remote.test>\r\n (a comment)", True),
    (b"From: Alice <alice@example.test>", False),
    (b"FROM : alice@EXAMPLE.ORG", False),
    (b"From: info@XN--BCHER-KVA.TEST", False),              # bücher.test, as A-labels
    (b"From: =?utf-8?q?x?= <info@remote.test>", False),     # encoded words: parse it
    (b"From: \xc3\xa9@remote.test", False),                  # non-ASCII: parse it
    (b"From: a@remote.test\r\n\tb@example.test", False),     # folded onto a second line
    (b"Sender: alice@remote.test", False),                  # no From: at all: parse it
])
def test_a_foreign_from_is_told_apart_without_a_thread(from_header, decided):
    """``cannot_be_local`` only ever says True when ``signing_domain`` says None."""
    message = from_header + b"\r\nSubject: x\r\n\r\nFrom: alice@example.test\r\n"
    assert cannot_be_local(message, ascii_forms(LOCAL)) is decided
    if decided:
        assert signing_domain(message, LOCAL) is None


# -- the step between end of DATA and the spool ---------------------------------------------

def mx_factory(key_dir, threads, trusted="192.0.2.0/24", spool=None):
    cfg = make_config(relay={"trusted_networks": trusted}, dkim={"key_dir": key_dir})
    store = KeyStore.from_config(cfg, clock=clock_at(DAY))
    store.ensure(cfg.server.domains)
    factory = SMTPFactory(cfg, FakeDirectory(["alice@example.test"]),
                          spool if spool is not None else FakeSpool(), Clock(), "mx")
    factory.signer = Signer(cfg, store, threads)
    return factory


def send_message(h, sender="alice@example.test", rcpt="bob@remote.test", body=MESSAGE):
    h.send(f"EHLO client.test\r\nMAIL FROM:<{sender}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    h.send(body + b".\r\n")


def test_a_trusted_peers_message_is_signed_in_a_thread_before_it_is_spooled(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    h = SMTPHarness(factory, peer="192.0.2.10")
    with capture_events() as seen:
        send_message(h)
        assert h.codes()[-1] == 354                 # no answer while signing
        assert factory.queue.accepted == [] and len(threads.calls) == 1
        threads.run_all()
    assert h.codes() == [250]
    [(envelope, stored)] = factory.queue.accepted
    assert stored.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert envelope.size == len(stored)
    [event] = seen.named("dkim.signed")
    assert (event["queue_id"], event["domain"], event["selector"], event["algorithm"]) == (
        envelope.queue_id, "example.test", "mail", "rsa-sha256")
    assert event["session"] == h.protocol.session_id and event["peer_ip"] == "192.0.2.10"
    assert dkimpy_results(stored, dnsfunc_from(factory.signer.keystore.keys())) == {
        ("mail", "rsa-sha256"): True}


def test_an_untrusted_mx_peer_is_never_signed_for(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    h = SMTPHarness(factory, peer="198.51.100.7")
    send_message(h, rcpt="alice@example.test")
    assert h.codes()[-1] == 250 and threads.calls == []
    [(_, stored)] = factory.queue.accepted
    assert b"DKIM-Signature" not in stored


def test_a_foreign_from_domain_is_relayed_unsigned(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    h = SMTPHarness(factory, peer="192.0.2.10")
    with capture_events() as seen:
        send_message(h, body=MESSAGE.replace(b"alice@example.test", b"alice@remote.test"))
        threads.run_all()
    assert h.codes()[-1] == 250
    [(_, stored)] = factory.queue.accepted
    assert b"DKIM-Signature" not in stored and seen.named("dkim.signed") == []


def test_a_message_that_cannot_be_signed_is_refused_for_now_and_not_queued(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    for key in factory.signer.keystore.keys():
        os.unlink(os.path.join(key_dir, key.file))
    h = SMTPHarness(factory, peer="192.0.2.10")
    with capture_events() as seen:
        send_message(h)
        threads.run_all()
    assert h.replies()[-1].startswith("451 4.3.0")
    assert factory.queue.accepted == []
    [failed] = seen.named("dkim.sign_failed")
    assert failed["domain"] == "example.test" and "cannot read" in failed["reason"]
    [rejected] = seen.named("smtp.message.rejected")
    assert rejected["code"] == 451


def test_a_header_section_dkimpy_cannot_parse_is_refused_for_good(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    h = SMTPHarness(factory, peer="192.0.2.10")
    send_message(h, body=b"From: alice@example.test\r\nno colon here\r\n\r\nbody\r\n")
    threads.run_all()
    assert h.replies()[-1].startswith("550 5.6.0 Malformed header section")
    assert factory.queue.accepted == []


def test_other_sessions_are_answered_while_a_signature_is_pending_t24(key_dir):
    threads = HeldThreads()
    factory = mx_factory(key_dir, threads)
    signing = SMTPHarness(factory, peer="192.0.2.10")
    send_message(signing)
    signing.replies()
    other = SMTPHarness(factory, peer="198.51.100.7")
    other.send("EHLO other.test\r\nNOOP\r\nMAIL FROM:<x@remote.test>\r\n")
    assert other.codes() == [220, 250, 250, 250]
    assert signing.codes() == []                    # still signing, in order
    threads.run_all()
    assert signing.codes() == [250]


class FakeTLS:
    context = "the SSL context"


def test_an_authenticated_submission_is_signed(key_dir):
    threads = HeldThreads()
    cfg = make_config(dkim={"key_dir": key_dir, "algorithm": "ed25519-sha256"})
    store = KeyStore.from_config(cfg)
    store.ensure(cfg.server.domains)
    factory = SubmissionFactory(
        cfg, FakeDirectory(["alice@example.test"]), FakeSpool(), Clock(), "submission",
        Mechanisms(FakeAccounts({"alice@example.test": "pw"})), FakeTLS())
    factory.signer = Signer(cfg, store, threads)
    h = SMTPHarness(factory, peer="203.0.113.5", transport_class=TLSStringTransport)
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    credentials = base64.b64encode(b"\0alice@example.test\0pw").decode()
    h.send(f"EHLO client.test\r\nAUTH PLAIN {credentials}\r\n")
    send_message(h)
    threads.run_all()
    assert h.codes()[-1] == 250
    [(envelope, stored)] = factory.queue.accepted
    assert envelope.auth_user == "alice@example.test"
    assert dkimpy_results(stored, dnsfunc_from(store.keys())) == {
        ("mail", "rsa-sha256"): True, ("mail-ed25519", "ed25519-sha256"): True}


def test_the_pipeline_signs_for_users_and_trusted_networks_only():
    trusted = make_config(relay={"trusted_networks": "10.0.0.0/8"}).relay.trusted_networks
    assert origin(Session(peer_ip="203.0.113.5", auth_user="alice@example.test"), trusted) == OURS
    assert origin(Session(peer_ip="10.1.2.3"), trusted) == OURS
    assert origin(Session(peer_ip="203.0.113.5"), trusted) == OUTSIDE


def test_signing_failed_carries_a_temporary_reply_by_default():
    error = SigningFailed("example.test", "no key")
    assert (error.smtp_reply.code, error.smtp_reply.status) == (451, "4.3.0")

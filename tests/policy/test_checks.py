"""Inbound SPF / DKIM / DMARC and Authentication-Results (appliance.policy.checks).

Real parts: messages signed by dkimpy with test keys, records served by the
test DNS server on loopback, the real resolver, pyspf and dkimpy. Where stock
dkimpy accepts what we refuse (rsa-sha1, l=, keys over 4096 bits) the test
shows both answers.
"""

import base64
import random
import time

import authres
import authres.dmarc
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from twisted.internet import defer, reactor, task, threads
from twisted.python import threadpool
from twisted.trial import unittest

from appliance.deliver.maildir import MaildirDeliverer
from appliance.deliver.mx import build_resolver
from appliance.envelope import Envelope
from appliance.policy import dmarc
from appliance.message import claims_authserv_id, header_fields, strip_forged
from appliance.policy.authresults import authentication_results
from appliance.policy.checks import Facts, InboundChecks, from_domains
from appliance.policy.dkim_verify import MAX_SIGNATURES, key_refusal
from appliance.durable.commit import GroupCommitWriter
from appliance.threads import synchronous_runner
from appliance.testing import FakeDirectory, FakeSpool, SMTPHarness, capture_events, \
    make_config
from appliance.receive.smtp import SMTPFactory
from dns_server import DNSServer

HOST = "mx.example.test"
CLIENT_IP = "192.0.2.10"
OTHER_IP = "198.51.100.7"


# -- keys and records -----------------------------------------------------------

def _pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _key_txt(public_key):
    """The DKIM key record, split into <=255-octet strings for the zone."""
    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    return " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))


def _crafted_key(bits, exponent_bits, seed):
    """A public key nobody holds the private half of: only its size matters."""
    rng = random.Random(seed)
    modulus = rng.getrandbits(bits) | 1 | (1 << (bits - 1))
    exponent = rng.getrandbits(exponent_bits) | 1 | (1 << (exponent_bits - 1))
    return rsa.RSAPublicNumbers(exponent, modulus).public_key()


KEY = rsa.generate_private_key(65537, 2048)
BIG_KEY = rsa.generate_private_key(65537, 4160)          # just over the 4096-bit cap
HUGE_KEY = _crafted_key(16384, 16380, seed=24)          # ~8 s of pow() per signature, stock
FAT_EXPONENT = _crafted_key(2048, 1024, seed=25)

ZONES = {
    # SPF
    "good.test": {"TXT": [f"v=spf1 ip4:{CLIENT_IP} -all"]},
    "client.good.test": {"TXT": [f"v=spf1 ip4:{CLIENT_IP} -all"]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "nospf.test": {"A": ["192.0.2.99"]},
    "servfail.test": "SERVFAIL",
    "hang.test": "HANG",
    "toomany.test": {"TXT": ['"v=spf1 ' + " ".join(f"include:i{n}.toomany.test"
                                                   for n in range(6)) + ' " "'
                             + " ".join(f"include:i{n}.toomany.test"
                                        for n in range(6, 11)) + ' -all"']},
    **{f"i{n}.toomany.test": {"TXT": ["v=spf1 -all"]} for n in range(11)},
    "void.test": {"TXT": ["v=spf1 a:v1.void.test a:v2.void.test a:v3.void.test -all"]},
    # DKIM keys
    "sel._domainkey.good.test": {"TXT": [_key_txt(KEY.public_key())]},
    "big._domainkey.good.test": {"TXT": [_key_txt(BIG_KEY.public_key())]},
    "huge._domainkey.good.test": {"TXT": [_key_txt(HUGE_KEY)]},
    "fat._domainkey.good.test": {"TXT": [_key_txt(FAT_EXPONENT)]},
    "broken._domainkey.good.test": "SERVFAIL",
    "sel._domainkey.mail.strict.test": {"TXT": [_key_txt(KEY.public_key())]},
    "sel._domainkey.other.test": {"TXT": [_key_txt(KEY.public_key())]},
    # DMARC
    "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@good.test"]},
    "quarantine.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.pct.test": {"TXT": ["v=DMARC1; p=reject; pct=50"]},
    "_dmarc.org.test": {"TXT": ["v=DMARC1; p=none; sp=reject"]},
    "_dmarc.strict.test": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.servfail.test": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.dnsdown.test": "SERVFAIL",
    "_dmarc.twice.test": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "_dmarc.none.test": {"TXT": ["v=DMARC1; p=none"]},
}


@pytest.fixture(scope="module")
def dns_server():
    with DNSServer(ZONES) as server:
        yield server


def make_checks(dns_server, timeout="2s", random_draw=0.0, **checks):
    settings = {"spf": "on", "dkim": "on", "dmarc": "enforce"}
    settings.update(checks)
    config = make_config(dns={"nameservers": dns_server.address, "timeout": timeout},
                         checks=settings)
    return InboundChecks(config, build_resolver(config), synchronous_runner,
                         random=lambda: random_draw)


def message(from_="Alice <alice@good.test>", subject="hello", extra=b"", body=b"Hi.\r\n"):
    return (f"From: {from_}\r\nTo: bob@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <1@good.test>\r\n").encode() + extra + b"\r\n" + body


def sign(msg, domain="good.test", selector="sel", key=KEY, **options):
    return dkim.sign(msg, selector.encode(), domain.encode(), _pem(key),
                     canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=[b"from", b"to", b"subject"], **options) + msg


def run(checks, msg, sender="bounce@good.test", ip=CLIENT_IP, helo="client.good.test"):
    return checks.evaluate(Facts(ip, helo, sender), msg)


def stock_dnsfunc(name, timeout=5):
    """Stock dkimpy reading our zone directly."""
    entry = ZONES.get(name.decode().rstrip("."))
    if not isinstance(entry, dict):
        return None
    text = entry["TXT"][0]
    return "".join(part.strip('"') for part in text.split('" "')).encode()


def added_field(verdict):
    """Our Authentication-Results field, parsed by authres (it is always on top)."""
    head = verdict.message.split(b"\r\n\r\n")[0]
    first = header_fields(verdict.message)[0]
    raw = verdict.message[first[1]:first[2]].replace(b"\r\n", b"").decode("ascii")
    assert head.startswith(b"Authentication-Results: ")
    return authres.FeatureContext(authres.dmarc).parse(raw)


def results_of(verdict, method):
    return [r.result for r in added_field(verdict).results if r.method == method]


# -- SPF ----------------------------------------------------------------------------

@pytest.mark.parametrize("sender, ip, expected", [
    ("bounce@good.test", CLIENT_IP, "pass"),
    ("bounce@good.test", OTHER_IP, "fail"),
    ("bounce@soft.test", CLIENT_IP, "softfail"),
    ("bounce@neutral.test", CLIENT_IP, "neutral"),
    ("bounce@nospf.test", CLIENT_IP, "none"),
    ("bounce@servfail.test", CLIENT_IP, "temperror"),
    ("bounce@toomany.test", CLIENT_IP, "permerror"),     # 11 DNS-querying terms
    ("bounce@void.test", CLIENT_IP, "permerror"),        # 3 void lookups
])
def test_spf_results_for_mail_from(dns_server, sender, ip, expected):
    verdict = run(make_checks(dns_server, dmarc="off"), message(), sender=sender, ip=ip)
    mailfrom = verdict.spf[0]
    assert (mailfrom.identity, mailfrom.result) == ("mailfrom", expected)
    assert results_of(verdict, "spf")[0] == expected
    assert verdict.refusal is None          # spf = on records, never refuses


def test_spf_timeout_is_temperror_within_the_dns_timeout(dns_server):
    checks = make_checks(dns_server, timeout="0.3s", dmarc="off", dkim="off")
    started = time.monotonic()
    verdict = run(checks, message(), sender="bounce@hang.test")
    assert verdict.spf[0].result == "temperror"
    assert time.monotonic() - started < 3


def test_helo_is_checked_and_the_null_sender_uses_it(dns_server):
    checks = make_checks(dns_server, dmarc="off")
    verdict = run(checks, message(), sender="", helo="client.good.test", ip=OTHER_IP)
    assert [(r.identity, r.result) for r in verdict.spf] == [("mailfrom", "fail"),
                                                            ("helo", "fail")]
    field = added_field(verdict)
    assert "smtp.helo=client.good.test" in str(field)
    assert "smtp.mailfrom" not in str(field)
    literal = run(checks, message(), helo="[192.0.2.10]")
    assert literal.spf[1].result == "none"


def test_spf_enforce_refuses_a_fail_with_5_7_23_and_on_does_not(dns_server):
    enforced = run(make_checks(dns_server, spf="enforce", dmarc="off"), message(),
                   ip=OTHER_IP)
    assert (enforced.refusal.code, enforced.refusal.status) == (550, "5.7.23")
    soft = run(make_checks(dns_server, spf="enforce", dmarc="off"), message(),
               sender="x@soft.test")
    assert soft.refusal is None
    temp = run(make_checks(dns_server, spf="enforce", dmarc="off"), message(),
               sender="x@servfail.test")
    assert temp.refusal is None             # DNS trouble never refuses
    recorded = run(make_checks(dns_server, spf="on", dmarc="off"), message(), ip=OTHER_IP)
    assert recorded.refusal is None and recorded.spf[0].result == "fail"


def test_spf_lookups_do_not_leak_into_other_pyspf_users(dns_server):
    import spf
    from appliance.policy import spf_check
    assert spf.DNSLookup is spf_check._dispatching_lookup
    assert getattr(spf_check._current, "lookups", None) is None   # outside a check


# -- DKIM ---------------------------------------------------------------------------

def test_dkim_pass_and_a_changed_body_fails(dns_server):
    checks = make_checks(dns_server, dmarc="off", spf="off")
    signed = sign(message())
    assert [(r.result, r.domain, r.selector) for r in run(checks, signed).dkim] == [
        ("pass", "good.test", "sel")]
    tampered = signed.replace(b"Hi.", b"Hello.")
    [result] = run(checks, tampered).dkim
    assert (result.result, result.reason) == ("fail", "body hash did not verify")
    unsigned = run(checks, message())
    assert unsigned.dkim == [] and results_of(unsigned, "dkim") == ["none"]


def test_rsa_sha1_fails_though_stock_dkimpy_accepts_it(dns_server):
    signed = sign(message(), signature_algorithm=b"rsa-sha1")
    assert dkim.verify(signed, dnsfunc=stock_dnsfunc)            # stock: valid
    [result] = run(make_checks(dns_server, dmarc="off"), signed).dkim
    assert result.result == "fail" and "RFC 8301" in result.reason


def test_l_tag_fails_though_stock_dkimpy_accepts_appended_text(dns_server):
    signed = sign(message(), length=True) + b"Click here: http://evil.example/\r\n"
    assert dkim.verify(signed, dnsfunc=stock_dnsfunc)            # stock: still valid
    [result] = run(make_checks(dns_server, dmarc="off"), signed).dkim
    assert result.result == "fail" and "l=" in result.reason


def test_keys_over_4096_bits_fail_though_stock_dkimpy_accepts_them(dns_server):
    signed = sign(message(), selector="big", key=BIG_KEY)
    assert dkim.verify(signed, dnsfunc=stock_dnsfunc)            # stock: valid
    [result] = run(make_checks(dns_server, dmarc="off"), signed).dkim
    assert (result.result, result.reason) == ("fail", "key over 4096 bits")


def test_a_huge_key_or_exponent_is_refused_before_any_arithmetic(dns_server):
    checks = make_checks(dns_server, dmarc="off", spf="off")
    started = time.monotonic()
    # Signed with the 2048-bit key: body hash right, so stock dkimpy would go
    # on to pow() with the 16384-bit modulus and exponent (about 8 s).
    [huge] = run(checks, sign(message(), selector="huge")).dkim
    [fat] = run(checks, sign(message(), selector="fat")).dkim
    assert time.monotonic() - started < 2
    assert (huge.result, huge.reason) == ("fail", "key over 4096 bits")
    assert (fat.result, fat.reason) == ("fail", "public exponent over 256 bits")
    assert key_refusal(stock_dnsfunc(b"sel._domainkey.good.test")) is None


def test_missing_key_is_permerror_and_dns_failure_temperror(dns_server):
    checks = make_checks(dns_server, dmarc="off")
    [missing] = run(checks, sign(message(), selector="gone")).dkim
    [broken] = run(checks, sign(message(), selector="broken")).dkim
    assert (missing.result, missing.reason) == ("permerror", "no key for signature")
    assert broken.result == "temperror"


def test_at_most_five_signatures_are_verified(dns_server):
    signed = message()
    for _ in range(MAX_SIGNATURES + 2):
        signed = sign(signed)
    verdict = run(make_checks(dns_server, dmarc="off"), signed)
    assert len(verdict.dkim) == MAX_SIGNATURES
    assert verdict.skipped_signatures == 2
    assert {r.result for r in verdict.dkim} == {"pass"}


def test_a_spent_time_budget_leaves_temperror_without_queries(dns_server):
    ticks = iter(range(0, 10_000, 100))     # every look at the clock: 100 s later

    class Hurried:
        def seconds(self):
            return next(ticks)

    config = make_config(dns={"nameservers": dns_server.address, "timeout": "2s"})
    checks = InboundChecks(config, build_resolver(config), synchronous_runner,
                           clock=Hurried())
    before = len(dns_server.queries)
    verdict = run(checks, sign(message()))
    assert [r.result for r in verdict.spf] == ["temperror", "temperror"]
    assert [r.result for r in verdict.dkim] == ["temperror"]
    assert [r.result for r in verdict.dmarc] == ["temperror"]
    assert verdict.refusal is None
    assert len(dns_server.queries) == before


# -- DMARC --------------------------------------------------------------------------

def test_spoofed_p_reject_domain_is_refused_with_5_7_1(dns_server):
    verdict = run(make_checks(dns_server), message(), sender="x@soft.test")
    assert (verdict.refusal.code, verdict.refusal.status) == (550, "5.7.1")
    [result] = verdict.dmarc
    assert (result.result, result.policy, result.disposition) == ("fail", "reject", "reject")
    assert verdict.action == "reject"


def test_report_mode_only_records(dns_server):
    verdict = run(make_checks(dns_server, dmarc="report"), message(), sender="x@soft.test")
    assert verdict.refusal is None and verdict.folder is None
    assert results_of(verdict, "dmarc") == ["fail"]
    assert b"dmarc=fail (p=reject dis=reject) header.from=good.test" in verdict.message


def test_aligned_dkim_passes_dmarc_despite_spf_fail(dns_server):
    verdict = run(make_checks(dns_server), sign(message()), ip=OTHER_IP)
    assert verdict.spf[0].result == "fail"
    assert verdict.dmarc[0].result == "pass" and verdict.refusal is None


def test_aligned_spf_passes_dmarc_without_a_signature(dns_server):
    verdict = run(make_checks(dns_server), message())
    assert verdict.dmarc[0].result == "pass"


def test_a_signature_of_another_domain_does_not_align(dns_server):
    verdict = run(make_checks(dns_server), sign(message(), domain="other.test"),
                  sender="x@soft.test")
    assert [r.result for r in verdict.dkim] == ["pass"]
    assert verdict.dmarc[0].result == "fail" and verdict.refusal is not None


def test_p_quarantine_goes_to_the_junk_folder(dns_server):
    verdict = run(make_checks(dns_server), message(from_="x@quarantine.test"),
                  sender="x@quarantine.test")
    assert verdict.refusal is None and verdict.folder == "Junk"
    assert verdict.action == "quarantine"


@pytest.mark.parametrize("draw, refused, folder", [(0.2, True, None), (0.7, False, "Junk")])
def test_pct_samples_and_the_rest_get_the_milder_policy(dns_server, draw, refused, folder):
    verdict = run(make_checks(dns_server, random_draw=draw), message(from_="x@pct.test"),
                  sender="x@soft.test")
    assert (verdict.refusal is not None) == refused
    assert verdict.folder == folder


def test_subdomains_get_the_organizational_sp_policy(dns_server):
    verdict = run(make_checks(dns_server), message(from_="x@news.org.test"),
                  sender="x@soft.test")
    [result] = verdict.dmarc
    assert (result.policy, result.disposition) == ("reject", "reject")
    apex = run(make_checks(dns_server), message(from_="x@org.test"), sender="x@soft.test")
    assert apex.dmarc[0].policy == "none" and apex.refusal is None


def test_strict_alignment_refuses_a_subdomain_signature(dns_server):
    signed = sign(message(from_="x@strict.test"), domain="mail.strict.test")
    verdict = run(make_checks(dns_server), signed, sender="x@soft.test")
    assert [r.result for r in verdict.dkim] == ["pass"]
    assert verdict.dmarc[0].result == "fail" and verdict.refusal is not None
    assert dmarc.aligned("mail.strict.test", "strict.test", "r")


def test_dns_trouble_is_temperror_never_a_refusal(dns_server):
    lookup_failed = run(make_checks(dns_server), message(from_="x@dnsdown.test"),
                        sender="x@soft.test")
    assert lookup_failed.dmarc[0].result == "temperror" and lookup_failed.refusal is None
    spf_failed = run(make_checks(dns_server), message(from_="x@servfail.test"),
                     sender="x@servfail.test")
    assert spf_failed.dmarc[0].result == "temperror" and spf_failed.refusal is None


def test_several_records_or_none_mean_no_policy(dns_server):
    for domain in ("twice.test", "nospf.test"):
        verdict = run(make_checks(dns_server), message(from_=f"x@{domain}"),
                      sender="x@soft.test")
        assert verdict.dmarc[0].result == "none" and verdict.refusal is None


def test_every_from_domain_is_held_to_its_policy(dns_server):
    two_fields = message(extra=b"From: x@none.test\r\n")
    verdict = run(make_checks(dns_server), two_fields, sender="x@soft.test")
    assert [r.domain for r in verdict.dmarc] == ["good.test", "none.test"]
    assert verdict.refusal is not None
    # A From: the email package finds defective is still searched for domains.
    garbled = run(make_checks(dns_server), message(from_="<x@good.test"), sender="x@soft.test")
    assert garbled.refusal is not None


def test_record_parsing():
    record = dmarc.parse_record(b"v=DMARC1; p=Quarantine; sp=bogus; pct=250; adkim=s")
    assert record == dmarc.Record("quarantine", "quarantine", 100, "s", "r")
    assert dmarc.parse_record(b"v=DMARC1; p=bogus") is None
    assert dmarc.parse_record(b"v=DMARC1; p=bogus; rua=mailto:a@b.test").policy == "none"
    assert dmarc.parse_record(b"p=reject; v=DMARC1") is None
    assert dmarc.organizational_domain("a.b.example.co.uk") == "example.co.uk"


# -- Authentication-Results ---------------------------------------------------------

FORGED = (b"Authentication-Results: mx.example.test; dkim=pass header.d=good.test\r\n"
          b"authentication-results:(comment) \"MX.Example.Test.\" ;\r\n dmarc=pass\r\n"
          b"Authentication-Results: elsewhere.test; spf=pass\r\n")


def test_forged_results_for_our_hostname_are_removed_others_kept(dns_server):
    verdict = run(make_checks(dns_server), message(extra=FORGED))
    assert verdict.message.count(b"mx.example.test") == 1        # ours only
    assert b"MX.Example.Test" not in verdict.message
    assert b"Authentication-Results: elsewhere.test; spf=pass\r\n" in verdict.message
    assert added_field(verdict).authserv_id == HOST


def test_claims_and_strip_without_checks():
    assert claims_authserv_id(" (x) mx.example.test 1; none", HOST)
    assert not claims_authserv_id(" other.test; spf=pass (mx.example.test)", HOST)
    stripped, count = strip_forged(message(extra=FORGED), HOST)
    assert count == 2 and stripped.startswith(b"From: ")
    assert strip_forged(b"\r\nAuthentication-Results: mx.example.test; x\r\n", HOST)[1] == 0


def test_client_text_cannot_inject_results(dns_server):
    checks = make_checks(dns_server)
    hostile = run(checks, message(), sender='x;dkim=pass@good.test',
                  helo="evil.test;dmarc=pass")
    field = added_field(hostile)
    assert [(r.method, r.result) for r in field.results] == [
        ("spf", "pass"), ("spf", "none"), ("dkim", "none"), ("dmarc", "pass")]
    raw = hostile.message.split(b"\r\n\r\n")[0]
    assert b"dkim=pass" not in raw and b"dmarc=pass (" in raw
    assert all(0x20 <= b < 0x7f or b in (9, 10, 13) for b in raw)


def test_from_domains_and_header_fields():
    msg = (b"From: =?utf-8?q?M=C3=BCller?= <m@b\xc3\xbccher.test>\r\n"
           b"Subject: folded\r\n  line\r\nnot a field\r\nFrom: a@b.test, c@d.test\r\n"
           b"\r\nFrom: body@not.test\r\n")
    fields = header_fields(msg)
    assert [f[0] for f in fields] == [b"from", b"subject", None, b"from"]
    assert from_domains(msg, fields) == ["xn--bcher-kva.test", "b.test", "d.test"]


def test_the_field_is_folded_ascii_with_our_authserv_id():
    from appliance.policy.checks import Verdict
    from appliance.policy.dkim_verify import DKIMResult
    from appliance.policy.spf_check import SPFResult
    verdict = Verdict(b"", spf=[SPFResult("mailfrom", "good.test", "pass")],
                      dkim=[DKIMResult("fail", "good.test", "s\r\n", "rsa-sha1",
                                       "rsa-sha1 is not accepted (RFC 8301)")])
    field = authentication_results(HOST, verdict, "a@good.test")
    assert field == (b"Authentication-Results: mx.example.test;\r\n"
                     b"\tspf=pass smtp.mailfrom=a@good.test;\r\n"
                     b"\tdkim=fail (rsa-sha1 is not accepted RFC 8301) "
                     b"header.d=good.test header.a=rsa-sha1\r\n")


# -- the MX listener ------------------------------------------------------------------

def mx_factory(dns_server, spool, runner=synchronous_runner, **checks):
    config = make_config(dns={"nameservers": dns_server.address, "timeout": "2s"},
                         checks={"spf": "on", "dkim": "on", "dmarc": "enforce", **checks},
                         relay={"trusted_networks": "203.0.113.0/24"})
    factory = SMTPFactory(config, FakeDirectory(["bob@example.test"]), spool, task.Clock())
    factory.checks = InboundChecks(config, build_resolver(config), runner,
                                   random=lambda: 0.0)
    return factory


def send(harness, msg, sender="x@soft.test"):
    harness.send(f"EHLO client.good.test\r\nMAIL FROM:<{sender}>\r\n"
                 "RCPT TO:<bob@example.test>\r\nDATA\r\n")
    harness.send(msg + b".\r\n")
    return harness.replies()


def test_mx_refuses_p_reject_spoofing_and_stores_nothing(dns_server):
    spool = FakeSpool()
    harness = SMTPHarness(mx_factory(dns_server, spool), peer=CLIENT_IP)
    with capture_events() as seen:
        answers = send(harness, message())
    assert answers[-1].startswith("550 5.7.1 ")
    assert spool.accepted == []
    [event] = seen.named("check.dmarc")
    assert (event["domain"], event["result"], event["action"]) == ("good.test", "fail", "reject")
    assert event["queue_id"] and event["session"] == harness.protocol.session_id
    assert seen.named("smtp.message.rejected")[0]["code"] == 550
    assert {e["identity"] for e in seen.named("check.spf")} == {"mailfrom", "helo"}


def test_mx_quarantine_is_stored_for_the_junk_folder_with_the_header(dns_server):
    spool = FakeSpool()
    harness = SMTPHarness(mx_factory(dns_server, spool), peer=CLIENT_IP)
    answers = send(harness, message(from_="x@quarantine.test", extra=FORGED))
    assert answers[-1].startswith("250 ")
    [(envelope, stored)] = spool.accepted
    assert envelope.params["folder"] == "Junk"
    names = [name for name, _, _ in header_fields(stored)]
    assert names[:2] == [b"received", b"authentication-results"]
    assert stored.count(b"Authentication-Results: mx.example.test;") == 1
    assert b"MX.Example.Test" not in stored and b"elsewhere.test" in stored
    assert envelope.size == len(stored)


def test_trusted_networks_are_not_checked(dns_server):
    spool = FakeSpool()
    harness = SMTPHarness(mx_factory(dns_server, spool), peer="203.0.113.5")
    assert send(harness, message())[-1].startswith("250 ")
    [(envelope, stored)] = spool.accepted
    assert b"Authentication-Results" not in stored
    assert "folder" not in envelope.params


def test_all_checks_off_still_removes_forgeries(dns_server):
    spool = FakeSpool()
    factory = mx_factory(dns_server, spool, spf="off", dkim="off", dmarc="off")
    queries = len(dns_server.queries)
    harness = SMTPHarness(factory, peer=CLIENT_IP)
    assert send(harness, message(extra=FORGED))[-1].startswith("250 ")
    [(_, stored)] = spool.accepted
    assert b"Authentication-Results: mx.example.test" not in stored
    assert b"MX.Example.Test" not in stored and b"elsewhere.test" in stored
    assert len(dns_server.queries) == queries


def test_while_checks_are_pending_other_sessions_are_answered(dns_server):
    held = []

    def hold(f, *args):
        held.append((f, args))
        return defer.Deferred()

    spool = FakeSpool()
    factory = mx_factory(dns_server, spool, runner=hold)
    first = SMTPHarness(factory, peer=CLIENT_IP)
    first.replies()
    first.send(b"EHLO a.test\r\nMAIL FROM:<x@good.test>\r\nRCPT TO:<bob@example.test>\r\n"
               b"DATA\r\n" + message() + b".\r\nNOOP\r\n")
    assert held and first.codes()[-1] == 354          # waiting on the checks, NOOP held back
    second = SMTPHarness(factory, peer=OTHER_IP)
    second.send("EHLO b.test\r\nNOOP\r\n")
    assert second.codes()[-2:] == [250, 250]


def test_a_client_gone_during_the_checks_stores_nothing(dns_server):
    pending = []

    def hold(f, *args):
        pending.append((f, args, defer.Deferred()))
        return pending[-1][2]

    spool = FakeSpool()
    harness = SMTPHarness(mx_factory(dns_server, spool, runner=hold), peer=CLIENT_IP)
    harness.send(b"EHLO a.test\r\nMAIL FROM:<x@good.test>\r\nRCPT TO:<bob@example.test>\r\n"
                 b"DATA\r\n" + message() + b".\r\n")
    harness.lose()
    [(f, args, d)] = pending
    verdict = f(*args)
    assert verdict.refusal is None          # it would have been stored
    d.callback(verdict)
    assert spool.accepted == []             # the client never got its 250: it sends again


# -- Junk folder delivery -----------------------------------------------------------

def test_quarantined_mail_lands_in_the_junk_maildir_once(tmp_path):
    deliverer = MaildirDeliverer(str(tmp_path), GroupCommitWriter(synchronous_runner),
                                 HOST)
    envelope = Envelope(queue_id="0005f1e2d3c4b5a6deadbeef", sender="x@quarantine.test",
                        recipients=["bob@example.test"], received_at=1700000000.0,
                        params={"folder": "Junk"})
    results = []
    for _ in range(2):                       # a redo after a crash: still one copy
        deliverer.deliver(envelope, b"Subject: s\r\n\r\nbody\r\n",
                          ["bob@example.test"]).addCallback(results.append)
    inbox = tmp_path / "example.test" / "bob"
    junk = inbox / ".Junk"
    assert len(list((junk / "new").iterdir())) == 1
    assert (junk / "maildirfolder").is_file()
    assert all((inbox / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert list((inbox / "new").iterdir()) == []
    envelope.params["folder"] = "../../escape"       # never a path: the inbox instead
    envelope.queue_id = "0005f1e2d3c4b5a6deadbeee"
    deliverer.deliver(envelope, b"Subject: s\r\n\r\nbody\r\n", ["bob@example.test"])
    assert len(list((inbox / "new").iterdir())) == 1


# -- T24: the reactor keeps answering ------------------------------------------------

class ReactorStaysResponsive(unittest.TestCase):
    """Real reactor, real threads: while one message waits on a DNS server that
    never answers, or carries a signature by a 16384-bit key with a huge
    exponent, another session is answered within a second."""

    def setUp(self):
        self.dns = DNSServer(ZONES).start()
        self.addCleanup(self.dns.stop)
        self.pool = threadpool.ThreadPool(minthreads=0, maxthreads=4, name="test-checks")
        self.pool.start()
        self.addCleanup(self.pool.stop)

    def factory(self, timeout):
        config = make_config(dns={"nameservers": self.dns.address, "timeout": timeout})
        factory = SMTPFactory(config, FakeDirectory(["bob@example.test"]), FakeSpool(),
                              reactor)

        def run(f, *args):
            return threads.deferToThreadPool(reactor, self.pool, f, *args)

        factory.checks = InboundChecks(config, build_resolver(config), run)
        return factory

    @defer.inlineCallbacks
    def responsive_while_pending(self, factory, msg, sender):
        first = SMTPHarness(factory, peer=CLIENT_IP)
        first.send(b"EHLO a.test\r\nMAIL FROM:<" + sender + b">\r\n"
                   b"RCPT TO:<bob@example.test>\r\nDATA\r\n" + msg + b".\r\n")
        self.assertEqual(first.replies()[-1][:3], "354")
        lateness = []
        for _ in range(5):                   # reactor ticks while the check runs
            asked = time.monotonic()
            yield task.deferLater(reactor, 0.1, lambda: None)
            second = SMTPHarness(factory, peer=OTHER_IP)
            second.send("EHLO b.test\r\n")
            self.assertEqual(second.codes()[-1], 250)
            lateness.append(time.monotonic() - asked - 0.1)
            second.lose()
        self.assertLess(max(lateness), 1.0)
        answer = []
        for _ in range(100):                 # then the first message is answered
            answer += first.replies()
            if answer:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        first.lose()
        return answer[-1] if answer else "no answer"

    @defer.inlineCallbacks
    def test_slow_dns(self):
        started = time.monotonic()
        last = yield self.responsive_while_pending(self.factory("1s"), message(),
                                                   b"x@hang.test")
        self.assertTrue(last.startswith("550 5.7.1"), last)   # SPF temperror, DMARC fail
        self.assertGreater(time.monotonic() - started, 0.9)   # it did wait on the DNS

    @defer.inlineCallbacks
    def test_huge_key(self):
        signed = sign(message(), selector="huge")
        last = yield self.responsive_while_pending(self.factory("2s"), signed,
                                                   b"x@good.test")
        self.assertTrue(last.startswith("250 "), last)       # SPF pass aligns


# -- bounded work per message (issue 17) -------------------------------------------------

def test_a_header_section_over_the_cap_is_refused_before_any_check():
    from appliance.policy.checks import HEADER_TOO_BIG, MAX_HEADER_OCTETS
    config = make_config(server={"hostname": HOST})
    ran = []

    def runner(f, *args):
        ran.append(f)
        return defer.maybeDeferred(f, *args)

    checks = InboundChecks(config, None, runner)
    message = b"X-Filler: " + b"x" * 900 + b"\r\n"
    message = message * (MAX_HEADER_OCTETS // len(message) + 1) + b"\r\nbody\r\n"
    verdict = []
    checks.check(Facts(CLIENT_IP, "client.test", "a@good.test"), message, {}).addCallback(
        verdict.append)
    assert verdict[0].refusal == HEADER_TOO_BIG and ran == []
    small = b"From: a@good.test\r\n\r\nbody\r\n"
    checks.dmarc, checks.spf, checks.dkim = "off", "off", False
    checks.check(Facts(CLIENT_IP, "client.test", "a@good.test"), small, {}).addCallback(
        verdict.append)
    assert verdict[1].refusal is None and ran == []     # unchecked and small: the reactor
    big = small + b"x" * (64 * 1024)
    checks.check(Facts(CLIENT_IP, "client.test", "a@good.test"), big, {}).addCallback(
        verdict.append)
    assert verdict[2].message == big and len(ran) == 1  # past REACTOR_OCTETS: off the reactor

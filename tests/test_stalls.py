"""Issue 17's stalls: no client input delays another client's reply by over 100 ms.

Each test runs one bad input of the kind that froze the server on 092f303
and measures, with ``stall_probe``, how long another client would have
waited meanwhile; the inputs are big enough to take the old code seconds.
Only APIs that were there before the fixes are used, so each test also
runs (and fails) on the old code.
"""

import time

import pytest

from appliance.access.imap.mailbox import matching_folders
from appliance.message import AmbiguousFrom, from_addresses, header_fields
from appliance.policy.checks import from_domains
from appliance.policy.dkim_sign import sign_message
from appliance.policy.dkim_verify import verify_signatures
from appliance.policy.keys import KeyStore
from dkim_tools import dnsfunc_from
from stall_probe import LIMIT, reactor_wait, worst_wait_while

HEAD = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
        b"Subject: spaces\r\nDate: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
        b"Message-ID: <s@example.test>\r\n\r\n")
# dkimpy's [\t ]+\r\n tries every start in a run of spaces not followed by
# CRLF: 30,000 spaces took it seconds, in one call holding the GIL.
SPACES = b" " * 30000 + b"x\r\n"


# -- DKIM body canonicalisation (a worker thread holding the GIL) -------------------

@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    store = KeyStore(str(tmp_path_factory.mktemp("dkim") / "keys"), "rsa-sha256", "mail")
    store.ensure(["example.test"])
    return store


class KeyLookups:
    """The ``Lookups`` a verifier asks: the keys, no DNS, no budget spent."""

    def __init__(self, keys):
        self.dnsfunc = dnsfunc_from(keys)

    def txt(self, name):
        record = self.dnsfunc(name)
        return [record] if record else []

    def remaining(self):
        return 60.0


def test_signing_a_line_of_spaces_does_not_stall_others(rsa_keys):
    message = HEAD + SPACES * 2
    keys = rsa_keys.signing_keys("example.test")
    worst, took, signed = worst_wait_while(lambda: sign_message(message, keys))
    assert worst < LIMIT, f"another client waited {worst:.3f} s while signing ({took:.3f} s)"
    results, _ = verify_signatures(signed, KeyLookups(rsa_keys.keys()))
    assert [r.result for r in results] == ["pass"]


def test_verifying_a_line_of_spaces_does_not_stall_others(rsa_keys):
    signed = sign_message(HEAD + SPACES * 2, rsa_keys.signing_keys("example.test"))
    lookups = KeyLookups(rsa_keys.keys())
    worst, took, (results, _) = worst_wait_while(lambda: verify_signatures(signed, lookups))
    assert worst < LIMIT, f"another client waited {worst:.3f} s while verifying ({took:.3f} s)"
    assert [r.result for r in results] == ["pass"]




def test_a_dkim_signature_of_whitespace_is_not_checked_at_length():
    # dkimpy checks b= with [\s0-9A-Za-z+/]+[\s=]*$: quadratic on a run of
    # whitespace before a character it refuses.
    signature = (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=mail;"
                 b" h=from; bh=AAAA; b=A" + b" " * 20000 + b"!\r\n")
    lookups = KeyLookups([])
    worst, took, (results, _) = worst_wait_while(
        lambda: verify_signatures(signature + HEAD + b"body\r\n", lookups))
    assert worst < LIMIT, f"another client waited {worst:.3f} s ({took:.3f} s)"
    assert [r.result for r in results] == ["permerror"]


# -- IMAP LIST / LSUB patterns (on the reactor) ------------------------------------

def test_list_wildcards_do_not_backtrack():
    # '*a*a*a*a*b' as a regex backtracks on a long name of a's: 5.6 s at 200.
    names = ["INBOX", "a" * 150, "Archive." + "a" * 150]
    took, found = reactor_wait(lambda: list(matching_folders(names, "", "*a*a*a*a*b")))
    assert took < LIMIT, f"LIST took {took:.3f} s on the reactor"
    assert found == []
    took, found = reactor_wait(lambda: list(matching_folders(
        names, "", "%" + "*a%" * 2000 + "b")))
    assert took < LIMIT, f"LIST took {took:.3f} s on the reactor"
    assert found == []


# -- From: on submission (on the reactor) -----------------------------------------------

def from_or_refusal(message):
    try:
        return from_addresses(message)
    except AmbiguousFrom:
        return "refused"


def test_many_from_lines_are_refused_without_parsing_them_all():
    # 1 MB of From: lines took the email package 13.8 s on the reactor.
    message = b"From: a@example.test\r\n" * 6000 + b"\r\nbody\r\n"
    took, outcome = reactor_wait(lambda: from_or_refusal(message))
    assert took < LIMIT, f"the From: check took {took:.3f} s on the reactor"
    assert outcome == "refused"


def test_one_huge_from_field_is_refused_without_parsing_it():
    message = b"From: " + b"a@example.test,\r\n " * 5000 + b"b@example.test\r\n\r\nbody\r\n"
    took, outcome = reactor_wait(lambda: from_or_refusal(message))
    assert took < LIMIT, f"the From: check took {took:.3f} s on the reactor"
    assert outcome == "refused"


# -- the inbound checks' worker pool: bounded work per message ------------------------

def test_from_domains_of_a_megabyte_of_from_lines_is_bounded_work():
    # Every From: field went through the email package: ~13 s a megabyte.
    message = b"From: a@example.test\r\n" * 45000 + b"\r\nbody\r\n"
    fields = header_fields(message)
    started = time.monotonic()
    domains = from_domains(message, fields)
    took = time.monotonic() - started
    assert took < 1.0, f"the DMARC From: parse took {took:.3f} s"
    assert domains == ["example.test"]

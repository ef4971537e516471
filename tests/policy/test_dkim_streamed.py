"""DKIM over a body that is not in memory (issue 17): incremental body
hashes, signing and verifying with them, exactly as dkimpy over the whole
message."""

import hashlib
from unittest import mock

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.policy import dkim_body
from appliance.policy.dkim_body import BodyDigests, BodyHashes, split_message
from appliance.policy.dkim_sign import sign_message
from appliance.policy.dkim_verify import verify_signatures
from appliance.policy.keys import KeyStore
from appliance.testing import clock_at
from dkim_tools import dkimpy_results, dnsfunc_from

HEAD = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
        b"Subject: streamed\r\nDate: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
        b"Message-ID: <s@example.test>\r\n\r\n")
BODY = b"".join(b"line %d \t with  spaces \r\n" % n for n in range(5000)) + b"\r\n\r\n"

bodies = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"  ",
                                   b"\r\n\r\n"]), max_size=40).map(b"".join)
WANTED = {(b"relaxed", "sha256"), (b"simple", "sha256"), (b"relaxed", "sha1")}


@settings(max_examples=500, deadline=None)
@given(bodies, st.lists(st.integers(0, 12), max_size=8), st.integers(1, 5))
def test_incremental_hashes_are_those_of_dkimpys_canonical_forms(body, cuts, piece):
    with mock.patch.object(dkim_body, "SLICE", piece):
        hashes = BodyHashes(WANTED)
        position = 0
        for cut in cuts:
            hashes.update(body[position:position + cut])
            position += cut
        hashes.update(body[position:])
        digests = hashes.digests()
    lines = dkim_body.crlf_lines(body)
    relaxed, simple = dkim_body.relaxed_body(lines), dkim_body.simple_body(lines)
    assert digests == {(b"relaxed", "sha256"): hashlib.sha256(relaxed).digest(),
                       (b"simple", "sha256"): hashlib.sha256(simple).digest(),
                       (b"relaxed", "sha1"): hashlib.sha1(relaxed).digest()}


def test_blank_lines_at_the_end_are_held_as_a_count_not_as_bytes():
    hashes = BodyHashes({(b"simple", "sha256")})
    hashes.update(b"text\r\n")
    for _ in range(1000):
        hashes.update(b"\r\n" * 1000)
    assert hashes._stages[0].pairs == 1_000_001         # no megabytes held
    assert hashes.digests()[(b"simple", "sha256")] == hashlib.sha256(b"text\r\n").digest()


def test_digests_from_pieces_are_computed_once_per_pass():
    passes = []

    def pieces():
        passes.append(1)
        return iter([BODY[:1000], BODY[1000:]])

    digests = BodyDigests(pieces)
    first = digests.digests(WANTED)
    assert digests.digest(b"simple", "sha256") == first[(b"simple", "sha256")]
    assert len(passes) == 1
    assert first == BodyDigests.of_message(HEAD + BODY).digests(WANTED)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    store = KeyStore(str(tmp_path_factory.mktemp("keys") / "dkim"), "ed25519-sha256", "mail",
                     clock=clock_at(1768478400))
    store.ensure(["example.test"])
    return store


def streamed(message):
    """The header section alone plus the BodyDigests of the body, as a body
    in the spool's file reaches the signer and the checks."""
    head, body = split_message(message)
    return head + b"\r\n", BodyDigests(lambda: iter([body[:777], body[777:]]))


def test_signing_with_body_digests_is_dkimpys_signature(keys):
    [rsa] = [k for k in keys.signing_keys("example.test") if k.key.key_type == "rsa"]
    with mock.patch("time.time", return_value=1768478400.0):
        ours = sign_message(HEAD + BODY, [rsa])
        signer = dkim.DKIM(HEAD + BODY)
        theirs = signer.sign(b"mail", b"example.test", rsa.private,
                             canonicalize=(b"relaxed", b"relaxed"),
                             include_headers=[b"from", b"to", b"subject", b"date",
                                              b"message-id", b"from"])
        front, body = streamed(HEAD + BODY)
        head_only = sign_message(front, [rsa], body)
    assert ours == theirs + HEAD + BODY
    assert head_only == theirs + front


def test_a_head_only_signature_verifies_over_the_whole_message(keys):
    front, body = streamed(HEAD + BODY)
    signed_front = sign_message(front, keys.signing_keys("example.test"), body)
    signed = signed_front + BODY
    assert dkimpy_results(signed, dnsfunc_from(keys.keys())) == {
        ("mail", "rsa-sha256"): True, ("mail-ed25519", "ed25519-sha256"): True}


class KeyLookups:
    def __init__(self, store):
        self.dnsfunc = dnsfunc_from(store.keys())

    def remaining(self):
        return 10.0

    def txt(self, name):
        record = self.dnsfunc((name + ".").encode() if not name.endswith(".") else
                              name.encode())
        return [record] if record else []


def test_verifying_with_body_digests_matches_verifying_the_whole_message(keys):
    signed = sign_message(HEAD + BODY, keys.signing_keys("example.test"))
    tampered = signed.replace(b"line 4999", b"line 9999")
    for message, expected in ((signed, "pass"), (tampered, "fail")):
        whole, _ = verify_signatures(message, KeyLookups(keys))
        front, body = streamed(message)
        head_only, _ = verify_signatures(front, KeyLookups(keys), body=body)
        assert whole == head_only
        assert {result.result for result in whole} == {expected}
    assert {r.reason for r in verify_signatures(tampered, KeyLookups(keys))[0]} == {
        "body hash did not verify"}


# -- the unsigned message's short cut (no dkimpy parse) -------------------------------

head_lines = st.lists(st.sampled_from([
    b"Subject: x", b"X-A:b", b"a:b:c", b"::x", b" folded", b"\tfolded", b"From x@y",
    b"no colon", b"DKIM-Signature: v=1", b"dkim-signature:x", b"Dkim-Signature : x",
    b"X: dkim-signature", b"", b"\r", b"X: a\rb", b"\x7f: x", b"X\x00: y"]), max_size=8)
line_ends = st.lists(st.sampled_from([b"\r\n", b"\n", b"\r\r\n"]), min_size=8, max_size=8)


@settings(max_examples=500, deadline=None)
@given(head_lines, line_ends, st.sampled_from([b"\r\nbody\r\n", b"\nbody", b""]))
def test_the_unsigned_short_cut_answers_as_dkimpy_would(lines, ends, rest):
    from appliance.policy import dkim_verify
    message = b"".join(line + end for line, end in zip(lines, ends)) + rest
    no_keys = mock.Mock(txt=lambda name: [], remaining=lambda: 5.0)
    with mock.patch.object(dkim_verify, "_surely_unsigned", lambda message: False):
        slow = verify_signatures(message, lookups=no_keys)
    fast = verify_signatures(message, lookups=no_keys)
    assert fast == slow
    if dkim_verify._surely_unsigned(message):
        assert slow == ([], 0)


def test_an_ordinary_unsigned_message_takes_the_short_cut():
    from appliance.policy import dkim_verify
    assert dkim_verify._surely_unsigned(HEAD + BODY)
    assert not dkim_verify._surely_unsigned(b"DKIM-Signature: v=1\r\n" + HEAD + BODY)

"""DKIM body canonicalisation: dkimpy's results, in linear time, without a stall."""

from unittest import mock

import dkim
import pytest
from dkim import canonicalization as dkimpy
from hypothesis import given, settings
from hypothesis import strategies as st

import dns_server
from appliance.policy import dkim_body
from appliance.policy.dkim_sign import sign_message
from appliance.policy.keys import KeyStore
from dkim_tools import mail_dkim_missing, mail_dkim_verify, zones_for

SPACES = b" " * 30000 + b"x\r\n"
HEAD = (b"From: Alice <alice@example.test>\r\nTo: bob@remote.test\r\n"
        b"Subject: spaces\r\nDate: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
        b"Message-ID: <s@example.test>\r\n\r\n")


def dkimpy_relaxed(body):
    """dkimpy's own relaxed body canonicalisation (the regular expressions)."""
    return dkimpy.correct_empty_body(dkimpy.strip_trailing_lines(
        dkimpy.compress_whitespace(dkimpy.strip_trailing_whitespace(body))))


def dkimpy_split(message):
    """dkimpy's split; MessageFormatError for what it cannot split (it
    raises IndexError for a first line that is a continuation)."""
    try:
        return dkim.rfc822_parse(message)
    except IndexError:
        raise dkim.MessageFormatError("continuation first") from None


bodies = st.lists(st.sampled_from([b" ", b"\t", b"\r", b"\n", b"\r\n", b"a", b"  ", b"\r\n\r\n"]),
                  max_size=40).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(bodies, st.integers(min_value=1, max_value=7))
def test_relaxed_and_simple_are_dkimpys(body, piece):
    with mock.patch.object(dkim_body, "SLICE", piece):
        assert dkim_body.relaxed_body(body) == dkimpy_relaxed(body)
        assert dkim_body.simple_body(body) == dkimpy.strip_trailing_lines(body)
        assert dkim_body.crlf_lines(body) == b"\r\n".join(body.replace(b"\r\n", b"\n")
                                                         .split(b"\n"))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([b"From: a@b.c", b"X: 1", b" folded", b"", b"\r", b"\n",
                                 b"\r\n", b"body"]), max_size=12).map(b"".join))
def test_the_message_is_split_as_dkimpy_splits_it(message):
    try:
        expected = dkimpy_split(message)
    except dkim.MessageFormatError:
        with pytest.raises(dkim.MessageFormatError):
            dkim_body.dkim_object(message)
        return
    ours = dkim_body.dkim_object(message)
    assert (ours.headers, ours.body) == expected


def test_dkimpy_uses_ours():
    assert dkimpy.Relaxed.canonicalize_body is dkim_body.relaxed_body
    assert dkimpy.Simple.canonicalize_body is dkim_body.simple_body


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    store = KeyStore(str(tmp_path_factory.mktemp("dkim") / "keys"), "rsa-sha256", "mail")
    store.ensure(["example.test"])
    return store


def test_mail_dkim_verifies_a_signed_body_full_of_whitespace(rsa_keys):
    missing = mail_dkim_missing()
    if missing:
        pytest.skip(missing)
    body = (b"trailing spaces   \r\n\ttabs\t and  runs \t \r\n \r\n" + SPACES
            + b"last line without trailing space\r\n\r\n\r\n")
    signed = sign_message(HEAD + body, rsa_keys.signing_keys("example.test"))
    with dns_server.DNSServer(zones_for(rsa_keys.keys())) as dns:
        overall, _ = mail_dkim_verify(signed, dns.host, dns.port)
        changed, _ = mail_dkim_verify(signed.replace(b"tabs", b"tabz"), dns.host, dns.port)
    assert (overall, changed) == ("pass", "fail")

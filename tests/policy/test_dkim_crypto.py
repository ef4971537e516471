"""DKIM signatures through OpenSSL (appliance.policy.dkim_crypto) and the key cache.

The RSA step runs in OpenSSL, the rest is dkimpy's: the signatures must be
the very bytes dkimpy's pure-Python RSA makes (RSASSA-PKCS1-v1_5 is
deterministic), and two independent verifiers must accept them: Perl's
Mail::DKIM (RSA; Debian 12's predates Ed25519) and OpenDKIM (RSA and
Ed25519), each for relaxed and simple canonicalisation.
"""

import calendar

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization

import dns_server
from appliance.policy import dkim_crypto
from appliance.policy.dkim_crypto import OpenSSLKey
from appliance.policy.dkim_sign import sign_message
from appliance.policy.keys import KeyStore
from appliance.testing import clock_at
from dkim_tools import (
    dkimpy_results, dnsfunc_from, mail_dkim_missing, mail_dkim_verify, opendkim_missing,
    opendkim_verify, zones_for)
from stall_probe import LIMIT, worst_wait_while

DAY = calendar.timegm((2026, 1, 15, 12, 0, 0))
MESSAGE = (b"From: Alice <alice@example.test>\r\n"
           b"To: Bob <bob@remote.test>\r\n"
           b"Subject: signed  through\r\n\tOpenSSL\r\n"
           b"Date: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
           b"Message-ID: <1@example.test>\r\n"
           b"\r\n"
           b"Hello Bob,  \r\n"
           b"\tspaces and tabs\t \r\n"
           b"\r\n\r\n")
CANONICALISATIONS = [(b"relaxed", b"relaxed"), (b"simple", b"simple")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    keys = KeyStore(str(tmp_path_factory.mktemp("dkim") / "keys"), "ed25519-sha256", "mail",
                    clock=clock_at(DAY))
    keys.ensure(["example.test"])
    return keys


def key_of(store, key_type):
    [key] = [k for k in store.signing_keys("example.test") if k.key.key_type == key_type]
    return key


def pem_of(signing_key):
    return signing_key.private.private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())


@pytest.fixture
def no_python_rsa(monkeypatch):
    """dkimpy's pure-Python RSA fails the test if anything reaches it."""
    def refuse(*args):
        raise AssertionError("dkimpy's pure-Python RSA was used")
    monkeypatch.setattr(dkim.crypto, "rsa_decrypt", refuse)
    monkeypatch.setattr(dkim.crypto, "parse_private_key", refuse)


def test_installed_at_import_in_front_of_dkimpy():
    assert dkim_crypto.installed()
    dkim_crypto.install()           # again: still one layer
    original = dkim.RSASSA_PKCS1_v1_5_sign.dkim_original
    assert not hasattr(original, "dkim_original")


def test_rsa_keys_are_loaded_into_openssl_once(store):
    first, second = key_of(store, "rsa"), key_of(store, "rsa")
    assert isinstance(first.private, OpenSSLKey) and first.private.key_size == 2048
    assert first.private is second.private         # the loaded key, not the file again
    assert "BEGIN" not in repr(first.private)      # no key material in logs


@pytest.mark.parametrize("canonicalize", CANONICALISATIONS, ids=lambda c: c[0].decode())
def test_openssl_signs_the_same_bytes_as_dkimpys_python_rsa(store, monkeypatch,
                                                            canonicalize):
    monkeypatch.setattr(dkim.time, "time", lambda: DAY)       # t= the same in both
    rsa = key_of(store, "rsa")
    ours = sign_message(MESSAGE, [rsa], canonicalize=canonicalize)
    pem = pem_of(rsa)
    theirs = dkim.sign(MESSAGE, b"mail", b"example.test", pem, canonicalize=canonicalize,
                       include_headers=[b"from", b"to", b"subject", b"date", b"message-id",
                                        b"from"])
    assert ours == theirs + MESSAGE


def test_a_pem_still_signs_with_dkimpys_own_code(store):
    """Every other caller in the process (a PEM): dkimpy as before."""
    rsa = key_of(store, "rsa")
    pem = pem_of(rsa)
    signed = dkim.sign(MESSAGE, b"mail", b"example.test", pem) + MESSAGE
    assert dkimpy_results(signed, dnsfunc_from(store.keys())) == {("mail", "rsa-sha256"): True}


@pytest.mark.parametrize("canonicalize", CANONICALISATIONS, ids=lambda c: c[0].decode())
def test_dkimpy_verifies_both_algorithms(store, no_python_rsa, canonicalize):
    signed = sign_message(MESSAGE, store.signing_keys("example.test"), canonicalize=canonicalize)
    assert dkimpy_results(signed, dnsfunc_from(store.keys())) == {
        ("mail", "rsa-sha256"): True, ("mail-ed25519", "ed25519-sha256"): True}


@pytest.mark.parametrize("canonicalize", CANONICALISATIONS, ids=lambda c: c[0].decode())
def test_mail_dkim_verifies_rsa_through_dns(store, no_python_rsa, canonicalize):
    missing = mail_dkim_missing()
    if missing:
        pytest.skip(missing)
    signed = sign_message(MESSAGE, [key_of(store, "rsa")], canonicalize=canonicalize)
    with dns_server.DNSServer(zones_for(store.keys())) as dns:
        overall, signatures = mail_dkim_verify(signed, dns.host, dns.port)
        forged, _ = mail_dkim_verify(signed.replace(b"Hello Bob", b"Hello Eve"),
                                     dns.host, dns.port)
    assert (overall, signatures) == ("pass", {("mail", "rsa-sha256"): "pass"})
    assert forged == "fail"


@pytest.mark.parametrize("canonicalize", CANONICALISATIONS, ids=lambda c: c[0].decode())
def test_opendkim_verifies_rsa_and_ed25519(store, no_python_rsa, canonicalize):
    missing = opendkim_missing()
    if missing:
        pytest.skip(missing)
    signed = sign_message(MESSAGE, store.signing_keys("example.test"), canonicalize=canonicalize)
    assert opendkim_verify(signed, store.keys()) == {
        ("mail", "rsa-sha256"): "pass", ("mail-ed25519", "ed25519-sha256"): "pass"}
    forged = signed.replace(b"Hello Bob", b"Hello Eve")
    assert opendkim_verify(forged, store.keys()) == {
        ("mail", "rsa-sha256"): "fail", ("mail-ed25519", "ed25519-sha256"): "fail"}


def test_a_rotation_drops_the_loaded_keys_and_signs_with_the_new_ones(tmp_path):
    store = KeyStore(str(tmp_path / "keys"), "rsa-sha256", "mail", clock=clock_at(DAY))
    store.ensure(["example.test"])
    [old] = store.signing_keys("example.test")
    # Another process (the CLI, the admin shell's thread) rotates.
    made, _ = KeyStore(str(tmp_path / "keys"), "rsa-sha256", "mail",
                       clock=clock_at(DAY)).rotate("example.test")
    [new] = store.signing_keys("example.test")
    assert new.key.selector == made[0].selector == "mail-20260115"
    assert new.private is not old.private
    assert list(store._private) == [(new.key.file, new.key.public)]
    signed = sign_message(MESSAGE, [new])
    assert dkimpy_results(signed, dnsfunc_from(store.keys())) == {
        ("mail-20260115", "rsa-sha256"): True}


def test_an_unknown_hash_is_a_dkim_error(store):
    with pytest.raises(dkim.ParameterError):
        key_of(store, "rsa").private.sign_digest("md5", b"\0" * 16)


def test_signing_2_mb_messages_leaves_the_reactor_free(store, no_python_rsa):
    """Issue 16: the dkim-sign pool signs while the reactor answers (RSA in
    OpenSSL with the GIL released, the body in slices): another client
    waits no more than issue 17's 100 ms."""
    line = b"A line of a large attachment, base64 or not, as users send them.\r\n"
    big = MESSAGE + line * (2 * 1024 * 1024 // len(line))
    keys = store.signing_keys("example.test")
    worst, took, signed = worst_wait_while(
        lambda: [sign_message(big, keys) for _ in range(4)][-1])
    assert worst < LIMIT, f"another client waited {worst:.3f} s while signing ({took:.3f} s)"
    assert dkimpy_results(signed, dnsfunc_from(store.keys())) == {
        ("mail", "rsa-sha256"): True, ("mail-ed25519", "ed25519-sha256"): True}

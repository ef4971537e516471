"""OAuth2 bearer tokens: JWTs checked offline against a JWKS file."""

import hashlib
import hmac
import json
import os

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet import task

from appliance.auth.accounts import BackendUnavailable
from appliance.auth.oauth2 import InvalidToken, JWKSError, TokenVerifier, load_jwks
from appliance.testing import clock_at, make_config

ISSUER = "https://id.example.test"
AUDIENCE = "mail.example.test"
NOW = 1_700_000_000


class Issuer:
    """An identity provider for tests: keys, a JWKS file, tokens."""

    def __init__(self, directory):
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.path = str(directory / "jwks.json")
        self.write([self.jwk(self.rsa, "rsa1"), self.jwk(self.ec, "ec1")])

    @staticmethod
    def jwk(key, kid, **extra):
        algorithm = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
        entry = json.loads(algorithm.to_jwk(key.public_key()))
        entry.update(kid=kid, **extra)
        return entry

    def write(self, keys):
        with open(self.path, "w", encoding="utf-8") as handle:
            json.dump({"keys": keys}, handle)

    def token(self, key=None, kid="rsa1", alg="RS256", **claims):
        payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600, "iat": NOW,
                   "email": "alice@example.test", "email_verified": True, "sub": "1234"}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key if key is not None else self.rsa, algorithm=alg,
                          headers={"kid": kid} if kid else None)


@pytest.fixture
def issuer(tmp_path):
    return Issuer(tmp_path)


@pytest.fixture
def clock():
    return clock_at(NOW)


@pytest.fixture
def verifier(issuer, clock):
    v = TokenVerifier(ISSUER, AUDIENCE, issuer.path, clock=clock)
    v.load()
    return v


def test_good_rs256_and_es256_tokens(issuer, verifier):
    assert verifier.verify(issuer.token()) == "alice@example.test"
    assert verifier.verify(issuer.token(issuer.ec, "ec1", "ES256")) == "alice@example.test"


def test_email_verified_as_a_string_is_understood(issuer, verifier):
    assert verifier.verify(issuer.token(email_verified="true")) == "alice@example.test"


def test_leeway_on_expiry_and_not_before(issuer, verifier, clock):
    token = issuer.token(exp=NOW - 30, nbf=NOW + 30)
    assert verifier.verify(token) == "alice@example.test"


@pytest.mark.parametrize("claims,reason", [
    ({"exp": NOW - 3600}, "expired"),
    ({"nbf": NOW + 3600}, "not yet valid"),
    ({"iss": "https://evil.test"}, "wrong issuer"),
    ({"aud": "other-service"}, "wrong audience"),
    ({"email": None}, "no email claim"),
    ({"email": 42}, "no email claim"),
    ({"email_verified": False}, "email not verified"),
    ({"email_verified": None}, "email not verified"),       # issue 17: absent
    ({"email_verified": "false"}, "email not verified"),
    ({"email_verified": 1}, "email not verified"),
    ({"exp": None}, "no exp claim"),
    ({"exp": "tomorrow"}, "malformed"),
])
def test_refused_claims(issuer, verifier, claims, reason):
    with pytest.raises(InvalidToken, match=reason):
        verifier.verify(issuer.token(**claims))


def test_expiry_follows_the_injected_clock(issuer, verifier, clock):
    token = issuer.token()
    clock.advance(3600 + 61)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token)


def test_wrongly_signed_token(issuer, verifier):
    """Same kid and algorithm, another private key: the signature fails."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(issuer.token(other))


def test_tampered_payload(issuer, verifier):
    header, payload, signature = issuer.token().split(".")
    forged = jwt.utils.base64url_encode(json.dumps({
        "iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600,
        "email": "mallory@example.test"}).encode()).decode()
    with pytest.raises(InvalidToken, match="bad signature"):
        verifier.verify(".".join((header, forged, signature)))


def test_unknown_kid(issuer, verifier):
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(issuer.token(kid="rotated-away"))


def test_algorithm_must_match_the_key(issuer, verifier):
    """An ES256 key id with an RS256 header (and the other way round)."""
    with pytest.raises(InvalidToken, match="algorithm"):
        verifier.verify(issuer.token(kid="ec1"))


def test_hmac_with_the_public_key_as_secret_fails(issuer, verifier):
    """The classic confusion: HS256 signed with the RSA public key's PEM."""
    pem = issuer.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = jwt.utils.base64url_encode(json.dumps(
        {"alg": "HS256", "typ": "JWT", "kid": "rsa1"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600,
         "email": "alice@example.test"}).encode())
    signature = jwt.utils.base64url_encode(
        hmac.new(pem, header + b"." + payload, hashlib.sha256).digest())
    token = b".".join((header, payload, signature)).decode()
    with pytest.raises(InvalidToken, match="algorithm"):
        verifier.verify(token)


def test_alg_none_fails(issuer, verifier):
    header = jwt.utils.base64url_encode(json.dumps({"alg": "none", "kid": "rsa1"}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(
        {"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 3600,
         "email": "alice@example.test"}).encode())
    with pytest.raises(InvalidToken):
        verifier.verify((header + b"." + payload + b".").decode())


@pytest.mark.parametrize("token", ["", "not.a.jwt", "a" * 9000, "x.y", None])
def test_garbage(verifier, token):
    with pytest.raises(InvalidToken):
        verifier.verify(token)


def test_key_rotation_is_picked_up(issuer, verifier, clock):
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = issuer.token(new_key, kid="rsa2")
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(token)
    issuer.write([issuer.jwk(new_key, "rsa2")])
    os.utime(issuer.path, ns=(1, 1))          # a changed mtime whatever the clock
    clock.advance(10)
    assert verifier.verify(token) == "alice@example.test"


def test_a_broken_rotation_keeps_the_old_keys(issuer, verifier, clock):
    with open(issuer.path, "w", encoding="utf-8") as handle:
        handle.write('{"keys": [')
    clock.advance(10)
    assert verifier.verify(issuer.token()) == "alice@example.test"


def test_no_keys_at_all_is_a_temporary_failure(tmp_path, issuer):
    v = TokenVerifier(ISSUER, AUDIENCE, str(tmp_path / "missing.json"), clock=task.Clock())
    with pytest.raises(BackendUnavailable):
        v.verify(issuer.token())


@pytest.mark.parametrize("content,message", [
    ("", "not JSON"), ("[]", "no \"keys\" list"),
    ('{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}', "no RS256 or ES256"),
    ('{"keys": [{"kty": "EC", "crv": "P-384", "x": "a", "y": "b"}]}', "no RS256 or ES256"),
])
def test_unusable_jwks_files(tmp_path, content, message):
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(JWKSError, match=message):
        load_jwks(str(path))


def test_encryption_keys_are_ignored(tmp_path, issuer):
    issuer.write([issuer.jwk(issuer.rsa, "enc", use="enc")])
    with pytest.raises(JWKSError):
        load_jwks(issuer.path)


def test_from_config(tmp_path, issuer):
    assert TokenVerifier.from_config(make_config(base_dir=str(tmp_path))) is None
    cfg = make_config(base_dir=str(tmp_path), auth={
        "oauth2_issuer": ISSUER, "oauth2_audience": AUDIENCE,
        "oauth2_jwks_file": issuer.path})
    v = TokenVerifier.from_config(cfg)
    assert (v.issuer, v.audience, v.jwks_path) == (ISSUER, AUDIENCE, issuer.path)

"""OAuth2 bearer tokens (JWTs) checked offline for XOAUTH2 and OAUTHBEARER.

The operator exports the identity provider's public keys to ``[auth]
oauth2_jwks_file`` (a JWKS document). A token is accepted when it is signed
by one of those keys with RS256 or ES256, names ``oauth2_issuer`` and
``oauth2_audience``, is inside its ``nbf``..``exp`` window on our clock
(with a small leeway) and carries an ``email`` claim with ``email_verified``
true: that address names the account. The JWKS file is re-read when it changes (key rotation), checked
at most once every few seconds.

PyJWT does the signature and the issuer/audience checks; the time checks
are ours so that the clock is injectable. The algorithm comes from the key,
never from the token's header alone: ``none`` and HMAC tokens (signed with a
public key as the "secret") cannot pass.
"""

import json

import jwt

from appliance.auth.accounts import BackendUnavailable, BadCredentials
from appliance.clock import default_clock
from appliance.durable.files import FileWatch

ALGORITHMS = ("RS256", "ES256")
LEEWAY = 60.0               # seconds of clock skew tolerated on exp and nbf
MAX_TOKEN = 8192            # characters; real access tokens are 1-2 KB


class InvalidToken(BadCredentials):
    """The token does not authenticate anyone (reason in the message)."""


class JWKSError(Exception):
    """The JWKS file cannot be used (message is one line)."""


def load_jwks(path):
    """``{kid or None: SigningKey}`` from a JWKS file; JWKSError if unusable."""
    try:
        with open(path, encoding="utf-8") as handle:
            document = json.load(handle)
    except OSError as exc:
        raise JWKSError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise JWKSError(f"{path} is not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JWKSError(f"{path}: no \"keys\" list (a JWKS document is expected)")
    keys = {}
    for entry in entries:
        key = _signing_key(entry)
        if key is not None:
            keys.setdefault(entry.get("kid"), key)
    if not keys:
        raise JWKSError(f"{path}: no RS256 or ES256 signing key")
    return keys


class SigningKey:
    """A public key and the one algorithm it verifies."""

    __slots__ = ("algorithm", "key")

    def __init__(self, algorithm, key):
        self.algorithm, self.key = algorithm, key


def _signing_key(entry):
    """A SigningKey for an RS256/ES256 signature key entry, else None."""
    if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
        return None
    algorithm = entry.get("alg") or {"RSA": "RS256", "EC": "ES256"}.get(entry.get("kty"))
    if algorithm not in ALGORITHMS:
        return None
    if algorithm == "ES256" and entry.get("crv") != "P-256":
        return None
    try:
        return SigningKey(algorithm, jwt.PyJWK(entry, algorithm).key)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        return None


class TokenVerifier:
    """``verify(token) -> email`` for tokens of one issuer and audience.

    ``clock`` (an IReactorTime, a ``task.Clock`` in tests) gives the time
    for the token's ``exp``/``nbf`` and paces the JWKS file checks.
    """

    def __init__(self, issuer, audience, jwks_path, clock=None,
                 check_interval=5.0, leeway=LEEWAY):
        self.issuer = issuer
        self.audience = audience
        self.jwks_path = jwks_path
        self.clock = default_clock(clock)
        self._watch = FileWatch([jwks_path], self.clock, check_interval)
        self._leeway = leeway
        self._keys = None

    @classmethod
    def from_config(cls, cfg):
        """A verifier when ``[auth] oauth2_*`` are set, else None."""
        auth = cfg.auth
        if not (auth.oauth2_issuer and auth.oauth2_audience and auth.oauth2_jwks_file):
            return None
        return cls(auth.oauth2_issuer, auth.oauth2_audience, auth.oauth2_jwks_file)

    def load(self):
        """Read the JWKS now; JWKSError if it cannot be used (start-up)."""
        self._keys = load_jwks(self.jwks_path)
        self._watch.loaded = self._watch.current()
        self._watch.looked()

    def verify(self, token):
        """The token's email claim (a str); InvalidToken otherwise, or
        BackendUnavailable when no keys can be read at all."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN:
            raise InvalidToken("malformed token")
        key = self._key_for(token)
        claims = self._decode(token, key)
        self._check_times(claims)
        return self._email(claims)

    # -- keys -------------------------------------------------------------

    def _current_keys(self):
        if self._watch.due() or self._keys is None:
            signature = self._watch.current()
            if self._keys is None or signature != self._watch.loaded:
                try:
                    self._keys, self._watch.loaded = load_jwks(self.jwks_path), signature
                except JWKSError as exc:
                    if self._keys is None:
                        raise BackendUnavailable(str(exc)) from None
                    # A rotation caught half-written: keep the keys we have.
        return self._keys

    def _key_for(self, token):
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        keys = self._current_keys()
        kid = header.get("kid")
        key = keys.get(kid)
        if key is None and kid is None and len(keys) == 1:
            key = next(iter(keys.values()))
        if key is None:
            raise InvalidToken("signed with an unknown key")
        if header.get("alg") != key.algorithm:
            raise InvalidToken("algorithm does not match the key")
        return key

    # -- claims -------------------------------------------------------------

    def _decode(self, token, key):
        options = {"verify_exp": False, "verify_nbf": False, "verify_iat": False,
                   "require": ["exp", "iss", "aud"]}
        try:
            return jwt.decode(token, key.key, algorithms=[key.algorithm],
                              audience=self.audience, issuer=self.issuer, options=options)
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad signature") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("wrong issuer") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("wrong audience") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"no {exc.claim} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("malformed token") from None

    def _check_times(self, claims):
        now = self.clock.seconds()
        exp, nbf = claims.get("exp"), claims.get("nbf")
        if not _is_number(exp) or (nbf is not None and not _is_number(nbf)):
            raise InvalidToken("malformed time claims")
        if now > exp + self._leeway:
            raise InvalidToken("expired")
        if nbf is not None and now + self._leeway < nbf:
            raise InvalidToken("not yet valid")

    @staticmethod
    def _email(claims):
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise InvalidToken("no email claim")
        # OpenID Connect: the provider vouches for the address only when it
        # says so. A token without the claim (or with false) names an
        # address anyone could have typed into their profile at the provider.
        verified = claims.get("email_verified")
        if isinstance(verified, str):
            verified = verified.lower() == "true"   # some providers send a string
        if verified is not True:
            raise InvalidToken("email not verified")
        return email


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)

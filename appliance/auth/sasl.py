"""SASL mechanisms, independent of the protocol that carries them.

SMTP AUTH (RFC 4954), IMAP AUTHENTICATE (RFC 3501) and POP3 AUTH (RFC 5034)
all send base64 responses on lines, ``*`` to cancel and ``=`` for an empty
initial response; ``decode_response`` reads them strictly. A mechanism is a
small state machine made fresh for each exchange::

    mechanism = mechanisms.create("PLAIN")
    d = mechanism.step(initial_response_or_None)   # Deferred
    # fires with Challenge(bytes): send it, feed the client's answer to step()
    #         or Account: authenticated
    # fails with Malformed (501 5.5.2), BadCredentials (535 5.7.8) or
    #         BackendUnavailable (454 4.7.0)

``mechanism.identity`` is who the client claimed to be (for the event log;
never the password or token).
"""

import base64
import hashlib
import hmac
import os
import binascii
import json
import re

from twisted.internet import defer

from appliance.auth.accounts import BadCredentials
from appliance.auth.users import UsersError, canonical_address

MAX_FIELD = 1024        # octets of one PLAIN/LOGIN field: names and passwords are short
_BASE64 = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?\Z")


class SASLError(Exception):
    """The exchange cannot go on."""


class Malformed(SASLError):
    """Not base64, wrong field count, not UTF-8: ``501 5.5.2``."""


class Aborted(SASLError):
    """The client sent ``*``: ``501 5.7.0``."""


class Challenge:
    """A server challenge (raw bytes; the protocol base64-encodes it)."""

    __slots__ = ("data",)

    def __init__(self, data=b""):
        self.data = data

    def __repr__(self):
        return f"Challenge({self.data!r})"


_KEY = os.urandom(32)       # per process, never written anywhere


def fingerprint(account, secret):
    """The HMAC that stands for (``account``, ``secret``) in memory;
    ``secret`` is the password or token (str or bytes)."""
    if isinstance(secret, str):
        secret = secret.encode("utf-8", "surrogatepass")
    message = account.lower().encode("utf-8", "surrogatepass") + b"\0" + secret
    return hmac.new(_KEY, message, hashlib.sha256).hexdigest()


def decode_response(line):
    """A client response line (bytes) -> the raw bytes it carries.

    ``*`` aborts; ``=`` (an initial response) and an empty line (a
    continuation) are the empty response (RFC 4954 §4); anything but
    canonical base64 (padding, alphabet, no spaces, nothing after it) is
    Malformed. Stock Twisted decodes leniently (T5).
    """
    line = line.strip(b" ")
    if line == b"*":
        raise Aborted("cancelled by the client")
    if line in (b"=", b""):
        return b""
    if not _BASE64.match(line):
        raise Malformed("not base64")
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise Malformed("not base64") from None


def respond(mechanism, line):
    """Feed the client's response ``line`` (base64, or None for no initial
    response) to ``mechanism``: a Deferred of its next Challenge or Account."""
    if line is None:
        return defer.maybeDeferred(mechanism.step, None)
    d = defer.maybeDeferred(decode_response, line)
    d.addCallback(mechanism.step)
    return d


def encode_challenge(data):
    return base64.b64encode(data)


def _text(raw, what):
    if len(raw) > MAX_FIELD:
        raise Malformed(f"{what} too long")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed(f"{what} is not UTF-8") from None


def same_identity(one, other):
    """Do two login names name the same account (case, IDNA)?"""
    try:
        return canonical_address(one) == canonical_address(other)
    except UsersError:
        return one == other


class Mechanism:
    """One exchange. Subclasses set ``name`` and implement ``_step``."""

    name = ""
    needs_tls = True

    def __init__(self, accounts):
        self.accounts = accounts
        self.identity = ""
        #: An HMAC standing for (identity, secret) once a secret was seen
        #: (``fingerprint`` above): the same wrong
        #: password again counts as one failure. Never the secret itself.
        self.fingerprint = None
        self._done = False

    def step(self, response):
        """Deferred[Challenge or Account] for the client's ``response``
        (raw bytes, or None when AUTH came without an initial response)."""
        if self._done:
            return defer.fail(Malformed("exchange already finished"))
        return defer.maybeDeferred(self._step, response)

    def _authenticate(self, username, password):
        self._done = True
        self.identity = username
        if not password:
            raise BadCredentials("empty password")
        self.fingerprint = fingerprint(username, password)
        return self.accounts.authenticate(username, password)


class Plain(Mechanism):
    """RFC 4616: ``authzid NUL authcid NUL passwd``."""

    name = "PLAIN"

    def _step(self, response):
        if response is None:
            return Challenge(b"")
        fields = response.split(b"\0")
        if len(fields) != 3:            # T6: stock crashes on two fields
            self._done = True
            raise Malformed("PLAIN needs authzid NUL authcid NUL password")
        authzid, authcid, password = (_text(f, "field") for f in fields)
        if not authcid:
            self._done = True
            raise Malformed("empty authentication identity")
        if authzid and not same_identity(authzid, authcid):
            self._done = True           # T5: stock silently drops the authzid
            self.identity = authcid
            raise BadCredentials("authorization identity differs from the user")
        return self._authenticate(authcid, password)


class Login(Mechanism):
    """The LOGIN mechanism (draft-murchison-sasl-login): user, then password."""

    name = "LOGIN"

    def __init__(self, accounts):
        super().__init__(accounts)
        self._username = None

    def _step(self, response):
        if self._username is None:
            if response is None:
                return Challenge(b"Username:")
            self._username = _text(response, "user name")
            if not self._username:
                self._done = True
                raise Malformed("empty user name")
            self.identity = self._username
            return Challenge(b"Password:")
        if response is None:
            raise Malformed("password missing")
        return self._authenticate(self._username, _text(response, "password"))


class _OAuthMechanism(Mechanism):
    """Bearer tokens (JWTs) checked offline, then the account looked up.

    On a bad token the server sends a JSON error as a challenge and fails
    after the client's (empty) answer (RFC 7628 §3.2.3; XOAUTH2 does the same).
    """

    error_status = "invalid_token"

    def __init__(self, accounts, verifier):
        super().__init__(accounts)
        self.verifier = verifier
        self._failure = None

    def _step(self, response):
        if self._failure is not None:
            self._done = True
            raise self._failure
        if response is None:
            return Challenge(b"")
        user, token = self._parse(response)
        self.identity = user
        self.fingerprint = fingerprint(user, token)
        try:
            email = self.verifier.verify(token)
        except BadCredentials as error:
            return self._fail(error)
        if user and not same_identity(user, email):
            return self._fail(BadCredentials("user does not match the token"))
        self.identity = email
        d = self.accounts.account(email)
        d.addCallback(self._found)
        return d

    def _found(self, account):
        self._done = True
        if account is None:
            raise BadCredentials("no account for the token's email")
        return account

    def _fail(self, error):
        self._failure = error
        body = {"status": self.error_status, "schemes": "bearer", "scope": "email"}
        return Challenge(json.dumps(body, separators=(",", ":")).encode("ascii"))

    @staticmethod
    def _pairs(data):
        """``key=value`` pairs separated by ^A, ended by ^A^A."""
        if not data.endswith(b"\x01\x01"):
            raise Malformed("missing ^A^A terminator")
        pairs = {}
        for item in data[:-2].split(b"\x01"):
            key, sep, value = item.partition(b"=")
            if not sep or not key:
                raise Malformed("not key=value")
            pairs[_text(key, "key")] = value
        return pairs

    @staticmethod
    def _bearer(pairs):
        auth = pairs.get("auth", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            raise Malformed("no Bearer token")
        try:
            return token.strip().decode("ascii")
        except UnicodeDecodeError:
            raise Malformed("token is not ASCII") from None


class XOAuth2(_OAuthMechanism):
    """Google's XOAUTH2: ``user=U ^A auth=Bearer T ^A ^A``."""

    name = "XOAUTH2"
    error_status = "401"

    def _parse(self, response):
        if not response.startswith(b"user="):
            raise Malformed("XOAUTH2 starts with user=")
        pairs = self._pairs(response)
        return _text(pairs.get("user", b""), "user"), self._bearer(pairs)


class OAuthBearer(_OAuthMechanism):
    """RFC 7628: ``n,a=U, ^A host=... ^A port=... ^A auth=Bearer T ^A ^A``."""

    name = "OAUTHBEARER"

    def _parse(self, response):
        header, sep, rest = response.partition(b"\x01")
        if not sep:
            raise Malformed("no GS2 header")
        user = self._gs2_user(header)
        return user, self._bearer(self._pairs(rest))

    @staticmethod
    def _gs2_user(header):
        """``n,a=user,`` -> user ("" without ``a=``); channel binding refused."""
        parts = header.split(b",")
        if len(parts) != 3 or parts[0] not in (b"n", b"y") or parts[2]:
            raise Malformed("bad GS2 header")
        if not parts[1]:
            return ""
        if not parts[1].startswith(b"a="):
            raise Malformed("bad GS2 authzid")
        value = _text(parts[1][2:], "authzid")
        if re.search(r"=(?!2C|3D)", value):
            raise Malformed("bad escape in authzid")
        return value.replace("=2C", ",").replace("=3D", "=")


class Mechanisms:
    """The mechanisms a server offers, over one ``IAccounts``.

    ``verifier`` (an ``appliance.auth.oauth2.TokenVerifier``) enables
    XOAUTH2 and OAUTHBEARER; without it only PLAIN and LOGIN are offered.
    """

    def __init__(self, accounts, verifier=None):
        self.accounts = accounts
        self.verifier = verifier

    def names(self):
        names = ["PLAIN", "LOGIN"]
        if self.verifier is not None:
            names += ["XOAUTH2", "OAUTHBEARER"]
        return names

    def create(self, name):
        """A fresh mechanism for ``name`` (any case), or None if not offered."""
        name = name.upper()
        if name not in self.names():
            return None
        if name == "PLAIN":
            return Plain(self.accounts)
        if name == "LOGIN":
            return Login(self.accounts)
        cls = XOAuth2 if name == "XOAUTH2" else OAuthBearer
        return cls(self.accounts, self.verifier)

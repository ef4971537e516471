"""Accounts: who may log in, and which addresses each may send as.

One interface for every protocol (SMTP AUTH now, IMAP and POP3 later) and
every backend (the users file here, LDAP in ``appliance.auth.ldap``):

- ``authenticate(address, password) -> Deferred[Account]``, failing with
  ``BadCredentials`` (wrong password, unknown user, empty password) or
  ``BackendUnavailable`` (a temporary failure: the directory is down);
- ``account(address) -> Deferred[Account or None]``, a lookup without a
  password (an OAuth2 token names the account; the token is the proof).

``AccountsChecker`` adapts any ``IAccounts`` to ``twisted.cred``'s
``ICredentialsChecker`` for protocols built on a cred portal.
"""

from dataclasses import dataclass

from twisted.cred import credentials, error
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet import defer
from zope.interface import Interface, implementer

from appliance.auth.users import UsersError, base_address, canonical_address


class AuthError(Exception):
    """Authentication did not succeed (base class)."""


class BadCredentials(AuthError):
    """Wrong password, unknown account or empty password: ``535 5.7.8``."""


class BackendUnavailable(AuthError):
    """The account store cannot answer now: ``454 4.7.0``, try later."""


@dataclass(frozen=True)
class Account:
    """An authenticated identity.

    ``address`` is the canonical login address; ``addresses`` every canonical
    address it may use as a sender (its own first).
    """

    address: str
    addresses: tuple = ()

    def __post_init__(self):
        if self.address not in self.addresses:
            object.__setattr__(self, "addresses", (self.address,) + tuple(self.addresses))

    def may_send_as(self, address):
        """Is ``address`` (any case, with or without a ``+tag``) one of ours?"""
        try:
            value = canonical_address(address)
        except UsersError:
            return False
        return value in self.addresses or base_address(value) in self.addresses


class IAccounts(Interface):
    """An account store (users file, LDAP)."""

    def authenticate(address, password):
        """Deferred[Account]; errbacks with BadCredentials or
        BackendUnavailable. An empty password fails with BadCredentials
        without reaching the backend (for LDAP it would be an anonymous
        bind)."""

    def account(address):
        """Deferred[Account or None]: the account named ``address``, without
        a password check; BackendUnavailable when the store is down."""


@implementer(IAccounts)
class FileAccounts:
    """Accounts from the users file; addresses from the aliases file.

    ``users`` is a ``UsersFile``; ``directory`` a ``Directory`` (its
    ``may_send_as`` decides which aliases reach a user).
    """

    def __init__(self, users, directory):
        self._users = users
        self._directory = directory

    def authenticate(self, address, password):
        name = login_name(address)
        refusal = refuse_at_once(name, password)
        if refusal is not None:
            return refusal
        d = self._users.check_password(name, password)
        d.addCallback(self._checked, name)
        return d

    def _checked(self, ok, name):
        if not ok:
            raise BadCredentials("wrong password or unknown user")
        return self._make(name)

    def account(self, address):
        name = login_name(address)
        if name is None or self._users.lookup(name) is None:
            return defer.succeed(None)
        return defer.succeed(self._make(name))

    def _make(self, name):
        return Account(name, (name,) + self._aliases_of(name))

    def _aliases_of(self, name):
        """Explicit aliases (no catch-alls) whose expansion reaches ``name``."""
        aliases = getattr(self._directory, "aliases", None)
        if aliases is None:
            return ()
        return tuple(key for key, _ in aliases.list()
                     if not key.startswith("@") and key != name
                     and self._directory.may_send_as(name, key))


def refuse_at_once(name, password):
    """A failed Deferred for a login no backend needs to see (an empty
    password would be an anonymous LDAP bind; ``name`` None: not an
    address), else None."""
    if not password:
        return defer.fail(BadCredentials("empty password"))
    if name is None:
        return defer.fail(BadCredentials("not an address"))
    return None


def login_name(address):
    """The canonical form of a login name, or None if it is no address."""
    if not isinstance(address, str):
        return None
    try:
        return canonical_address(address)
    except UsersError:
        return None


@implementer(ICredentialsChecker)
class AccountsChecker:
    """``twisted.cred`` checker over an ``IAccounts``.

    The avatar id is the ``Account`` itself (so a realm sees its addresses).
    Bad credentials become ``UnauthorizedLogin``; ``BackendUnavailable`` is
    passed through so the protocol can answer with a temporary failure.
    """

    credentialInterfaces = (credentials.IUsernamePassword,)

    def __init__(self, accounts):
        self._accounts = accounts

    def requestAvatarId(self, creds):
        username, password = _text(creds.username), _text(creds.password)
        if username is None or password is None:
            return defer.fail(error.UnauthorizedLogin("credentials are not UTF-8"))
        d = self._accounts.authenticate(username, password)
        d.addErrback(_unauthorized)
        return d


def _unauthorized(failure):
    failure.trap(BadCredentials)
    raise error.UnauthorizedLogin(str(failure.value))


def _text(value):
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value

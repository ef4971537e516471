"""Accounts in an LDAP directory (ldap3), behind ``IAccounts``.

A login is checked the way Postfix and Dovecot do it:

1. on a pooled connection bound as the service account (``[auth]
   ldap_bind_dn`` / ``ldap_bind_password_file``; anonymous when both are
   empty), search ``ldap_base_dn`` with ``ldap_user_filter`` in which
   ``{address}`` is the login, escaped per RFC 4515 -- exactly one entry must
   match (none or several: bad credentials);
2. on a second pooled connection, used only for this, bind as the entry's DN
   with the given password: ``invalidCredentials`` is a wrong password,
   anything else the directory says or does not say is "unavailable".

An empty password never reaches the directory: a simple bind with a DN and no
password is an *unauthenticated* bind (RFC 4513 5.1.2) that some servers
answer with success. An account's sender addresses are the values of
``ldap_address_attributes``, canonical, the first one being the account's
address (its mailbox).

Transport: ``ldaps://``, or ``ldap://`` with StartTLS when ``ldap_starttls``
is on; the certificate is verified against ``ldap_ca_file`` or the system
store, host name included. ldap3 is synchronous, so every call runs through
``run_in_thread`` (a small dedicated thread pool in the server). Sockets have
connect and receive timeouts, and every answer has an overall deadline on the
reactor's clock, so a hung directory costs a client a bounded wait and a
``454 4.7.0``. A pooled connection that died while idle is replaced once,
transparently; a fresh connection that fails means the directory is down.
"""

import math
import ssl
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.protocol.sasl.sasl import validate_simple_password
from ldap3.utils.conv import escape_filter_chars
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from appliance import events
from appliance.threads import ThreadPoolService, pool_runner
from appliance.auth.accounts import (Account, BackendUnavailable, BadCredentials,
                                     FileAccounts, IAccounts, login_name, refuse_at_once)

_log = Logger(namespace="mailappliance.ldap")

events.register("ldap.unavailable",
                "the LDAP directory stopped answering; logins get 454 until it recovers",
                ("url", "error"))
events.register("ldap.recovered", "the LDAP directory answers again", ("url",))

TIMEOUT = 5.0           # seconds for a TCP connect, and for each answer awaited
DEADLINE = 3 * TIMEOUT  # the longest any caller waits for one answer
POOL_SIZE = 4           # threads, and idle connections kept per pool
LIST_LIMIT = 10_000     # list_accounts() returns at most this many
PAGE_SIZE = 500         # entries per page (RFC 2696) when listing

# result codes (RFC 4511 4.1.9)
SUCCESS = 0
SIZE_LIMIT_EXCEEDED = 4
NO_SUCH_OBJECT = 32
INVALID_CREDENTIALS = 49

# Raised by ldap3 when talking to the server fails (socket, TLS, protocol).
_COMMUNICATION = (ldap_errors.LDAPException, OSError)


class LdapConfigError(Exception):
    """The LDAP settings cannot work (one line, names the key)."""


@dataclass(frozen=True)
class LdapSettings:
    """What the client needs from ``[auth]``, checked and resolved."""

    host: str
    port: int
    use_ssl: bool           # ldaps://
    starttls: bool          # ldap:// + StartTLS
    ca_file: object         # str or None (the system store)
    bind_dn: str
    bind_password: str
    base_dn: str
    user_filter: str
    address_attributes: tuple
    timeout: float = TIMEOUT

    @property
    def url(self):
        scheme = "ldaps" if self.use_ssl else "ldap"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @classmethod
    def from_config(cls, cfg, timeout=TIMEOUT):
        """Settings from ``cfg.auth``; reads the bind password file now."""
        auth = cfg.auth
        parts = urlsplit(auth.ldap_url)
        use_ssl = parts.scheme.lower() == "ldaps"
        try:
            port = parts.port or (636 if use_ssl else 389)
        except ValueError:
            raise LdapConfigError(f"[auth] ldap_url: bad port in {auth.ldap_url!r}") from None
        password = ""
        if auth.ldap_bind_password_file:
            password = read_bind_password(auth.ldap_bind_password_file)
        return cls(host=parts.hostname, port=port, use_ssl=use_ssl,
                   starttls=not use_ssl and auth.ldap_starttls,
                   ca_file=auth.ldap_ca_file or None, bind_dn=auth.ldap_bind_dn,
                   bind_password=password, base_dn=auth.ldap_base_dn,
                   user_filter=auth.ldap_user_filter,
                   address_attributes=tuple(auth.ldap_address_attributes),
                   timeout=timeout)


def read_bind_password(path):
    """The service account's password: the file's one line, without its
    trailing newline."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise LdapConfigError(f"[auth] ldap_bind_password_file: cannot read {path}: "
                              f"{why}") from None
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if "\n" in text or "\r" in text:
        raise LdapConfigError(f"[auth] ldap_bind_password_file: {path} must hold one line")
    if not text:
        raise LdapConfigError(f"[auth] ldap_bind_password_file: {path} is empty "
                              "(an empty password would be an anonymous bind)")
    return text


def user_filter(template, value):
    """``template`` with every ``{address}`` replaced by ``value`` escaped per
    RFC 4515. (``str.replace``, not ``format``: the template may hold other
    braces, and ``format`` would evaluate ``{address.attr}``.)"""
    return template.replace("{address}", escape_filter_chars(value))


def presence_filter(template):
    """The template matching every account: ``(mail=*)`` for ``(mail={address})``."""
    return template.replace("{address}", "*")


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def account_from_entry(entry, attributes):
    """The Account of a search result entry, or None when it holds no valid
    address (it could not receive or send mail)."""
    found = []
    values = entry.get("attributes") or {}
    for name in attributes:
        raw = values.get(name) or []
        for value in raw if isinstance(raw, (list, tuple)) else [raw]:
            address = login_name(_text(value))
            if address is not None and address not in found:
                found.append(address)       # values that are no address: skipped
    if not found:
        return None
    return Account(found[0], tuple(found))


# ---------------------------------------------------------------------------
# The synchronous client (runs in the LDAP threads only)

class _ConnectionPool:
    """Idle connections, at most ``size``; each used by one thread at a time."""

    def __init__(self, size):
        self._size = size
        self._idle = []
        self._lock = threading.Lock()

    def take(self):
        """An idle connection that still looks open, or None."""
        while True:
            with self._lock:
                if not self._idle:
                    return None
                conn = self._idle.pop()
            if not conn.closed:
                return conn
            _close(conn)

    def give(self, conn):
        with self._lock:
            if len(self._idle) < self._size and not conn.closed:
                self._idle.append(conn)
                return
        _close(conn)

    def close_all(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)


def _close(conn):
    try:
        conn.unbind()
    except Exception:       # closing a dead connection: nothing left to do
        pass


class _Ambiguous(Exception):
    """Several entries match one login: it opens none of them."""


class _ConnectionLost(Exception):
    """A connection failed underneath an operation; ``cause`` says how."""

    def __init__(self, cause):
        super().__init__(_describe(cause))
        self.cause = cause


def _describe(exc):
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class LdapClient:
    """Blocking LDAP operations with two small connection pools.

    Every public method may raise ``BackendUnavailable``; ``check_password``
    also returns False for a wrong password.
    """

    def __init__(self, settings, pool_size=POOL_SIZE):
        self.settings = settings
        self._tls = _make_tls(settings)
        self._searchers = _ConnectionPool(pool_size)    # bound as the service
        self._binders = _ConnectionPool(pool_size)      # only ever bind users

    # -- connections ---------------------------------------------------------

    def _connect(self, user=None, password=None):
        """A new connection, TLS established (StartTLS or ldaps)."""
        # A Server per connection: ldap3's Server keeps mutable state (current
        # address, availability marks) that threads must not share, and that
        # would keep a restarted directory "unavailable" for a while.
        server = ldap3.Server(self.settings.host, port=self.settings.port,
                              use_ssl=self.settings.use_ssl, tls=self._tls,
                              get_info=ldap3.NONE, connect_timeout=self.settings.timeout,
                              # every address of the name, IPv4 first (the
                              # default tries only the first one)
                              mode=ldap3.IP_V4_PREFERRED)
        conn = ldap3.Connection(
            server, user=user, password=password,
            authentication=ldap3.SIMPLE if user else ldap3.ANONYMOUS,
            client_strategy=ldap3.SYNC, auto_bind=ldap3.AUTO_BIND_NONE,
            read_only=True, raise_exceptions=False, auto_referrals=False,
            # whole seconds: ldap3 packs it into SO_RCVTIMEO (0 would mean never)
            receive_timeout=max(1, math.ceil(self.settings.timeout)))
        try:
            conn.open(read_server_info=False)
            if self.settings.starttls and not conn.start_tls(read_server_info=False):
                raise ldap_errors.LDAPStartTLSError("StartTLS refused")
        except BaseException:
            _close(conn)
            raise
        return conn

    def _connect_service(self):
        conn = self._connect(self.settings.bind_dn or None,
                             self.settings.bind_password or None)
        if not self.settings.bind_dn:
            return conn                 # anonymous searches
        try:
            bound = conn.bind(read_server_info=False)
        except BaseException:
            _close(conn)
            raise
        if not bound:
            why = conn.result.get("description")
            _close(conn)
            raise BackendUnavailable(f"service account bind refused: {why}")
        return conn

    def _with(self, pool, connect, operation):
        """``operation(conn)`` on a pooled connection; if one that sat idle
        turns out dead, once more on a fresh one."""
        conn = pool.take()
        if conn is not None:
            try:
                return self._run(pool, conn, operation)
            except _ConnectionLost:
                pass                # the directory restarted, or dropped us
        try:
            conn = connect()
        except _COMMUNICATION as exc:
            raise BackendUnavailable(_describe(exc)) from None
        try:
            return self._run(pool, conn, operation)
        except _ConnectionLost as exc:
            raise BackendUnavailable(str(exc)) from None

    def _run(self, pool, conn, operation):
        try:
            result = operation(conn)
        except _COMMUNICATION as exc:
            _close(conn)
            raise _ConnectionLost(exc) from None
        except BaseException:
            _close(conn)
            raise
        pool.give(conn)
        return result

    # -- operations ------------------------------------------------------------

    def _search_on(self, conn, search_filter, size_limit, paged_size=None, cookie=None):
        """(result, entries) of one search on ``conn``."""
        settings = self.settings
        conn.search(settings.base_dn, search_filter, search_scope=ldap3.SUBTREE,
                    dereference_aliases=ldap3.DEREF_NEVER,
                    attributes=list(settings.address_attributes),
                    size_limit=size_limit, time_limit=max(1, math.ceil(settings.timeout)),
                    paged_size=paged_size, paged_cookie=cookie)
        entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        return conn.result, entries

    def _search(self, search_filter, size_limit):
        def operation(conn):
            return self._search_on(conn, search_filter, size_limit)
        return self._with(self._searchers, self._connect_service, operation)

    def _matching(self, address, limit):
        """The entries (at most ``limit``) the filter matches for ``address``."""
        result, entries = self._search(
            user_filter(self.settings.user_filter, address), size_limit=limit)
        code = result.get("result")
        if code == NO_SUCH_OBJECT:
            # nobody can log in: the operator's problem, reported as an outage
            raise BackendUnavailable(f"[auth] ldap_base_dn {self.settings.base_dn} "
                                     "does not exist")
        if code not in (SUCCESS, SIZE_LIMIT_EXCEEDED):
            raise BackendUnavailable(f"search failed: {result.get('description')}")
        return entries[:limit]

    def find(self, address):
        """The one entry whose filter matches ``address``, or None."""
        entries = self._matching(address, 2)
        if len(entries) > 1:
            raise _Ambiguous(f"{len(entries)} or more entries match")
        return entries[0] if entries else None

    def check_password(self, dn, password):
        """True if ``dn`` binds with ``password``; False if the directory
        says the credentials are invalid."""
        if not dn or not password:      # an unauthenticated bind, never
            return False

        def operation(conn):
            if conn.closed:             # ldap3 would reopen it without TLS
                raise ldap_errors.LDAPSocketOpenError("connection closed")
            conn.user, conn.password = dn, password
            conn.authentication = ldap3.SIMPLE
            try:
                conn.bind(read_server_info=False)
            finally:
                conn.password = None    # do not keep it in the pool
            return conn.result
        if not _sendable(password):
            return False
        result = self._with(self._binders, self._connect, operation)
        code = result.get("result")
        if code == SUCCESS:
            return True
        if code == INVALID_CREDENTIALS:
            return False
        raise BackendUnavailable(f"bind failed: {result.get('description')}")

    def entries(self, address, limit=2):
        """What ``user show`` needs: ``[{"dn", "addresses"}]`` of the entries
        the filter matches for ``address`` (escaped), at most ``limit`` (more
        than one: the address is ambiguous)."""
        found = []
        for entry in self._matching(address, limit):
            account = account_from_entry(entry, self.settings.address_attributes)
            found.append({"dn": entry.get("dn", ""),
                          "addresses": list(account.addresses) if account else []})
        return found

    def _find_one(self, address):
        """find(), with several matching entries counted as none."""
        try:
            return self.find(address)
        except _Ambiguous:
            return None

    def authenticate(self, address, password):
        """The Account for ``address`` and ``password``, or BadCredentials."""
        try:
            entry = self.find(address)
        except _Ambiguous as exc:
            raise BadCredentials(f"ambiguous login: {exc}") from None
        if entry is None:
            raise BadCredentials("unknown user")
        account = account_from_entry(entry, self.settings.address_attributes)
        if account is None:
            raise BadCredentials("the entry holds no address")
        if not self.check_password(entry["dn"], password):
            raise BadCredentials("wrong password")
        return account

    def account(self, address):
        entry = self._find_one(address)
        if entry is None:
            return None
        return account_from_entry(entry, self.settings.address_attributes)

    def list_accounts(self, limit=LIST_LIMIT):
        """Every account the filter matches, at most ``limit``, by address."""
        return self.listing(limit)[0]

    def listing(self, limit=LIST_LIMIT):
        """``(accounts, cut)``: as ``list_accounts``; ``cut`` is True when the
        directory ended the paged search with its own size limit
        (``sizeLimitExceeded``: OpenLDAP's default is 500 entries), so more
        entries may exist than were listed."""
        search_filter = presence_filter(self.settings.user_filter)

        def operation(conn):
            # all pages on one connection: a paging cookie belongs to it
            accounts, cookie, cut = {}, None, False
            for _ in range(limit // PAGE_SIZE + 1):     # bounded, whatever the cookie says
                result, entries = self._search_on(conn, search_filter, limit,
                                                  PAGE_SIZE, cookie)
                code = result.get("result")
                if code not in (SUCCESS, SIZE_LIMIT_EXCEEDED):
                    raise BackendUnavailable(f"search failed: {result.get('description')}")
                for entry in entries:
                    account = account_from_entry(entry, self.settings.address_attributes)
                    if account is not None:
                        accounts.setdefault(account.address, account)
                cookie = _paged_cookie(result)
                if code == SIZE_LIMIT_EXCEEDED:
                    cut = True
                    break
                if not cookie or len(accounts) >= limit:
                    break
            return accounts, cut
        accounts, cut = self._with(self._searchers, self._connect_service, operation)
        return [accounts[key] for key in sorted(accounts)][:limit], cut

    def close(self):
        self._searchers.close_all()
        self._binders.close_all()


def _sendable(password):
    """Does ``password`` survive SASLprep (RFC 4013), as ldap3 applies it?
    One that maps to nothing or holds prohibited characters cannot match."""
    try:
        return bool(validate_simple_password(password))
    except ldap_errors.LDAPException:
        return False


def _paged_cookie(result):
    control = (result.get("controls") or {}).get("1.2.840.113556.1.4.319") or {}
    return (control.get("value") or {}).get("cookie")


def _make_tls(settings):
    """ldap3's TLS settings, or None for plain ldap:// without StartTLS."""
    if not (settings.use_ssl or settings.starttls):
        return None
    try:
        return _VerifiedTls(settings.host, settings.ca_file)
    except (ldap_errors.LDAPException, OSError) as exc:   # ssl.SSLError is an OSError
        raise LdapConfigError(f"[auth] ldap_ca_file: {_describe(exc)}") from None


class _VerifiedTls(ldap3.Tls):
    """ldap3's Tls, with the verification left to the standard library.

    ldap3 turns ``check_hostname`` off and matches names itself through
    ``ssl.match_hostname``, which Python 3.12 removed (its fallback rejects IP
    addresses). Here the context verifies the chain and the host name (DNS
    name or IP address) during the handshake, for ldaps:// and StartTLS alike,
    with TLS 1.2 at least.
    """

    def __init__(self, host, ca_file):
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context
        self._host = host

    def wrap_socket(self, connection, do_handshake=False):
        connection.socket = self._context.wrap_socket(
            connection.socket, server_side=False, server_hostname=self._host,
            do_handshake_on_connect=do_handshake)


# ---------------------------------------------------------------------------
# The asynchronous face

@implementer(IAccounts)
class LdapAccounts:
    """``IAccounts`` over an ``LdapClient``.

    ``run_in_thread(f, *args) -> Deferred`` runs the blocking calls (a pool of
    ``POOL_SIZE`` threads in the server; tests may run them synchronously).
    ``clock`` (the reactor) bounds every answer by ``deadline`` seconds; None
    leaves only the socket timeouts.
    """

    _available = True           # False from an outage's first error to the next answer

    def __init__(self, client, run_in_thread, clock=None, deadline=DEADLINE):
        self._client = client
        self._run_in_thread = run_in_thread
        self._clock = clock
        self._deadline = deadline

    @classmethod
    def from_config(cls, cfg, run_in_thread, clock=None, timeout=TIMEOUT,
                    pool_size=POOL_SIZE):
        client = LdapClient(LdapSettings.from_config(cfg, timeout), pool_size)
        return cls(client, run_in_thread, clock, deadline=3 * timeout)

    @property
    def url(self):
        return self._client.settings.url

    def authenticate(self, address, password):
        name = login_name(address)
        refusal = refuse_at_once(name, password)
        if refusal is not None:
            return refusal
        return self._call(self._client.authenticate, name, password)

    def account(self, address):
        name = login_name(address)
        if name is None:
            return defer.succeed(None)
        return self._call(self._client.account, name)

    def list_accounts(self, limit=LIST_LIMIT):
        """Deferred[list[Account]] sorted by address, at most ``limit``."""
        return self._call(self._client.list_accounts, limit)

    def listing(self, limit=LIST_LIMIT):
        """Deferred[(list[Account], cut)]: ``LdapClient.listing``."""
        return self._call(self._client.listing, limit)

    def entries(self, address, limit=2):
        """Deferred[list[{"dn", "addresses"}]]: ``LdapClient.entries``."""
        name = login_name(address)
        if name is None:
            return defer.succeed([])
        return self._call(self._client.entries, name, limit)

    def close(self):
        """Deferred: the pooled connections are unbound."""
        return self._run_in_thread(self._client.close)

    def _call(self, f, *args):
        d = defer.maybeDeferred(self._run_in_thread, f, *args)
        if self._clock is not None:
            d.addTimeout(self._deadline, self._clock, onTimeoutCancel=self._timed_out)
        d.addCallbacks(self._answered, self._failed)
        return d

    def _timed_out(self, result, timeout):
        raise BackendUnavailable(f"no answer within {timeout:g}s")

    def _answered(self, result):
        self._mark_available()
        return result

    def _failed(self, failure):
        if failure.check(BadCredentials):
            self._mark_available()
            return failure
        if not failure.check(BackendUnavailable):
            # ldap3 raised something unforeseen: a temporary failure, logged
            _log.failure("LDAP call failed", failure)
            failure = Failure(BackendUnavailable(_describe(failure.value)))
        self._mark_unavailable(str(failure.value))
        return failure

    def _mark_available(self):
        if not self._available:
            self._available = True
            events.emit("ldap.recovered", url=self.url)

    def _mark_unavailable(self, error):
        if self._available:
            self._available = False
            events.emit("ldap.unavailable", url=self.url, error=error)


# ---------------------------------------------------------------------------
# Choosing the backend

def accounts_from_config(cfg, users, directory, reactor, pool=None):
    """``(accounts, service)`` for ``cfg.auth.backend``.

    ``service`` is None for the users file; for LDAP it runs ``pool`` (a
    ThreadPool of at most ``POOL_SIZE`` threads, built in ``tap.py``), closes
    the connections at stop, and must join the service tree before the
    listeners that use the accounts (a MultiService stops children in reverse
    order). Raises ``LdapConfigError`` (one line) for unusable LDAP settings.
    """
    if cfg.auth.backend != "ldap":
        return FileAccounts(users, directory), None
    accounts = LdapAccounts.from_config(cfg, pool_runner(reactor, pool), clock=reactor,
                                        pool_size=pool.max)
    service = ThreadPoolService(pool, drain=lambda: _closed_quietly(accounts))
    return accounts, service


def _closed_quietly(accounts):
    d = accounts.close()
    d.addErrback(lambda failure: None)  # unbinding a dead connection is no news
    return d

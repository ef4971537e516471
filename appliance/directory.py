"""Where does an address go: local users, aliases, catch-alls, forwards.

One resolver for the whole server (Postfix's trivial-rewrite idea): the SMTP
server asks it whether a recipient exists, the queue asks it where to deliver,
submission asks it which addresses a user may send as.

Aliases live in ``<data_dir>/aliases``, lines ``address: target, target``;
``@domain: target`` is the catch-all of that domain. The file is re-read on
change and rewritten atomically under a lock, like the users file.

Who has a mailbox comes from the users file (``Directory``, synchronous) or,
with ``[auth] backend = ldap``, from LDAP (``LdapDirectory``, Deferreds, a
short cache); ``directory_from_config`` picks one.
"""

import dataclasses
import functools

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance import events
from appliance.address import domain_of
from appliance.auth.users import (UsersError, UsersFile, WatchedFile,
                                  base_address, canonical_address)
from appliance.config import unicode_domain
from appliance.threads import ThreadPoolService, pool_runner

_log = Logger(namespace="mailappliance.directory")

events.register("aliases.reloaded", "the aliases file was (re)read after a change",
                ("path", "count"))
events.register("aliases.changed", "an alias was added, extended or deleted",
                ("path", "address", "action"))

MAX_DEPTH = 8           # alias chains longer than this are cut (and logged)


@functools.lru_cache(maxsize=4096)      # pure, and asked several times per message
def canonical_domain(domain):
    """Lower-case, U-label, no trailing dot; UsersError if not a domain."""
    try:
        return unicode_domain(domain)
    except ValueError:
        raise UsersError(f"{domain!r} is not a domain name") from None


def alias_key(address):
    """The canonical alias key: ``user@domain`` or ``@domain`` (catch-all)."""
    value = address.strip()
    if value.startswith("@"):
        return "@" + canonical_domain(value[1:])
    return canonical_address(value)


class AliasesFile(WatchedFile):
    """``address: target[, target...]`` lines; ``@domain`` is a catch-all."""

    reloaded_event = "aliases.reloaded"

    def _parse_line(self, line):
        key, sep, rest = line.partition(":")
        if not sep:
            raise ValueError("not address: target, target")
        targets = _targets(rest.split(","))
        if not targets:
            raise ValueError("an alias needs at least one target")
        return alias_key(key), targets

    def _format_line(self, key, targets):
        return f"{key}: {', '.join(targets)}"

    _key = staticmethod(alias_key)

    def targets(self, address):
        """The targets of the alias ``address`` (or ``@domain``), or None."""
        return self._get(address)

    def list(self):
        """``[(address, targets)]`` sorted by address."""
        return sorted(self._entries_now().items())

    def add(self, address, targets):
        """Create the alias, or extend an existing one with new targets."""
        key, new = alias_key(address), _targets(targets)
        if not new:
            raise UsersError("an alias needs at least one target")

        def edit(lines, entries):
            if key not in entries:
                return lines + [self._format_line(key, new)]
            merged = entries[key] + tuple(t for t in new if t not in entries[key])
            found = self._key_index(lines, key)
            lines = list(lines)
            lines[found[0]] = self._format_line(key, merged)
            return lines
        self._update(edit)
        events.emit("aliases.changed", path=self.path, address=key, action="add")

    def delete(self, address):
        key = alias_key(address)
        self._delete(key)
        events.emit("aliases.changed", path=self.path, address=key, action="delete")


def _targets(items):
    """Canonical, de-duplicated targets in the order given."""
    result = []
    for item in items:
        if item.strip():
            target = canonical_address(item)
            if target not in result:
                result.append(target)
    return tuple(result)


class Directory:
    """The answers about addresses, from the config, users and aliases.

    The expansion is written once, as generators (``_resolve``,
    ``_is_local_user``, ``_may_send_as``) that *yield* every account lookup
    they need -- a canonical address -- and are sent back the mailbox it
    names, or None. ``_run`` drives them: here from the users file, at once,
    so the file backend answers plain values; ``LdapDirectory`` drives the
    same generators with Deferreds. Callers wrap every call in
    ``defer.maybeDeferred``, so either kind of answer works.
    """

    def __init__(self, config, users, aliases):
        self._domains = frozenset(config.server.domains)
        primary = config.server.domains[0] if config.server.domains else ""
        self.postmaster = f"postmaster@{primary}" if primary else ""
        self.users = users
        self.aliases = aliases

    @classmethod
    def from_config(cls, config, clock=None, run_in_thread=None):
        """The file-backed directory of ``config`` (users file + aliases)."""
        extra = {} if run_in_thread is None else {"run_in_thread": run_in_thread}
        users = UsersFile(config.auth.users_file, clock=clock, **extra)
        aliases = AliasesFile(config.aliases_file, clock=clock)
        return cls(config, users, aliases)

    def is_local_domain(self, domain):
        """Synchronous for every backend: the domains come from the config."""
        try:
            return canonical_domain(domain) in self._domains
        except UsersError:
            return False

    def is_local_user(self, address):
        """Is ``address`` (or its ``+tag``-less form) an account here?"""
        return self._run(self._is_local_user(address))

    def resolve(self, address):
        """Final destinations of ``address``: local mailboxes and forward
        targets, de-duplicated in order; [] when the address is unknown here.

        ``postmaster@`` every local domain always exists (RFC 5321 §4.5.1):
        without an account or alias of its own it is the postmaster of the
        primary domain (the first of ``[server] domains``), and without one
        of those either, that address's own Maildir (the operator reads it,
        or creates the account later and finds the mail there)."""
        return self._run(self._resolve(address))

    def may_send_as(self, user, address):
        """May the account ``user`` use ``address`` as its sender? Its own
        address, or an explicit alias that reaches it (a catch-all does not
        count: it would grant the whole domain); a ``+tag`` form of either
        when the tagged address is not another account or alias."""
        return self._run(self._may_send_as(user, address))

    # -- the users file's lookups -----------------------------------------

    def _mailbox(self, address):
        """The mailbox the canonical ``address`` names as an account, or None."""
        return address if self.users.lookup(address) is not None else None

    def _run(self, steps):
        """Drive a lookup generator, answering each lookup at once."""
        try:
            request = next(steps)
            while True:
                request = steps.send(self._mailbox(request))
        except StopIteration as done:
            return done.value

    # -- the steps (generators: see the class docstring) ------------------

    def _is_local_user(self, address):
        try:
            start = canonical_address(address)
        except UsersError:
            return False
        mailbox = yield from self._account(start)
        return mailbox is not None

    def _resolve(self, address):
        try:
            start = canonical_address(address)
        except UsersError:
            return []
        found = []
        yield from self._expand(start, 0, (), found, catch_all=True)
        if not found and self._is_postmaster(start):
            if start != self.postmaster:
                yield from self._expand(self.postmaster, 0, (), found, catch_all=True)
            if not found:
                found.append(self.postmaster)
        return found

    def _is_postmaster(self, address):
        local, _, domain = address.rpartition("@")
        return local == "postmaster" and bool(self.postmaster) and self.is_local_domain(domain)

    def _may_send_as(self, user, address):
        try:
            user, start = canonical_address(user), canonical_address(address)
        except UsersError:
            return False
        if start == user:
            return True
        # A +tag form is the user's only when it is no one else's: the
        # expansion looks at the tagged address before its base (issue 17).
        found = []
        yield from self._expand(start, 0, (), found, catch_all=False)
        return user in found

    def _account(self, address):
        """The mailbox of the account a canonical ``address`` names (exactly,
        or without its +tag), or None."""
        for candidate in dict.fromkeys((address, base_address(address))):
            mailbox = yield candidate
            if mailbox is not None:
                return mailbox
        return None

    def _expand(self, address, depth, path, found, catch_all):
        if not self.is_local_domain(domain_of(address)):
            _add(found, address)                    # a forward: leaves here
            return
        if address in path:                         # a loop: keep a real user
            mailbox = yield from self._account(address)
            if mailbox is not None:
                _add(found, mailbox)
            return
        if depth > MAX_DEPTH:
            _log.warn("alias chain deeper than {depth} at {address}; cut",
                      depth=MAX_DEPTH, address=address)
            return
        targets = None
        for candidate in dict.fromkeys((address, base_address(address))):
            targets = self.aliases.targets(candidate)    # an alias wins ...
            if targets is not None:
                break
            mailbox = yield candidate                    # ... over an account
            if mailbox is not None:
                _add(found, mailbox)
                return
        if targets is None:
            key = "@" + domain_of(address)
            targets = self.aliases.targets(key) if catch_all else None
            if targets is None or key in path:
                return
            path = path + (key,)
        for target in targets:
            yield from self._expand(target, depth + 1, path + (address,), found, catch_all)


def _add(found, address):
    if address not in found:
        found.append(address)


# ---------------------------------------------------------------------------
# Accounts in LDAP

POSITIVE_TTL = 60.0     # seconds an LDAP "this address is that mailbox" is kept
NEGATIVE_TTL = 10.0     # seconds an LDAP "no such address" is kept
CACHE_ENTRIES = 10_000  # answers kept at most (a harvest of random names stays bounded)


class LdapDirectory(Directory):
    """The directory when the accounts live in LDAP (``[auth] backend = ldap``).

    The directory is the source of truth for who exists: ``accounts``'s
    ``account(address) -> Deferred[Account or None]`` finds the entry holding
    ``address`` in any of ``[auth] ldap_address_attributes`` (see
    ``recipient_accounts``), and mail for any of those addresses goes to the
    entry's mailbox, its first (primary) address. Aliases and catch-alls from
    the aliases file apply on top, as with the users file; the users file
    itself is not consulted. Every answer is a Deferred; when the directory
    is unreachable it fails with ``BackendUnavailable`` (a ``451 4.3.0`` at
    RCPT, a later retry in the queue, never a bounce). Answers are cached
    (``LookupCache``) on ``clock`` so a flood of RCPTs does not reach LDAP.
    """

    def __init__(self, config, aliases, accounts, clock, positive_ttl=POSITIVE_TTL,
                 negative_ttl=NEGATIVE_TTL, max_entries=CACHE_ENTRIES):
        super().__init__(config, None, aliases)
        self.accounts = accounts
        self.cache = LookupCache(self._fetch, clock, positive_ttl, negative_ttl,
                                 max_entries)

    def _fetch(self, address):
        d = self.accounts.account(address)
        d.addCallback(lambda account: None if account is None else account.address)
        return d

    def _run(self, steps):
        return _run_deferred(steps, self.cache.get)


@defer.inlineCallbacks
def _run_deferred(steps, lookup):
    """Drive a lookup generator with ``lookup(address) -> Deferred``; a
    failed lookup fails the whole answer."""
    try:
        request = next(steps)
        while True:
            mailbox = yield lookup(request)
            request = steps.send(mailbox)
    except StopIteration as done:
        return done.value


class LookupCache:
    """The answers of ``fetch(key) -> Deferred``, kept for a while.

    A found value is kept ``positive_ttl`` seconds, a None ``negative_ttl``
    (by ``clock.seconds()``); a failure is never kept, so a recovered
    directory answers at once. Lookups of a key while its fetch runs wait for
    that one fetch. At most ``max_entries`` answers are kept, the oldest
    dropped first.
    """

    def __init__(self, fetch, clock, positive_ttl=POSITIVE_TTL, negative_ttl=NEGATIVE_TTL,
                 max_entries=CACHE_ENTRIES):
        self._fetch = fetch
        self._clock = clock
        self._positive_ttl = positive_ttl
        self._negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._answers = {}      # key -> (expires at, value), oldest first
        self._waiting = {}      # key -> [Deferred] while its fetch runs

    def __len__(self):
        return len(self._answers)

    def get(self, key):
        """Deferred: the cached answer for ``key``, or a fresh one."""
        cached = self._answers.get(key)
        if cached is not None:
            if self._clock.seconds() < cached[0]:
                return defer.succeed(cached[1])
            del self._answers[key]
        d = defer.Deferred()
        if key in self._waiting:
            self._waiting[key].append(d)
            return d
        self._waiting[key] = [d]
        fetched = defer.maybeDeferred(self._fetch, key)
        fetched.addBoth(self._fetched, key)
        return d

    def _fetched(self, result, key):
        waiters = self._waiting.pop(key, [])
        if not isinstance(result, Failure):
            self._keep(key, result)
        for d in waiters:
            if d.called:                # cancelled by its caller meanwhile
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    def _keep(self, key, value):
        ttl = self._negative_ttl if value is None else self._positive_ttl
        if ttl <= 0:
            return
        self._answers.pop(key, None)
        while self._answers and len(self._answers) >= self._max_entries:
            del self._answers[next(iter(self._answers))]
        self._answers[key] = (self._clock.seconds() + ttl, value)


def recipient_filter(template, attributes):
    """The LDAP filter finding the account that holds ``{address}`` in any of
    ``attributes``: among the entries the login filter ``template`` can match
    (its ``{address}`` made a presence test), the ones holding the address.
    ``(mail={address})`` with ``mail, mailAlternateAddress`` gives
    ``(&(mail=*)(|(mail={address})(mailAlternateAddress={address})))``."""
    from appliance.auth.ldap import presence_filter
    any_of = "".join(f"({name}={{address}})" for name in attributes)
    return f"(&{presence_filter(template)}(|{any_of}))"


def recipient_accounts(cfg, run_in_thread, clock=None, timeout=None, pool_size=None):
    """An ``LdapAccounts`` for recipients: its ``account(address)`` finds the
    entry holding ``address`` in any address attribute (for logins, only the
    ``[auth] ldap_user_filter`` counts: never use this one to authenticate).
    Raises ``LdapConfigError``."""
    from appliance.auth import ldap
    timeout = ldap.TIMEOUT if timeout is None else timeout
    settings = ldap.LdapSettings.from_config(cfg, timeout)
    settings = dataclasses.replace(settings, user_filter=recipient_filter(
        settings.user_filter, settings.address_attributes))
    client = ldap.LdapClient(settings, pool_size or ldap.POOL_SIZE)
    return ldap.LdapAccounts(client, run_in_thread, clock, deadline=3 * timeout)


def directory_from_config(cfg, users, aliases, reactor, pool=None):
    """``(directory, service)`` for ``[auth] backend``.

    The users file's ``Directory`` and None; or, for LDAP, an
    ``LdapDirectory`` and the service owning its LDAP threads and
    connections, to be added to the service tree before the queue runner and
    the listeners (a MultiService stops its children in reverse order).
    Raises ``LdapConfigError`` (one line) for unusable LDAP settings.
    """
    if cfg.auth.backend != "ldap":
        return Directory(cfg, users, aliases), None
    accounts = recipient_accounts(cfg, pool_runner(reactor, pool), clock=reactor,
                                  pool_size=pool.max)
    service = ThreadPoolService(pool, drain=lambda: _closed_quietly(accounts))
    return LdapDirectory(cfg, aliases, accounts, reactor), service


def _closed_quietly(accounts):
    d = accounts.close()
    d.addErrback(lambda failure: None)  # unbinding a dead connection is no news
    return d

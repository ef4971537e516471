"""Where does an address go: local users, aliases, catch-alls, forwards.

One resolver for the whole server (Postfix's trivial-rewrite idea): the SMTP
server asks it whether a recipient exists, the queue asks it where to deliver,
submission asks it which addresses a user may send as.

Aliases live in ``<data_dir>/aliases``, lines ``address: target, target``;
``@domain: target`` is the catch-all of that domain. The file is re-read on
change and rewritten atomically under a lock, like the users file.
"""

import time

from twisted.logger import Logger

from appliance import events
from appliance.auth.users import (UsersError, UsersFile, WatchedFile,
                                  base_address, canonical_address)
from appliance.config import unicode_domain

_log = Logger(namespace="mailappliance.directory")

events.register("aliases.reloaded", "the aliases file was (re)read after a change",
                ("path", "count"))
events.register("aliases.changed", "an alias was added, extended or deleted",
                ("path", "address", "action"))

MAX_DEPTH = 8           # alias chains longer than this are cut (and logged)


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


def domain_of(address):
    return address.rpartition("@")[2]


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

    def targets(self, address):
        """The targets of the alias ``address`` (or ``@domain``), or None."""
        try:
            key = alias_key(address)
        except UsersError:
            return None
        return self._entries_now().get(key)

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

    ``resolve`` is synchronous for the file backend; callers wrap it in
    ``defer.maybeDeferred`` because an LDAP directory returns a Deferred.
    """

    def __init__(self, config, users, aliases):
        self._domains = frozenset(config.server.domains)
        self.users = users
        self.aliases = aliases

    @classmethod
    def from_config(cls, config, now=time.monotonic, defer_to_thread=None):
        """The file-backed directory of ``config`` (users file + aliases)."""
        extra = {} if defer_to_thread is None else {"defer_to_thread": defer_to_thread}
        users = UsersFile(config.auth.users_file, now=now, **extra)
        aliases = AliasesFile(config.aliases_file, now=now)
        return cls(config, users, aliases)

    def is_local_domain(self, domain):
        try:
            return canonical_domain(domain) in self._domains
        except UsersError:
            return False

    def is_local_user(self, address):
        """Is ``address`` (or its ``+tag``-less form) an account here?"""
        try:
            return self._account(canonical_address(address)) is not None
        except UsersError:
            return False

    def resolve(self, address):
        """Final destinations of ``address``: local users and forward targets,
        de-duplicated in order; [] when the address is unknown here."""
        try:
            start = canonical_address(address)
        except UsersError:
            return []
        found = []
        self._expand(start, 0, (), found, catch_all=True)
        return found

    def may_send_as(self, user, address):
        """May the account ``user`` use ``address`` as its sender? Its own
        address (with any ``+tag``), or an explicit alias that reaches it
        (a catch-all does not count: it would grant the whole domain)."""
        try:
            user, start = canonical_address(user), canonical_address(address)
        except UsersError:
            return False
        if base_address(start) == user or start == user:
            return True
        found = []
        self._expand(start, 0, (), found, catch_all=False)
        return user in found

    # -- expansion -------------------------------------------------------

    def _account(self, address):
        """The account a canonical ``address`` names (exactly, or without
        its +tag), or None."""
        for candidate in (address, base_address(address)):
            if self.users.lookup(candidate) is not None:
                return candidate
        return None

    def _expand(self, address, depth, path, found, catch_all):
        if not self.is_local_domain(domain_of(address)):
            _add(found, address)                    # a forward: leaves here
            return
        if address in path:                         # a loop: keep a real user
            account = self._account(address)
            if account is not None:
                _add(found, account)
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
            if self.users.lookup(candidate) is not None:  # ... over an account
                _add(found, candidate)
                return
        if targets is None:
            key = "@" + domain_of(address)
            targets = self.aliases.targets(key) if catch_all else None
            if targets is None or key in path:
                return
            path = path + (key,)
        for target in targets:
            self._expand(target, depth + 1, path + (address,), found, catch_all)


def _add(found, address):
    if address not in found:
        found.append(address)

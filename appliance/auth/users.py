"""The file backend of authentication: lines ``address:hash``.

The running server and the ``mailappliance`` CLI share the file. The server
re-reads it when it changes (one ``os.stat`` per lookup at most once a second),
so users added with the CLI work without a restart. Every write happens under
an ``fcntl`` lock on a sibling ``.lock`` file and replaces the file atomically
(temporary file in the same directory, fsync, rename, fsync of the directory),
so a reader never sees half a file and two writers never lose each other's
change. ``WatchedFile`` holds that machinery; the aliases file reuses it.

Hashes are bcrypt (``$2b$``, the default) or argon2id (``$argon2id$``).
"""

import contextlib
import fcntl
import hashlib
import hmac
import os
import re

import argon2
import bcrypt
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from appliance import events
from appliance.address import canonical
from appliance.clock import default_clock
from appliance.durable.files import FileWatch, adopt_owner, write_atomic

_log = Logger(namespace="mailappliance.users")

events.register("users.reloaded", "the users file was (re)read after a change",
                ("path", "count"))
events.register("users.changed", "a user was added, deleted or got a new password",
                ("path", "address", "action"))

BCRYPT_PREFIXES = ("$2b$", "$2a$", "$2y$")
ARGON2ID_PREFIX = "$argon2id$"
BCRYPT_MAX_BYTES = 72           # bcrypt only ever looks at the first 72 bytes

_argon2 = argon2.PasswordHasher()


class UsersError(Exception):
    """A refused change to the users or aliases file (message is one line)."""


class AlreadyExists(UsersError):
    pass


class NotFound(UsersError):
    pass


# ---------------------------------------------------------------------------
# Addresses

_BAD_CHARS = re.compile(r"[\s:,<>()\[\]\\;\"\x00-\x1f\x7f]")


def canonical_address(address):
    """The lookup form of ``address`` (``local@domain``), or UsersError.

    Stricter than SMTP on purpose: these are keys in line-oriented files, so no
    whitespace, ``:``, ``,`` or control characters.
    """
    value = address.strip()
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or "@" in local or _BAD_CHARS.search(value):
        raise UsersError(f"{address!r} is not an address like user@example.org")
    try:
        return canonical(value)
    except ValueError as exc:
        raise UsersError(f"{address!r} is not a valid address ({exc})") from None


def account_name(address):
    """The canonical address of an account. Its local part names the
    account's Maildir directory, so it may not hold ``/`` or start with a dot."""
    value = canonical_address(address)
    local = value.rpartition("@")[0]
    if "/" in local or local.startswith("."):
        raise UsersError(f"{address!r} cannot be an account (no / or leading dot "
                         "in the local part)")
    return value


def base_address(address):
    """``user+tag@d`` -> ``user@d`` (Postfix's recipient_delimiter habit)."""
    local, _, domain = address.rpartition("@")
    if "+" in local[1:]:
        local = local[: local.index("+", 1)]
    return f"{local}@{domain}"


# ---------------------------------------------------------------------------
# Password hashes

def hash_password(password):
    """A new hash for ``password``: bcrypt, or argon2id past bcrypt's 72 bytes
    (bcrypt would silently ignore the rest)."""
    if not password:
        raise UsersError("empty password refused")
    secret = _bytes(password)
    if len(secret) > BCRYPT_MAX_BYTES:
        return _argon2.hash(secret)
    return bcrypt.hashpw(secret, bcrypt.gensalt()).decode("ascii")


def _bytes(password):
    # surrogateescape: undecodable bytes read from a terminal stay themselves
    return password.encode("utf-8", "surrogateescape")


def is_known_hash(hashed):
    return hashed.startswith(BCRYPT_PREFIXES + (ARGON2ID_PREFIX,))


def verify_password(password, hashed):
    """True if ``password`` matches ``hashed``; False for anything else,
    including unknown or damaged hash formats. The libraries compare in
    constant time."""
    if not password or not isinstance(hashed, str):
        return False
    secret = _bytes(password)
    try:
        if hashed.startswith(BCRYPT_PREFIXES):
            return bcrypt.checkpw(secret[:BCRYPT_MAX_BYTES], hashed.encode("ascii"))
        if hashed.startswith(ARGON2ID_PREFIX):
            return _argon2.verify(hashed, secret)
    except (ValueError, argon2.exceptions.Argon2Error):   # incl. invalid hashes
        return False
    return False


_dummy = []


def _verify_unknown_user(password):
    """Spend what a real check costs, then fail: unknown and known users take
    the same time (no user enumeration by timing)."""
    if not _dummy:
        _dummy.append(hash_password("not a password of anyone"))
    verify_password(password, _dummy[0])
    return False


# ---------------------------------------------------------------------------
# A line file that is re-read on change and rewritten atomically

class WatchedFile:
    """A file of ``key<sep>value`` lines, cached and reloaded when it changes.

    Subclasses define ``_parse_line(line) -> (key, value)`` (ValueError for a
    malformed line), ``_format_line(key, value) -> str`` and ``_key(text)``,
    the key form of a name asked for (UsersError if it can be none). ``clock`` is an
    IReactorTime (a ``task.Clock`` in tests); ``check_interval`` bounds how often lookups
    pay for an ``os.stat``.
    """

    reloaded_event = None

    def __init__(self, path, clock=None, check_interval=1.0):
        self.path = path
        self.clock = default_clock(clock)
        self._watch = FileWatch([path], self.clock, check_interval, ignore=FileNotFoundError)
        self._entries = {}

    # -- reading ---------------------------------------------------------

    def _get(self, text):
        """The value stored under ``text``'s key, or None (also when
        ``text`` can be no key)."""
        try:
            key = self._key(text)
        except UsersError:
            return None
        return self._entries_now().get(key)

    def _entries_now(self):
        """The current entries, reloading if the file changed."""
        if self._watch.due():
            self._reload_if_changed()
        return self._entries

    def _reload_if_changed(self):
        signature = self._watch.current()
        if signature == self._watch.loaded:
            return
        lines = self._read_lines()
        self._entries = self._parse(lines, warn=True)
        self._watch.loaded = signature
        if self.reloaded_event:
            events.emit(self.reloaded_event, path=self.path, count=len(self._entries))

    def _read_lines(self):
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                return handle.read().splitlines()
        except FileNotFoundError:
            return []

    def _parse(self, lines, warn=False):
        entries = {}
        for number, line in enumerate(lines, 1):
            parsed = self._parse_numbered(line, number, warn)
            if parsed is None:
                continue
            key, value = parsed
            if key in entries:
                if warn:
                    self._warn(number, "duplicate entry, the first one counts")
                continue
            entries[key] = value
        return entries

    def _parse_numbered(self, line, number, warn):
        if not line.strip() or line.lstrip().startswith("#"):
            return None
        try:
            return self._parse_line(line)
        except (ValueError, UsersError) as exc:
            if warn:
                self._warn(number, str(exc))
            return None

    def _warn(self, number, why):
        _log.warn("{path}:{line}: {why}; line skipped", path=self.path,
                  line=number, why=why)

    # -- writing ---------------------------------------------------------

    def _update(self, edit):
        """Apply ``edit(lines, entries) -> lines`` to the file as it is on
        disk now, under the lock, and replace the file atomically."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        with self._locked():
            lines = self._read_lines()
            new_lines = edit(lines, self._parse(lines))
            write_atomic(self.path, "".join(line + "\n" for line in new_lines),
                         owner_like=self.path)
        self._watch.forget()            # the next read sees our own change

    @contextlib.contextmanager
    def _locked(self):
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            adopt_owner(fd, self.path)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)                # closing releases the lock

    def _key_index(self, lines, key):
        """Line numbers (0-based) holding ``key``."""
        found = []
        for index, line in enumerate(lines):
            parsed = self._parse_numbered(line, index + 1, warn=False)
            if parsed is not None and parsed[0] == key:
                found.append(index)
        return found

    def _add(self, key, value):
        def edit(lines, entries):
            if key in entries:
                raise AlreadyExists(f"{key} already exists")
            return lines + [self._format_line(key, value)]
        self._update(edit)

    def _replace(self, key, value):
        def edit(lines, entries):
            found = self._key_index(lines, key)
            if not found:
                raise NotFound(f"{key} does not exist")
            lines = list(lines)
            lines[found[0]] = self._format_line(key, value)
            return lines
        self._update(edit)

    def _delete(self, key):
        def edit(lines, entries):
            found = set(self._key_index(lines, key))
            if not found:
                raise NotFound(f"{key} does not exist")
            return [line for index, line in enumerate(lines) if index not in found]
        self._update(edit)


# A login verified against a hash is remembered this long (Dovecot's
# auth_cache habit): a bcrypt check costs ~0.25 s of CPU, and clients that
# log in for every message would otherwise be capped at a few per second.
CACHE_TTL = 300.0
CACHE_SIZE = 10_000


# ---------------------------------------------------------------------------
# The users file

class UsersFile(WatchedFile):
    """``address:hash`` lines; see the module docstring.

    ``run_in_thread(f, *args) -> Deferred`` runs the hash work off the
    reactor thread (the server's own ``password-hash`` pool, so a storm of
    logins cannot delay Maildir or spool work; ``deferToThread`` by default,
    for the offline commands; tests inject a synchronous one).
    """

    reloaded_event = "users.reloaded"

    def __init__(self, path, clock=None, check_interval=1.0,
                 run_in_thread=deferToThread, cache_ttl=CACHE_TTL):
        super().__init__(path, clock, check_interval)
        self._run_in_thread = run_in_thread
        self._verified = VerifiedCache(self.clock, cache_ttl)

    def _parse_line(self, line):
        address, sep, hashed = line.strip().rpartition(":")
        if not sep or not address:
            raise ValueError("not address:hash")
        if not is_known_hash(hashed):
            raise ValueError("unknown hash format (bcrypt $2b$ or argon2id expected)")
        return account_name(address), hashed

    def _format_line(self, address, hashed):
        return f"{address}:{hashed}"

    _key = staticmethod(canonical_address)

    def lookup(self, address):
        """The hash stored for ``address``, or None."""
        return self._get(address)

    def list(self):
        return sorted(self._entries_now())

    def add(self, address, hashed):
        address = account_name(address)
        self._add(address, _checked_hash(hashed))
        events.emit("users.changed", path=self.path, address=address, action="add")

    def set_hash(self, address, hashed):
        address = canonical_address(address)
        self._replace(address, _checked_hash(hashed))
        events.emit("users.changed", path=self.path, address=address, action="passwd")

    def delete(self, address):
        address = canonical_address(address)
        self._delete(address)
        events.emit("users.changed", path=self.path, address=address, action="delete")

    def check_password(self, address, password):
        """Deferred[bool]: does ``password`` open ``address``? Unknown users
        cost a hash too, so timing does not tell who exists."""
        if not password:
            return defer.succeed(False)
        hashed = self.lookup(address)
        if hashed is None:
            return self._run_in_thread(_verify_unknown_user, password)
        if self._verified.holds(address, password, hashed):
            return defer.succeed(True)
        d = self._run_in_thread(verify_password, password, hashed)
        d.addCallback(self._remember, address, password, hashed)
        return d

    def _remember(self, ok, address, password, hashed):
        if ok:
            self._verified.add(address, password, hashed)
        return ok


class VerifiedCache:
    """Recently verified (address, password) pairs, never the passwords.

    An entry is an HMAC of the password under a key that lives only in this
    process, tied to the hash it was verified against: a password change
    (new hash) or a deletion makes it useless at once. Failures are never
    cached, so a guessing client pays the full hash cost every time.
    """

    def __init__(self, clock, ttl=CACHE_TTL, size=CACHE_SIZE):
        self.clock = clock
        self._ttl = ttl
        self._size = size
        self._key = os.urandom(32)
        self._entries = {}

    def _tag(self, address, password, hashed):
        message = b"\0".join((address.encode(), _bytes(password), hashed.encode()))
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def holds(self, address, password, hashed):
        if self._ttl <= 0:
            return False
        expiry = self._entries.get(self._tag(address, password, hashed))
        return expiry is not None and expiry > self.clock.seconds()

    def add(self, address, password, hashed):
        if self._ttl <= 0:
            return
        if len(self._entries) >= self._size:
            now = self.clock.seconds()
            self._entries = {k: v for k, v in self._entries.items() if v > now}
            if len(self._entries) >= self._size:
                self._entries.clear()
        self._entries[self._tag(address, password, hashed)] = self.clock.seconds() + self._ttl


_BAD_HASH_CHARS = re.compile(r"[\s:\x00-\x1f\x7f]")


def _checked_hash(hashed):
    if not is_known_hash(hashed) or _BAD_HASH_CHARS.search(hashed):
        raise UsersError("unknown hash format (bcrypt $2b$ or argon2id expected)")
    return hashed

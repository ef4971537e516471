"""The state behind the defences: counters, sliding windows, maps and sets
that forget on their own.

``IDefenceState`` is the interface every defence talks to; ``LocalState``
keeps it in this process and persists the maps named at construction in
``<data_dir>/defence/<name>.json``. A shared backend (Redis, #12) implements
the same interface.

Semantics (the contract both backends keep):

- Every method is **synchronous and never blocks**: the gate asks at connect
  and a refused client must cost nothing, and a ban must be in place before
  the reply to the failing AUTH is written. A remote backend keeps a local
  replica and writes through in the background.
- Durability is asynchronous: a change to a persistent map is written by
  ``flush()`` (called by the implementation itself shortly after a change,
  coalesced; write temp + fsync + rename + fsync of the directory, in a
  thread, never on the reactor thread). ``flush()`` returns a Deferred that
  fires when everything changed before the call is on disk. A change starts
  a write at the next reactor turn; changes made while a write runs go into
  the next one. A kill -9 loses at most what changed during the last write
  (milliseconds).
- Times are the injected clock's ``seconds()`` (wall-clock Unix time with the
  reactor; a ``task.Clock`` in tests). ``ttl`` is seconds from now; None
  means no expiry.
- Values stored in maps are JSON-able and never mutated after ``map_put``
  (put a new value instead): a snapshot being written in a thread shares them.
"""

import json
import os
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Interface, implementer

from appliance.clock import cancel
from appliance.durable.files import write_atomic

FLUSH_DELAY = 0.0       # seconds: changes within this (and during a write) are written together
RETRY_DELAY = 5.0       # seconds before a failed write is tried again
WINDOW_SLOTS = 60       # slots per sliding window (see window_hit)
FORMAT_VERSION = 1

_log = Logger()


class IDefenceState(Interface):
    """Counters, sliding windows, maps and sets with expiry (see the module doc)."""

    def get(key):
        """The value stored under ``key``, or None (also once expired)."""

    def put(key, value, ttl=None):
        """Store ``value`` under ``key`` for ``ttl`` seconds (None: forever)."""

    def incr(key, amount=1, ttl=None):
        """Add ``amount`` to the number under ``key`` (0 if absent) and
        return the new value; ``ttl`` is set when the key is created."""

    def delete(key):
        """Forget ``key``; True if it was there."""

    def window_hit(key, window, limit, amount=1):
        """Count ``amount`` events in the sliding ``window`` (seconds) of
        ``key`` unless that would pass ``limit``. -> (allowed, count): when
        not allowed nothing is counted and ``count`` is the count that
        stopped it. No double burst at any edge (see LocalState)."""

    def window_add(key, window, amount=1):
        """Count ``amount`` events whatever the total; -> the new count."""

    def window_count(key, window):
        """The events counted in the last ``window`` seconds of ``key``."""

    def window_clear(key):
        """Forget the events of ``key``."""

    def map_put(name, field, value, ttl=None):
        """Set ``field`` of map ``name`` to ``value`` for ``ttl`` seconds."""

    def map_get(name, field):
        """The value of ``field`` in map ``name``, or None."""

    def map_expires(name, field):
        """When ``field`` of map ``name`` expires (None: never or absent)."""

    def map_delete(name, field):
        """Remove ``field`` from map ``name``; True if it was there.
        No expiry callback is called for it."""

    def map_items(name):
        """[(field, value, expires)] of map ``name``, expired ones left out."""

    def map_size(name):
        """How many fields map ``name`` holds (expired ones may still count
        until the next ``expire()``)."""

    def on_expire(name, callback):
        """Call ``callback(field, value)`` when a field of map ``name``
        expires (found expired by a read or by ``expire()``), once."""

    def set_add(name, member, ttl=None):
        """Add ``member`` to set ``name`` (its own expiry); -> the set's size."""

    def set_members(name):
        """The members of set ``name`` that have not expired (a frozenset)."""

    def set_discard(name, member):
        """Remove ``member`` from set ``name``."""

    def expire():
        """Drop everything expired now, calling the expiry callbacks."""

    def flush():
        """A Deferred firing once every change made so far is on disk."""


class _Window:
    """Event counts in slots of ``window / WINDOW_SLOTS`` seconds.

    An event counts from its slot's start until ``window`` after its slot's
    end: at least ``window`` and at most ``window * (1 + 1/WINDOW_SLOTS)``
    seconds. Never less than the window, so there is no edge where a whole
    new allowance opens next to a full one (the fixed-window double burst of
    Postfix anvil and epoch-aligned counters); a client is at most held a
    sixtieth of the window longer than an exact log would hold it.
    """

    __slots__ = ("window", "slot", "slots", "total")

    def __init__(self, window):
        self.window = float(window)
        self.slot = self.window / WINDOW_SLOTS
        self.slots = deque()        # [slot start, count], oldest first
        self.total = 0

    def prune(self, now):
        slots = self.slots
        while slots and slots[0][0] + self.slot + self.window <= now:
            self.total -= slots.popleft()[1]
        return self.total

    def add(self, now, amount):
        start = now - (now % self.slot)
        if self.slots and self.slots[-1][0] == start:
            self.slots[-1][1] += amount
        else:
            self.slots.append([start, amount])
        self.total += amount
        return self.total


def _encode(entries):
    return json.dumps({"version": FORMAT_VERSION, "entries": entries},
                      separators=(",", ":")).encode("utf-8")


def _synchronous(f, *args):
    return defer.maybeDeferred(f, *args)


@implementer(IDefenceState)
class LocalState:
    """``IDefenceState`` in this process; ``persistent`` maps kept on disk.

    ``directory``: where the persistent maps live (None: nothing persisted);
    ``clock``: seconds() and callLater(); ``run_in_thread(f, *args)`` -> a
    Deferred (``threads.deferToThread``; tests pass a synchronous runner).
    Call ``load()`` once before use (the DefenceService does it before the
    listeners open).
    """

    def __init__(self, directory, clock, persistent=(), run_in_thread=_synchronous):
        self.directory = directory
        self.clock = clock
        self.persistent = frozenset(persistent) if directory else frozenset()
        self.run_in_thread = run_in_thread
        self._keys = {}             # key -> [value, expires]
        self._windows = {}          # key -> _Window
        self._maps = {}             # name -> {field: [value, expires]}
        self._sets = {}             # name -> {member: expires}
        self._on_expire = {}        # name -> [callback]
        self._dirty = set()
        self._writing = set()
        self._failed = set()
        self._flush_call = None
        self._waiters = []
        self.write_errors = 0

    # -- persistence -----------------------------------------------------------

    def path(self, name):
        return os.path.join(self.directory, f"{name}.json")

    def load(self):
        """Read the persistent maps (expired entries dropped); -> {name: count}.

        An unreadable file is moved aside (``.corrupt``) and its map starts
        empty: a broken ban list must not keep the server from starting.
        """
        counts = {}
        if not self.persistent:
            return counts
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        now = self.clock.seconds()
        for name in sorted(self.persistent):
            entries = self._read(name)
            # The decoded [value, expires] lists are kept as they are: one
            # pass, no copies (20,000 bans load in a fraction of a second).
            kept = {field: entry for field, entry in entries.items()
                    if entry[1] is None or entry[1] > now}
            self._maps[name] = kept
            counts[name] = len(kept)
        return counts

    def _read(self, name):
        path = self.path(name)
        try:
            with open(path, "rb") as handle:
                data = json.loads(handle.read())
            entries = data.get("entries")
            if data.get("version") != FORMAT_VERSION or not isinstance(entries, dict):
                raise ValueError("unknown format")
            if not all(type(e) is list and len(e) == 2 and
                       (e[1] is None or type(e[1]) in (int, float)) for e in entries.values()):
                raise ValueError("malformed entry")
            return entries
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            aside = f"{path}.corrupt"
            _log.warn("defence state {path} unreadable ({why}); moved to {aside}",
                      path=path, why=exc, aside=aside)
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return {}

    def _changed(self, name):
        if name not in self.persistent:
            return
        self._dirty.add(name)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self._write_dirty)

    def _write_dirty(self):
        self._flush_call = None
        names = sorted(self._dirty - self._writing)
        self._dirty.difference_update(names)
        self._writing.update(names)
        self._failed.difference_update(names)
        for name in names:
            snapshot = {f: entry[:] for f, entry in self._maps.get(name, {}).items()}
            d = self.run_in_thread(self._write_snapshot, self.path(name), snapshot)
            d.addErrback(self._write_failed, name)
            d.addBoth(self._written, name)

    @staticmethod
    def _write_snapshot(path, snapshot):
        write_atomic(path, _encode(snapshot))

    def _write_failed(self, failure, name):
        self.write_errors += 1
        _log.failure("writing defence state {name} failed", failure, name=name)
        self._failed.add(name)
        self._dirty.add(name)       # again later, not in a tight loop
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(RETRY_DELAY, self._write_dirty)

    def _written(self, _, name):
        self._writing.discard(name)
        if self._writing:
            return
        if self._dirty and self._flush_call is None:
            self._flush_call = self.clock.callLater(FLUSH_DELAY, self._write_dirty)
        if not (self._dirty - self._failed):
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def flush(self):
        if not self._dirty and not self._writing:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        if not self._writing and self._dirty:
            self._flush_call = cancel(self._flush_call)
            self._write_dirty()
        return d

    # -- keys -----------------------------------------------------------------

    def _expires(self, ttl):
        return None if ttl is None else self.clock.seconds() + ttl

    def get(self, key):
        entry = self._keys.get(key)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= self.clock.seconds():
            del self._keys[key]
            return None
        return entry[0]

    def put(self, key, value, ttl=None):
        self._keys[key] = [value, self._expires(ttl)]

    def incr(self, key, amount=1, ttl=None):
        current = self.get(key)
        if current is None:
            self._keys[key] = [amount, self._expires(ttl)]
            return amount
        self._keys[key][0] = current + amount
        return current + amount

    def delete(self, key):
        return self._keys.pop(key, None) is not None

    # -- sliding windows ---------------------------------------------------------

    def _window(self, key, window):
        w = self._windows.get(key)
        if w is None or w.window != float(window):
            w = self._windows[key] = _Window(window)
        return w

    def window_hit(self, key, window, limit, amount=1):
        now = self.clock.seconds()
        w = self._window(key, window)
        count = w.prune(now)
        if count + amount > limit:
            return False, count
        return True, w.add(now, amount)

    def window_add(self, key, window, amount=1):
        now = self.clock.seconds()
        w = self._window(key, window)
        w.prune(now)
        return w.add(now, amount)

    def window_count(self, key, window):
        w = self._windows.get(key)
        if w is None:
            return 0
        count = w.prune(self.clock.seconds())
        if not w.slots:
            del self._windows[key]
        return count

    def window_clear(self, key):
        self._windows.pop(key, None)

    # -- maps -------------------------------------------------------------------

    def map_put(self, name, field, value, ttl=None):
        self._maps.setdefault(name, {})[field] = [value, self._expires(ttl)]
        self._changed(name)

    def _live(self, name, field, now):
        entries = self._maps.get(name)
        if not entries:
            return None
        entry = entries.get(field)
        if entry is None:
            return None
        if entry[1] is not None and entry[1] <= now:
            del entries[field]
            self._changed(name)
            self._expired(name, field, entry[0])
            return None
        return entry

    def map_get(self, name, field):
        entry = self._live(name, field, self.clock.seconds())
        return None if entry is None else entry[0]

    def map_expires(self, name, field):
        entry = self._live(name, field, self.clock.seconds())
        return None if entry is None else entry[1]

    def map_delete(self, name, field):
        entries = self._maps.get(name)
        if entries is None or entries.pop(field, None) is None:
            return False
        self._changed(name)
        return True

    def map_items(self, name):
        now = self.clock.seconds()
        return [(field, value, expires)
                for field, (value, expires) in list(self._maps.get(name, {}).items())
                if expires is None or expires > now]

    def map_size(self, name):
        return len(self._maps.get(name, ()))

    def on_expire(self, name, callback):
        self._on_expire.setdefault(name, []).append(callback)

    def _expired(self, name, field, value):
        for callback in self._on_expire.get(name, ()):
            try:
                callback(field, value)
            except Exception:
                _log.failure("expiry callback for {name} failed", name=name)

    # -- sets -------------------------------------------------------------------

    def set_add(self, name, member, ttl=None):
        members = self._sets.setdefault(name, {})
        members[member] = self._expires(ttl)
        return len(self.set_members(name))

    def set_members(self, name):
        members = self._sets.get(name)
        if not members:
            return frozenset()
        now = self.clock.seconds()
        for member in [m for m, e in members.items() if e is not None and e <= now]:
            del members[member]
        if not members:
            del self._sets[name]
            return frozenset()
        return frozenset(members)

    def set_discard(self, name, member):
        members = self._sets.get(name)
        if members is not None:
            members.pop(member, None)

    # -- expiry -------------------------------------------------------------------

    def expire(self):
        now = self.clock.seconds()
        for key in [k for k, (_, e) in self._keys.items() if e is not None and e <= now]:
            del self._keys[key]
        for key in list(self._windows):
            if not self._windows[key].prune(now):
                del self._windows[key]
        for name in list(self._sets):
            self.set_members(name)
        for name, entries in list(self._maps.items()):
            gone = [(f, e[0]) for f, e in entries.items() if e[1] is not None and e[1] <= now]
            for field, value in gone:
                del entries[field]
                self._expired(name, field, value)
            if gone:
                self._changed(name)

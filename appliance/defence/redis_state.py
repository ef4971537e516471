"""``IDefenceState`` shared by several appliances through one Redis (SPEC §7).

``RedisState`` keeps the contract of ``appliance.defence.state``: every call
is synchronous and never blocks. It answers from a local replica (a
``LocalState``, persisted in ``data_dir`` as with ``backend = local``) and
writes through to Redis in the background, on its own thread pool
(``run_in_thread``; ``redis``, two threads in ``tap.POOLS``): one thread
writes batches, the other waits for what the other appliances publish.

What is shared, and how (Redis keys under ``mailappliance:``, each expiring
by itself; see docs/redis.md):

- the maps (``bans``, ``offences``, ``logins``, ``greylist``,
  ``greylist_networks``, ``greylist_pending``): one string key per field,
  ``map:<name>:<field>`` = JSON ``[value, expires]``, ``PXAT`` the entry's
  end. Every change is published on the channel ``mailappliance:state``
  in the same pipeline; the other appliances put it into their replica (a
  ban reaches them in milliseconds; ``on_remote(name, callback)`` tells the
  ban list, which closes the banned network's open sessions there too);
- the sliding windows (rate limits, AUTH failure counts): one hash per
  window key, ``win:<key>``, a field per slot (its start in ms) counting the
  events of every appliance, pruned and its expiry moved by a Lua script in
  the same round trip as the increment (atomic; one call per batch of
  increments, which wait ``WRITE_DELAY`` for company). The script publishes
  the slots' new totals. A limit is decided on ``own events (exact, local) +
  other appliances' events`` where the latter are the totals last heard
  (published or returned by our own increments) minus our own share in
  them, merged by maximum: they are never overcounted and lag the truth by
  the publish delay (milliseconds). See "Consistency" in docs/redis.md;
- alerts: ``publish_alert`` pushes the auditor's alerts to the capped list
  ``alerts`` and publishes them; ``on_alert(callback)`` hears the others'.

Plain keys and sets (``get``/``put``/``incr``, ``set_*``: the AUTH
fingerprints, which are keyed per process, and per-appliance bookkeeping)
stay local.

Redis down is never a mail outage: a failed write or poll turns sharing off
(event ``state.redis_down``), the replica keeps answering, changes are kept
in a bounded journal, and a reconnect is tried with backoff (1 s doubling
up to 30 s). When Redis answers again the journal is replayed, the maps are
synchronised (Redis wins for what it holds; what only this appliance holds
is pushed, so a Redis that lost its data is refilled), the subscription
resumes and ``state.redis_up`` is emitted.
"""

import json
import time
import uuid
from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from appliance import events
from appliance.defence.state import WINDOW_SLOTS, IDefenceState
from appliance.clock import cancel

PREFIX = "mailappliance:"
CHANNEL = PREFIX + "state"
ALERTS_KEY = PREFIX + "alerts"
ALERTS_KEEP = 10_000
SOCKET_TIMEOUT = 2.0        # seconds: every Redis command and connect is bounded by it
BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)      # seconds between reconnect attempts
JOURNAL_MAX = 100_000       # changes kept while Redis is down (the oldest dropped beyond)
BATCH_MAX = 1000            # changes written in one pipeline
WRITE_DELAY = 0.01          # seconds increments wait to go in one pipeline (map changes: none)
POLL_TIMEOUT = 0.5          # seconds a poll of the subscription waits for messages
POLL_MAX = 500              # messages taken per poll
SCAN_COUNT = 1000

_log = Logger()

for _name, _description, _fields in (
    ("state.redis_down", "the shared defence state (Redis) is unreachable: this appliance "
     "goes on with its local state, keeps accepting mail, and reconnects with backoff "
     "(retry_in seconds)", ("url", "error", "retry_in")),
    ("state.redis_up", "the defence state is shared through Redis (at start, or again after "
     "state.redis_down: down_for seconds, replayed changes made meanwhile, dropped ones "
     "beyond the journal, synced map entries)",
     ("url", "down_for", "replayed", "dropped", "synced")),
):
    events.register(_name, _description, _fields)


# One call counts a run of increments (each of a window's hash) and publishes
# their new totals in one message. KEYS: the hashes; ARGV[1] the channel,
# ARGV[2] the origin, then 7 per key: slot (its start in ms), amount, oldest
# live slot (ms), the hash's time to live (ms), window key, window (seconds),
# "1" for every slot's total. -> per key [slot, total, slot, total, ...] of
# its live slots after the increment (with "0": of the incremented slot only;
# the other slots come with the other appliances' publications).
WINDOW_SCRIPT = """
local out, published = {}, {}
for k = 1, #KEYS do
  local b = 2 + (k - 1) * 7
  local slot = ARGV[b + 1]
  local total = redis.call('HINCRBYFLOAT', KEYS[k], slot, ARGV[b + 2])
  local all = redis.call('HGETALL', KEYS[k])
  local cutoff = tonumber(ARGV[b + 3])
  local live = {}
  for i = 1, #all, 2 do
    if tonumber(all[i]) < cutoff then
      redis.call('HDEL', KEYS[k], all[i])
    else
      live[#live + 1] = all[i]
      live[#live + 1] = all[i + 1]
    end
  end
  redis.call('PEXPIRE', KEYS[k], ARGV[b + 4])
  if ARGV[b + 7] ~= '1' then
    live = {slot, total}
  end
  out[k] = live
  published[k] = {ARGV[b + 5], slot, total, ARGV[b + 6]}
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. '\\n' .. cjson.encode({w = published}))
return out
"""


def map_key(name, field):
    return f"{PREFIX}map:{name}:{field}"


def window_key(key):
    return f"{PREFIX}win:{key}"


def redact(url):
    """``url`` without its password (for events)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return url
    user = userinfo.partition(":")[0]
    return f"{scheme}{sep}{user + ':***' if user else '***'}@{host}"


def client_factory(url, password=None, timeout=SOCKET_TIMEOUT):
    """``make() -> redis.Redis`` for ``url`` (redis:// or rediss://; a
    rediss:// server's certificate is verified against the system CAs, or
    the ``ssl_ca_certs=`` of the URL's query, and its name checked)."""
    def make():
        import redis
        options = dict(socket_timeout=timeout, socket_connect_timeout=timeout)
        if password:
            options["password"] = password
        if url.lower().startswith("rediss://"):
            options.update(ssl_cert_reqs="required", ssl_check_hostname=True)
        return redis.Redis.from_url(url, **options)
    return make


def _merged(changes):
    """``changes`` with the increments of one window key and slot summed into
    the first (not across a clear of that key)."""
    out, at = [], {}
    for change in changes:
        kind = change[0]
        if kind == "win":
            spot = change[1:4]
            i = at.get(spot)
            if i is not None:
                first = out[i]
                out[i] = first[:4] + (first[4] + change[4], first[5] or change[5])
                continue
            at[spot] = len(out)
        elif kind == "clear":
            for spot in [s for s in at if s[0] == change[1]]:
                del at[spot]
        out.append(change)
    return out


def _chained(d):
    """A Deferred firing when ``d`` has, with None (``d``'s result untouched)."""
    out = defer.Deferred()
    d.addBoth(lambda result: (out.callback(None), result)[1])
    return out


class StateConfigError(Exception):
    """The shared state cannot be set up (one line: the password file)."""


def shared_state(config, local, clock, run_in_thread, shared=()):
    """The ``RedisState`` of ``config`` ([state] backend = redis) over the
    replica ``local``; StateConfigError when the password file is unreadable."""
    state = config.state
    password = None
    if state.redis_password_file:
        try:
            with open(state.redis_password_file, encoding="utf-8") as handle:
                password = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise StateConfigError(f"[state] redis_password_file: cannot read "
                                   f"{state.redis_password_file} "
                                   f"({getattr(exc, 'strerror', None) or exc})") from None
    node = f"{config.server.hostname}-{uuid.uuid4().hex[:8]}"
    return RedisState(local, clock, client_factory(state.redis_url, password), run_in_thread,
                      shared=shared, url=state.redis_url, node=node)


class _Others:
    """Other appliances' events in one window key, per slot (ms -> count),
    and our own events Redis has acknowledged per slot."""

    __slots__ = ("slot", "window", "counts", "acked")

    def __init__(self, window):
        self.window = float(window)
        self.slot = self.window / WINDOW_SLOTS
        self.counts = {}
        self.acked = {}

    def heard(self, slot_ms, total):
        others = total - self.acked.get(slot_ms, 0)
        if others > self.counts.get(slot_ms, 0):
            self.counts[slot_ms] = others

    def total(self, now):
        cutoff = (now - self.slot - self.window) * 1000.0
        for slot_ms in [s for s in self.counts if s <= cutoff]:
            del self.counts[slot_ms]
        for slot_ms in [s for s in self.acked if s <= cutoff]:
            del self.acked[slot_ms]
        return sum(self.counts.values())


@implementer(IDefenceState)
class RedisState:
    """See the module doc. ``local``: the ``LocalState`` replica; ``make_client()``
    -> a redis-py client (called in a thread); ``run_in_thread(f, *args)`` ->
    Deferred (the ``redis`` pool: two threads); ``shared``: the map names
    shared through Redis; ``url``: for events (the password is left out)."""

    def __init__(self, local, clock, make_client, run_in_thread, shared=(), url="",
                 node=None, backoff=BACKOFF, journal_max=JOURNAL_MAX,
                 poll_timeout=POLL_TIMEOUT, poll_interval=0.0, write_delay=WRITE_DELAY):
        self.local = local
        self.clock = clock
        self.make_client = make_client
        self.run_in_thread = run_in_thread
        self.shared = frozenset(shared)
        self.url = redact(url)
        self.node = node or uuid.uuid4().hex[:12]
        if "\n" in self.node:
            raise ValueError("a node name is one line")
        self._own = self.node.encode("utf-8") + b"\n"
        self.backoff = tuple(backoff)
        self.poll_timeout = poll_timeout
        self.poll_interval = poll_interval    # between polls (the poll itself waits)
        self.write_delay = write_delay
        self.up = False
        self.started = False
        self.stopping = False
        self.client = None
        self._pubsub = None
        self._pending = []          # changes to write while up
        self._journal = deque(maxlen=journal_max)   # changes made while down
        self.dropped = 0            # journal entries lost (JOURNAL_MAX)
        self._writing = None        # the Deferred of the batch being written
        self._write_call = None
        self._polling = None
        self._reconnect_call = None
        self._attempt = 0
        self._down_since = None
        self._others = {}           # window key -> _Others
        self._stale = set()         # window keys whose publications we may have missed
        self._remote = {}           # map name -> [callback(field, value or None, origin)]
        self._alert_listeners = []
        self._stopping = None
        self._sha = None
        self.received = 0           # messages from other appliances applied
        self.written = 0            # changes written to Redis

    # -- the service's calls ------------------------------------------------------------

    def load(self):
        return self.local.load()

    def start(self):
        """Connect (in the background); until then changes are journaled."""
        self.started = True
        self.stopping = False
        self._connect()

    def stop(self):
        """Stop polling and reconnecting; write what is pending (bounded by
        the socket timeout), close the connections; -> a Deferred (the same
        one to every caller: the service and the pool's drain both wait)."""
        if self._stopping is not None:
            return _chained(self._stopping)
        self.stopping = True
        self._reconnect_call = cancel(self._reconnect_call)
        self._write_call = cancel(self._write_call)
        waits = [d for d in (self._writing, self._polling) if d is not None]
        d = defer.DeferredList(waits) if waits else defer.succeed(None)

        def last_write(_):
            if self.up and self._pending and self._writing is None:
                self._write()
            return self._writing
        d.addCallback(last_write)
        d.addErrback(lambda f: None)        # a failed last write is journaled: local only
        d.addCallback(self._close)
        d.addErrback(lambda f: _log.failure("closing the Redis connection failed", f))
        d.addBoth(self._stopped)
        self._stopping = d
        return _chained(d)

    def _stopped(self, _):
        self.up = False

    def _close(self, _=None):
        """Close the sockets (nothing uses them any more: no poll or write runs)."""
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            pubsub.close()
        if self.client is not None:
            self.client.close()

    def flush(self):
        return self.local.flush()

    def on_remote(self, name, callback):
        """Call ``callback(field, value, origin)`` when another appliance changed
        ``field`` of map ``name`` (value None: removed), after the replica."""
        self._remote.setdefault(name, []).append(callback)

    def on_alert(self, callback):
        """Call ``callback(alert, origin)`` for each alert of another appliance."""
        self._alert_listeners.append(callback)

    def publish_alert(self, alert):
        """Share one of our auditor's alerts (a JSON-able dict)."""
        self._send(("alert", alert))

    # -- IDefenceState: reads from the replica, writes through --------------------------

    def get(self, key):
        return self.local.get(key)

    def put(self, key, value, ttl=None):
        self.local.put(key, value, ttl)

    def incr(self, key, amount=1, ttl=None):
        return self.local.incr(key, amount, ttl)

    def delete(self, key):
        return self.local.delete(key)

    def _slot_ms(self, now, window):
        slot = float(window) / WINDOW_SLOTS
        return int(round((now - (now % slot)) * 1000))

    def _others_total(self, key, window, now):
        others = self._others.get(key)
        if others is None:
            return 0
        if others.window != float(window):
            del self._others[key]
            return 0
        total = others.total(now)
        if not others.counts and not others.acked:
            del self._others[key]
        return total

    def window_hit(self, key, window, limit, amount=1):
        now = self.clock.seconds()
        count = self.local.window_count(key, window) + self._others_total(key, window, now)
        if count + amount > limit:
            return False, count
        self._count(key, window, amount, now)
        return True, count + amount

    def window_add(self, key, window, amount=1):
        now = self.clock.seconds()
        own = self._count(key, window, amount, now)
        return own + self._others_total(key, window, now)

    def _count(self, key, window, amount, now):
        own = self.local.window_add(key, window, amount)
        # Every slot's total only while we know nothing of the key's other slots.
        full = key not in self._others or key in self._stale
        self._send(("win", key, float(window), self._slot_ms(now, window), amount, full))
        return own

    def window_count(self, key, window):
        return (self.local.window_count(key, window)
                + self._others_total(key, window, self.clock.seconds()))

    def window_clear(self, key):
        self.local.window_clear(key)
        self._others.pop(key, None)
        self._send(("clear", key))

    def map_put(self, name, field, value, ttl=None):
        self.local.map_put(name, field, value, ttl)
        if name in self.shared:
            self._send(("put", name, field, value, self.local.map_expires(name, field)))

    def map_get(self, name, field):
        return self.local.map_get(name, field)

    def map_expires(self, name, field):
        return self.local.map_expires(name, field)

    def map_delete(self, name, field):
        found = self.local.map_delete(name, field)
        if name in self.shared:
            self._send(("del", name, field))
        return found

    def map_items(self, name):
        return self.local.map_items(name)

    def map_size(self, name):
        return self.local.map_size(name)

    def on_expire(self, name, callback):
        self.local.on_expire(name, callback)

    def set_add(self, name, member, ttl=None):
        return self.local.set_add(name, member, ttl)

    def set_members(self, name):
        return self.local.set_members(name)

    def set_discard(self, name, member):
        self.local.set_discard(name, member)

    def expire(self):
        self.local.expire()
        now = self.clock.seconds()
        for key in list(self._others):
            others = self._others[key]
            others.total(now)
            if not others.counts and not others.acked:
                del self._others[key]
        self._stale.intersection_update(self._others)

    # -- writing through ----------------------------------------------------------------

    def _send(self, change):
        if self.up:
            self._pending.append(change)
            self._schedule_write(self.write_delay if change[0] == "win" else 0)
        else:
            if len(self._journal) == self._journal.maxlen:
                self.dropped += 1
            self._journal.append(change)

    def _schedule_write(self, delay=0):
        """Write soon: map changes at the next reactor turn (with the rest of
        this turn's), increments after ``write_delay`` (those of one client
        key and slot merged into one), unless a write is under way (then
        everything meanwhile goes in the next pipeline)."""
        if self._writing is not None or self.stopping:
            return
        if self._write_call is None:
            self._write_call = self.clock.callLater(delay, self._write)
        elif delay == 0 and self._write_call.getTime() > self.clock.seconds():
            self._write_call.reset(0)

    def _write(self):
        self._write_call = None
        if not self.up or self._writing is not None or not self._pending:
            return
        batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
        batch = _merged(batch)
        d = self._writing = self.run_in_thread(self._write_batch, batch)
        d.addCallbacks(self._written, self._write_failed, callbackArgs=(batch,),
                       errbackArgs=(batch,))

    def _written(self, results, batch):
        self._writing = None
        self.written += len(batch)
        self._acknowledged(batch, results)
        if self._pending:
            self._schedule_write()

    def _write_failed(self, failure, batch):
        self._writing = None
        self._requeue(batch + self._pending)
        self._pending = []
        self._down(failure.getErrorMessage() or failure.type.__name__)

    def _requeue(self, changes):
        """Put ``changes`` back in front of the journal (the oldest are
        dropped beyond its length)."""
        merged = list(changes) + list(self._journal)
        keep = self._journal.maxlen
        if len(merged) > keep:
            self.dropped += len(merged) - keep
            merged = merged[-keep:]
        self._journal.clear()
        self._journal.extend(merged)

    def _acknowledged(self, batch, results):
        """Our increments' replies: the other appliances' share of each slot."""
        for change, live in zip(batch, results):
            if change[0] != "win" or live is None:
                continue
            _, key, window, slot_ms, amount, _ = change
            others = self._others.get(key)
            if others is None or others.window != window:
                others = self._others[key] = _Others(window)
            others.acked[slot_ms] = others.acked.get(slot_ms, 0) + amount
            if len(live) > 2:
                self._stale.discard(key)
            for i in range(0, len(live) - 1, 2):
                others.heard(int(live[i]), float(live[i + 1]))

    def _write_batch(self, batch, strict=True):
        """In a thread: one pipeline for ``batch``; -> per change, the live
        slots of a window increment (else None). Not ``strict`` (a replay):
        a change Redis refuses (a key of another type...) is left out, so one
        bad change cannot keep sharing off for ever."""
        pipe = self.client.pipeline(transaction=False)
        maps, alerts, run = [], [], []
        replies_of = []         # per change: the index of its reply (a script's: its run)
        now_ms = int(self.clock.seconds() * 1000)

        def counted():      # a run of increments: one script call
            if run:
                args = [CHANNEL, self.node]
                for _, key, window, slot_ms, amount, full in run:
                    slot = window / WINDOW_SLOTS
                    args += [slot_ms, repr(float(amount)),
                             slot_ms - int((window + slot) * 1000),
                             int((window + 2 * slot) * 1000), key, repr(window),
                             "1" if full else "0"]
                pipe.evalsha(self._sha, len(run), *[window_key(c[1]) for c in run], *args)
                run.clear()
                return 1
            return 0

        commands = 0
        for change in batch:
            kind = change[0]
            if kind == "win":
                replies_of.append((commands, len(run)))
                run.append(change)
                continue
            commands += counted()
            replies_of.append(None)
            if kind == "put":
                _, name, field, value, expires = change
                data = json.dumps([value, expires], separators=(",", ":"))
                if expires is None:
                    pipe.set(map_key(name, field), data)
                elif expires * 1000 > now_ms:
                    pipe.set(map_key(name, field), data, pxat=int(expires * 1000))
                else:
                    pipe.delete(map_key(name, field))
                maps.append(["p", name, field, value, expires])
            elif kind == "del":
                _, name, field = change
                pipe.delete(map_key(name, field))
                maps.append(["d", name, field])
            elif kind == "clear":
                pipe.delete(window_key(change[1]))
                maps.append(["c", change[1]])
            elif kind == "alert":
                alert = json.dumps(change[1], separators=(",", ":"), default=str)
                pipe.lpush(ALERTS_KEY, alert)
                pipe.ltrim(ALERTS_KEY, 0, ALERTS_KEEP - 1)
                alerts.append(change[1])
                commands += 1
            commands += 1
        counted()
        if maps or alerts:
            message = {}
            if maps:
                message["m"] = maps
            if alerts:
                message["a"] = alerts
            pipe.publish(CHANNEL, self.node + "\n" + json.dumps(message, separators=(",", ":"),
                                                                default=str))
        replies = pipe.execute(raise_on_error=strict)
        out = []
        for where in replies_of:
            if where is None:
                out.append(None)
                continue
            reply = replies[where[0]]
            out.append(None if isinstance(reply, Exception) else reply[where[1]])
        return out

    # -- connecting, synchronising, falling back ----------------------------------------

    def _connect(self):
        self._reconnect_call = None
        if self.stopping:
            return
        journal = list(self._journal)
        self._journal.clear()
        snapshot = [(name, field, value, expires) for name in sorted(self.shared)
                    for field, value, expires in self.local.map_items(name)]
        d = self.run_in_thread(self._connect_sync, journal, snapshot)
        d.addCallbacks(self._connected, self._connect_failed, callbackArgs=(journal,),
                       errbackArgs=(journal,))

    def _connect_sync(self, journal, snapshot):
        """In a thread: connect, subscribe, replay ``journal``, and merge the
        maps: -> the entries Redis holds ([(name, field, value, expires)])."""
        if self.client is None:
            self.client = self.make_client()
        self.client.ping()
        # (Again at each connect: a restarted Redis has forgotten it.)
        self._sha = self.client.script_load(WINDOW_SCRIPT)
        if self._pubsub is not None:
            try:
                self._pubsub.close()
            except Exception:  # noqa: BLE001 - the old connection is gone anyway
                pass
        pubsub = self.client.pubsub()
        pubsub.subscribe(CHANNEL)
        reply = pubsub.get_message(timeout=SOCKET_TIMEOUT)
        if reply is None or reply.get("type") != "subscribe":
            pubsub.close()
            raise ConnectionError("no answer to SUBSCRIBE")
        self._pubsub = pubsub
        for start in range(0, len(journal), BATCH_MAX):
            self._write_batch(journal[start:start + BATCH_MAX], strict=False)
        remote = self._read_maps()
        held = {(name, field) for name, field, _, _ in remote}
        now_ms = int(self.clock.seconds() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pushed = 0
        for name, field, value, expires in snapshot:
            if (name, field) in held:
                continue
            data = json.dumps([value, expires], separators=(",", ":"))
            if expires is None:
                pipe.set(map_key(name, field), data, nx=True)
            elif expires * 1000 > now_ms:
                pipe.set(map_key(name, field), data, nx=True, pxat=int(expires * 1000))
            else:
                continue
            pushed += 1
            if pushed % BATCH_MAX == 0:
                pipe.execute()
        pipe.execute()
        return remote

    def _read_maps(self):
        found = []
        for name in sorted(self.shared):
            prefix = map_key(name, "")
            keys = list(self.client.scan_iter(match=prefix + "*", count=SCAN_COUNT))
            for start in range(0, len(keys), SCAN_COUNT):
                chunk = keys[start:start + SCAN_COUNT]
                for key, data in zip(chunk, self.client.mget(chunk)):
                    if data is None:
                        continue        # expired between SCAN and MGET
                    try:
                        value, expires = json.loads(data)
                    except (ValueError, TypeError):
                        continue        # not ours
                    found.append((name, key.decode("utf-8")[len(prefix):], value, expires))
        return found

    def _connected(self, remote, journal):
        if self.stopping:
            self._close()
            return
        now = self.clock.seconds()
        synced = 0
        for name, field, value, expires in remote:
            if expires is not None and expires <= now:
                continue
            if (self.local.map_get(name, field) != value
                    or self.local.map_expires(name, field) != expires):
                self._apply_put(name, field, value, expires, origin="sync")
                synced += 1
        down_for = None if self._down_since is None else round(now - self._down_since, 3)
        dropped, self.dropped = self.dropped, 0
        self._stale = set(self._others)    # publications were missed while down
        self.up = True
        self._attempt = 0
        self._down_since = None
        events.emit("state.redis_up", url=self.url, down_for=down_for, replayed=len(journal),
                    dropped=dropped, synced=synced)
        if self._journal:       # changes made while connecting
            self._pending[:0] = list(self._journal)
            self._journal.clear()
        self._schedule_write()
        self._poll()

    def _connect_failed(self, failure, journal):
        # Nothing of the journal is known to be written: it is replayed whole
        # next time (a replayed increment may count twice; never lost).
        self._requeue(journal)
        self._down(failure.getErrorMessage() or failure.type.__name__, first=self._attempt == 0)

    def _down(self, error, first=True):
        """Sharing is off: local state only; reconnect with backoff."""
        was_up = self.up
        self.up = False
        if self._pending:       # not written: before what is journaled from now on
            self._requeue(self._pending)
            self._pending = []
        if was_up or self._down_since is None:
            self._down_since = self.clock.seconds()
        if self.stopping or (self._reconnect_call is not None
                             and self._reconnect_call.active()):
            return
        delay = self.backoff[min(self._attempt, len(self.backoff) - 1)]
        self._attempt += 1
        if was_up or first:
            events.emit("state.redis_down", url=self.url, error=str(error)[:200],
                        retry_in=delay)
        self._reconnect_call = self.clock.callLater(delay, self._connect)

    # -- what the other appliances publish ----------------------------------------------

    def _poll(self):
        if not self.up or self.stopping or self._polling is not None:
            return
        pubsub = self._pubsub
        d = self._polling = self.run_in_thread(self._poll_sync, pubsub)
        d.addCallbacks(self._polled, self._poll_failed, errbackArgs=(pubsub,))

    def _poll_sync(self, pubsub):
        """In a thread: the messages published, waiting up to poll_timeout."""
        messages = []
        deadline = time.monotonic() + self.poll_timeout
        while len(messages) < POLL_MAX:
            # Wait (up to the deadline) for the first message of the others,
            # then take what is already there.
            timeout = 0.0 if messages else max(0.0, deadline - time.monotonic())
            message = pubsub.get_message(timeout=timeout)
            if message is None:
                if messages or time.monotonic() >= deadline:
                    break
                continue
            # Our own publications come back too: dropped here, unparsed.
            if message.get("type") == "message" and not message["data"].startswith(self._own):
                messages.append(message["data"])
        return messages

    def _polled(self, messages):
        self._polling = None
        for data in messages:
            try:
                origin, _, body = data.partition(b"\n")
                self._receive(origin.decode("utf-8"), json.loads(body))
            except Exception:  # noqa: BLE001 - one bad message must not stop sharing
                _log.failure("a message on {channel} could not be applied", channel=CHANNEL)
        if self.up and not self.stopping:
            self.clock.callLater(self.poll_interval, self._poll)

    def _poll_failed(self, failure, pubsub):
        self._polling = None
        if pubsub is not self._pubsub:      # a subscription replaced by a reconnect
            if self.up and not self.stopping:
                self.clock.callLater(self.poll_interval, self._poll)
        elif self.up:
            self._down(failure.getErrorMessage() or failure.type.__name__)

    def _receive(self, origin, message):
        """A publication of appliance ``origin``: ``w`` a window slot's new
        total, ``m`` map changes and window clears, ``a`` alerts."""
        if origin == self.node:
            return
        self.received += 1
        now = self.clock.seconds()
        for key, slot_ms, total, window in message.get("w", ()):
            window = float(window)
            others = self._others.get(key)
            if others is None or others.window != window:
                others = self._others[key] = _Others(window)
            others.heard(int(slot_ms), float(total))
            others.total(now)
        for change in message.get("m", ()):
            kind = change[0]
            if kind == "p":
                _, name, field, value, expires = change
                if name in self.shared and (expires is None or expires > now):
                    self._apply_put(name, field, value, expires, origin)
            elif kind == "d":
                _, name, field = change
                if name in self.shared and self.local.map_delete(name, field):
                    for callback in self._remote.get(name, ()):
                        callback(field, None, origin)
            elif kind == "c":
                self.local.window_clear(change[1])
                self._others.pop(change[1], None)
        for alert in message.get("a", ()):
            for callback in self._alert_listeners:
                callback(alert, origin)

    def _apply_put(self, name, field, value, expires, origin):
        ttl = None if expires is None else expires - self.clock.seconds()
        self.local.map_put(name, field, value, ttl=ttl)
        for callback in self._remote.get(name, ()):
            callback(field, value, origin)

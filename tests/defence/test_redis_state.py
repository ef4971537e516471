"""The defence state shared through a real Redis (SPEC §7): two appliances'
``Defences`` over one ``redis-server``, driven by one ``task.Clock`` (set to
the wall clock: Redis expires keys by it) with the Redis work run in the
caller (``synchronous_runner``), so every step is deterministic.

``pump()`` runs what the reactor would run next: the write-through of this
turn's changes and a poll of the subscription on each side.
"""

import json
import time

import pytest
from twisted.internet import task

from appliance import config
from appliance.defence.bans import BANS
from appliance.defence.redis_state import (CHANNEL, PREFIX, WRITE_DELAY, RedisState,
                                           StateConfigError, _merged, client_factory, redact,
                                           shared_state)
from appliance.defence.service import PERSISTENT, Defences
from appliance.defence.state import LocalState
from appliance.threads import synchronous_runner

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"
POLL = 0.001


def make_config(url, limits="", checks="", password_file=""):
    text = (MINIMAL + f"[state]\nbackend = redis\nredis_url = {url}\n"
            f"redis_password_file = {password_file}\n"
            f"[limits]\n{limits}\n[checks]\n{checks}\n")
    return config.parse(text, base_dir="/srv")


class Appliance:
    """One appliance's defences over the shared state."""

    def __init__(self, name, url, clock, directory=None, limits="", checks="",
                 make_client=None):
        self.name = name
        self.clock = clock
        self.config = make_config(url, limits, checks)
        local = LocalState(directory, clock, persistent=PERSISTENT)
        self.state = RedisState(local, clock, make_client or client_factory(url),
                                synchronous_runner, shared=PERSISTENT, url=url, node=name,
                                poll_timeout=0.0, poll_interval=POLL)
        self.defences = Defences(self.config, clock, state=self.state)
        self.defences.load()
        self.closed = []

    def start(self):
        self.state.start()
        return self


def pump(clock, turns=5):
    """Five reactor turns of 10 ms: increments wait WRITE_DELAY (10 ms) to be
    written together; each turn polls the subscriptions (every POLL)."""
    for _ in range(turns):
        clock.advance(WRITE_DELAY)


@pytest.fixture
def clock():
    clock = task.Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture
def pair(redis_server, clock):
    def make(limits="", checks=""):
        a = Appliance("a", redis_server.url, clock, limits=limits, checks=checks).start()
        b = Appliance("b", redis_server.url, clock, limits=limits, checks=checks).start()
        pump(clock)
        return a, b
    return make


def test_both_connect_and_say_so(pair, collected):
    a, b = pair()
    assert a.state.up and b.state.up
    ups = collected.named("state.redis_up")
    assert len(ups) == 2 and all(u["down_for"] is None for u in ups)


def test_a_ban_on_one_refuses_the_client_on_the_other_and_ends_its_sessions(
        pair, redis_server, collected):
    a, b = pair()
    closed = []
    verdict, ticket = b.defences.admission.admit("192.0.2.7", lambda: closed.append(1))
    assert verdict is None
    a.defences.bans.ban("192.0.2.7", reason="test", rule="manual")
    pump(a.clock)
    assert b.defences.admission.check("192.0.2.7") == "banned"
    assert b.defences.bans.is_banned("192.0.2.7").reason == "test"
    assert closed == [1]                     # B ended the banned client's open session
    remote = collected.named("defence.ban.remote")
    assert [(r["network"], r["origin"]) for r in remote] == [("192.0.2.7/32", "a")]
    # Stored under the namespace, expiring by itself at the ban's end.
    client = redis_server.client()
    key = f"{PREFIX}map:{BANS}:192.0.2.7/32"
    value, expires = json.loads(client.get(key))
    assert value["reason"] == "test"
    assert 3500 < client.ttl(key) <= 3600
    # An unban on B lifts it on A.
    assert b.defences.bans.unban("192.0.2.7")
    pump(a.clock)
    assert a.defences.bans.is_banned("192.0.2.7") is None
    assert client.get(key) is None


def test_a_wide_ban_reaches_the_other_index(pair):
    a, b = pair()
    a.defences.bans.ban("198.51.100.0/24", duration=600, reason="net")
    pump(a.clock)
    assert b.defences.bans.is_banned("198.51.100.77").network == "198.51.100.0/24"


def test_a_triplet_passed_on_one_passes_on_the_other(pair, clock):
    a, b = pair(checks="greylist = on\ngreylist_delay = 5m")
    ip, sender, rcpt = "203.0.113.9", "s@example.net", "alice@example.test"
    assert a.defences.greylist.check(ip, sender, rcpt) is False         # new: deferred on A
    pump(clock)
    clock.advance(301)
    pump(clock)
    assert b.defences.greylist.check(ip, sender, rcpt) is True          # the retry lands on B
    pump(clock)
    assert a.defences.greylist.check(ip, sender, rcpt) is True          # known on A as well


def test_a_users_hourly_limit_is_counted_across_both(pair, clock):
    a, b = pair(limits="messages_per_hour_per_user = 5")
    allowed = []
    for side in (a, b, a, b, a, b, a):
        allowed.append(side.defences.mail_allowed("192.0.2.50", user="bob@example.test"))
        pump(clock)
    assert allowed == [True] * 5 + [False, False]
    assert a.defences.rates.counts_of_user("bob@example.test") == {
        "messages_per_hour_per_user": (5, 5)}
    assert b.defences.rates.counts_of_user("bob@example.test") == {
        "messages_per_hour_per_user": (5, 5)}
    # The window slides on both: an hour (and a slot) later the user may send again.
    clock.advance(3600 + 61)
    assert b.defences.mail_allowed("192.0.2.50", user="bob@example.test")


def test_a_starting_appliance_learns_the_counts_at_its_first_increment(pair, redis_server,
                                                                        clock):
    a, _ = pair(limits="messages_per_hour_per_user = 3")
    for _ in range(2):
        assert a.defences.mail_allowed("192.0.2.50", user="carol@example.test")
    pump(clock)
    late = Appliance("late", redis_server.url, clock,
                     limits="messages_per_hour_per_user = 3").start()
    pump(clock)
    # It missed the publications: its first MAIL counts and hears the total.
    assert late.defences.mail_allowed("192.0.2.50", user="carol@example.test")
    pump(clock)
    assert not late.defences.mail_allowed("192.0.2.50", user="carol@example.test")


def test_auth_failures_on_both_add_up_to_one_ban(pair, clock):
    a, b = pair(limits="auth_failures_before_ban = 4")
    for side in (a, b, a):
        assert side.defences.auth_failed("192.0.2.66", "x@example.test") is None
        pump(clock)
    ban = b.defences.auth_failed("192.0.2.66", "x@example.test")
    assert ban is not None and ban.network == "192.0.2.66/32"
    pump(clock)
    assert a.defences.bans.is_banned("192.0.2.66") is not None
    # The count was cleared everywhere with the ban.
    assert a.defences.auth.failures("192.0.2.66") == 0


def test_window_keys_are_namespaced_and_expire(pair, redis_server, clock):
    a, _ = pair()
    a.defences.rates.connection("192.0.2.80")
    pump(clock)
    client = redis_server.client()
    keys = [k.decode() for k in client.keys(PREFIX + "*")]
    key = f"{PREFIX}win:connections_per_minute_per_ip:192.0.2.80/32"
    assert keys == [key]
    assert 0 < client.pttl(key) <= 62_000


def test_alerts_are_shared(pair, redis_server, clock):
    a, b = pair()
    heard = []
    b.state.on_alert(lambda alert, origin: heard.append((alert["rule"], origin)))
    a.state.publish_alert({"alert_id": 1, "rule": "harvesting", "peer_ip": "192.0.2.1"})
    pump(clock)
    assert heard == [("harvesting", "a")]
    stored = redis_server.client().lrange(f"{PREFIX}alerts", 0, -1)
    assert [json.loads(s)["rule"] for s in stored] == ["harvesting"]


def test_redis_down_local_state_goes_on_then_sharing_resumes(pair, redis_server, clock,
                                                             collected):
    a, b = pair(limits="messages_per_hour_per_user = 100")
    a.defences.bans.ban("192.0.2.1", reason="before")
    pump(clock)
    redis_server.stop()
    # Both keep answering from their replicas; the first failure turns sharing off.
    assert a.defences.mail_allowed("192.0.2.9", user="dave@example.test")
    assert b.defences.mail_allowed("192.0.2.9", user="dave@example.test")
    pump(clock)
    assert not a.state.up and not b.state.up
    downs = collected.named("state.redis_down")
    assert len(downs) == 2 and {d["retry_in"] for d in downs} == {1.0}
    assert b.defences.bans.is_banned("192.0.2.1") is not None      # the replica
    a.defences.bans.ban("192.0.2.2", reason="while down")          # local, journaled
    assert a.defences.bans.is_banned("192.0.2.2") is not None
    assert b.defences.bans.is_banned("192.0.2.2") is None
    # Reconnects back off: 1 s, then 2 s, then 4 s ... (one event per outage).
    clock.advance(1.0)
    clock.advance(2.0)
    assert len(collected.named("state.redis_down")) == 2
    assert all(3.9 < c.getTime() - clock.seconds() <= 4.0 for c in clock.getDelayedCalls())
    assert len(clock.getDelayedCalls()) == 2
    redis_server.start()                  # back, empty
    clock.advance(4.0)
    pump(clock)
    assert a.state.up and b.state.up
    ups = collected.named("state.redis_up")[-2:]
    assert all(7.0 <= u["down_for"] < 7.1 and u["replayed"] >= 1 for u in ups)
    # The ban made while down reached B; Redis was refilled with both bans.
    assert b.defences.bans.is_banned("192.0.2.2") is not None
    client = redis_server.client()
    assert client.get(f"{PREFIX}map:{BANS}:192.0.2.1/32") is not None
    assert client.get(f"{PREFIX}map:{BANS}:192.0.2.2/32") is not None
    # Sharing resumed: a new ban on B reaches A.
    b.defences.bans.ban("192.0.2.3", reason="after")
    pump(clock)
    assert a.defences.bans.is_banned("192.0.2.3") is not None


def test_redis_down_at_start_then_up(redis_server, clock, collected):
    redis_server.stop()
    a = Appliance("a", redis_server.url, clock).start()
    assert not a.state.up
    assert collected.named("state.redis_down")[0]["retry_in"] == 1.0
    a.defences.bans.ban("192.0.2.4")
    redis_server.start()
    clock.advance(1.0)
    pump(clock)
    assert a.state.up
    assert redis_server.client().get(f"{PREFIX}map:{BANS}:192.0.2.4/32") is not None


def test_a_hung_redis_costs_at_most_the_socket_timeout_off_the_reactor(redis_server, clock,
                                                                       collected):
    a = Appliance("a", redis_server.url, clock,
                  make_client=client_factory(redis_server.url, timeout=0.3)).start()
    pump(clock)
    redis_server.pause()
    try:
        started = time.monotonic()
        a.defences.bans.ban("192.0.2.5")
        pump(clock)       # the write (run here, synchronously) times out
        assert time.monotonic() - started < 3.0
        assert not a.state.up
        assert a.defences.bans.is_banned("192.0.2.5") is not None
    finally:
        redis_server.resume()
    clock.advance(1.0)
    pump(clock)
    assert a.state.up


def test_the_channel_ignores_what_is_not_ours(pair, redis_server, clock):
    a, _ = pair()
    client = redis_server.client()
    client.publish(CHANNEL, b"not json")
    client.publish(CHANNEL, b"x\nnot json either")
    client.publish(CHANNEL, "x\n" + json.dumps({"m": [["p", "unknown_map", "f", 1, None]]}))
    pump(clock)
    assert a.state.up
    assert a.state.map_get("unknown_map", "f") is None


def test_password_and_url(redis_server, tmp_path, clock):
    assert redact("redis://:secret@h:1/0") == "redis://***@h:1/0"
    assert redact("rediss://user:secret@h:1/0") == "rediss://user:***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"
    missing = make_config(redis_server.url, password_file=str(tmp_path / "nope"))
    with pytest.raises(StateConfigError, match=r"^\[state\] redis_password_file: cannot read"):
        shared_state(missing, LocalState(None, clock), clock, synchronous_runner)


def test_password_file_is_used(tmp_path, clock, collected):
    import redis_server as module
    with module.RedisServer(tmp_path / "r", password="s3cret") as server:
        secret = tmp_path / "redis.password"
        secret.write_text("s3cret\n")
        url = f"redis://127.0.0.1:{server.port}/0"
        cfg = make_config(url, password_file=str(secret))
        state = shared_state(cfg, LocalState(None, clock), clock, synchronous_runner)
        state.start()
        assert state.up
        assert "s3cret" not in json.dumps(collected.named("state.redis_up"))
        wrong = shared_state(make_config(url), LocalState(None, clock), clock,
                             synchronous_runner)
        wrong.start()
        assert not wrong.up
        assert "s3cret" not in json.dumps(collected.named("state.redis_down"))


@pytest.mark.parametrize("trusted", [True, False])
def test_rediss_verifies_the_server_certificate(tmp_path, clock, collected, trusted):
    import redis_server as module
    with module.RedisServer(tmp_path / "tls", tls=True, trusted_cert=trusted) as server:
        a = Appliance("a", server.url, clock).start()
        assert a.state.up is trusted
        if not trusted:
            assert "certificate verify failed" in collected.named("state.redis_down")[0]["error"]
            return
        a.defences.bans.ban("192.0.2.90")
        pump(clock)
        client = __import__("redis").Redis.from_url(server.url)
        assert client.get(f"{PREFIX}map:{BANS}:192.0.2.90/32") is not None


def test_rediss_without_the_ca_is_refused(tmp_path, clock, collected):
    import redis_server as module
    with module.RedisServer(tmp_path / "tls", tls=True) as server:
        url = server.url.partition("?")[0]          # the system CAs do not know the test CA
        a = Appliance("a", url, clock).start()
        assert not a.state.up
        with pytest.raises(config.ConfigError, match="always verified"):
            make_config(url + "?ssl_cert_reqs=none")


def test_stop_writes_what_is_pending_once_for_every_caller(pair, redis_server, clock):
    a, _ = pair()
    a.defences.bans.ban("192.0.2.91")           # pending: written at the next turn
    first, second = a.state.stop(), a.state.stop()
    fired = []
    first.addCallback(fired.append)
    second.addCallback(fired.append)
    assert fired == [None, None]
    assert not a.state.up
    assert redis_server.client().get(f"{PREFIX}map:{BANS}:192.0.2.91/32") is not None


@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:6379/0", "is not a redis:// or rediss:// URL"),
    ("redis://", "is not a redis:// or rediss:// URL"),
    ("redis://127.0.0.1:99999/0", "has no valid port"),
    ("redis://127.0.0.1:6379/zero", "has no valid database number"),
])
def test_a_bad_url_is_one_config_line(url, why):
    with pytest.raises(config.ConfigError) as info:
        make_config(url)
    assert info.value.problems == [f'[state] redis_url: "{url}" {why}' + (
        " (e.g. /0)" if "database" in why else "")]


def test_a_change_redis_refuses_does_not_keep_sharing_off(pair, redis_server, clock,
                                                          collected):
    a, b = pair()
    client = redis_server.client()
    key = f"{PREFIX}win:connections_per_minute_per_ip:192.0.2.93/32"
    client.set(key, "not a hash")           # someone else's key of another type
    a.defences.rates.connection("192.0.2.93")
    a.defences.bans.ban("192.0.2.94")
    pump(clock)
    assert not a.state.up                   # the batch failed (WRONGTYPE)
    clock.advance(1.0)
    pump(clock)
    assert a.state.up                       # the replay left the refused change out
    assert b.defences.bans.is_banned("192.0.2.94") is not None


def test_the_journal_is_bounded_and_says_what_it_dropped(redis_server, clock, collected):
    redis_server.stop()
    local = LocalState(None, clock, persistent=PERSISTENT)
    state = RedisState(local, clock, client_factory(redis_server.url), synchronous_runner,
                       shared=PERSISTENT, node="small", journal_max=3, poll_timeout=0.0,
                       poll_interval=POLL)
    state.start()
    for n in range(5):
        state.map_put(BANS, f"192.0.2.{n}/32", {"reason": "x"}, ttl=600)
    redis_server.start()
    clock.advance(1.0)
    pump(clock)
    up = collected.named("state.redis_up")[-1]
    assert (up["replayed"], up["dropped"]) == (3, 2)
    # The replica kept all five; the sync pushed the two the journal dropped.
    client = redis_server.client()
    assert len(client.keys(f"{PREFIX}map:{BANS}:*")) == 5


def test_increments_of_one_key_and_slot_go_as_one_but_not_across_a_clear():
    win = ("win", "k", 60.0, 1000, 1, False)
    other = ("win", "j", 60.0, 1000, 1, True)
    put = ("put", "bans", "f", {}, None)
    assert _merged([win, other, put, win, ("clear", "k"), win, win]) == [
        ("win", "k", 60.0, 1000, 2, False), other, put, ("clear", "k"),
        ("win", "k", 60.0, 1000, 2, False)]


def test_increments_wait_for_company_a_ban_does_not(pair, clock, redis_server):
    a, _ = pair()
    client = redis_server.client()
    for _ in range(3):
        a.defences.rates.connection("192.0.2.95")
    clock.advance(0)
    assert client.keys(f"{PREFIX}win:*") == []          # waiting WRITE_DELAY
    a.defences.bans.ban("192.0.2.96")
    clock.advance(0)                                    # the ban takes them along at once
    key = f"{PREFIX}win:connections_per_minute_per_ip:192.0.2.95/32"
    assert sum(float(v) for v in client.hgetall(key).values()) == 3.0
    assert client.get(f"{PREFIX}map:{BANS}:192.0.2.96/32") is not None


def test_reconnects_back_off_to_thirty_seconds_and_stop_ends_them(redis_server, clock,
                                                                  collected):
    redis_server.stop()
    a = Appliance("a", redis_server.url, clock).start()
    delays = []
    for _ in range(8):
        (call,) = clock.getDelayedCalls()
        delays.append(round(call.getTime() - clock.seconds(), 3))
        clock.advance(delays[-1])
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert len(collected.named("state.redis_down")) == 1       # one event per outage
    assert a.defences.mail_allowed("192.0.2.97", user="erin@example.test")
    a.state.stop()
    assert clock.getDelayedCalls() == []

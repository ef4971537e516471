"""appliance.defence.state: LocalState's windows, expiry and durable maps over task.Clock."""

import json
import os
import time

from twisted.internet import defer, task

from appliance.defence import state as state_module
from appliance.defence.state import WINDOW_SLOTS, IDefenceState, LocalState
from appliance.testing import value_of


def make(tmp_path=None, persistent=("bans",), clock=None, **kwargs):
    clock = clock or task.Clock()
    clock.advance(1_000_000)
    directory = str(tmp_path / "defence") if tmp_path is not None else None
    store = LocalState(directory, clock, persistent=persistent, **kwargs)
    store.load()
    return store, clock


def test_provides_the_interface():
    store, _ = make()
    assert IDefenceState.providedBy(store)


def test_keys_expire_and_incr_keeps_its_first_ttl():
    store, clock = make()
    assert store.incr("k", ttl=10) == 1
    clock.advance(5)
    assert store.incr("k", ttl=10) == 2
    clock.advance(5)
    assert store.get("k") is None
    store.put("p", "v")
    clock.advance(10 ** 9)
    assert store.get("p") == "v"
    assert store.delete("p") and not store.delete("p")


def test_window_counts_for_the_whole_window_and_no_double_burst_at_an_edge():
    store, clock = make()
    window, limit = 3600.0, 10
    results = [store.window_hit("w", window, limit)[0] for _ in range(limit)]
    assert all(results)
    assert store.window_hit("w", window, limit) == (False, 10)
    # Just before and just after any "edge" (a fixed window would reset here):
    # the full allowance is still spent until a whole window has gone by.
    clock.advance(window - 1)
    assert store.window_hit("w", window, limit)[0] is False
    clock.advance(1 + window / WINDOW_SLOTS)
    assert store.window_hit("w", window, limit) == (True, 1)


def test_window_slides_instead_of_resetting():
    store, clock = make()
    window = 60.0
    for _ in range(5):
        store.window_add("s", window)
        clock.advance(20)
    # t=100: events at 0,20,40,60,80; those at 0 and 20 are more than 61 s old.
    assert store.window_count("s", window) == 3
    clock.advance(100)
    assert store.window_count("s", window) == 0
    store.window_add("s", window, 0.5)
    assert store.window_count("s", window) == 0.5
    store.window_clear("s")
    assert store.window_count("s", window) == 0


def test_sets_and_maps_expire_with_one_callback_each():
    store, clock = make()
    expired = []
    store.on_expire("m", lambda field, value: expired.append((field, value)))
    store.map_put("m", "a", 1, ttl=10)
    store.map_put("m", "b", 2, ttl=20)
    store.map_put("m", "c", 3)
    assert store.set_add("s", "x", ttl=5) == 1
    assert store.set_add("s", "y", ttl=50) == 2
    clock.advance(10)
    assert store.map_get("m", "a") is None          # found expired by a read
    assert store.set_members("s") == frozenset({"y"})
    clock.advance(10)
    store.expire()                                   # found by the sweep
    assert expired == [("a", 1), ("b", 2)]
    assert [f for f, _, _ in store.map_items("m")] == ["c"]
    store.expire()
    assert len(expired) == 2
    assert store.map_delete("m", "c") and store.map_items("m") == []


def test_persistent_maps_survive_a_new_process_and_expired_entries_are_dropped(tmp_path):
    store, clock = make(tmp_path)
    store.map_put("bans", "192.0.2.1/32", {"reason": "x"}, ttl=100)
    store.map_put("bans", "192.0.2.2/32", {"reason": "y"}, ttl=10)
    store.map_put("volatile", "k", 1)
    clock.advance(state_module.FLUSH_DELAY)         # the coalesced write runs
    assert os.path.exists(store.path("bans"))
    assert not os.path.exists(os.path.join(store.directory, "volatile.json"))
    again = LocalState(store.directory, clock, persistent=("bans",))
    clock.advance(20)
    assert again.load() == {"bans": 1}
    assert again.map_get("bans", "192.0.2.1/32") == {"reason": "x"}
    assert again.map_expires("bans", "192.0.2.1/32") == 1_000_100


def test_flush_waits_for_the_write_in_its_thread(tmp_path):
    calls = []

    def run_in_thread(f, *args):
        d = defer.Deferred()
        calls.append((d, f, args))
        return d

    store, clock = make(tmp_path, run_in_thread=run_in_thread)
    store.map_put("bans", "a", 1)
    done = store.flush()
    assert not done.called and len(calls) == 1
    store.map_put("bans", "b", 2)            # changed again while writing
    d, f, args = calls.pop()
    f(*args)
    d.callback(None)
    assert not done.called                  # "b" still to be written
    clock.advance(state_module.FLUSH_DELAY)
    d, f, args = calls.pop()
    f(*args)
    d.callback(None)
    assert done.called
    with open(store.path("bans"), encoding="utf-8") as handle:
        assert set(json.load(handle)["entries"]) == {"a", "b"}


def test_a_failed_write_is_retried_later_not_in_a_loop(tmp_path):
    attempts = []

    def failing(f, *args):
        attempts.append(1)
        return defer.fail(OSError(28, "No space left on device"))

    store, clock = make(tmp_path, run_in_thread=failing)
    store.map_put("bans", "a", 1)
    clock.advance(state_module.FLUSH_DELAY)
    assert len(attempts) == 1 and store.write_errors == 1
    clock.advance(state_module.RETRY_DELAY)
    assert len(attempts) == 2


def test_an_unreadable_file_is_moved_aside_and_the_map_starts_empty(tmp_path):
    directory = tmp_path / "defence"
    directory.mkdir()
    (directory / "bans.json").write_text("{not json")
    store = LocalState(str(directory), task.Clock(), persistent=("bans",))
    assert store.load() == {"bans": 0}
    assert (directory / "bans.json.corrupt").exists()


def test_twenty_thousand_entries_load_in_well_under_a_second(tmp_path):
    store, clock = make(tmp_path)
    for n in range(20000):
        store.map_put("bans", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}/32",
                      {"reason": "test", "until": clock.seconds() + 3600}, ttl=3600)
    value_of(store.flush())
    again = LocalState(store.directory, clock, persistent=("bans",))
    started = time.monotonic()
    assert again.load() == {"bans": 20000}
    assert time.monotonic() - started < 1.0

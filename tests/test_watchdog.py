"""The reactor-lag watchdog: server.stall when the reactor runs late."""

import pytest
from twisted.internet import task

from appliance import watchdog


@pytest.fixture
def clock(monkeypatch):
    clock = task.Clock()
    monkeypatch.setattr(watchdog, "now", clock.seconds)
    monkeypatch.setattr(watchdog, "_slow", [None])
    return clock


class Slow:
    """A protocol whose input handler keeps the reactor busy for ``cost`` seconds."""

    def __init__(self, clock, cost):
        self.clock, self.cost, self.session_id = clock, cost, "s-slow"

    @watchdog.timed
    def dataReceived(self, data):
        self.clock.rightNow += self.cost    # time passes, no delayed call runs meanwhile


def test_on_time_ticks_are_silent(clock, collected):
    dog = watchdog.ReactorWatchdog(clock)
    dog.startService()
    clock.pump([watchdog.TICK] * 100)
    assert collected.named("server.stall") == []
    dog.stopService()
    assert clock.getDelayedCalls() == []


def test_late_tick_names_the_slow_session(clock, collected):
    dog = watchdog.ReactorWatchdog(clock)
    dog.startService()
    clock.advance(0.01)
    Slow(clock, 0.6).dataReceived(b"x")
    clock.advance(0)            # the reactor gets back to its delayed calls
    [stall] = collected.named("server.stall")
    assert stall["session"] == "s-slow"
    assert 550 <= stall["late_ms"] <= 600
    assert stall["busy_ms"] == 600
    clock.pump([watchdog.TICK] * 10)
    assert len(collected.named("server.stall")) == 1
    dog.stopService()


def test_stall_without_a_known_handler(clock, collected):
    dog = watchdog.ReactorWatchdog(clock)
    dog.startService()
    clock.rightNow += 1.0       # a worker thread held the GIL: no handler to blame
    clock.advance(0)
    [stall] = collected.named("server.stall")
    assert stall["session"] == ""
    assert 900 <= stall["late_ms"] <= 1000
    dog.stopService()


def test_quick_handler_is_not_blamed(clock, collected):
    dog = watchdog.ReactorWatchdog(clock)
    dog.startService()
    Slow(clock, 0.01).dataReceived(b"x")
    clock.rightNow += 0.5
    clock.advance(0)
    [stall] = collected.named("server.stall")
    assert stall["session"] == ""
    dog.stopService()

"""appliance.clock: the time source and stopping its timers."""

from twisted.internet.task import Clock

from appliance.clock import cancel, default_clock


def test_cancel_stops_a_pending_call_and_is_safe_on_any_other():
    clock = Clock()
    fired = []
    pending = clock.callLater(5, fired.append, "pending")
    ran = clock.callLater(0, fired.append, "ran")
    clock.advance(1)
    assert cancel(pending) is None
    assert cancel(pending) is None          # cancelled already
    assert cancel(ran) is None              # has run already
    assert cancel(None) is None
    clock.advance(10)
    assert fired == ["ran"]


def test_default_clock_is_the_given_one_or_the_reactor():
    from twisted.internet import reactor
    clock = Clock()
    assert default_clock(clock) is clock
    assert default_clock() is reactor

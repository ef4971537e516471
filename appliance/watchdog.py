"""The reactor-lag watchdog: ``server.stall`` when the reactor runs late.

Every client shares the one reactor thread, so one request that keeps it (or
the GIL) busy delays every other client's reply. ``ReactorWatchdog`` asks the
reactor for a call every ``TICK`` seconds; when the call comes more than
``STALL_THRESHOLD`` late, something held the reactor that long and
``server.stall`` says so: ``late_ms``, and the ``session`` that was being
served, when it can tell.

It can tell for input handlers decorated with ``timed``: one that ran for
more than the threshold is remembered and named by the next late tick. A
stall with no such handler (a worker thread holding the GIL, a slow
callback) is reported with ``session`` empty.

Time comes from ``now`` (``time.monotonic``, not the reactor's wall clock: a
clock step is not a stall); tests replace it with a ``task.Clock``'s ``seconds``.
"""

import functools
import time

from twisted.application import service

from appliance import events
from appliance.clock import cancel

TICK = 0.05                     # seconds between the watchdog's calls
STALL_THRESHOLD = 0.25          # seconds late before it is a stall

events.register("server.stall", "the reactor ran late: every client waited late_ms; "
                "session names the client whose input was being handled, when known",
                ("late_ms", "session", "busy_ms"))

now = time.monotonic
# (session, finished at, took seconds) of the last handler over the threshold
_slow = [None]


def timed(method):
    """Decorate a protocol's input handler (``dataReceived``): a call that
    takes longer than ``STALL_THRESHOLD`` is remembered with the protocol's
    ``session_id`` for the watchdog's next report."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        started = now()
        try:
            return method(self, *args, **kwargs)
        finally:
            finished = now()
            if finished - started > STALL_THRESHOLD:
                _slow[0] = (getattr(self, "session_id", ""), finished, finished - started)

    return wrapper


def take_slow_handler(since):
    """(session, seconds) of the slow handler that finished after ``since``,
    or ("", 0.0); it is reported once."""
    slow, _slow[0] = _slow[0], None
    if slow is None or slow[1] < since:
        return "", 0.0
    return slow[0] or "", slow[2]


class ReactorWatchdog(service.Service):
    """See the module docstring. ``clock``: the reactor (callLater)."""

    name = "watchdog"
    stalls = 0                  # how many times the reactor was late
    _call = None                # the next check
    _due = None                 # when it should run

    def __init__(self, clock, tick=TICK, threshold=STALL_THRESHOLD):
        self.clock = clock
        self.tick = tick
        self.threshold = threshold

    def startService(self):
        super().startService()
        self._schedule()

    def stopService(self):
        self._call = cancel(self._call)
        return super().stopService()

    def _schedule(self):
        self._due = now() + self.tick
        self._call = self.clock.callLater(self.tick, self._check)

    def _check(self):
        late = now() - self._due
        if late > self.threshold:
            self.stalls += 1
            session, busy = take_slow_handler(self._due - self.tick)
            events.emit("server.stall", late_ms=round(late * 1000), session=session,
                        busy_ms=round(busy * 1000))
        self._schedule()

"""The one source of time.

Whatever needs the time takes ``clock``, an ``IReactorTime`` (the reactor in
the server, a ``task.Clock`` in tests), and reads ``clock.seconds()``.
"""


def default_clock(clock=None):
    """``clock``, or the global reactor when none was given (imported here,
    late, so that importing a module never installs a reactor)."""
    if clock is not None:
        return clock
    from twisted.internet import reactor
    return reactor


def cancel(call):
    """Stop ``call`` (an ``IDelayedCall``, or None) if it has not run yet.
    Returns None, so that ``self._timer = cancel(self._timer)`` both stops a
    timer and forgets it."""
    if call is not None and call.active():
        call.cancel()
    return None

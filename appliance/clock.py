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

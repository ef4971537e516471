"""Measure how long other clients wait while some work runs (issue 17 stall tests).

A reactor thread waits in select/epoll and needs the GIL back whenever a
client's data arrives. ``worst_wait_while(work)`` runs ``work`` on a worker
thread (where the server runs DKIM, the inbound checks, Maildir reads) and
meanwhile wakes the calling thread every ``interval`` seconds, as a reactor
woken by other clients would be: the worst lateness of those wake-ups is what
another client would have waited. One C call that holds the GIL (a regular
expression over the whole message) shows as a wait as long as the call.

The server runs with ``sys.setswitchinterval(SWITCH_INTERVAL)``; so does the
measurement. A loaded machine adds noise, a stall does not go away: the
measurement is repeated (up to ``tries`` times) while it is over ``limit``
(but not when it is over ``STALL``: that is no noise) and the best one is
returned.
"""

import os
import sys
import threading
import time

from appliance.tap import SWITCH_INTERVAL

LIMIT = 0.100                   # seconds: issue 17's bound on another client's wait
STALL = 1.0                     # seconds: a wait this long is a stall, not noise


def _one_run(work, interval):
    result, error = [], []

    def run():
        try:
            result.append(work())
        except BaseException as exc:    # re-raised in the test's thread
            error.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    previous = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    worst = 0.0
    try:
        started = time.monotonic()
        worker.start()
        while worker.is_alive():
            before = time.monotonic()
            time.sleep(interval)
            worst = max(worst, time.monotonic() - before - interval)
        took = time.monotonic() - started
    finally:
        sys.setswitchinterval(previous)
        worker.join()
    if error:
        raise error[0]
    return worst, took, result[0]


def worst_wait_while(work, interval=0.002, limit=LIMIT, tries=3):
    """``(worst wait in seconds, seconds the work took, its result)``."""
    best = None
    for _ in range(tries):
        outcome = _one_run(work, interval)
        if best is None or outcome[0] < best[0]:
            best = outcome
        if best[0] <= limit or outcome[0] >= STALL:
            break
    return best


def reactor_wait(work, limit=LIMIT, tries=3):
    """``(seconds, result)`` of ``work()`` run here, as the reactor runs a
    command: every other client waits for all of it. Repeated while over
    ``limit`` (and under ``STALL``); the best time is returned."""
    best = None
    for _ in range(tries):
        started = time.monotonic()
        result = work()
        took = time.monotonic() - started
        if best is None or took < best[0]:
            best = (took, result)
        if best[0] <= limit or took >= STALL:
            break
    return best


def big_inbox(root, count, message, name):
    """alice@example.test's Maildir under ``root``/mail with ``count``
    messages in new/: ``message(n)`` the bytes, ``name(n)`` the file name."""
    new = root / "mail" / "example.test" / "alice" / "new"
    os.makedirs(new)
    for n in range(count):
        (new / name(n)).write_bytes(message(n))
    return root

"""The fuzz harness: hypothesis drives every protocol and parser with hostile input.

What every target holds, per input (``guard``):

- no exception escapes: nothing raised out of the protocol or parser, nothing
  logged as a failure (a traceback in the server's log);
- no input is slow: each runs under ``FUZZ_TIME_BOUND`` seconds;
- memory stays bounded: the peak of Python allocations (tracemalloc) while it
  runs stays under ``FUZZ_MEMORY_BOUND`` octets.

The protocol targets check too that every command gets exactly one reply.

Runs: the ``ci`` profile (the default) is part of the normal pytest run and
takes well under a minute; ``MAILAPPLIANCE_FUZZ=long`` (or
``tests/fuzz/run-long``) runs the ``long`` profile: many more inputs each.
Inputs that failed are replayed first from hypothesis's database
(``.hypothesis/``, not committed). A finding becomes a regression test in
the test file of the module at fault; the list is in tests/fuzz/FINDINGS.md.
"""

import os
import time
import tracemalloc
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, settings
from twisted.logger import globalLogPublisher

settings.register_profile(
    "ci", max_examples=int(os.environ.get("MAILAPPLIANCE_FUZZ_EXAMPLES", "60")),
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.register_profile(
    "long", max_examples=int(os.environ.get("MAILAPPLIANCE_FUZZ_EXAMPLES", "20000")),
    deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("MAILAPPLIANCE_FUZZ", "ci"))

FUZZ_TIME_BOUND = float(os.environ.get("MAILAPPLIANCE_FUZZ_TIME_BOUND", "2.0"))
FUZZ_MEMORY_BOUND = 64 * 1024 * 1024


class Guard:
    """Checks one input: see the module docstring."""

    def __init__(self):
        self.failures = []

    def __call__(self, event):
        if event.get("log_failure") is not None:
            self.failures.append(event)

    @contextmanager
    def check(self, what=""):
        del self.failures[:]
        tracemalloc.start()
        started = time.monotonic()
        try:
            yield
        finally:
            took = time.monotonic() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        if self.failures:
            failure = self.failures[0]["log_failure"]
            raise AssertionError(f"{what}: logged a failure: {failure.getTraceback()}")
        assert took < FUZZ_TIME_BOUND, f"{what}: took {took:.2f} s"
        assert peak < FUZZ_MEMORY_BOUND, f"{what}: {peak} octets allocated at the peak"


@pytest.fixture
def guard():
    observer = Guard()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)

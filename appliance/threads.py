"""Thread pools: each kind of blocking work has its own, named, built in ``tap.py``.

A pool is handed to the code that uses it as a ``run_in_thread(f, *args) ->
Deferred`` function, so that code never knows which pool (or, in tests and
offline commands, no thread at all: ``synchronous_runner``) runs its work.
Separate pools keep one kind of work from starving another: a storm of
password hashes cannot delay Maildir reads or spool work.
"""

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python import threadpool


def new_pool(name, maxthreads, minthreads=0):
    """A named Twisted ThreadPool (its name shows in thread listings)."""
    return threadpool.ThreadPool(minthreads=minthreads, maxthreads=maxthreads, name=name)


def pool_runner(reactor, pool):
    """``run_in_thread`` over a Twisted ThreadPool (results come back on the reactor)."""
    def run(f, *args):
        return threads.deferToThreadPool(reactor, pool, f, *args)
    return run


def synchronous_runner(f, *args):
    """``run_in_thread`` that runs in the caller (tests, offline CLI commands)."""
    return defer.maybeDeferred(f, *args)


class ThreadPoolService(service.Service):
    """Starts a ThreadPool with the service tree; on stop, drains work then stops it.
    Named after its pool.

    Add it BEFORE the services that use the pool: a MultiService stops its
    children in reverse order, so the pool outlives them.
    """

    def __init__(self, pool, drain=None, helpers=None):
        self.setName(f"pool-{pool.name}")
        self.pool = pool
        self._drain = drain
        self._helpers = helpers     # a concurrent.futures executor the pool's work uses

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        d = self._drain() if self._drain is not None else defer.succeed(None)
        d.addCallback(lambda _: self._stop())
        return d

    def _stop(self):
        self.pool.stop()
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)

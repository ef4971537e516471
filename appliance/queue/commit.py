"""Group commit: one writer thread makes batches of requests durable together.

fsync is the ceiling of durable acceptance: every ``250`` after DATA costs at
least one journal commit. So requests (a spool entry, a state update, a Maildir
delivery) are not written one by one. While a batch is on the writer thread,
new requests wait on the reactor side; when it finishes, each request's
Deferred fires and everything that accumulated goes as the next batch.

A batch runs in phases, each over all of its items::

    plan      each item decides what to write (may create directories, check files)
    write     open + write every file
    fsync     fsync every file, then close
    rename    rename temp files into place (the commit points)
    unlink    remove files
    dir sync  fsync each touched directory ONCE for the whole batch

An item's Deferred fires only after the batch's last phase, so never before its
own data and directory entries are durable. An item that fails in any phase is
cleaned up (its files unlinked, its ``rollback`` paths removed) and fails alone;
the other items go on.
"""

import os

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python.failure import Failure


class StorageError(Exception):
    """A durable write or read failed (disk full, I/O error...): answer 4xx, retry later."""

    def __init__(self, operation, error):
        super().__init__(f"{operation}: {error}")
        self.operation = operation
        self.error = str(error)


class Durable:
    """What one request asks the writer to make durable, and what its Deferred fires with.

    ``writes``: (path, bytes) files created (truncated if present) and fsynced.
    ``renames``: (src, dst) done after every file of the batch is fsynced.
    ``unlinks``: paths removed after the renames (a missing file is fine).
    ``sync_dirs``: directories whose entries changed; fsynced once per batch.
    ``rollback``: paths to remove if the item fails after its renames, so a
    failed request leaves no committed trace (e.g. the spool's state file).
    """

    __slots__ = ("writes", "renames", "unlinks", "sync_dirs", "rollback", "result")

    def __init__(self, writes=(), renames=(), unlinks=(), sync_dirs=(), rollback=(),
                 result=None):
        self.writes = list(writes)
        self.renames = list(renames)
        self.unlinks = list(unlinks)
        self.sync_dirs = list(sync_dirs)
        self.rollback = list(rollback)
        self.result = result


class FileSystem:
    """The system calls of the writer, one method each, so tests can count or fail them."""

    def open_new(self, path):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def write_all(self, fd, data):
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]

    def fsync(self, fd):
        os.fsync(fd)

    def close(self, fd):
        os.close(fd)

    def rename(self, src, dst):
        os.rename(src, dst)

    def unlink(self, path):
        os.unlink(path)

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mkdir(self, path, mode=0o700):
        os.mkdir(path, mode)

    def listdir(self, path):
        return os.listdir(path)

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def size(self, path):
        return os.stat(path).st_size


class _Item:
    """One request's progress through a batch (writer thread only)."""

    __slots__ = ("plan", "durable", "fds", "written", "renamed", "error")

    def __init__(self, plan):
        self.plan = plan
        self.durable = None
        self.fds = []
        self.written = []
        self.renamed = False
        self.error = None

    @property
    def alive(self):
        return self.error is None


def _each(items, step):
    """Run ``step(item)`` for every live item; an exception fails that item only."""
    for item in items:
        if item.alive:
            try:
                step(item)
            except Exception as e:  # noqa: BLE001 - one item's failure must not sink the batch
                item.error = e


def _discard(fs, paths):
    """Best-effort removal while cleaning up a failed item."""
    for path in paths:
        try:
            fs.unlink(path)
        except OSError:
            pass


def run_batch(fs, plans):
    """Make every plan's Durable durable; return ``[(ok, result_or_exception)]``.

    Runs on the writer thread. Only ``Exception`` is caught per item: anything
    else (a test's simulated kill) stops the batch dead, like a crash would.
    """
    items = [_Item(plan) for plan in plans]

    def plan(item):
        item.durable = item.plan(fs)

    def write(item):
        for path, data in item.durable.writes:
            fd = fs.open_new(path)
            item.fds.append(fd)
            item.written.append(path)
            fs.write_all(fd, data)

    def sync(item):
        for fd in item.fds:
            fs.fsync(fd)

    def rename(item):
        item.renamed = True
        for src, dst in item.durable.renames:
            fs.rename(src, dst)

    def unlink(item):
        for path in item.durable.unlinks:
            try:
                fs.unlink(path)
            except FileNotFoundError:
                pass

    _each(items, plan)
    _each(items, write)
    _each(items, sync)
    _close_all(fs, items)
    _each(items, rename)
    _each(items, unlink)
    _sync_dirs(fs, items)
    for item in items:
        if not item.alive and item.durable is not None:
            _discard(fs, (item.durable.rollback if item.renamed else []) + item.written)
    return [(item.alive, item.durable.result if item.alive else item.error)
            for item in items]


def _close_all(fs, items):
    for item in items:
        for fd in item.fds:
            try:
                fs.close(fd)
            except OSError as e:
                if item.alive:
                    item.error = e
        item.fds = []


def _sync_dirs(fs, items):
    """fsync each directory once; a failure fails every item that needed it."""
    users = {}
    for item in items:
        if item.alive:
            for path in item.durable.sync_dirs:
                users.setdefault(path, []).append(item)
    for path, needing in users.items():
        if not any(item.alive for item in needing):
            continue
        try:
            fs.fsync_dir(path)
        except Exception as e:  # noqa: BLE001 - fails the items that needed this directory
            for item in needing:
                if item.alive:
                    item.error = e


class GroupCommitWriter:
    """Queues durable requests on the reactor side and runs them in batches on one thread.

    ``run_in_thread(f, *args) -> Deferred`` runs ``f`` on the writer thread
    (``pool_runner`` over a one-thread ThreadPool; tests pass
    ``synchronous_runner`` or a runner they step by hand). Only one batch is
    ever in flight, so batches are ordered: a request submitted after another
    is never made durable before it.
    """

    def __init__(self, run_in_thread, fs=None, max_batch=256):
        self.run_in_thread = run_in_thread
        self.fs = fs if fs is not None else FileSystem()
        self.max_batch = max_batch  # bounds the file descriptors held open by one batch
        self._pending = []
        self._busy = False
        self._idle_waiters = []
        self.batches = 0
        self.items = 0

    def submit(self, plan, operation):
        """Run ``plan(fs) -> Durable`` in the next batch.

        The Deferred fires with ``Durable.result`` once durable; an OSError
        arrives as ``StorageError(operation, error)``.
        """
        d = defer.Deferred()
        self._pending.append((plan, operation, d))
        self._kick()
        return d

    def drain(self):
        """A Deferred that fires when nothing is queued or in flight (for shutdown)."""
        if not self._busy and not self._pending:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _kick(self):
        if self._busy or not self._pending:
            return
        batch = self._pending[:self.max_batch]
        del self._pending[:self.max_batch]
        self._busy = True
        self.batches += 1
        self.items += len(batch)
        d = self.run_in_thread(run_batch, self.fs, [plan for plan, _, _ in batch])
        d.addBoth(self._finished, batch)

    def _finished(self, outcomes, batch):
        # Still "busy" while the callbacks run: what they submit waits and
        # goes together in the next batch instead of one item at a time.
        if isinstance(outcomes, Failure):
            outcomes = [(False, outcomes)] * len(batch)
        for (_, operation, d), (ok, value) in zip(batch, outcomes):
            if ok:
                d.callback(value)
            else:
                d.errback(_as_failure(operation, value))
        self._busy = False
        self._kick()
        if not self._busy and not self._pending:
            waiters, self._idle_waiters = self._idle_waiters, []
            for waiter in waiters:
                waiter.callback(None)


def _as_failure(operation, error):
    if isinstance(error, Failure):
        error = error.value
    if isinstance(error, OSError):
        return Failure(StorageError(operation, error))
    return Failure(error)


def makedirs(fs, path, mode=0o700):
    """mkdir -p through ``fs``; returns the directories it created, outermost first.

    The caller fsyncs their parents so the new directories are durable too.
    """
    try:
        fs.mkdir(path, mode)
    except FileExistsError:
        return []
    except FileNotFoundError:
        parent = os.path.dirname(path)
        if parent == path:
            raise
        created = makedirs(fs, parent, mode)
        fs.mkdir(path, mode)
        return created + [path]
    return [path]


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

    Add it BEFORE the services that use the pool: a MultiService stops its
    children in reverse order, so the pool outlives them.
    """

    def __init__(self, pool, drain=None):
        self.pool = pool
        self._drain = drain

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        d = self._drain() if self._drain is not None else defer.succeed(None)
        d.addCallback(lambda _: self.pool.stop())
        return d

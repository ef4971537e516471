"""Group commit: one writer thread makes batches of requests durable together.

fsync is the ceiling of durable acceptance: every ``250`` after DATA costs at
least one journal commit. So requests (a spool entry, a state update, a Maildir
delivery) are not written one by one. While a batch is on the writer thread,
new requests wait on the reactor side; when it finishes, each request's
Deferred fires and everything that accumulated goes as the next batch.

A batch runs in phases, each over all of its items::

    plan      each item decides what to write (may create directories, check files)
    write     open + write every file (new, or recycled and written over)
    fsync     fsync every file, then close (ParallelFileSystem: write, fsync
              and close as one task per file, all files at once)
    rename    rename temp files into place (the commit points)
    link      hard links to committed files (a message into its Maildirs)
    unlink    remove files
    dir sync  fsync each touched directory ONCE for the whole batch
    retire    renames and unlinks an item no longer needs once its links are
              durable (a spool entry delivered in its own commit's batch)

An item's Deferred fires only after the batch's last phase, so never before its
own data and directory entries are durable. An item that fails in any phase is
cleaned up (its files unlinked, its ``rollback`` paths and links removed) and
fails alone; the other items go on.

Links come after every rename, so a link never exists before the commit it
depends on, and they are "soft": a link that fails (or whose directory fsync
fails) does not fail its item, it is reported with the result and redone later
by whoever asked for it.
"""

import errno
import os

from twisted.internet import defer
from twisted.python.failure import Failure


class StorageError(Exception):
    """A durable write or read failed (disk full, I/O error...): answer 4xx, retry later."""

    def __init__(self, operation, error):
        super().__init__(f"{operation}: {error}")
        self.operation = operation
        self.error = str(error)


COPY_CHUNK = 8 * 1024 * 1024      # octets per copy_file_range call


class Spliced:
    """The data of a write: ``head`` (bytes) followed by the whole content of
    the file ``source``, ``size`` octets in all. The copy is the kernel's
    (``copy_file_range``): a message body that is in a spool file (issue 17)
    is never in this process's memory, nor in the writer child's, and
    crosses the pipe to the child as a path. A source that no longer has
    the size it had fails the write."""

    __slots__ = ("head", "source", "size")

    def __init__(self, head, source, size):
        self.head, self.source, self.size = head, source, size

    def __reduce__(self):
        return (Spliced, (self.head, self.source, self.size))


def octets(data):
    """The size of a write's data (bytes or Spliced)."""
    return data.size if isinstance(data, Spliced) else len(data)


def _copy_file(source, fd, expected):
    """Append the content of ``source`` to ``fd``; OSError unless it was
    exactly ``expected`` octets."""
    copied = 0
    with open(source, "rb") as src:
        fast = hasattr(os, "copy_file_range")
        while True:
            n = 0
            if fast:
                try:
                    n = os.copy_file_range(src.fileno(), fd, COPY_CHUNK)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL,
                                       errno.EOPNOTSUPP):
                        raise
                    fast = False
            if not fast:
                chunk = src.read(1024 * 1024)
                n = len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            if n == 0:
                break
            copied += n
            if copied > expected:
                break
    if copied != expected:
        raise OSError(errno.EIO, f"{source}: {copied} octets, expected {expected}")


class Durable:
    """What one request asks the writer to make durable, and what its Deferred fires with.

    ``writes``: (path, bytes or ``Spliced``) files created (truncated if
    present) and fsynced.
    ``renames``: (src, dst) done after every file of the batch is fsynced.
    ``unlinks``: paths removed after the renames (a missing file is fine).
    ``sync_dirs``: directories whose entries changed; fsynced once per batch.
    ``rollback``: paths to remove if the item fails after its renames, so a
    failed request leaves no committed trace (e.g. the spool's state file).
    ``rewrites``: (path, bytes) like ``writes``, for files that may exist (a
    recycled state file): written over from the start and cut to length, so
    the file system reuses their blocks instead of freeing and allocating.
    ``links``: (src, dst) hard links made after the renames, their directories
    fsynced with the batch. An existing ``dst`` counts as made (the callers
    name links after queue ids: an existing one is this message from an
    earlier attempt). With links the item's result is ``(result, failed)``,
    ``failed`` mapping each dst that was not made durable to its exception.
    ``retire``: ("rename", src, dst) and ("unlink", path) steps done after
    the directory fsyncs, only when the item succeeded and every one of its
    links is durable; not fsynced themselves (a crash that loses them only
    makes the next start redo work already done), best effort.
    """

    __slots__ = ("writes", "renames", "unlinks", "sync_dirs", "rollback", "result",
                 "links", "rewrites", "retire")

    def __init__(self, writes=(), renames=(), unlinks=(), sync_dirs=(), rollback=(),
                 result=None, links=(), rewrites=(), retire=()):
        self.writes = list(writes)
        self.rewrites = list(rewrites)
        self.retire = list(retire)
        self.renames = list(renames)
        self.unlinks = list(unlinks)
        self.sync_dirs = list(sync_dirs)
        self.rollback = list(rollback)
        self.result = result
        self.links = list(links)


class FileSystem:
    """The system calls of the writer, one method each, so tests can count or fail them."""

    parallel = False        # see ParallelFileSystem

    def open_new(self, path):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)

    def open_existing(self, path):
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def truncate(self, fd, length):
        os.ftruncate(fd, length)

    def write_all(self, fd, data):
        if isinstance(data, Spliced):
            self.write_all(fd, data.head)
            _copy_file(data.source, fd, data.size - len(data.head))
            return
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

    def link(self, src, dst):
        os.link(src, dst)

    def fsync_dir(self, path):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_all(self, fds):
        """fsync each file; a list of None or the Exception, one per fd."""
        return [_attempt(self.fsync, fd) for fd in fds]

    def fsync_dirs(self, paths):
        """fsync each directory; a list of None or the Exception, one per path."""
        return [_attempt(self.fsync_dir, path) for path in paths]

    def mkdir(self, path, mode=0o700):
        os.mkdir(path, mode)

    def listdir(self, path):
        return os.listdir(path)

    def read(self, path):
        with open(path, "rb") as f:
            return f.read()

    def size(self, path):
        return os.stat(path).st_size


def _attempt(call, arg):
    """None if ``call(arg)`` worked, else its Exception (BaseException escapes:
    a test's simulated kill must stop the batch)."""
    try:
        call(arg)
    except Exception as e:  # noqa: BLE001 - reported per file, failing its item only
        return e
    return None


class ParallelFileSystem(FileSystem):
    """Writes and fsyncs the files (and directories) of a batch concurrently.

    Each fsync waits for the device on its own; one after the other, a batch
    of n messages costs n device round trips (the file system may not merge
    them: ext4 without a journal does not). Issued together from ``executor``
    threads (a ``concurrent.futures`` executor; the GIL is released while they
    wait) they overlap, and the block layer merges their cache flushes: a
    batch costs about one round trip, like a journal commit shared by many.

    Each file is one task (open, write, fsync, close): every system call
    gives the GIL away and waits to get it back from the busy reactor thread,
    so the writer thread making them one after the other would wait for the
    sum of those turns; from several threads the waits overlap too. (The
    renames and links stay on the writer thread: handing those out as tasks
    too measured slower, each costing more in hand-over than it saved.)
    A batch of at most ``inline`` files (one message at low load) goes on
    the calling thread: there is nothing to overlap. (Measured in the writer
    child at concurrency 10: with two or more files in parallel a batch took
    1.25 ms, with up to four one after the other 1.7 ms.)
    """

    parallel = True

    def __init__(self, executor, inline=1):
        self.executor = executor
        self.inline = inline        # a batch this small goes file by file: no hand-overs

    def store_files(self, tasks):
        """``[(path, data, rewrite)]`` written, fsynced and closed, each on
        its own; a list of None or the Exception, one per task."""
        if len(tasks) <= self.inline:
            return [self._store(task) for task in tasks]
        return list(self.executor.map(self._store, tasks))

    def _store(self, task):
        path, data, rewrite = task
        try:
            fd = self.open_existing(path) if rewrite else self.open_new(path)
        except Exception as e:  # noqa: BLE001 - reported for this file's item
            return e
        error = None
        try:
            self.write_all(fd, data)
            if rewrite:
                self.truncate(fd, len(data))
            self.fsync(fd)
        except Exception as e:  # noqa: BLE001 - reported for this file's item
            error = e
        try:
            self.close(fd)
        except Exception as e:  # noqa: BLE001 - a failed close may mean lost data
            error = error or e
        return error

    def fsync_dirs(self, paths):
        if len(paths) <= max(1, self.inline):
            return super().fsync_dirs(paths)
        return list(self.executor.map(_attempt, [self.fsync_dir] * len(paths), paths))


class _Item:
    """One request's progress through a batch (writer thread only)."""

    __slots__ = ("plan", "durable", "fds", "written", "renamed", "error", "linked",
                 "link_failed")

    def __init__(self, plan):
        self.plan = plan
        self.durable = None
        self.fds = []
        self.written = []
        self.renamed = False
        self.error = None
        self.linked = []            # links this item created (rolled back if it fails)
        self.link_failed = {}       # dst -> exception: soft failures, reported

    def outcome(self):
        if not self.alive:
            return False, self.error
        if self.durable.links:
            return True, (self.durable.result, self.link_failed)
        return True, self.durable.result

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
    The plans run here; the rest goes to ``fs.execute`` when the file system
    has one (``ChildProcessFileSystem``: the writes run in another process).
    """
    prepare = getattr(fs, "prepare_batch", None)
    if prepare is not None:
        try:
            prepare()
        except OSError as e:
            return [(False, e)] * len(plans)
    items = plan_items(fs, plans)
    execute = getattr(fs, "execute", None)
    if execute is not None:
        execute(items)
    else:
        execute_items(fs, items)
    return [item.outcome() for item in items]


def plan_items(fs, plans):
    """The plan phase: one ``_Item`` per plan, its ``durable`` set (or its
    ``error``, for a plan that raised)."""
    items = [_Item(plan) for plan in plans]

    def plan(item):
        item.durable = item.plan(fs)

    _each(items, plan)
    return items


def execute_items(fs, items):
    """Every phase after planning (see the module docstring), over ``items``
    whose ``durable`` is set; failures land in ``item.error`` and
    ``item.link_failed``."""

    def write(item):
        for path, data in item.durable.writes:
            fd = fs.open_new(path)
            item.fds.append(fd)
            item.written.append(path)
            fs.write_all(fd, data)
        for path, data in item.durable.rewrites:
            fd = fs.open_existing(path)
            item.fds.append(fd)
            item.written.append(path)
            fs.write_all(fd, data)
            fs.truncate(fd, len(data))

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

    if fs.parallel:
        _store_files(fs, items)
    else:
        _each(items, write)
        _sync_files(fs, items)
        _close_all(fs, items)
    _each(items, rename)
    _each(items, lambda item: _link(fs, item))
    _each(items, unlink)
    _sync_dirs(fs, items)
    for item in items:
        if not item.alive and item.durable is not None:
            _discard(fs, (item.durable.rollback if item.renamed else []) + item.written
                     + item.linked)
        elif item.alive and item.durable.retire and not item.link_failed:
            _retire(fs, item.durable.retire)


def _retire(fs, steps):
    for step in steps:
        try:
            if step[0] == "rename":
                fs.rename(step[1], step[2])
            else:
                fs.unlink(step[1])
        except Exception:  # noqa: BLE001 - the item is durable: never fail it now
            return          # the rest is left for the next start's recovery


def _link(fs, item):
    for src, dst in item.durable.links:
        try:
            fs.link(src, dst)
        except FileExistsError:
            pass                    # made by an earlier attempt: not ours to roll back
        except OSError as e:
            item.link_failed[dst] = e
        else:
            item.linked.append(dst)


def _store_files(fs, items):
    """The write, fsync and close phases as one task per file, all at once
    (``ParallelFileSystem.store_files``)."""
    tasks, owners = [], []
    for item in items:
        if item.alive:
            for path, data in item.durable.writes:
                tasks.append((path, data, False))
                owners.append(item)
            for path, data in item.durable.rewrites:
                tasks.append((path, data, True))
                owners.append(item)
    for item, (path, _, _), error in zip(owners, tasks, fs.store_files(tasks)):
        item.written.append(path)
        if error is not None and item.alive:
            item.error = error


def _sync_files(fs, items):
    """fsync every live item's files in one call (``FileSystem.fsync_all``)."""
    pairs = [(item, fd) for item in items if item.alive for fd in item.fds]
    errors = fs.fsync_all([fd for _, fd in pairs])
    for (item, _), error in zip(pairs, errors):
        if error is not None and item.alive:
            item.error = error


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
    """fsync each directory once; a failure fails every item that needed it
    and every link made into it."""
    users, links = {}, {}
    for item in items:
        if item.alive:
            for path in item.durable.sync_dirs:
                users.setdefault(path, []).append(item)
            for _, dst in item.durable.links:
                if dst not in item.link_failed:
                    links.setdefault(os.path.dirname(dst), []).append((item, dst))
    paths = [path for path in list(users) + [p for p in links if p not in users]
             if any(item.alive for item in users.get(path, ())) or path in links]
    for path, error in zip(paths, fs.fsync_dirs(paths)):
        if error is None:
            continue
        for item in users.get(path, ()):
            if item.alive:
                item.error = error
        for item, dst in links.get(path, ()):
            item.link_failed[dst] = error


class GroupCommitWriter:
    """Queues durable requests on the reactor side and runs them in batches.

    ``run_in_thread(f, *args) -> Deferred`` runs ``f`` on the writer thread
    (``pool_runner`` over a one-thread ThreadPool; tests pass
    ``synchronous_runner`` or a runner they step by hand).

    Batches are ordered: a request submitted after another is never made
    durable before it. A batch on the writer thread is the only one in
    flight. A batch of light requests, when the file system can take it
    from the reactor (``ChildProcessFileSystem.ready_here``: a pipe to the
    writer child, which answers in order), may go while ``pipeline - 1``
    others are still in the child: it waits in the pipe instead of in this
    queue, and the child starts it the moment the one before is done,
    without a round trip through the reactor in between. Such a second
    batch holds at most ``pipelined_batch`` requests, so that it fits the
    pipe even before the child reads it.
    """

    def __init__(self, run_in_thread, fs=None, max_batch=256, pipeline=2,
                 pipelined_batch=16):
        self.run_in_thread = run_in_thread
        self.fs = fs if fs is not None else FileSystem()
        self.max_batch = max_batch  # bounds the file descriptors held open by one batch
        self.pipeline = pipeline
        self.pipelined_batch = pipelined_batch
        self._pending = []
        self._in_flight = 0
        self._on_thread = False     # the batch in flight runs on the writer thread
        self._completing = False    # a batch's callbacks are running
        self._idle_waiters = []
        self.batches = 0
        self.items = 0

    def submit(self, plan, operation, light=False):
        """Run ``plan(fs) -> Durable`` in a coming batch.

        The Deferred fires with ``Durable.result`` once durable; an OSError
        arrives as ``StorageError(operation, error)``. ``light``: the plan
        makes at most a few quick system calls and its writes are small, so
        it may run on the reactor thread (see the class docstring).
        """
        d = defer.Deferred()
        self._pending.append((plan, operation, d, light))
        self._kick()
        return d

    def drain(self):
        """A Deferred that fires when nothing is queued or in flight (for shutdown)."""
        if not self._in_flight and not self._pending:
            return defer.succeed(None)
        d = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _kick(self):
        # While a batch's callbacks run, what they submit waits and goes
        # together in the next batch instead of one request at a time.
        while self._pending and not self._on_thread and not self._completing:
            if self._in_flight and self._in_flight >= self.pipeline:
                return              # no room either way (below): spare the checks
            here = self._can_run_here()
            if here:
                if self._in_flight >= self.pipeline:
                    return
                size = self.pipelined_batch if self._in_flight else self.max_batch
            elif self._in_flight:
                return              # the thread's batch goes alone
            else:
                size = self.max_batch
            batch = self._pending[:size]
            del self._pending[:size]
            self._in_flight += 1
            self._on_thread = not here
            self.batches += 1
            self.items += len(batch)
            plans = [plan for plan, _, _, _ in batch]
            if here:
                d = self.fs.run_batch_here(plans)
            else:
                d = self.run_in_thread(run_batch, self.fs, plans)
            d.addBoth(self._finished, batch)

    def _can_run_here(self):
        ready = getattr(self.fs, "ready_here", None)
        if ready is None:
            return False
        size = self.pipelined_batch if self._in_flight else self.max_batch
        return all(light for _, _, _, light in self._pending[:size]) and ready()

    def _finished(self, outcomes, batch):
        if isinstance(outcomes, Failure):
            outcomes = [(False, outcomes)] * len(batch)
        self._completing = True
        try:
            for (_, operation, d, _), (ok, value) in zip(batch, outcomes):
                if ok:
                    d.callback(value)
                else:
                    d.errback(_as_failure(operation, value))
        finally:
            self._completing = False
        self._in_flight -= 1
        self._on_thread = False
        self._kick()
        if not self._in_flight and not self._pending:
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

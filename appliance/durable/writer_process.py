"""The group commit's writes, fsyncs, renames and links, in a child process.

Why a process: every system call a Python thread makes gives the GIL away,
and getting it back from a busy reactor thread costs a forced switch (up to
the switch interval, and a storm of futex calls). A batch makes about a
dozen such calls per message, so under load the writer threads and the
reactor spent more time handing the GIL around than doing either's work.
The child has its own interpreter and GIL: the writer thread hands it a
whole batch in one pipe write and waits for one reply, and the reactor's
core stays on the protocols.

The plans still run in the server process, on the writer thread (they look
at the file system: a Maildir already delivered, a spare state file); only
their ``Durable``\\ s cross the pipe, as plain tuples, and only each item's
error and failed links come back. The child runs exactly
``commit.execute_items``: the commit protocol is the same code either way.

Safety across crashes: the server holds an exclusive ``flock`` on
``<data_dir>/queue.lock`` from its first batch, and the child inherits it. A
restarted server's recovery (its first batch) waits for that lock, so it can
never scan the queue while a dead server's child still finishes a batch. The
child also asks the kernel to kill it when its parent dies, and exits at
end of input.

Wire format, both ways: a 4-byte big-endian length, then a pickle (the pipe
is private to the two processes).
"""

import collections
import fcntl
import os
import pickle
import struct
import subprocess
import sys
import threading
import time

from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from zope.interface import implementer

from appliance import events
from appliance.durable.commit import Durable, FileSystem, _Item, execute_items, plan_items

events.register("spool.writer.started", "the writer child (the spool's fsyncs) started",
                ("pid",))
events.register("spool.writer.lost", "the writer child ended or broke its pipe: the batches "
                "it held failed with 451, the next batch starts a new one", ("pid", "status"))

_LENGTH = struct.Struct(">I")
_FIELDS = ("writes", "rewrites", "renames", "unlinks", "sync_dirs", "rollback", "links",
           "retire")
LOCK_WAIT = 30.0            # seconds a new server waits for an old one's writer to end
PIPE_BYTES = 1024 * 1024    # the request pipe's size (F_SETPIPE_SZ; unprivileged maximum)


class WriterDied(OSError):
    """The child process ended or its pipe broke: the batch's items fail (4xx)."""


class ChildProcessFileSystem(FileSystem):
    """A FileSystem whose batches run in a child (``python -m appliance.durable.writer_process``).

    Plans get this object's own (local) system calls; ``run_batch`` then
    hands the planned items to ``execute``. Used from the writer thread only.
    ``shutdown()`` ends the child (the ThreadPoolService calls it, as it would
    an executor's).
    """

    def __init__(self, lock_path, threads=16, python=None, reactor=None):
        self.lock_path = lock_path
        self.threads = threads
        self.python = python or sys.executable
        self.reactor = reactor          # given: light batches run from the reactor
        self._lock_fd = None
        self._child = None
        self._guard = threading.Lock()
        self._awaiting = collections.deque()    # (items, Deferred) sent from the reactor
        self._reader = None

    # -- the child

    def prepare_batch(self):
        """Hold the queue lock and have a child running (writer thread)."""
        with self._guard:
            if self._lock_fd is None:
                self._lock_fd = _acquire(self.lock_path)
            if self._child is None:
                self._child = self._spawn()

    def _spawn(self):
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        # A process group of its own: Ctrl-C at twistd's terminal (SIGINT to the
        # foreground group) is the server's to handle; the child ends with it.
        child = subprocess.Popen(
            [self.python, "-m", "appliance.durable.writer_process", str(self.threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(self._lock_fd,),
            env=env, bufsize=0, process_group=0)
        try:        # room for a batch while the child works on the one before
            fcntl.fcntl(child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except (OSError, AttributeError):
            pass    # the default 64 KiB: GroupCommitWriter keeps the second batch small
        self._emit("spool.writer.started", pid=child.pid)
        return child

    def _emit(self, name, **fields):
        """An event, from whichever thread: it is written on the reactor's."""
        if self.reactor is None:
            events.emit(name, **fields)
        else:
            self.reactor.callFromThread(events.emit, name, **fields)

    def shutdown(self, wait=True):
        with self._guard:
            child, self._child = self._child, None
            if child is not None:
                child.stdin.close()         # end of input: the child exits
                if wait:
                    try:
                        child.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        child.kill()
                        child.wait()
                child.stdout.close()
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    # -- a batch

    def execute(self, items):
        """The batch's writes, in the child (writer thread; ``run_batch``
        has called ``prepare_batch``)."""
        message = _request(items)
        if message is None:
            return
        try:
            reply = self._call(message)
        except OSError as e:
            self._forget_child()
            _fail(items, e)
            return
        _apply(items, reply)

    # -- light batches, from the reactor thread

    def ready_here(self):
        """Can ``run_batch_here`` take a batch now? Not before the first
        batch (recovery, on the thread) made the child, nor without a reactor,
        nor once the child died (the thread path makes a new one)."""
        child = self._child
        if self.reactor is None or child is None or self._lock_fd is None:
            return False
        if child.poll() is not None:
            self._fail_awaiting(WriterDied("writer process ended"))
            return False
        return True

    def run_batch_here(self, plans):
        """``run_batch`` without a thread: a Deferred of the outcomes.

        For light plans (``GroupCommitWriter.submit``), after ``ready_here``:
        the plans run here, the request goes down the pipe (small; the pipe
        holds PIPE_BYTES, so the write does not wait for the child even while
        it works on the batch before), and the reactor watches for replies.
        The child answers batches in the order they were sent.
        """
        child = self._child
        items = plan_items(self, plans)
        message = _request(items)
        if message is None:
            return defer.succeed(_outcomes(items))
        try:
            _write_all(child.stdin.fileno(), message)
        except OSError as e:
            died = WriterDied(f"writer process: {e}")
            self._fail_awaiting(died)
            _fail(items, died)
            return defer.succeed(_outcomes(items))
        done = defer.Deferred()
        self._awaiting.append((items, done))
        if self._reader is None:
            self._reader = _Readable(child.stdout.fileno(), self._reply_ready)
            self.reactor.addReader(self._reader)
        return done

    def _reply_ready(self):
        """The oldest batch sent has its reply (or the child is gone)."""
        try:
            reply = pickle.loads(_read_message(self._reader.fd))
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            self._fail_awaiting(WriterDied(f"writer process: {e}"))
            return
        items, done = self._awaiting.popleft()
        if not self._awaiting:
            self._stop_reading()
        _apply(items, reply)
        done.callback(_outcomes(items))

    def _fail_awaiting(self, error):
        """The child is gone: every batch sent and not answered fails, a new
        child comes with the next batch on the thread."""
        self._stop_reading()
        awaiting, self._awaiting = self._awaiting, collections.deque()
        with self._guard:
            self._forget_child()
        for items, done in awaiting:
            _fail(items, error)
            done.callback(_outcomes(items))

    def _stop_reading(self):
        if self._reader is not None:
            self.reactor.removeReader(self._reader)
            self._reader = None

    def _call(self, message):
        try:
            self._send(message)
        except BrokenPipeError:
            # The child had died before this batch (nothing of it ran): a new one.
            self._forget_child()
            self.prepare_batch()
            self._send(message)
        try:
            return pickle.loads(_read_message(self._child.stdout.fileno()))
        except (OSError, EOFError, pickle.UnpicklingError) as e:
            raise WriterDied(f"writer process: {e}") from None

    def _send(self, message):
        try:
            _write_all(self._child.stdin.fileno(), message)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise WriterDied(f"writer process: {e}") from None

    def _forget_child(self):
        """Done with a child that died or broke its pipe (the next batch on
        the thread starts another)."""
        child, self._child = self._child, None
        if child is not None:
            child.kill()
            status = child.wait()
            child.stdin.close()
            child.stdout.close()
            self._emit("spool.writer.lost", pid=child.pid, status=status)


@implementer(IReadDescriptor)
class _Readable:
    """The child's reply pipe, watched by the reactor for one batch."""

    def __init__(self, fd, ready):
        self.fd = fd
        self.doRead = ready

    def fileno(self):
        return self.fd

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "group-commit-writer"


def _acquire(path):
    """An fd holding an exclusive flock on ``path`` (waits up to LOCK_WAIT)."""
    os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                raise OSError(f"{path} stays locked: another server uses this data_dir") \
                    from None
            time.sleep(0.05)


def _frame(value):
    """``value`` as it crosses the pipe: its length, then its pickle."""
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(data)) + data


def _request(items):
    """The framed request for the live items (numbered by their place in
    ``items``), or None when none is left to write."""
    request = [(n, tuple(getattr(item.durable, f) for f in _FIELDS))
               for n, item in enumerate(items) if item.alive]
    return _frame(request) if request else None


def _apply(items, reply):
    """What the child reported: each item's error and failed links."""
    for n, error, link_failed in reply:
        items[n].error = error
        items[n].link_failed = link_failed


def _fail(items, error):
    for item in items:
        if item.alive:
            item.error = error


def _outcomes(items):
    return [item.outcome() for item in items]


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise EOFError("end of input")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_message(fd):
    (length,) = _LENGTH.unpack(_read_exact(fd, _LENGTH.size))
    return _read_exact(fd, length)


# -- the child's side


def _die_with_parent():
    """Ask the kernel for SIGKILL when the parent dies (Linux), best effort."""
    parent = os.getppid()
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, 9)            # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # it died before the call
        os._exit(1)


def _portable(error):
    """An exception that pickles (the item's error, back in the server)."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception becomes an OSError
        return OSError(f"{type(error).__name__}: {error}")


def serve(fs, infd=0, outfd=1):
    """Run batches from ``infd`` until end of input."""
    while True:
        try:
            request = pickle.loads(_read_message(infd))
        except EOFError:
            return
        items = []
        for _, fields in request:
            item = _Item(None)
            item.durable = Durable(**dict(zip(_FIELDS, fields)))
            items.append(item)
        execute_items(fs, items)
        reply = [(n, None if item.alive else _portable(item.error),
                  {dst: _portable(e) for dst, e in item.link_failed.items()})
                 for (n, _), item in zip(request, items)]
        _write_all(outfd, _frame(reply))


def main(argv):
    from concurrent import futures

    from appliance.durable.commit import ParallelFileSystem
    _die_with_parent()
    threads = int(argv[0]) if argv else 16
    with futures.ThreadPoolExecutor(threads, thread_name_prefix="fsync") as executor:
        serve(ParallelFileSystem(executor))


if __name__ == "__main__":
    main(sys.argv[1:])

"""A DATA body on its way into the spool, in bounded memory (issue 17).

The header section stays in memory (the checks and the signer read it; it
is refused over 1 MiB anyway). The rest of the message stays in memory
while the message is small (``SPILL_AT``: the common message costs no file
and no thread hop more than before); once it outgrows that, the body after
the blank line goes to a file in the spool's directory as it arrives:
``BodyFile``, written in chunks on a thread pool, in the stored form (LF
line ends, as ``appliance.maildir.maildir_bytes`` keeps a message). The
client is not read while more than ``BACKLOG`` octets wait for the file.

At the end of DATA the checks read the body back from the file, on their
worker thread, piece by piece (``BodyFile.pieces``: DKIM's body hashes);
the pipeline's result is our header fields plus the client's header
section (``SpooledMessage.front``), and the spool's commit writes the
message file as that front followed by a kernel copy of the body file
(``appliance.durable.commit.Spliced``), fsynced and linked into the
Maildirs in the same batch as ever, then unlinks the body file. A message
that is refused, or whose client leaves, has its body file unlinked before
the reply (``discard``). A body file left by a crash ends in ``.tmp`` and
is removed by the spool's recovery at the next start.
"""

import os

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from appliance.durable.commit import Spliced, StorageError
from appliance.maildir import maildir_bytes, round_trips

_log = Logger(namespace="mailappliance.queue")

SPILL_AT = 256 * 1024       # a message body past this goes to a file
CHUNK = 128 * 1024          # octets handed to the file per write
BACKLOG = 512 * 1024        # octets waiting for the file: the client is not read
READ_PIECE = 256 * 1024     # octets per read when the body is read back
CRLF = b"\r\n"


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class BodyFile:
    """The body of one message in a file of the spool directory, written as
    it arrives.

    Reactor side: ``write(data)`` (CRLF lines), ``backlogged``,
    ``finish()``, ``discard()``; ``on_drain`` is called when a backlog is
    written out. The file work runs through ``run_in_thread``, one task at
    a time and in order: open and write, close, unlink. ``wire_size`` and
    ``stored_size`` count the body with CRLF and as stored (LF).
    """

    wire_size = 0
    stored_size = 0
    error = None                # the OSError that failed a write

    def __init__(self, path, run_in_thread, on_drain=None, chunk=CHUNK, backlog=BACKLOG):
        self.path = path
        self.run_in_thread = run_in_thread
        self.on_drain = on_drain
        self.chunk = chunk
        self.backlog = backlog
        self._pending = []
        self._pending_size = 0
        self._busy = False
        self._finishing = None      # a Deferred once finish() was called
        self._discarded = None      # a Deferred once discard() was called
        self._fd = None             # the open file (thread side)

    @property
    def backlogged(self):
        return self._pending_size >= self.backlog

    def write(self, data):
        if self._discarded is not None or self._finishing is not None:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        self.wire_size += len(data)
        self._pump()

    def finish(self):
        """A Deferred firing with this BodyFile once every octet is in the
        file and the file is closed (fsynced later, by the spool's commit);
        StorageError if a write failed."""
        if self._finishing is None:
            self._finishing = defer.Deferred()
            self._pump()
        d = defer.Deferred()
        self._finishing.addBoth(_pass_on, d)
        return d

    def discard(self):
        """A Deferred firing once the file is gone (after any write still running)."""
        if self._discarded is None:
            self._discarded = defer.Deferred()
            self._pending, self._pending_size = [], 0
            self._pump()
        d = defer.Deferred()
        self._discarded.addBoth(_pass_on, d)
        return d

    def _pump(self):
        if self._busy:
            return
        if self._discarded is not None:
            if not self._discarded.called:
                self._run(self._unlink, self._discarded)
            return
        if self._pending and (self._pending_size >= self.chunk or self._finishing is not None):
            data = b"".join(self._pending)
            was_backlogged = self.backlogged
            self._pending, self._pending_size = [], 0
            self._run(self._append, None, data)
            if was_backlogged and self.on_drain is not None:
                self.on_drain()
            return
        if self._finishing is not None and not self._finishing.called:
            self._run(self._close, self._finishing)

    def _run(self, task, done, *args):
        self._busy = True
        d = self.run_in_thread(task, *args)
        d.addBoth(self._ran, done)

    def _ran(self, result, done):
        self._busy = False
        failure = result if isinstance(result, Failure) else None
        if failure is not None and self.error is None:
            self.error = failure.value
            if not failure.check(OSError):
                _log.failure("writing a message body to {path} failed", failure,
                             path=self.path)
        if done is not None and not done.called:
            if done is self._finishing and self.error is not None:
                done.errback(StorageError("incoming", self.error))
            else:
                done.callback(self)
        finishing = self._finishing
        if self._discarded is not None and self._discarded.called and \
                finishing is not None and not finishing.called:
            finishing.errback(StorageError("incoming", "the body was discarded"))
        self._pump()

    # -- thread side

    def _append(self, data):
        if self.error is not None:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                               0o600)
        stored = data.replace(CRLF, b"\n")
        _write_all(self._fd, stored)
        self.stored_size += len(stored)

    def _close(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        if self.error is not None:
            raise self.error

    def _unlink(self):
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def pieces(self):
        """The body as written, with CRLF line ends, in pieces (a worker
        thread's reads, after ``finish``)."""
        with open(self.path, "rb") as f:
            while True:
                piece = f.read(READ_PIECE)
                if not piece:
                    return
                yield piece.replace(b"\n", CRLF)


def _pass_on(result, d):
    if isinstance(result, Failure):
        d.errback(result)
    else:
        d.callback(result)
    return None


class SpooledMessage:
    """A message for ``Spool.accept`` whose body is a finished ``BodyFile``:
    ``front`` (bytes, CRLF) is everything before the body (our header
    fields, the client's header section, the blank line)."""

    def __init__(self, front, body):
        self.front = front
        self.body = body

    @property
    def size(self):
        """Octets as received and relayed (CRLF)."""
        return len(self.front) + self.body.wire_size

    def stored(self, sender):
        """The ``Spliced`` write of the stored form; ValueError when the
        front would not come back from it exactly (it always does: SMTP
        refuses a bare CR or LF)."""
        if not round_trips(self.front):
            raise ValueError("header section with a bare LF")
        head = maildir_bytes(sender, self.front)
        return Spliced(head, self.body.path, len(head) + self.body.stored_size)


class IncomingMessage:
    """What DATA has received so far: the sink of a ``DataBody``.

    ``write(data)`` takes complete CRLF lines, dot-unstuffed. The header
    section is kept until its blank line (at most ``max_head`` octets and
    one write more: past that ``overflow`` is set and nothing more is kept;
    the pipeline refuses such a header section). The rest is kept in memory
    up to ``spill_at`` octets, then goes to the ``BodyFile`` that
    ``open_file()`` gives (None, or no ``open_file``: it stays in memory).
    """

    def __init__(self, open_file=None, max_head=1024 * 1024, spill_at=SPILL_AT):
        self._open_file = open_file
        self.max_head = max_head
        self.spill_at = spill_at
        self.overflow = False
        self.file = None
        self._head = bytearray()
        self._head_done = False
        self._rest = []
        self._rest_size = 0
        self._dropped = False

    @property
    def backlogged(self):
        return self.file is not None and self.file.backlogged

    def write(self, data):
        if self._dropped:
            return
        if self.file is not None:
            self.file.write(data)
            return
        if not self._head_done:
            data = self._take_head(data)
            if data is None:
                return
        self._rest.append(data)
        self._rest_size += len(data)
        if self._rest_size > self.spill_at and self._open_file is not None:
            self._spill()

    def _take_head(self, data):
        """Add to the header section; the part after it (None: none yet)."""
        if self.overflow:
            return None
        if data.startswith(CRLF):       # writes are whole lines: a blank line here
            end = 0
        else:
            end = data.find(b"\r\n\r\n")
            end = -1 if end < 0 else end + 2
        if end < 0:
            self._head += data
            self.overflow = len(self._head) > self.max_head
            return None
        self._head += data[:end]
        self._head_done = True
        if len(self._head) > self.max_head:
            self.overflow = True
            return None
        return data[end:]

    def _spill(self):
        self.file = self._open_file()
        if self.file is None:
            self._open_file = None
            return
        rest, self._rest, self._rest_size = b"".join(self._rest), [], 0
        self.file.write(rest[2:])       # the body: after the blank line

    def drop(self):
        """The message cannot be accepted (a fault): keep nothing more."""
        self._dropped = True
        self._head, self._rest, self._rest_size = bytearray(), [], 0
        if self.file is not None:
            self.file.discard()

    def message(self):
        """The message in memory (for a body that never spilled)."""
        return bytes(self._head) + b"".join(self._rest)

    def front(self):
        """What the pipeline reads: the whole message, or, when the body is
        in the file, the header section and its blank line."""
        if self.file is None:
            return self.message()
        return bytes(self._head) + CRLF

    def finish(self):
        """A Deferred firing once the body file (if any) is complete."""
        if self.file is None:
            return defer.succeed(self)
        d = self.file.finish()
        d.addCallback(lambda _: self)
        return d

    def discard(self):
        """Unlink the body file (if any); a Deferred firing once it is gone."""
        self._dropped = True
        if self.file is None:
            return defer.succeed(None)
        return self.file.discard()

    def to_spool(self, front):
        """``(message for Spool.accept, its size)`` with ``front`` (the
        pipeline's result) in place of ``front()``."""
        if self.file is None:
            return front, len(front)
        message = SpooledMessage(front, self.file)
        return message, message.size

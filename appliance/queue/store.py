"""The durable spool: ``<data_dir>/queue/<id>.msg`` + ``<id>.json``.

``<id>.msg`` is the message in the form a Maildir stores it (``Return-Path:``
first, LF line ends: ``appliance.deliver.maildir.maildir_bytes``), so local
delivery is a hard link of this file; ``read`` gives back the message exactly
as received and as it will be relayed (CRLF, our ``Received:`` first). A
message whose LFs are not all CRLFs would not come back exactly: it is kept
as received (``message_form`` "wire") and copied at delivery instead.
``<id>.json`` is the envelope plus per-recipient state, indented so a person
can ``cat`` it. The state file's presence is the commit point. Acceptance, via
the group-commit writer:

    1. write ``<id>.msg``, and the state into a temp file (or a spare one,
       see ``Spool``), fsync both;
    2. rename the state file to ``<id>.json``;
    3. link ``<id>.msg`` into the Maildirs of the local recipients (optional);
    4. fsync the queue directory (and the Maildirs' ``new/``).

A kill -9 before 2 leaves files without a state file: ``recover()`` deletes
them, and no Maildir has the message (3 comes after 2). After 2 the entry is
complete (the message was fsynced in 1) and its recipients are pending: a
redo finds the links already made (same names) and makes the others. Only
after 4 does ``accept`` fire, so a ``250`` always means "on disk". State
updates write a new temp file and rename it over ``<id>.json`` (atomic
replace); removal unlinks the state file first, so a half-removed entry is
just an orphan. Removal does not fsync the directory: an entry that comes back
after a power cut is one whose recipients are all done or whose redo finds
its Maildir files (exactly once still holds).

When the links of 3 deliver every recipient, the same batch retires the entry
after 4 (state file first, as a removal would): the common message costs one
batch, and its entry never outlives it. When the message has one recipient,
a local Maildir that exists (or was just made), the batch skips the state
file altogether: ``<id>.msg`` is written and fsynced, linked into ``new/``,
that directory fsynced, and the spool file unlinked. The Maildir is then the
record; a crash before its fsync leaves at most an orphan ``<id>.msg``
(deleted by recovery) and no ``250``. With one link there is no partial
delivery for a state file to finish; with several, the state file is what
lets recovery complete a delivery a crash cut short, so they keep it. If the
link fails after all, a second batch commits the state file (and the queue
directory) before the ``250``, and the runner delivers it the usual way. A
kill between 4 and the reply leaves a message delivered but unanswered, as a
kill just after any last fsync does: the client sends it again.
"""

import collections
import dataclasses
import itertools
import json
import os
import re

from twisted.internet import defer
from twisted.logger import Logger

from appliance import events
from appliance.maildir import SpoolFile, maildir_bytes, round_trips, wire_bytes
from appliance.queue.counts import QueueCounts, classify_all
from appliance.envelope import (DELIVERED, FAILED, STATES, Envelope, new_queue_id,
                                new_recipient_state)
from appliance.durable.commit import Durable, StorageError, makedirs, octets
from appliance.queue.incoming import BodyFile, SpooledMessage

__all__ = ["Spool", "SpoolEntry"]

_log = Logger(namespace="mailappliance.queue")

events.register("spool.error", "a spool operation failed on the file system",
                ("operation", "error"))
events.register("spool.corrupt", "a committed entry was unreadable and moved aside",
                ("queue_id", "reason"))
events.register("spool.orphans_removed", "recovery deleted files of uncommitted entries",
                ("count",))
events.register("queue.removed", "an entry left the spool (all recipients done)",
                ("queue_id",))
events.register("spool.space_low", "the spool's file system is nearly full: new mail gets "
                "452 4.3.1 until space is free again (once per episode)",
                ("free_bytes", "free_inodes"))

_ENCODER = json.JSONEncoder(ensure_ascii=False)

MAILDIR_FORM, WIRE_FORM = "maildir", "wire"     # how <id>.msg holds the message

FORMAT = 1
STATE_SUFFIX = ".json"
MESSAGE_SUFFIX = ".msg"
TEMP_SUFFIX = ".tmp"
CORRUPT_DIR = "corrupt"
QUEUE_ID = re.compile(r"[0-9a-f]{8,64}")
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_INODES = 64
LIGHT_WRITE = 64 * 1024     # a commit writing no more may run from the reactor (commit.py)
HOT_MESSAGE = 256 * 1024    # a message up to this size is kept in memory for its first read
HOT_BYTES = 32 * 1024 * 1024
MAX_SPARES = 1024
STATVFS_TTL = 0.5       # seconds a free-space answer is reused


class SpoolEntry:
    """The envelope of one spooled message plus the state of each recipient.

    ``flags`` are message-level facts the queue manager keeps: ``held`` (an
    admin put it on hold) and ``delay_warned`` (the one "still trying" DSN
    went out). Recipients may carry more fields than ``new_recipient_state``
    (status, remote_host, dsn ...): the queue manager adds them.
    """

    def __init__(self, envelope, message_size, created_at, recipients=None, flags=None,
                 message_form=WIRE_FORM, stored_size=None):
        self.envelope = envelope
        self.message_size = message_size
        self.created_at = created_at
        self.recipients = recipients if recipients is not None else {
            address: new_recipient_state(created_at) for address in envelope.recipients}
        self.flags = dict(flags or {})
        self.message_form = message_form
        self.stored_size = message_size if stored_size is None else stored_size
        # Not saved: what the commit already did for the first delivery pass
        # (``{recipient: targets}`` resolved, ``{mailbox: Delivered or
        # Failure}`` linked), handed over once to the queue runner; and
        # whether the commit's batch also retired the entry (all delivered,
        # its files gone: only the events and ``Spool.forget`` are left).
        self.resolved = None
        self.linked = None
        self.retired = False
        self.counted = None         # (held, deferred) while QueueCounts counts it

    @property
    def held(self):
        return bool(self.flags.get("held"))

    @property
    def queue_id(self):
        return self.envelope.queue_id

    def to_json(self):
        return {"format": FORMAT, "queue_id": self.queue_id,
                "message_file": self.queue_id + MESSAGE_SUFFIX,
                "message_size": self.message_size, "message_form": self.message_form,
                "stored_size": self.stored_size, "created_at": self.created_at,
                "envelope": self.envelope.to_json(), "recipients": self.recipients,
                "flags": self.flags}

    def dumps(self):
        """The state file: a JSON object, one top-level key a line (``cat``-able).

        Each value is encoded on its own with the C encoder: ``indent=``
        would send the whole object through json's pure-Python encoder,
        several times slower, and this runs for every message.
        """
        lines = [f"{_ENCODER.encode(key)}: {_ENCODER.encode(value)}"
                 for key, value in self.to_json().items()]
        return ("{\n" + ",\n".join(lines) + "\n}\n").encode("utf-8")

    @classmethod
    def from_json(cls, data):
        """Parse a state file's object; ValueError if it is not one we wrote."""
        try:
            if data["format"] != FORMAT:
                raise ValueError(f"unknown format {data['format']!r}")
            envelope = Envelope.from_json(data["envelope"])
            recipients = {str(k): dict(v) for k, v in data["recipients"].items()}
            if any(v.get("state") not in STATES for v in recipients.values()):
                raise ValueError("unknown recipient state")
            flags = data.get("flags", {})       # absent in entries written before it existed
            if not isinstance(flags, dict):
                raise ValueError("flags is not an object")
            form = data.get("message_form", WIRE_FORM)      # older entries: as received
            if form not in (MAILDIR_FORM, WIRE_FORM):
                raise ValueError(f"unknown message form {form!r}")
            stored = data.get("stored_size")
            return cls(envelope, int(data["message_size"]), float(data["created_at"]),
                       recipients, flags, form, None if stored is None else int(stored))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"malformed state file ({e.__class__.__name__}: {e})") from None

    def in_state(self, *states):
        return [a for a, st in self.recipients.items() if st["state"] in states]

    def done(self):
        """True when every recipient is delivered: the entry may be removed."""
        return all(st["state"] == DELIVERED for st in self.recipients.values())

    def finished(self):
        """True when nothing is left to do: every recipient delivered, or failed
        with its failure reported (``dsn`` set by the queue manager)."""
        return all(st["state"] == DELIVERED or (st["state"] == FAILED and st.get("dsn"))
                   for st in self.recipients.values())

    def summary(self, now):
        """A plain dict for `queue list` / `queue show`."""
        errors = [st["last_error"] for st in self.recipients.values() if st["last_error"]]
        return {
            "queue_id": self.queue_id, "sender": self.envelope.sender,
            "recipients": [{"address": a, "state": st["state"], "last_error": st["last_error"],
                            "next_attempt": st["next_attempt"],
                            "attempts": st.get("attempts", 0),
                            "remote_host": st.get("remote_host", "")}
                           for a, st in self.recipients.items()],
            "size": self.message_size, "age": max(0.0, now - self.envelope.received_at),
            "last_error": errors[-1] if errors else "", "held": self.held,
        }


class Spool:
    """The queue directory and the in-memory copy of every committed entry.

    ``writer`` is the GroupCommitWriter (all writes, fsyncs, renames and the
    recovery scan run on its thread); ``reader(f, *args) -> Deferred`` runs
    message reads on a thread; ``clock`` gives ``seconds()``; ``statvfs`` is
    ``os.statvfs`` unless a test fakes a full disk.

    The spool only stores: the queue runner (``appliance.queue.runner``)
    routes a new entry (``accept``'s ``router``) and works on it once
    ``accept`` has fired.

    ``spare``: a directory (on the same file system, outside ``directory``)
    where removed state files wait, at most ``max_spares`` of them, to be
    written over by the state files of new entries. Creating and deleting a
    file per message costs the file system more than rewriting one (inode
    allocation: ext4 without a journal skips every recently freed inode;
    with ``discard`` each freed block is trimmed at once). A spare's content
    means nothing: the first batch after a start finds those left over.
    (Message files cannot be recycled: each lives on as the Maildir copy.)
    """

    def __init__(self, directory, writer, reader, clock, statvfs=os.statvfs,
                 reserve=RESERVE_BYTES, spare=None, max_spares=MAX_SPARES, incoming=None):
        self.directory = directory
        self.incoming = incoming    # run_in_thread for BodyFile writes (None: none)
        self._body_names = itertools.count()
        self.spare = spare
        self.max_spares = max_spares
        # Spare state files ready for reuse: appended on the reactor thread once
        # a removal is done, taken on the writer thread (deque: thread-safe).
        self._spares = collections.deque()
        self._spares_pending = 0
        self.writer = writer
        self.reader = reader
        self.clock = clock
        self.statvfs = statvfs
        self.reserve = reserve
        self._entries = {}
        self.counts = QueueCounts(self._is_live)    # for `status`: kept, never recounted
        self._removing = set()
        self._temp_names = itertools.count()
        self._dir_ready = False
        self._space_low = False
        self._statvfs_cache = None      # (when, statvfs result)
        # Messages just accepted, as received, for their first remote attempt
        # (which then needs no read): oldest first, HOT_BYTES in all.
        self._hot = collections.OrderedDict()
        self._hot_bytes = 0

    # -- paths

    def _path(self, name):
        return os.path.join(self.directory, name)

    def message_path(self, qid):
        return self._path(qid + MESSAGE_SUFFIX)

    def state_path(self, qid):
        return self._path(qid + STATE_SUFFIX)

    def _temp_path(self, qid):
        return self._path(f"{qid}{STATE_SUFFIX}.{next(self._temp_names)}{TEMP_SUFFIX}")

    def _ensure_dir(self, fs):
        """Create the queue (and spare) directory once (writer thread)."""
        if self._dir_ready:
            return []
        created = makedirs(fs, self.directory)
        if self.spare is not None:
            created += makedirs(fs, self.spare)
            # The spares left by an earlier run; from now on the deque knows them all.
            self._spares.extend(os.path.join(self.spare, name)
                                for name in sorted(fs.listdir(self.spare))[:self.max_spares])
        self._dir_ready = True
        return [os.path.dirname(path) for path in created]

    def _state_plan(self, qid, data, result=None, rollback=()):
        """A plan replacing the state file of ``qid`` with ``data``: written
        (over a spare when there is one), renamed into place, the queue
        directory fsynced."""
        state_path = self.state_path(qid)

        def plan(fs):
            writes, rewrites, temp = self._state_write(qid, data)
            return Durable(writes=writes, rewrites=rewrites, renames=[(temp, state_path)],
                           sync_dirs=[self.directory], rollback=rollback, result=result)
        return plan

    def _state_write(self, qid, data):
        """(writes, rewrites, temp) for a new state file of ``qid`` (writer
        thread): written over a spare when there is one."""
        try:
            spare = self._spares.popleft()
        except IndexError:
            temp = self._temp_path(qid)
            return [(temp, data)], [], temp
        return [], [(spare, data)], spare

    # -- operations

    def body_file(self, on_drain=None):
        """A new ``BodyFile`` in the queue directory for a DATA body too big
        for memory (``appliance.queue.incoming``), or None when this spool
        has no thread for them. Its name ends in ``.tmp``: recovery removes
        what a crash left."""
        if self.incoming is None or not self._dir_ready:
            return None
        name = f"incoming.{os.getpid()}.{next(self._body_names)}{TEMP_SUFFIX}"
        return BodyFile(self._path(name), self.incoming, on_drain)

    def space_available(self, size):
        """True if ``size`` more bytes fit with room to spare.

        The statvfs answer is kept for ``STATVFS_TTL`` seconds: asked at every
        MAIL, it is a system call on the reactor thread each time, and free
        space moves slowly (a commit that finds the disk full still says 451).
        """
        now = self.clock.seconds()
        if self._statvfs_cache is not None and now - self._statvfs_cache[0] < STATVFS_TTL:
            st = self._statvfs_cache[1]
        else:
            try:
                st = self._statvfs()
            except OSError as e:
                self._statvfs_cache = None
                events.emit("spool.error", operation="statvfs", error=str(e))
                return False
            self._statvfs_cache = (now, st)
        free = st.f_bavail * st.f_frsize
        inodes_ok = st.f_files == 0 or st.f_favail >= RESERVE_INODES
        ok = inodes_ok and free >= 2 * max(0, size) + self.reserve
        if ok:
            self._space_low = False
        elif not self._space_low:
            self._space_low = True
            events.emit("spool.space_low", free_bytes=free, free_inodes=st.f_favail)
        return ok

    def _statvfs(self):
        try:
            return self.statvfs(self.directory)
        except FileNotFoundError:   # not created yet: ask the file system it will be on
            return self.statvfs(os.path.dirname(self.directory))

    def accept(self, envelope, message, router=None, held=False):
        """Commit a new entry; fires with the queue id once durable, else StorageError.

        ``message``: bytes, or a ``SpooledMessage`` (its body in a
        ``BodyFile``: the message file is its front plus a kernel copy of
        the body file, which the same batch removes; on a failure the
        caller discards it).

        ``router(entry) -> Route | Deferred[Route] | None`` (the queue
        runner's) is asked first: the message is then also linked into the
        Maildirs the route names, in the same batch, after the commit rename
        (module docstring). None (or a failure) commits it without deliveries.
        ``held``: committed on hold (no delivery, not even local, until released).
        """
        qid = envelope.queue_id or new_queue_id(self.clock.seconds())
        if not QUEUE_ID.fullmatch(qid):
            return defer.fail(ValueError(f"queue id {qid!r} is not a spool file name"))
        if qid in self._entries:
            return defer.fail(ValueError(f"queue id {qid} already spooled"))
        envelope = dataclasses.replace(envelope, queue_id=qid,
                                       recipients=list(envelope.recipients))
        if isinstance(message, SpooledMessage):     # the body in a BodyFile
            try:
                form, stored, size = MAILDIR_FORM, message.stored(envelope.sender), message.size
            except ValueError as e:
                return defer.fail(e)
        else:
            message = bytes(message)
            size = len(message)
            if round_trips(message):
                form, stored = MAILDIR_FORM, maildir_bytes(envelope.sender, message)
            else:
                form, stored = WIRE_FORM, message
        entry = SpoolEntry(envelope, size, self.clock.seconds(),
                           message_form=form, stored_size=octets(stored),
                           flags={"held": True} if held else None)
        route = None if held else self._route(router, entry)
        if isinstance(route, defer.Deferred):
            route.addErrback(self._route_failed)
            return route.addCallback(lambda found: self._commit(entry, stored, found, message))
        return self._commit(entry, stored, route, message)

    def _route(self, router, entry):
        if router is None:
            return None
        try:
            return router(entry)
        except Exception:  # noqa: BLE001 - routing is an optimisation: commit without it
            _log.failure("routing {queue_id} at commit failed", queue_id=entry.queue_id)
            return None

    def _route_failed(self, failure):
        _log.failure("routing at commit failed", failure)
        return None

    def _commit(self, entry, stored, route, message):
        qid = entry.queue_id
        links = route.links if route is not None and entry.message_form == MAILDIR_FORM \
            else None
        msg_path, state_path = self.message_path(qid), self.state_path(qid)
        spare, retire = None, []
        complete = links is not None and route.complete
        if complete:
            # Every recipient is delivered once the links are durable: the
            # entry leaves the spool in the same batch, as ``remove`` would.
            spare = self._reserve_spare(qid)
            retire = [("rename", state_path, spare) if spare else ("unlink", state_path),
                      ("unlink", msg_path)]
        direct = []                 # the plan's choice, read back once the batch is done
        # A body file is copied into <id>.msg by the writer, then removed.
        body = [message.body.path] if isinstance(message, SpooledMessage) else []

        def plan(fs):
            parents = self._ensure_dir(fs)
            pairs, created = links.prepare(fs, msg_path) if links is not None else ((), [])
            if complete and links.all_prepared and len(pairs) == 1:
                # Straight into the one Maildir: no state file (module docstring).
                direct.append(True)
                return Durable(writes=[(msg_path, stored)], links=pairs, unlinks=body,
                               sync_dirs=parents + created, result=qid,
                               retire=[("unlink", msg_path)])
            # Made here, only when needed: the entry is nobody else's until
            # the batch is done.
            writes, rewrites, temp = self._state_write(qid, entry.dumps())
            return Durable(writes=[(msg_path, stored)] + writes, rewrites=rewrites,
                           renames=[(temp, state_path)], links=pairs, unlinks=body,
                           sync_dirs=parents + [self.directory] + created,
                           rollback=[state_path, msg_path], result=qid,
                           retire=retire if links is not None and links.all_prepared else [])

        d = self.writer.submit(plan, "spool.accept", light=octets(stored) <= LIGHT_WRITE)
        d.addCallbacks(self._committed, self._accept_failed,
                       callbackArgs=(entry, route, retire, spare, message, direct),
                       errbackArgs=(spare,))
        return d

    def _committed(self, result, entry, route, retire, spare, message, direct):
        if not direct:
            return self._accepted(result, entry, route, retire, spare, message)
        self._release_spare(spare, False)
        if not result[1]:
            return self._accepted(result, entry, route, retire, None, message)
        # A link failed: the message stays queued for those recipients, so it
        # needs its state file after all (and the queue directory its fsync),
        # before the 250.
        plan = self._state_plan(entry.queue_id, entry.dumps(),
                                rollback=[self.state_path(entry.queue_id)])
        d = self.writer.submit(plan, "spool.accept", light=True)
        d.addCallbacks(lambda _: self._accepted(result, entry, route, [], None, message),
                       self._accept_failed, errbackArgs=(None,))
        return d

    def _accepted(self, result, entry, route, retire, spare, message):
        qid = entry.queue_id
        if route is not None:
            entry.resolved = route.resolved
            if isinstance(result, tuple):        # (qid, failed links): see Durable.links
                entry.linked = route.links.results(result[1], entry.stored_size)
                entry.retired = bool(retire) and route.links.all_prepared and not result[1]
        self._release_spare(spare, entry.retired)
        self._entries[qid] = entry
        self.counts.add(entry)
        if not entry.retired:
            self._keep_hot(qid, message)
        return qid

    def _keep_hot(self, qid, message):
        if not isinstance(message, bytes) or len(message) > HOT_MESSAGE:
            return
        self._hot[qid] = message
        self._hot_bytes += len(message)
        while self._hot_bytes > HOT_BYTES:
            _, old = self._hot.popitem(last=False)
            self._hot_bytes -= len(old)

    def _cool(self, qid):
        message = self._hot.pop(qid, None)
        if message is not None:
            self._hot_bytes -= len(message)
        return message

    def _accept_failed(self, failure, spare):
        self._release_spare(spare, False)
        return self._storage_failed(failure, "accept")

    def _reserve_spare(self, qid):
        """A spare path for the state file of ``qid`` to become, or None when
        there are enough spares (then it is deleted)."""
        if self.spare is None or len(self._spares) + self._spares_pending >= self.max_spares:
            return None
        self._spares_pending += 1
        return os.path.join(self.spare, qid)

    def _release_spare(self, spare, made):
        if spare is not None:
            self._spares_pending -= 1
            if made:
                self._spares.append(spare)

    def forget(self, qid):
        """Drop an entry its commit's batch retired (``SpoolEntry.retired``):
        its files are gone already."""
        self._cool(qid)
        entry = self._entries.pop(qid, None)
        if entry is not None:
            self.counts.removed(entry)
            events.emit("queue.removed", queue_id=qid)

    def _storage_failed(self, failure, operation):
        if failure.check(StorageError):
            events.emit("spool.error", operation=operation, error=failure.value.error)
        return failure

    def get(self, qid):
        """The committed SpoolEntry for ``qid``, or None."""
        return self._entries.get(qid)

    def _is_live(self, received_at, qid):
        entry = self._entries.get(qid)
        return entry is not None and entry.counted is not None and \
            entry.envelope.received_at == received_at

    def totals(self):
        """``{"messages", "held", "deferred", "oldest_age"}`` in O(1) (amortised):
        what ``status`` shows of the queue (``appliance.queue.counts``)."""
        return self.counts.snapshot(self.clock.seconds())

    def queue_ids(self):
        return sorted(self._entries)

    def entries(self):
        """One summary dict per entry, oldest first (for the admin shell)."""
        now = self.clock.seconds()
        return [self._entries[qid].summary(now) for qid in sorted(self._entries)]

    def read(self, qid):
        """The message as received, read on a thread; StorageError if unreadable."""
        entry = self._entries.get(qid)
        if entry is None:
            return defer.fail(KeyError(qid))
        message = self._cool(qid)           # read once from memory, then from disk
        if message is not None:
            return defer.succeed(message)
        d = self.reader(_read_message, self.message_path(qid),
                        entry.message_form == MAILDIR_FORM)
        d.addErrback(_os_to_storage, "read")
        d.addErrback(self._storage_failed, "read")
        return d

    def source(self, qid):
        """The SpoolFile local deliveries link (or copy) from."""
        entry = self._entries[qid]
        return SpoolFile(self.message_path(qid), entry.message_form == MAILDIR_FORM,
                         entry.stored_size)

    def update(self, qid, changes, flags=None):
        """Apply ``{recipient: {field: value}}`` (and message ``flags``), then
        replace the state file atomically.

        Fires once the new state is durable. The in-memory entry changes at
        once, so a later update or removal always carries this one too.
        """
        entry = self._entries.get(qid)
        if entry is None or qid in self._removing:
            return defer.fail(KeyError(qid))
        now = self.clock.seconds()
        for address, fields in changes.items():
            state = entry.recipients.setdefault(address, new_recipient_state(now))
            state.update(fields, updated_at=now)
        entry.flags.update(flags or {})
        self.counts.changed(entry)
        d = self.writer.submit(self._state_plan(qid, entry.dumps(), result=entry),
                               "spool.update", light=True)
        d.addErrback(self._storage_failed, "update")
        return d

    def remove(self, qid, durable=False):
        """Delete the entry (state file first, so a crash leaves only an orphan).

        The state file becomes a spare when there is room for one. With
        ``durable`` the queue directory is fsynced too: the removal is then
        the record that the entry is done (it can never come back).
        """
        if qid not in self._entries or qid in self._removing:
            return defer.fail(KeyError(qid))
        self._removing.add(qid)
        self._cool(qid)
        state_path, msg_path = self.state_path(qid), self.message_path(qid)
        spare = self._reserve_spare(qid)
        # No directory fsync unless durable: see the module docstring. The
        # rename is the writer's, not the plan's: it then comes after every
        # earlier write of this entry still on its way (a batch may wait in
        # the writer child's pipe behind another).
        sync_dirs = [self.directory] if durable else []
        if spare is None:
            removal = Durable(unlinks=[state_path, msg_path], sync_dirs=sync_dirs, result=qid)
        else:
            if durable:
                sync_dirs.append(self.spare)
            removal = Durable(renames=[(state_path, spare)], unlinks=[msg_path],
                              sync_dirs=sync_dirs, result=qid)

        def plan(fs):
            return removal

        d = self.writer.submit(plan, "spool.remove", light=True)
        d.addCallbacks(self._removed, self._remove_failed, callbackArgs=(qid, spare),
                       errbackArgs=(qid, spare))
        return d

    def _removed(self, result, qid, spare):
        self._removing.discard(qid)
        entry = self._entries.pop(qid, None)
        if entry is not None:
            self.counts.removed(entry)
        self._release_spare(spare, True)
        events.emit("queue.removed", queue_id=qid)
        return qid

    def _remove_failed(self, failure, qid, spare):
        self._removing.discard(qid)
        self._release_spare(spare, False)
        return self._storage_failed(failure, "remove")

    def recover(self):
        """Scan the queue directory (on the writer thread) after a start or a crash.

        Deletes orphans (message or temp files with no committed state file),
        moves unreadable or incomplete entries to ``queue/corrupt/``, and
        fires with the committed entries not already known, oldest first.
        """
        d = self.writer.submit(self._recover_plan, "spool.recover")
        d.addCallback(self._recovered)
        d.addErrback(self._storage_failed, "recover")
        return d

    def _recover_plan(self, fs):
        parents = self._ensure_dir(fs)
        names = set(fs.listdir(self.directory))
        committed = {n[:-len(STATE_SUFFIX)] for n in names if n.endswith(STATE_SUFFIX)}
        orphans = [n for n in names if n.endswith(TEMP_SUFFIX) or (
            n.endswith(MESSAGE_SUFFIX) and n[:-len(MESSAGE_SUFFIX)] not in committed)]
        for name in orphans:
            fs.unlink(self._path(name))
        found, corrupt = [], []
        for qid in sorted(committed):
            try:
                found.append(self._load(fs, qid))
            except ValueError as e:
                corrupt.append((qid, str(e)))
                self._set_aside(fs, qid)
        # Counted here, off the reactor: the reactor only adds the totals.
        totals = classify_all(found)
        return Durable(sync_dirs=parents, result=(found, corrupt, len(orphans), totals))

    def _load(self, fs, qid):
        """Read and check one committed entry (writer thread); ValueError if broken."""
        try:
            data = json.loads(fs.read(self.state_path(qid)).decode("utf-8"))
        except (OSError, ValueError) as e:
            raise ValueError(f"unreadable state file: {e}") from None
        if not isinstance(data, dict):
            raise ValueError("state file is not an object")
        entry = SpoolEntry.from_json(data)
        if entry.queue_id != qid:
            raise ValueError(f"state file names queue id {entry.queue_id!r}")
        try:
            size = fs.size(self.message_path(qid))
        except FileNotFoundError:
            raise ValueError("message file missing") from None
        if size != entry.stored_size:
            raise ValueError(f"message file has {size} bytes, expected {entry.stored_size}")
        return entry

    def _set_aside(self, fs, qid):
        corrupt = self._path(CORRUPT_DIR)
        try:
            fs.mkdir(corrupt, 0o700)
        except FileExistsError:
            pass
        for path in (self.state_path(qid), self.message_path(qid)):
            try:
                fs.rename(path, os.path.join(corrupt, os.path.basename(path)))
            except FileNotFoundError:
                pass

    def _recovered(self, result):
        found, corrupt, orphans, totals = result
        for qid, reason in corrupt:
            events.emit("spool.corrupt", queue_id=qid, reason=reason)
        if orphans:
            events.emit("spool.orphans_removed", count=orphans)
        fresh = [entry for entry in found if entry.queue_id not in self._entries]
        for entry in fresh:
            self._entries[entry.queue_id] = entry
        if len(fresh) == len(found):
            self.counts.merge(totals)
        else:                           # a recovery after a failed one: some known
            for entry in fresh:
                self.counts.add(entry)
        return fresh


def _read_message(path, maildir_form):
    with open(path, "rb") as f:
        data = f.read()
    return wire_bytes(data) if maildir_form else data


def _os_to_storage(failure, operation):
    failure.trap(OSError)
    raise StorageError(operation, failure.value)

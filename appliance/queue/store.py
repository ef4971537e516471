"""The durable spool: ``<data_dir>/queue/<id>.msg`` + ``<id>.json``.

``<id>.msg`` is the message exactly as it will be relayed (CRLF, our
``Received:`` first). ``<id>.json`` is the envelope plus per-recipient state,
indented so a person can ``cat`` it. The state file's presence is the commit
point. Acceptance, via the group-commit writer:

    1. write ``<id>.msg`` and ``<id>.json.<n>.tmp``, fsync both;
    2. rename the temp file to ``<id>.json``;
    3. fsync the queue directory.

A kill -9 before 2 leaves files without a state file: ``recover()`` deletes
them. After 2 the entry is complete (the message was fsynced in 1). Only after
3 does ``accept`` fire, so a ``250`` always means "on disk". State updates write
a new temp file and rename it over ``<id>.json`` (atomic replace); removal
unlinks the state file first, so a half-removed entry is just an orphan.
"""

import dataclasses
import itertools
import json
import os
import re

from twisted.internet import defer
from twisted.logger import Logger

from appliance import events
from appliance.envelope import Envelope, new_queue_id
from appliance.queue.commit import Durable, StorageError, makedirs

__all__ = ["Spool", "SpoolEntry", "StorageError", "PENDING", "DELIVERED", "DEFERRED",
           "FAILED"]

_log = Logger(namespace="mailappliance.queue")

events.register("spool.error", "a spool operation failed on the file system",
                ("operation", "error"))
events.register("spool.corrupt", "a committed entry was unreadable and moved aside",
                ("queue_id", "reason"))
events.register("spool.orphans_removed", "recovery deleted files of uncommitted entries",
                ("count",))
events.register("queue.removed", "an entry left the spool (all recipients done)",
                ("queue_id",))

PENDING, DELIVERED, DEFERRED, FAILED = "pending", "delivered", "deferred", "failed"
STATES = (PENDING, DELIVERED, DEFERRED, FAILED)

FORMAT = 1
STATE_SUFFIX = ".json"
MESSAGE_SUFFIX = ".msg"
TEMP_SUFFIX = ".tmp"
CORRUPT_DIR = "corrupt"
QUEUE_ID = re.compile(r"[0-9a-f]{8,64}")
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_INODES = 64


def new_recipient_state(now):
    return {"state": PENDING, "attempts": 0, "next_attempt": None, "last_error": "",
            "delivered_to": [], "remote": [], "updated_at": now}


class SpoolEntry:
    """The envelope of one spooled message plus the state of each recipient.

    ``flags`` are message-level facts the queue manager keeps: ``held`` (an
    admin put it on hold) and ``delay_warned`` (the one "still trying" DSN
    went out). Recipients may carry more fields than ``new_recipient_state``
    (status, remote_host, dsn ...): the queue manager adds them.
    """

    def __init__(self, envelope, message_size, created_at, recipients=None, flags=None):
        self.envelope = envelope
        self.message_size = message_size
        self.created_at = created_at
        self.recipients = recipients if recipients is not None else {
            address: new_recipient_state(created_at) for address in envelope.recipients}
        self.flags = dict(flags or {})

    @property
    def held(self):
        return bool(self.flags.get("held"))

    @property
    def queue_id(self):
        return self.envelope.queue_id

    def to_json(self):
        return {"format": FORMAT, "queue_id": self.queue_id,
                "message_file": self.queue_id + MESSAGE_SUFFIX,
                "message_size": self.message_size, "created_at": self.created_at,
                "envelope": self.envelope.to_json(), "recipients": self.recipients,
                "flags": self.flags}

    def dumps(self):
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False).encode("utf-8") + b"\n"

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
            return cls(envelope, int(data["message_size"]), float(data["created_at"]),
                       recipients, flags)
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
    """

    def __init__(self, directory, writer, reader, clock, statvfs=os.statvfs,
                 reserve=RESERVE_BYTES):
        self.directory = directory
        self.writer = writer
        self.reader = reader
        self.clock = clock
        self.statvfs = statvfs
        self.reserve = reserve
        self._entries = {}
        self._removing = set()
        self._listeners = []
        self._temp_names = itertools.count()
        self._dir_ready = False

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
        """Create the queue directory once (writer thread)."""
        if self._dir_ready:
            return []
        created = makedirs(fs, self.directory)
        self._dir_ready = True
        return [os.path.dirname(path) for path in created]

    # -- listeners

    def add_listener(self, callback):
        """``callback(queue_id)`` after each commit, on the reactor thread."""
        self._listeners.append(callback)

    def _notify(self, qid):
        for callback in list(self._listeners):
            try:
                callback(qid)
            except Exception:  # noqa: BLE001 - a listener bug must not un-accept mail
                _log.failure("spool listener failed for {queue_id}", queue_id=qid)

    # -- operations

    def space_available(self, size):
        """True if ``size`` more bytes fit with room to spare (cheap statvfs)."""
        try:
            st = self._statvfs()
        except OSError as e:
            events.emit("spool.error", operation="statvfs", error=str(e))
            return False
        free = st.f_bavail * st.f_frsize
        inodes_ok = st.f_files == 0 or st.f_favail >= RESERVE_INODES
        return inodes_ok and free >= 2 * max(0, size) + self.reserve

    def _statvfs(self):
        try:
            return self.statvfs(self.directory)
        except FileNotFoundError:   # not created yet: ask the file system it will be on
            return self.statvfs(os.path.dirname(self.directory))

    def accept(self, envelope, message):
        """Commit a new entry; fires with the queue id once durable, else StorageError."""
        qid = envelope.queue_id or new_queue_id(self.clock.seconds())
        if not QUEUE_ID.fullmatch(qid):
            return defer.fail(ValueError(f"queue id {qid!r} is not a spool file name"))
        if qid in self._entries:
            return defer.fail(ValueError(f"queue id {qid} already spooled"))
        message = bytes(message)
        entry = SpoolEntry(dataclasses.replace(envelope, queue_id=qid,
                                               recipients=list(envelope.recipients)),
                           len(message), self.clock.seconds())
        state = entry.dumps()
        msg_path, state_path, temp = self.message_path(qid), self.state_path(qid), \
            self._temp_path(qid)

        def plan(fs):
            parents = self._ensure_dir(fs)
            return Durable(writes=[(msg_path, message), (temp, state)],
                           renames=[(temp, state_path)],
                           sync_dirs=parents + [self.directory],
                           rollback=[state_path, msg_path], result=qid)

        d = self.writer.submit(plan, "spool.accept")
        d.addCallbacks(self._accepted, self._storage_failed, callbackArgs=(entry,),
                       errbackArgs=("accept",))
        return d

    def _accepted(self, qid, entry):
        self._entries[qid] = entry
        self._notify(qid)
        return qid

    def _storage_failed(self, failure, operation):
        if failure.check(StorageError):
            events.emit("spool.error", operation=operation, error=failure.value.error)
        return failure

    def get(self, qid):
        """The committed SpoolEntry for ``qid``, or None."""
        return self._entries.get(qid)

    def queue_ids(self):
        return sorted(self._entries)

    def entries(self):
        """One summary dict per entry, oldest first (for the admin shell)."""
        now = self.clock.seconds()
        return [self._entries[qid].summary(now) for qid in sorted(self._entries)]

    def read(self, qid):
        """The message bytes, read on a thread; StorageError if unreadable."""
        if qid not in self._entries:
            return defer.fail(KeyError(qid))
        d = self.reader(_read_file, self.message_path(qid))
        d.addErrback(_os_to_storage, "read")
        d.addErrback(self._storage_failed, "read")
        return d

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
        data, temp, state_path = entry.dumps(), self._temp_path(qid), self.state_path(qid)

        def plan(fs):
            return Durable(writes=[(temp, data)], renames=[(temp, state_path)],
                           sync_dirs=[self.directory], result=entry)

        d = self.writer.submit(plan, "spool.update")
        d.addErrback(self._storage_failed, "update")
        return d

    def remove(self, qid):
        """Delete the entry (state file first, so a crash leaves only an orphan)."""
        if qid not in self._entries or qid in self._removing:
            return defer.fail(KeyError(qid))
        self._removing.add(qid)
        unlinks = [self.state_path(qid), self.message_path(qid)]

        def plan(fs):
            return Durable(unlinks=unlinks, sync_dirs=[self.directory], result=qid)

        d = self.writer.submit(plan, "spool.remove")
        d.addCallbacks(self._removed, self._remove_failed, callbackArgs=(qid,),
                       errbackArgs=(qid,))
        return d

    def _removed(self, result, qid):
        self._removing.discard(qid)
        self._entries.pop(qid, None)
        events.emit("queue.removed", queue_id=qid)
        return qid

    def _remove_failed(self, failure, qid):
        self._removing.discard(qid)
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
        return Durable(sync_dirs=parents, result=(found, corrupt, len(orphans)))

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
        if size != entry.message_size:
            raise ValueError(f"message file has {size} bytes, expected {entry.message_size}")
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
        found, corrupt, orphans = result
        for qid, reason in corrupt:
            events.emit("spool.corrupt", queue_id=qid, reason=reason)
        if orphans:
            events.emit("spool.orphans_removed", count=orphans)
        fresh = [entry for entry in found if entry.queue_id not in self._entries]
        for entry in fresh:
            self._entries[entry.queue_id] = entry
        return fresh


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


def _os_to_storage(failure, operation):
    failure.trap(OSError)
    raise StorageError(operation, failure.value)

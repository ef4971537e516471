"""Maildir access for IMAP and POP3: folders, persistent UIDs, flags, locks.

Layout (Maildir++, the one Courier and Dovecot use)::

    <data_dir>/mail/<domain>/<localpart>/          INBOX (tmp/ new/ cur/)
    <data_dir>/mail/<domain>/<localpart>/.Sent/    folder "Sent"
    <data_dir>/mail/<domain>/<localpart>/.a.b/     folder "a.b" ("." is the hierarchy delimiter)

Folder names are IMAP names (str); on disk they are stored in IMAP's modified
UTF-7, so directory names stay ASCII. A name can never leave the user's
Maildir: ``/``, ``\\``, NUL, control characters and empty hierarchy levels
(``..``, a leading or trailing ``.``) are refused by ``check_folder_name``.

Each folder keeps ``mailappliance-uidlist`` (like Dovecot's
``dovecot-uidlist``): UIDVALIDITY, UIDNEXT, the folder's keywords (letters
``a``-``z`` in the Maildir info) and one line per message: UID, size in CRLF
octets, internal date, base name. It is rewritten atomically (temp file,
fsync, rename) whenever UIDs are assigned or messages leave, so UIDs stay the
same across restarts and messages delivered while the server was down get the
next UIDs in delivery order.

A scan moves ``new/`` to ``cur/`` (adding ``:2,``) and keeps the base name,
so delivery's "already in cur/" check still recognises a message; a second
copy of a base name already in ``cur/`` (a delivery redone after a crash) is
removed instead of being shown twice.

Stored messages use LF line endings; ``read`` hands them out with CRLF and
sizes are always CRLF octets (what IMAP RFC822.SIZE and POP3 LIST report).

All the file work runs through ``run_in_thread`` under one DeferredLock per
folder; the ``Folder`` objects are shared (``MaildirStore``), so every IMAP
and POP3 session on a folder sees the same UIDs, and listeners hear about
every change.
"""

import bisect
import codecs
import errno
import gc
import heapq
import os
import re
import shutil
import weakref
from collections import OrderedDict, namedtuple

from twisted.internet import defer
from twisted.mail import imap4  # noqa: F401  (registers the imap4-utf-7 codec)

from appliance.access.msgcache import MessageCache
from appliance.clock import default_clock
from appliance.durable.files import fsync_dir, write_atomic, write_new
from appliance.maildir import SUBDIRS, crlf, crlf_size, maildir_path, split_name, to_stored, unique_name

UIDLIST = "mailappliance-uidlist"
SUBSCRIPTIONS = "subscriptions"
DELIMITER = "."
INFO = ":2,"
MAX_NAME = 200                       # characters of a folder name (a path component is 255 bytes)
KEYWORD_LETTERS = "abcdefghijklmnopqrstuvwxyz"

# IMAP system flag <-> Maildir info letter. \Recent is per session, never stored.
SYSTEM_FLAGS = {"\\Draft": "D", "\\Flagged": "F", "\\Answered": "R", "\\Seen": "S",
                "\\Deleted": "T"}
_LETTER_FLAGS = {letter: flag for flag, letter in SYSTEM_FLAGS.items()}
_FLAG_CASE = {flag.lower(): flag for flag in SYSTEM_FLAGS}

# Folders made at login, with their RFC 6154 SPECIAL-USE attribute.
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]")
_KEYWORD = re.compile(r"[!#$&'+\-.0-9:;<=>?@A-Z^_`a-z|~]{1,64}\Z")


class FolderError(Exception):
    """A folder operation that cannot be done; the text is safe to show a client."""


class FolderNameError(FolderError, ValueError):
    """A name that is not a valid folder name (or would leave the Maildir)."""


class FolderMissing(FolderError):
    """The folder does not exist."""


class FolderExists(FolderError):
    """CREATE or RENAME onto a folder that exists already."""


class MessageGone(FolderError):
    """The message was expunged (by another session or a tool) meanwhile."""


class Message(namedtuple("Message", "uid base info size mtime")):
    """One message of a folder: UID, base file name, Maildir info letters,
    size in CRLF octets, internal date (Unix time)."""

    __slots__ = ()

    @property
    def filename(self):
        return self.base + INFO + self.info


ScanResult = namedtuple("ScanResult", "messages recent uidvalidity uidnext")
ScanResult.__doc__ = """A folder after a scan: messages in UID order, the UIDs this scan
moved out of new/ (the caller's \\Recent), UIDVALIDITY and UIDNEXT."""


# -- names ---------------------------------------------------------------------------

def check_folder_name(name):
    """The folder name ``name`` normalised ("INBOX" in any case is INBOX),
    or FolderNameError if it could escape the Maildir or is not storable."""
    if not isinstance(name, str) or not name:
        raise FolderNameError("empty folder name")
    if name.upper() == "INBOX":
        return "INBOX"
    if len(name) > MAX_NAME:
        raise FolderNameError("folder name too long")
    if _BAD_NAME.search(name):
        raise FolderNameError("folder names may not contain /, \\ or control characters")
    if any(not part for part in name.split(DELIMITER)):
        raise FolderNameError("empty hierarchy level in folder name")
    if name.split(DELIMITER)[0].upper() == "INBOX":
        raise FolderNameError("INBOX cannot have subfolders")
    return name


def encode_name(name):
    """An IMAP folder name as its Maildir++ directory name (``.`` + modified UTF-7)."""
    return "." + name.encode("imap4-utf-7").decode("ascii")


def decode_name(dirname):
    """The folder name of a Maildir++ directory, or None if it is not one."""
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    try:
        name = dirname[1:].encode("ascii").decode("imap4-utf-7")
        return check_folder_name(name)
    except (UnicodeError, FolderNameError, ValueError):
        return None


# -- small file helpers (run on threads) ----------------------------------------------

def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _stamp(path):
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _make_maildir(path, subfolder):
    """Create ``path`` with tmp/ new/ cur/ (and Maildir++'s ``maildirfolder``)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    for sub in SUBDIRS:
        os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
    if subfolder:
        marker = os.path.join(path, "maildirfolder")
        if not os.path.exists(marker):
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT, 0o600))


_SIZE_IN_NAME = re.compile(r",W=(\d{1,12})(?:,|$)")


def _measure(name, dir_fd):
    """``(CRLF size, mtime, header block or None)`` of a message file in
    ``dir_fd``, or None if it vanished. A name carrying ``,W=<size>`` (as
    Dovecot's deliveries do) needs a stat only; others are read once."""
    sized = _SIZE_IN_NAME.search(name.partition(":")[0])
    try:
        if sized:
            st = os.stat(name, dir_fd=dir_fd)
            return int(sized.group(1)), st.st_mtime, None
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        want = st.st_size + 1
        chunks = [os.read(fd, want)]
        while len(chunks[-1]) == want:     # a short read of a file is its end
            want = 65536
            chunks.append(os.read(fd, want))
    finally:
        os.close(fd)
    data = b"".join(chunks)
    return crlf_size(data), st.st_mtime, header_of(data)


def header_of(data):
    """The header block (CRLF, blank line included) of stored bytes."""
    end = data.find(b"\n\n")
    return crlf(data if end < 0 else data[:end + 2])


class HeaderCache:
    """Header blocks by base name, bounded in octets (oldest dropped first).

    A first scan reads every new message anyway (for its size): keeping the
    header then makes the FETCH ENVELOPE and header SEARCH that clients send
    right after SELECT free of disk reads. Message files never change, so an
    entry never goes stale.
    """

    def __init__(self, limit=16 * 1024 * 1024):
        self.limit = limit
        self.octets = 0
        self._entries = OrderedDict()   # popitem(last=False) is O(1); next(iter(dict))
                                        # walks the holes deletions leave at the front

    def get(self, base):
        return self._entries.get(base)

    def put(self, base, header):
        if base in self._entries or len(header) > self.limit // 64:
            return
        self._entries[base] = header
        self.octets += len(header)
        while self.octets > self.limit and self._entries:     # two render threads may put
            self.octets -= len(self._entries.popitem(last=False)[1])


FLAG_LOG_LIMIT = 20000


def _uid_of(message):
    return message.uid


def _info_of(message, base):
    """The flags we knew for a UID, if it is still the same file."""
    return message.info if message is not None and message.base == base else ""


SETTLE_AFTER = 5000              # long-lived objects made before they are frozen
_made = [0]


def settle(count):
    """``count`` long-lived objects were just made (Messages of a scan):
    after ``SETTLE_AFTER`` of them, ``gc.freeze()``.

    A Message is a namedtuple, which the cyclic collector tracks for good
    (it untracks plain tuples only), and a full collection walks every
    tracked object holding the GIL: at 100,000 messages one took hundreds of
    ms, a stall of the reactor each time a FETCH or SEARCH made enough
    short-lived objects to start one. Frozen objects are left out of every
    collection; reference counting still frees them (a Message refers to no
    container, so it is in no cycle). What the freeze leaks is cyclic
    garbage that exists at that moment and is never freed: bounded by one
    freeze per ``SETTLE_AFTER`` messages loaded.
    """
    _made[0] += count
    if _made[0] >= SETTLE_AFTER:
        _made[0] = 0
        gc.freeze()


SORT_STEP = 4096


def _sorted_in_steps(items):
    """``sorted(items)``, without holding the GIL for the whole sort: one
    sort of 100,000 tuples is one C call of a few hundred ms, which the
    reactor thread would wait out. Runs of ``SORT_STEP`` are sorted, then
    merged by heapq.merge (a Python loop: the GIL changes hands)."""
    if len(items) <= SORT_STEP:
        return sorted(items)
    runs = [sorted(items[start:start + SORT_STEP]) for start in range(0, len(items), SORT_STEP)]
    return list(heapq.merge(*runs))


def _unlink_quietly(name, dir_fd):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# -- the uidlist file ------------------------------------------------------------------

def parse_uidlist(text):
    """``(uidvalidity, uidnext, keywords, [(uid, size, mtime, base)])`` or ValueError."""
    lines = text.split("\n")
    head = lines[0].split()
    if len(head) < 3 or head[0] != "1" or head[1][:1] != "V" or head[2][:1] != "N":
        raise ValueError("bad uidlist header")
    validity, uidnext = int(head[1][1:]), int(head[2][1:])
    keywords = []
    entries = []
    for line in lines[1:]:
        if not line:
            continue
        if line.startswith("K "):
            keywords = line.split()[1:]
            continue
        fields, sep, base = line.partition(" :")
        uid, size, mtime = fields.split()
        if not sep or not base:
            raise ValueError("bad uidlist line")
        entries.append((int(uid), int(size), float(mtime), base))
    if not 0 < validity < 2 ** 32 or uidnext < 1:
        raise ValueError("bad uidlist values")
    return validity, uidnext, keywords[:len(KEYWORD_LETTERS)], entries


def format_uidlist(validity, uidnext, keywords, messages):
    out = [f"1 V{validity} N{uidnext}"]
    if keywords:
        out.append("K " + " ".join(keywords))
    out.extend(f"{m.uid} {m.size} {m.mtime:.3f} :{m.base}" for m in messages)
    return ("\n".join(out) + "\n").encode("utf-8", "surrogateescape")


# -- one folder ------------------------------------------------------------------------

class Folder:
    """One Maildir folder, shared by every session that opens it.

    ``messages`` is the last scan's tuple of Message in UID order (replaced,
    never mutated, so readers on the reactor thread always see a whole list).
    Mutating methods return Deferreds and run one at a time on a thread.
    """

    def __init__(self, path, name, run_in_thread, clock=None, hostname="localhost"):
        self.path = path
        self.name = name
        self.subfolder = name != "INBOX"
        self._run = run_in_thread
        self.clock = default_clock(clock)
        self.hostname = hostname
        self.lock = defer.DeferredLock()
        self.uidvalidity = 0
        self.uidnext = 1
        self.keywords = ()
        self._state = ((), {})        # (messages in UID order, {uid: Message}), swapped whole
        self._unclaimed_recent = set()
        self._loaded = False
        self._uidlist_stamp = None
        self._dir_stamp = None
        self._owner = None
        self._listeners = []
        self.headers = HeaderCache()
        self.cache = MessageCache(path)  # ENVELOPE and SEARCH texts, kept on disk
        self._flag_log = []             # UIDs whose flags changed, oldest first
        self._flag_log_start = 0        # the serial number of _flag_log[0]
        self.removals = 0               # bumped whenever messages leave

    def __repr__(self):
        return f"<Folder {self.name} at {self.path}>"

    # listeners and the exclusive (POP3 maildrop) lock

    def add_listener(self, listener):
        """``listener(folder)`` is called on the reactor after every change."""
        self._listeners.append(listener)

    def remove_listener(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)

    def notify(self, result=None):
        for listener in list(self._listeners):
            listener(self)
        return result

    def try_lock(self, owner):
        """Take the exclusive maildrop lock for ``owner``; False if someone holds it."""
        if self._owner is not None and self._owner is not owner:
            return False
        self._owner = owner
        return True

    def unlock(self, owner):
        if self._owner is owner:
            self._owner = None

    @property
    def locked_by(self):
        return self._owner

    # lookups on the reactor thread

    @property
    def messages(self):
        """The messages in UID order, as of the last scan or change."""
        return self._state[0]

    @property
    def _by_uid(self):
        return self._state[1]

    @property
    def index(self):
        """``{uid: Message}`` for the messages of ``messages``."""
        return self._state[1]

    def get(self, uid):
        """The Message with ``uid``, or None."""
        return self._state[1].get(uid)

    def unclaimed_recent(self):
        """How many \\Recent messages no session has claimed (for STATUS)."""
        return len(self._unclaimed_recent & self._state[1].keys())

    def take_recent(self):
        """The UIDs that scans moved out of new/ and no session has claimed yet.

        \\Recent belongs to one session: the first to ask gets them.
        """
        recent = self._unclaimed_recent & self._state[1].keys()
        self._unclaimed_recent = set()
        return recent

    def flags_of(self, message):
        """The IMAP flags of ``message`` (system flags and keywords)."""
        flags = []
        for letter in message.info:
            if letter in _LETTER_FLAGS:
                flags.append(_LETTER_FLAGS[letter])
            elif "a" <= letter <= "z":
                index = ord(letter) - ord("a")
                if index < len(self.keywords):
                    flags.append(self.keywords[index])
        return flags

    @property
    def can_add_keywords(self):
        return len(self.keywords) < len(KEYWORD_LETTERS)

    # asynchronous operations

    def _locked(self, f, *args):
        return self.lock.run(self._run, f, *args)

    def exists(self):
        return self._run(os.path.isdir, os.path.join(self.path, "cur"))

    def scan(self):
        """Sync with the disk: Deferred[ScanResult]; FolderMissing if it is gone.

        The UIDs it moved out of new/ are also kept for ``take_recent``.
        """
        return self._locked(self._scan_sync).addCallback(self._scanned)

    def _scanned(self, result):
        self._unclaimed_recent |= result.recent
        return result

    def changed_on_disk(self):
        """Deferred[bool]: did new/ or cur/ change since the last scan? Two stats only."""
        return self._run(self._dir_changed_sync)

    def read(self, message):
        """Deferred[bytes]: the whole message with CRLF line ends; MessageGone."""
        return self._run(self.read_sync, message)

    def read_headers(self, messages):
        """Deferred[list of bytes or None]: the header blocks (CRLF, with the blank line)."""
        return self._run(lambda: [self._header_or_none(m) for m in messages])

    def save_cache(self):
        """Deferred[bool]: write the message cache if it has news (on a thread)."""
        if not self.cache.dirty:
            return defer.succeed(False)
        return self._run(self.cache.save, self.messages)

    def store(self, uids, flags, mode):
        """Set (``mode`` "set"), add ("add") or remove ("remove") IMAP ``flags``
        on ``uids``. Deferred[list of the changed Messages]. Keywords beyond
        the 26 a folder can hold are dropped."""
        d = self._locked(self._store_sync, list(uids), list(flags), mode)
        return d.addCallback(self.notify)

    def expunge(self, uids):
        """Remove the messages ``uids``: Deferred[list of the UIDs removed]."""
        d = self._locked(self._expunge_sync, list(uids))
        return d.addCallback(self.notify)

    def append(self, data, flags=(), date=None):
        """Store a new message (bytes or a file, CRLF or LF): Deferred[Message]."""
        d = self._locked(self._append_sync, data, list(flags), date)
        return d.addCallback(self.notify)

    def copy_to(self, uids, dest, move=False):
        """Copy (or move) messages to ``dest``: Deferred[[(old uid, new uid)]]."""
        # Both locks, always in path order, so two crossing copies cannot deadlock.
        locks = [f.lock for f in sorted({self, dest}, key=lambda f: f.path)]
        d = locks[0].acquire()
        for lock in locks[1:]:
            d.addCallback(lambda _, lock=lock: lock.acquire())

        def release(result):
            for lock in locks:
                lock.release()
            return result

        d.addCallback(lambda _: self._run(self._copy_sync, list(uids), dest, move))
        d.addBoth(release)
        d.addCallback(dest.notify)
        if move:
            d.addCallback(self.notify)
        return d

    # the work, on a thread, under the lock

    def _cur(self, name=""):
        return os.path.join(self.path, "cur", name)

    def _new(self, name=""):
        return os.path.join(self.path, "new", name)

    def _dir_changed_sync(self):
        return self._dir_stamp != self._dirs_now()

    def _dirs_now(self):
        return (_stamp(self._new()), _stamp(self._cur()))

    def _load_uidlist(self):
        """Read the uidlist if it changed on disk (or was never read)."""
        path = os.path.join(self.path, UIDLIST)
        stamp = _stamp(path)
        if self._loaded and stamp == self._uidlist_stamp:
            return False
        previous = self.uidvalidity
        try:
            with open(path, "r", encoding="utf-8", errors="surrogateescape") as f:
                validity, uidnext, keywords, entries = parse_uidlist(f.read())
        except (FileNotFoundError, ValueError, UnicodeError):
            # New folder, or a damaged list: new UIDs need a new UIDVALIDITY.
            validity = self._new_uidvalidity(path, previous)
            uidnext, keywords, entries = 1, [], []
            stamp = None
        if validity != self.uidvalidity:
            self._set_messages(())
        self.uidvalidity, self.uidnext, self.keywords = validity, uidnext, tuple(keywords)
        known = self._state[1]
        self._set_messages([Message(uid, base, _info_of(known.get(uid), base), size, mtime)
                            for uid, size, mtime, base in sorted(entries)])
        settle(len(entries))
        self._loaded = True
        self._uidlist_stamp = stamp
        return stamp is None

    def _new_uidvalidity(self, path, previous):
        """A UIDVALIDITY above any this folder had: the clock, but past the
        damaged list's own value and its last change (a list made and lost in
        the same second must not give the old value again)."""
        floor = previous + 1
        try:
            with open(path, "rb") as f:
                found = re.search(rb"V(\d{1,10})", f.read(64))
                floor = max(floor, int(os.fstat(f.fileno()).st_mtime) + 1)
            if found:
                floor = max(floor, int(found.group(1)) + 1)
        except OSError:
            pass
        validity = max(int(self.clock.seconds()), floor)
        return validity if 0 < validity < 2 ** 32 else 1

    def _save_uidlist(self):
        path = os.path.join(self.path, UIDLIST)
        write_atomic(path, format_uidlist(self.uidvalidity, self.uidnext, self.keywords,
                                           self.messages))
        self._uidlist_stamp = _stamp(path)

    def _set_messages(self, messages):
        """Swap in a new message list, then note what changed for the views:
        UIDs whose flags changed go to the flag log, removals bump a counter
        (after the swap: a view that reads a log entry sees the new state)."""
        messages = tuple(messages)
        old = self._state[1]
        new = {m.uid: m for m in messages}
        self._state = (messages, new)
        self._log_flags([m.uid for m in messages if m.uid in old and old[m.uid].info != m.info])
        if len(new) < len(old) or any(uid not in new for uid in old):
            self.removals += 1
            self.cache.forget([m.base for uid, m in old.items() if uid not in new])

    def _update(self, changed=(), added=(), removed=()):
        """Apply changes we know of without comparing every message (a STORE
        on one message of 10,000 must not cost 10,000 comparisons)."""
        messages, index = self._state
        index = dict(index)
        if removed:
            gone = set(removed)
            messages = tuple(m for m in messages if m.uid not in gone)
            self.cache.forget([index[uid].base for uid in gone if uid in index])
            for uid in gone:
                index.pop(uid, None)
        if changed:
            messages = list(messages)
            for message in changed:
                position = bisect.bisect_left(messages, message.uid, key=_uid_of)
                if position < len(messages) and messages[position].uid == message.uid:
                    messages[position] = index[message.uid] = message
        if added:
            messages = tuple(messages) + tuple(added)
            index.update((m.uid, m) for m in added)
        self._state = (tuple(messages), index)
        self._log_flags([m.uid for m in changed])
        if removed:
            self.removals += 1

    def _log_flags(self, uids):
        if not uids:
            return
        self._flag_log.extend(uids)
        if len(self._flag_log) > FLAG_LOG_LIMIT:
            drop = len(self._flag_log) // 2
            self._flag_log_start += drop
            del self._flag_log[:drop]

    # what views need to catch up with (read on the reactor)

    @property
    def flag_serial(self):
        return self._flag_log_start + len(self._flag_log)

    def flags_changed_since(self, serial):
        """UIDs whose flags changed after ``serial``, or None if the log no
        longer reaches back that far (the caller compares everything)."""
        if serial < self._flag_log_start:
            return None
        return self._flag_log[serial - self._flag_log_start:]

    def _scan_sync(self):
        try:
            cur_fd = os.open(self._cur(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FolderMissing(f"no folder {self.name}") from None
        try:
            return self._scan_with(cur_fd)
        finally:
            os.close(cur_fd)

    def _scan_with(self, cur_fd):
        # Names relative to open directories: no path walk per file (10k files!).
        dirty = self._load_uidlist()
        self._dir_stamp = self._dirs_now()
        in_cur = {}
        for filename in _listdir(self._cur()):
            if not filename.startswith("."):
                base, info = split_name(filename)
                in_cur.setdefault(base, info)
        recent, measured_new = self._take_new(in_cur, cur_fd)
        known = {m.base: m for m in self.messages}
        kept = [m._replace(info=in_cur[m.base]) for m in self.messages if m.base in in_cur]
        dirty = dirty or len(kept) != len(self.messages)
        arrived = []
        for base in in_cur.keys() - known.keys():
            measured = measured_new.get(base) or _measure(base + INFO + in_cur[base], cur_fd)
            if measured is not None:
                arrived.append((measured[1], base, measured[0]))
                if measured[2] is not None:
                    self.headers.put(base, measured[2])
        for count, (mtime, base, size) in enumerate(_sorted_in_steps(arrived), 1):
            kept.append(Message(self.uidnext, base, in_cur[base], size, mtime))
            self.uidnext += 1
            dirty = True
            if count % SETTLE_AFTER == 0:
                settle(SETTLE_AFTER)
        self._set_messages(kept)
        settle(len(arrived) % SETTLE_AFTER)
        if dirty:
            self._save_uidlist()
        recent_uids = frozenset(m.uid for m in kept if m.base in recent)
        return ScanResult(self.messages, recent_uids, self.uidvalidity, self.uidnext)

    def _take_new(self, in_cur, cur_fd):
        """Move new/ into cur/: ``(base names moved, {base: measured})``.

        Each file is measured (size, header) in new/ before it is renamed.
        """
        measured = {}
        try:
            new_fd = os.open(self._new(), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return set(), measured
        try:
            moved = set()
            for filename in os.listdir(new_fd):
                if filename.startswith("."):
                    continue
                base, info = split_name(filename)
                if base in in_cur:
                    _unlink_quietly(filename, new_fd)   # a redone delivery we have
                    continue
                result = _measure(filename, new_fd)
                if result is None:
                    continue
                try:
                    os.rename(filename, base + INFO + info, src_dir_fd=new_fd,
                              dst_dir_fd=cur_fd)
                except FileNotFoundError:
                    continue
                measured[base] = result
                in_cur[base] = info
                moved.add(base)
        finally:
            os.close(new_fd)
        return moved, measured
        try:
            for filename in os.listdir(new_fd):
                if filename.startswith("."):
                    continue
                base, info = split_name(filename)
                try:
                    if base in in_cur:
                        os.unlink(filename, dir_fd=new_fd)   # a redone delivery we have
                        continue
                    os.rename(filename, base + INFO + info, src_dir_fd=new_fd,
                              dst_dir_fd=cur_fd)
                except FileNotFoundError:
                    continue
                in_cur[base] = info
                moved.add(base)
        finally:
            os.close(new_fd)
        return moved

    def _find(self, message):
        """The current file name of ``message`` (flags may have changed), or None."""
        prefix = message.base + ":"
        for filename in _listdir(self._cur()):
            if filename == message.base or filename.startswith(prefix):
                return filename
        return None

    def _open(self, message):
        try:
            return open(self._cur(message.filename), "rb", buffering=0)
        except FileNotFoundError:
            filename = self._find(message)
            if filename is None:
                raise MessageGone(f"message {message.uid} is gone") from None
            try:
                return open(self._cur(filename), "rb", buffering=0)
            except FileNotFoundError:
                raise MessageGone(f"message {message.uid} is gone") from None

    def read_sync(self, message):
        with self._open(message) as f:
            return crlf(f.read())

    def read_header_sync(self, message):
        """The header block of ``message`` (CRLF), blank line included."""
        cached = self.headers.get(message.base)
        if cached is not None:
            return cached
        with self._open(message) as f:
            data = b""
            while True:
                chunk = f.read(16384)
                data += chunk
                end = data.find(b"\n\n")
                if end >= 0 or not chunk:
                    header = header_of(data)
                    self.headers.put(message.base, header)
                    return header

    def _header_or_none(self, message):
        try:
            return self.read_header_sync(message)
        except MessageGone:
            return None

    def _letters_for(self, flags, create):
        """Maildir info letters for IMAP ``flags`` (new keywords added if ``create``)."""
        letters = set()
        for flag in flags:
            system = _FLAG_CASE.get(flag.lower())
            if system is not None:
                letters.add(SYSTEM_FLAGS[system])
                continue
            if flag.startswith("\\") or not _KEYWORD.match(flag):
                continue
            index = self._keyword_index(flag, create)
            if index is not None:
                letters.add(KEYWORD_LETTERS[index])
        return letters

    def _keyword_index(self, keyword, create):
        for index, known in enumerate(self.keywords):
            if known.lower() == keyword.lower():
                return index
        if not create or not self.can_add_keywords:
            return None
        self.keywords = self.keywords + (keyword,)
        self._save_uidlist()
        return len(self.keywords) - 1

    def _store_sync(self, uids, flags, mode):
        self._ready()
        letters = self._letters_for(flags, create=mode != "remove")
        changed = []
        for uid in uids:
            message = self._by_uid.get(uid)
            if message is None:
                continue
            current = set(message.info)
            if mode == "set":
                # Letters we do not map (e.g. P, passed) survive a FLAGS replace.
                unmapped = {c for c in current if c not in _LETTER_FLAGS and not c.islower()}
                wanted = letters | unmapped
            elif mode == "add":
                wanted = current | letters
            else:
                wanted = current - letters
            info = "".join(sorted(wanted))
            if info == message.info:
                continue
            updated = self._rename_info(message, info)
            if updated is not None:
                changed.append(updated)
        if changed:
            self._update(changed=changed)
        return changed

    def _rename_info(self, message, info):
        new = message._replace(info=info)
        try:
            os.rename(self._cur(message.filename), self._cur(new.filename))
        except FileNotFoundError:
            filename = self._find(message)
            if filename is None:
                return None
            os.rename(self._cur(filename), self._cur(new.filename))
        return new

    def _expunge_sync(self, uids):
        self._ready()
        removed = []
        for uid in uids:
            message = self._by_uid.get(uid)
            if message is None:
                continue
            try:
                os.unlink(self._cur(message.filename))
            except FileNotFoundError:
                filename = self._find(message)
                if filename is not None:
                    os.unlink(self._cur(filename))
            removed.append(uid)
        if removed:
            self._update(removed=removed)
            self._save_uidlist()
        return removed

    def _ready(self):
        """Before adding messages: the folder exists and its uidlist is loaded."""
        if not os.path.isdir(self._cur()):
            raise FolderMissing(f"no folder {self.name}")
        if not self._loaded:
            self._load_uidlist()
            self._scan_after_load()

    def _scan_after_load(self):
        # A first contact through APPEND/COPY: learn the existing files first,
        # so the new message's UID is above every message already there.
        self._scan_sync()

    def _append_sync(self, data, flags, date):
        self._ready()
        if hasattr(data, "read"):
            data.seek(0)
            data = data.read()
        stored = to_stored(data)
        base = unique_name(self.clock.seconds(), self.hostname)
        info = "".join(sorted(self._letters_for(flags, create=True)))
        tmp = os.path.join(self.path, "tmp", base)
        write_new(tmp, stored)
        mtime = self.clock.seconds() if date is None else date
        os.utime(tmp, (mtime, mtime))
        message = Message(self.uidnext, base, info, crlf_size(stored), float(mtime))
        os.rename(tmp, self._cur(message.filename))
        fsync_dir(self._cur())
        return self._added([message])[0]

    def _added(self, messages):
        """Record new messages (UIDs from uidnext) and persist the list."""
        numbered = []
        for message in messages:
            numbered.append(message._replace(uid=self.uidnext))
            self.uidnext += 1
        self._update(added=numbered)
        self._save_uidlist()
        return numbered

    def _copy_sync(self, uids, dest, move):
        dest._ready()
        if not self._loaded:
            self._ready()
        pairs, made, moved = [], [], []
        for uid in uids:
            message = self._by_uid.get(uid)
            if message is None:
                continue
            flags = self.flags_of(message)
            info = "".join(sorted(dest._letters_for(flags, create=True)))
            base = message.base if move and dest is not self else \
                unique_name(self.clock.seconds(), self.hostname)
            copy = Message(0, base, info, message.size, message.mtime)
            if not self._transfer(message, dest, copy.filename, move and dest is not self):
                continue
            pairs.append(uid)
            made.append(copy)
            if move:
                moved.append(uid)
        fsync_dir(dest._cur())
        numbered = dest._added(made) if made else []
        if moved and dest is not self:
            self._update(removed=moved)
            self._save_uidlist()
        elif moved:
            self._expunge_sync(moved)
        return [(old, new.uid) for old, new in zip(pairs, numbered)]

    def _transfer(self, message, dest, filename, rename):
        """Put ``message`` into ``dest``'s cur/ as ``filename``: rename (move),
        else a hard link, else a copy through tmp/. False if it vanished."""
        source = self._cur(message.filename)
        target = dest._cur(filename)
        if not os.path.exists(source):
            found = self._find(message)
            if found is None:
                return False
            source = self._cur(found)
        try:
            if rename:
                os.rename(source, target)
            else:
                os.link(source, target)
            return True
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                raise
        tmp = os.path.join(dest.path, "tmp", filename.partition(":")[0])
        shutil.copyfile(source, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.rename(tmp, target)
        if rename:
            os.unlink(source)
        return True


# -- a user's Maildir and the shared registry ------------------------------------------

class UserMaildir:
    """The folders of one user: INBOX and Maildir++ subfolders."""

    def __init__(self, store, address, path):
        self.store = store
        self.address = address
        self.path = path

    def folder_path(self, name):
        name = check_folder_name(name)
        if name == "INBOX":
            return self.path
        return os.path.join(self.path, encode_name(name))

    def folder(self, name):
        """The shared Folder for ``name`` (it may not exist: scan() says so)."""
        name = check_folder_name(name)
        return self.store.folder_at(self.folder_path(name), name)

    def ensure(self, special=tuple(SPECIAL_USE)):
        """Create INBOX and the ``special`` folders if missing (at login)."""
        return self.store.run_in_thread(self._ensure_sync, tuple(special))

    def _ensure_sync(self, special):
        _make_maildir(self.path, subfolder=False)
        created = [name for name in special
                   if not os.path.isdir(os.path.join(self.folder_path(name), "cur"))]
        for name in special:
            _make_maildir(self.folder_path(name), subfolder=True)
        if created:
            subscribed = self._read_subscriptions()
            self._write_subscriptions(subscribed | set(created))
        return created

    def list_folders(self):
        """Deferred[list of folder names], INBOX first, the rest sorted."""
        return self.store.run_in_thread(self._list_sync)

    def _list_sync(self):
        names = []
        for entry in _listdir(self.path):
            name = decode_name(entry)
            if name is not None and os.path.isdir(os.path.join(self.path, entry, "cur")):
                names.append(name)
        return ["INBOX"] + sorted(names)

    def create(self, name):
        """Create folder ``name``: FolderExists if it is there."""
        path = self.folder_path(name)
        return self.store.run_in_thread(self._create_sync, path, check_folder_name(name))

    def _create_sync(self, path, name):
        if name == "INBOX" or os.path.isdir(os.path.join(path, "cur")):
            raise FolderExists(f"folder {name} exists")
        _make_maildir(path, subfolder=True)
        fsync_dir(self.path)

    def delete(self, name):
        """Delete folder ``name`` and its messages (not INBOX, not its subfolders)."""
        name = check_folder_name(name)
        if name == "INBOX":
            return defer.fail(FolderError("INBOX cannot be deleted"))
        return self.store.run_in_thread(self._delete_sync, self.folder_path(name), name)

    def _delete_sync(self, path, name):
        if not os.path.isdir(path):
            raise FolderMissing(f"no folder {name}")
        # Rename first (atomic: the folder is gone at once), then remove the tree.
        trash = os.path.join(self.path, "tmp", f"deleted-{os.urandom(6).hex()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.path)
        self._write_subscriptions(self._read_subscriptions() - {name})

    def rename(self, old, new):
        """Rename folder ``old`` (and its subfolders) to ``new``. Renaming INBOX
        moves its messages into the new folder and leaves INBOX empty."""
        old, new = check_folder_name(old), check_folder_name(new)
        if new == "INBOX":
            return defer.fail(FolderExists("folder INBOX exists"))
        if old == "INBOX":
            return self._rename_inbox(new)
        return self.store.run_in_thread(self._rename_sync, old, new)

    def _rename_sync(self, old, new):
        if not os.path.isdir(self.folder_path(old)):
            raise FolderMissing(f"no folder {old}")
        if os.path.exists(self.folder_path(new)):
            raise FolderExists(f"folder {new} exists")
        children = [n for n in self._list_sync() if n.startswith(old + DELIMITER)]
        for name in [old] + children:
            target = new + name[len(old):]
            check_folder_name(target)
            os.rename(self.folder_path(name), self.folder_path(target))
            self.store.forget(self.folder_path(name))
        fsync_dir(self.path)
        subscribed = self._read_subscriptions()
        renamed = {new + n[len(old):] if n == old or n.startswith(old + DELIMITER) else n
                   for n in subscribed}
        self._write_subscriptions(renamed)

    @defer.inlineCallbacks
    def _rename_inbox(self, new):
        yield self.create(new)
        inbox = self.folder("INBOX")
        result = yield inbox.scan()
        yield inbox.copy_to([m.uid for m in result.messages], self.folder(new), move=True)

    # subscriptions (LSUB): one name a line, like Dovecot's Maildir++ file

    def subscriptions(self):
        return self.store.run_in_thread(self._read_subscriptions)

    def subscribe(self, name, on=True):
        name = check_folder_name(name)
        return self.store.run_in_thread(self._subscribe_sync, name, on)

    def _subscribe_sync(self, name, on):
        names = self._read_subscriptions()
        self._write_subscriptions(names | {name} if on else names - {name})

    def _read_subscriptions(self):
        try:
            with open(os.path.join(self.path, SUBSCRIPTIONS), encoding="utf-8") as f:
                return {line for line in f.read().split("\n") if line}
        except (FileNotFoundError, UnicodeError):
            return set()

    def _write_subscriptions(self, names):
        data = "".join(n + "\n" for n in sorted(names)).encode("utf-8")
        write_atomic(os.path.join(self.path, SUBSCRIPTIONS), data)


class MaildirStore:
    """Opens users' Maildirs under ``root`` (``<data_dir>/mail``).

    Folder objects are shared while anyone holds them (a weak registry), so
    all sessions on one folder use one lock, one UID list and one set of
    listeners. ``run_in_thread(f, *args) -> Deferred`` runs the file work
    (``appliance.threads.synchronous_runner`` in tests).
    """

    def __init__(self, root, run_in_thread, clock=None, hostname="localhost"):
        self.root = root
        self.run_in_thread = run_in_thread
        self.clock = default_clock(clock)
        self.hostname = hostname
        self._folders = weakref.WeakValueDictionary()

    def user(self, address):
        """The Maildir of the canonical local address ``address``."""
        return UserMaildir(self, address, maildir_path(self.root, address))

    def folder_at(self, path, name):
        folder = self._folders.get(path)
        if folder is None:
            folder = Folder(path, name, self.run_in_thread, self.clock, self.hostname)
            self._folders[path] = folder
        return folder

    def open_folder(self, path):
        """The shared Folder at ``path`` if some session has it open, else None."""
        return self._folders.get(path)

    def forget(self, path):
        """Drop the registry entry of a folder renamed away."""
        self._folders.pop(path, None)


# The imap4-utf-7 codec must exist before any name is encoded.
codecs.lookup("imap4-utf-7")

"""The mailbox side of IMAP: twisted.mail's IAccount / IMailbox / IMessage
over ``appliance.access.folders``, and FETCH and SEARCH over messages.

``MaildirAccount`` is a logged-in user's folders; ``MailboxView`` one
session's view of a shared Folder (its own sequence numbers and \\Recent
set, told of other sessions' changes through the folder's flag log and
removal counter, so catching up costs what changed, not the mailbox size);
``render_batch`` and ``search_batch`` run on a thread and read no more of a
message than the request needs (an ENVELOPE once computed is remembered).
"""

import bisect
import io

from twisted.internet import defer
from twisted.mail import imap4
from zope.interface import implementer

from appliance.access.imap import mime as imapmime
from appliance.access.imap.search import Candidate, search_fields
from appliance.access.imap.syntax import (format_internaldate, resolve_seqs, resolve_uids,
                                         section_name)
from appliance.access.imap.listmatch import Pattern
from appliance.access.folders import (DELIMITER, SPECIAL_USE, SYSTEM_FLAGS, MessageGone,
                                      check_folder_name)


# -- the account (IAccount) ------------------------------------------------------------

@implementer(imap4.IAccount, imap4.INamespacePresenter)
class MaildirAccount:
    """A logged-in user's folders, as twisted.mail's IAccount.

    Every method returns a Deferred; errors are ``appliance.access.folders``
    FolderErrors, which the server turns into NO responses.
    """

    def __init__(self, user):
        self.user = user            # an appliance.access.folders.UserMaildir
        self.address = user.address

    def addMailbox(self, name, mbox=None):
        return self.create(name)

    def create(self, pathspec):
        return self.user.create(pathspec.rstrip(DELIMITER) or pathspec)

    def select(self, name, rw=True):
        view = MailboxView(self.user.folder(name), rw)
        return view.open()

    def delete(self, name):
        return self.user.delete(name)

    def rename(self, oldname, newname):
        return self.user.rename(oldname, newname)

    def isSubscribed(self, name):
        d = self.user.subscriptions()
        return d.addCallback(lambda names: check_folder_name(name) in names)

    def subscribe(self, name):
        return self.user.subscribe(name, True)

    def unsubscribe(self, name):
        return self.user.subscribe(name, False)

    @defer.inlineCallbacks
    def listMailboxes(self, ref, wildcard):
        """Deferred[[(name, attributes)]] matching ``ref`` + ``wildcard``."""
        names = yield self.user.list_folders()
        return list(matching_folders(names, ref, wildcard))

    def getPersonalNamespaces(self):
        return [["", DELIMITER]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None


def wildcard_pattern(ref, wildcard, fold_case=False):
    """The ``listmatch.Pattern`` for LIST's ``ref`` + ``wildcard`` (``*``
    anything, ``%`` no delimiter): linear in the name, never a regex."""
    text = (ref + wildcard) if ref and not wildcard.startswith(DELIMITER) else wildcard
    return Pattern(text, fold_case)


def matching_folders(names, ref, wildcard):
    """``(name, attributes)`` for LIST: existing folders and the parents they
    imply (``\\Noselect``), with CHILDREN and SPECIAL-USE attributes."""
    existing = set(names)
    every = set(existing)
    for name in existing:
        parts = name.split(DELIMITER)
        every.update(DELIMITER.join(parts[:i]) for i in range(1, len(parts)))
    pattern = wildcard_pattern(ref, wildcard)
    inbox_pattern = wildcard_pattern(ref, wildcard, fold_case=True)
    parents = {n.rsplit(DELIMITER, 1)[0] for n in every if DELIMITER in n}
    for name in sorted(every, key=lambda n: (n != "INBOX", n)):
        if not (pattern.match(name) or (name == "INBOX" and inbox_pattern.match(name))):
            continue
        attributes = ["\\HasChildren" if name in parents else "\\HasNoChildren"]
        if name not in existing:
            attributes.insert(0, "\\Noselect")
        if name in SPECIAL_USE:
            attributes.append(SPECIAL_USE[name])
        yield name, attributes


# -- one selected mailbox (IMailbox) ----------------------------------------------------

@implementer(imap4.IMailbox)
class MailboxView:
    """A session's view of a shared Folder: its own sequence numbers, its
    \\Recent messages and the flags it has shown, so that changes made by
    other sessions (and deliveries) can be announced when IMAP allows."""

    def __init__(self, folder, readwrite=True):
        self.folder = folder
        self.readwrite = bool(readwrite)
        self.uids = []
        self.recent = set()
        self._shown = {}
        self._shown_base = {}
        self._first_unseen = None
        self._removals = 0
        self._flag_serial = 0
        self._listeners = []

    # the view

    def open(self):
        d = self.folder.scan()
        d.addCallback(self._opened)
        return d

    def _opened(self, result):
        messages = self.folder.messages
        self.uids = [m.uid for m in messages]
        # What the client was shown: the folder's index as of now (swapped
        # whole, never mutated) plus what changed since; not a copy of 100,000
        # entries made on the reactor.
        self._shown_base = self.folder.index
        self._shown = {}
        self._first_unseen = next((seq for seq, m in enumerate(messages, 1)
                                   if "S" not in m.info), None)
        self.recent = self.folder.take_recent()     # UIDs of the folder as of now
        self._removals = self.folder.removals
        self._flag_serial = self.folder.flag_serial
        self.folder.add_listener(self._changed)
        return self

    def close(self):
        self.folder.remove_listener(self._changed)

    def _changed(self, folder):
        for listener in list(self._listeners):
            listener.newMessages(None, None)

    def message(self, seq):
        """The Message at sequence number ``seq`` (None if expunged meanwhile)."""
        return self.folder.get(self.uids[seq - 1])

    def seq_of(self, uid):
        index = bisect.bisect_left(self.uids, uid)
        return index + 1 if index < len(self.uids) and self.uids[index] == uid else None

    def flags(self, message):
        flags = self.folder.flags_of(message)
        if message.uid in self.recent:
            flags.append("\\Recent")
        return flags

    def flag_bytes(self, message):
        return b"(" + " ".join(self.flags(message)).encode("ascii") + b")"

    def shown(self, message):
        """The client now knows ``message``'s current flags."""
        self._shown[message.uid] = message.info

    def _shown_info(self, uid):
        info = self._shown.get(uid)
        if info is None:
            message = self._shown_base.get(uid)
            info = None if message is None else message.info
        return info

    def pending(self, allow_expunge=True):
        """Untagged lines telling the client what changed since it last heard:
        EXPUNGE (only when allowed), FETCH FLAGS, EXISTS and RECENT. Work is
        proportional to the changes (the folder's flag log and removal
        counter), not to the mailbox."""
        folder = self.folder
        index = folder.index
        lines = []
        if allow_expunge and self._removals != folder.removals:
            self._removals = folder.removals
            for position in range(len(self.uids) - 1, -1, -1):
                if self.uids[position] not in index:
                    lines.append(b"* %d EXPUNGE" % (position + 1))
            if lines:
                self.uids = [uid for uid in self.uids if uid in index]
                self.recent &= set(self.uids)
        serial = folder.flag_serial
        if serial != self._flag_serial:
            changed = folder.flags_changed_since(self._flag_serial)
            candidates = self.uids if changed is None else sorted(set(changed))
            for uid in candidates:
                message = index.get(uid)
                seq = self.seq_of(uid) if message is not None else None
                if seq is not None and message.info != self._shown_info(uid):
                    self._shown[uid] = message.info
                    lines.append(b"* %d FETCH (FLAGS %s)" % (seq, self.flag_bytes(message)))
            self._flag_serial = serial
        messages = folder.messages
        top = self.uids[-1] if self.uids else 0
        start = bisect.bisect_right(messages, top, key=lambda m: m.uid)
        if start < len(messages):
            for message in messages[start:]:
                self.uids.append(message.uid)
                self._shown[message.uid] = message.info
            self.recent |= folder.take_recent() & set(self.uids)
            lines.append(b"* %d EXISTS" % len(self.uids))
            lines.append(b"* %d RECENT" % len(self.recent))
        return lines

    def refresh(self):
        """Look at the disk (new deliveries, changes by other programs)."""
        return self.folder.scan()

    # IMailbox

    def getFlags(self):
        return list(SYSTEM_FLAGS) + list(self.folder.keywords)

    def getHierarchicalDelimiter(self):
        return DELIMITER

    def getUIDValidity(self):
        return self.folder.uidvalidity

    def getUIDNext(self):
        return self.folder.uidnext

    def getUID(self, message):
        return self.uids[message - 1]

    def getMessageCount(self):
        return len(self.uids)

    def getRecentCount(self):
        return len(self.recent)

    def getUnseenCount(self):
        return sum(1 for m in self.folder.messages if "S" not in m.info)

    def first_unseen(self):
        """The first unseen message's number when the view was opened (SELECT's answer)."""
        return self._first_unseen

    def isWriteable(self):
        return self.readwrite

    def destroy(self):
        raise imap4.MailboxException("use DELETE")

    def requestStatus(self, names):
        values = {"MESSAGES": self.getMessageCount, "RECENT": self.getRecentCount,
                  "UIDNEXT": self.getUIDNext, "UIDVALIDITY": self.getUIDValidity,
                  "UNSEEN": self.getUnseenCount}
        return {name: values[name.upper()]() for name in names}

    def addListener(self, listener):
        self._listeners.append(listener)

    def removeListener(self, listener):
        if listener in self._listeners:
            self._listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        d = self.folder.append(message, flags, date)
        return d.addCallback(lambda m: m.uid)

    def expunge(self):
        uids = [m.uid for m in self.folder.messages if "T" in m.info]
        return self.folder.expunge(uids)

    def fetch(self, messages, uid):
        """[(seq, ImapMessage)] for a MessageSet, resolved against the mailbox."""
        ranges = [(low, high) for low, high in messages.ranges]
        if uid:
            positions = [i + 1 for i in resolve_uids(ranges, self.uids)]
        else:
            positions = resolve_seqs(ranges, len(self.uids))
        found = []
        for seq in positions:
            message = self.message(seq)
            if message is not None:
                found.append((seq, ImapMessage(self, message)))
        return found

    def store(self, messages, flags, mode, uid):
        mode = {1: "add", -1: "remove", 0: "set"}[mode]
        targets = [m.message for _, m in self.fetch(messages, uid)]
        d = self.folder.store([m.uid for m in targets], flags, mode)

        def answer(_):
            return {self.seq_of(m.uid): self.flags(self.folder.get(m.uid))
                    for m in targets if self.folder.get(m.uid) is not None}
        return d.addCallback(answer)


@implementer(imap4.IMessage)
class ImapMessage:
    """One message as twisted.mail's IMessage (read from the disk on demand)."""

    def __init__(self, view, message):
        self.view = view
        self.message = message
        self._part = None

    def _root(self):
        if self._part is None:
            self._part = imapmime.Part(self.view.folder.read_sync(self.message))
        return self._part

    def getUID(self):
        return self.message.uid

    def getFlags(self):
        return self.view.flags(self.message)

    def getInternalDate(self):
        return format_internaldate(self.message.mtime).strip(b'"').decode("ascii")

    def getHeaders(self, negate, *names):
        wanted = {n.lower().encode("ascii") if isinstance(n, str) else n.lower() for n in names}
        found = {}
        for name, raw in self._root().headers.fields:
            if not names or ((name in wanted) != negate):
                found.setdefault(name.decode("latin-1"),
                                 imapmime.field_value(raw).decode("latin-1"))
        return found

    def getBodyFile(self):
        return io.BytesIO(self._root().body)

    def getSize(self):
        return self.message.size

    def isMultipart(self):
        return self._root().is_multipart

    def getSubPart(self, part):
        root = self._root()
        if not root.is_multipart or not 0 <= part < len(root.children):
            raise IndexError(part)
        return root.children[part]


# -- FETCH rendering (on a thread) ------------------------------------------------------

NEEDS_NOTHING, NEEDS_HEADER, NEEDS_ALL = 0, 1, 2


def fetch_needs(items):
    """How much of each message a FETCH must read."""
    need = NEEDS_NOTHING
    for item in items:
        if item.name in ("ENVELOPE", "RFC822.HEADER"):
            need = max(need, NEEDS_HEADER)
        elif item.name == "BODY[]" and not item.numbers and item.kind.startswith("HEADER"):
            need = max(need, NEEDS_HEADER)
        elif item.name in ("RFC822", "RFC822.TEXT", "BODY", "BODYSTRUCTURE", "BODY[]"):
            need = NEEDS_ALL
    return need


def sets_seen(item):
    return (item.name in ("RFC822", "RFC822.TEXT")
            or (item.name == "BODY[]" and not item.peek))


def literal(data):
    return b"{%d}\r\n" % len(data) + data


class _Source:
    """A message's parsed form, read from the disk on first use only (a FETCH
    whose ENVELOPEs are all remembered reads nothing)."""

    __slots__ = ("folder", "message", "need", "_root")

    def __init__(self, folder, message, need):
        self.folder = folder
        self.message = message
        self.need = need
        self._root = None

    @property
    def root(self):
        if self._root is None:
            if self.need == NEEDS_ALL:
                self._root = imapmime.Part(self.folder.read_sync(self.message))
            else:
                self._root = imapmime.Part(self.folder.read_header_sync(self.message),
                                           structure=False)
        return self._root


def envelope_of(source):
    """The ENVELOPE, from the folder's message cache or computed and put
    there with SEARCH's decoded header fields (a client searches right after
    fetching; one header parse serves both)."""
    cache, message = source.folder.cache, source.message
    cached = cache.get(message.base, message.size)
    if cached is not None and cached[0] is not None:
        return cached[0]
    headers = source.root.headers
    envelope = imapmime.envelope(headers)
    cache.put(message.base, message.size, envelope, search_fields(headers))
    return envelope


def render_item(item, message, flags, source):
    """One ``NAME value`` of a FETCH response."""
    name = item.name
    if name == "FLAGS":
        return b"FLAGS " + flags
    if name == "UID":
        return b"UID %d" % message.uid
    if name == "INTERNALDATE":
        return b"INTERNALDATE " + format_internaldate(message.mtime)
    if name == "RFC822.SIZE":
        return b"RFC822.SIZE %d" % message.size
    if name == "ENVELOPE":
        return b"ENVELOPE " + envelope_of(source)
    root = source.root
    if name == "RFC822.HEADER":
        return b"RFC822.HEADER " + literal(root.header)
    if name == "RFC822.TEXT":
        return b"RFC822.TEXT " + literal(root.body)
    if name == "RFC822":
        return b"RFC822 " + literal(root.raw)
    if name == "BODYSTRUCTURE":
        return b"BODYSTRUCTURE " + imapmime.body_structure(root, True)
    if name == "BODY":
        return b"BODY " + imapmime.body_structure(root, False)
    data = imapmime.section(root, list(item.numbers), item.kind, item.fields)
    if data is None:
        data = b""
    if item.partial is not None:
        start, length = item.partial
        data = data[start:start + length]
    return section_name(item) + b" " + literal(data)


def render_batch(folder, batch, items, need):
    """``(bytes of the FETCH responses, number of messages gone)`` for
    ``batch`` = [(seq, Message, flags bytes)]; runs on a thread."""
    out, gone = [], 0
    for seq, message, flags in batch:
        source = _Source(folder, message, need)
        try:
            parts = [render_item(item, message, flags, source) for item in items]
        except MessageGone:
            gone += 1
            continue
        out.append(b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n")
    return b"".join(out), gone


def search_batch(folder, query, rows):
    """The (seq, uid) of ``rows`` = [(seq, Message, recent)] matching
    ``query``; runs on a thread when the query reads messages."""
    found = []
    for seq, message, recent in rows:
        try:
            if query.match(Candidate(seq, message, recent, folder)):
                found.append((seq, message.uid))
        except MessageGone:
            continue
    return found

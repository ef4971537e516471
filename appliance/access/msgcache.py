"""What IMAP derives from a folder's messages, kept across sessions and restarts.

Parsing a header for ENVELOPE, or decoding From/To/Cc/Bcc/Subject for
SEARCH, costs far more than reading the file; over 100,000 messages it is
the whole of the time. ``MessageCache`` keeps both per message, in memory
and in the folder's ``mailappliance-cache`` file (as Dovecot keeps
``dovecot.index.cache``), so a FETCH ENVELOPE or SEARCH after a restart, or
from another session, parses nothing it parsed before.

Entries are keyed by the message's base file name and its size: a Maildir
file's content never changes under its base name (flags live in the name's
info part and in the uidlist, never here), so an entry never goes stale. A
delivery adds a base name the cache lacks (computed on first use); an
expunge leaves an entry nobody asks for, dropped at the next save (only the
folder's current messages are written).

The file is written whole by ``write_atomic`` (temp file, fsync, rename,
directory fsync): after a crash it is the old file or the new one. It is
checked on load (a magic line, the record lengths, a CRC-32 of everything
before the trailer); a file that fails any check is ignored and the cache
is rebuilt as messages are read again. The file is only a cache: losing
it costs time, never a wrong answer.

Format: ``MAGIC``, then per message ``>HIII`` (base length, CRLF size,
envelope length, search-text length), the base name, the ENVELOPE bytes,
the search text (UTF-8: each of the five fields' values preceded by
``\\x01``, the fields joined by ``\\x00``); then ``>I`` the CRC-32. An empty
envelope is one not computed yet (a SEARCH read the header, no FETCH did).
"""

import os
import struct
import threading
import zlib

from appliance.durable.files import write_atomic

CACHE_FILE = "mailappliance-cache"
MAGIC = b"mailappliance-cache 1\n"
_RECORD = struct.Struct(">HIII")
_CRC = struct.Struct(">I")
SEARCH_FIELDS = (b"from", b"to", b"cc", b"bcc", b"subject")
MAX_BASE = 0xFFFF


def _pack_search(fields):
    """The search text of ``fields`` (a tuple of 5 tuples of str), or None
    when a value holds a separator (such an entry stays in memory only)."""
    parts = []
    for values in fields:
        for value in values:
            if "\x00" in value or "\x01" in value:
                return None
        parts.append("".join("\x01" + value for value in values))
    return "\x00".join(parts).encode("utf-8", "surrogatepass")


def _unpack_search(data):
    parts = data.decode("utf-8", "surrogatepass").split("\x00")
    if len(parts) != len(SEARCH_FIELDS):
        raise ValueError("bad search text")
    return tuple(tuple(part.split("\x01")[1:]) for part in parts)


def encode(entries):
    """The file's bytes for ``entries`` = [(base, size, envelope, search fields)]."""
    out = [MAGIC]
    for base, size, envelope, fields in entries:
        name = base.encode("utf-8", "surrogateescape")
        search = _pack_search(fields)
        if search is None or len(name) > MAX_BASE or size >= 2 ** 32:
            continue
        envelope = envelope or b""
        out.append(_RECORD.pack(len(name), size, len(envelope), len(search)))
        out.append(name)
        out.append(envelope)
        out.append(search)
    data = b"".join(out)
    return data + _CRC.pack(zlib.crc32(data))


def decode(data):
    """``{base: (size, envelope, search fields)}`` of a file's bytes; ValueError if damaged."""
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + _CRC.size:
        raise ValueError("not a cache file")
    body, trailer = data[:-_CRC.size], data[-_CRC.size:]
    if _CRC.unpack(trailer)[0] != zlib.crc32(body):
        raise ValueError("checksum mismatch")
    entries = {}
    view = memoryview(body)
    pos, end = len(MAGIC), len(body)
    unpack = _RECORD.unpack_from
    while pos < end:
        if pos + _RECORD.size > end:
            raise ValueError("truncated record")
        name_len, size, env_len, search_len = unpack(body, pos)
        pos += _RECORD.size
        stop = pos + name_len + env_len + search_len
        if stop > end:
            raise ValueError("truncated record")
        base = bytes(view[pos:pos + name_len]).decode("utf-8", "surrogateescape")
        envelope = bytes(view[pos + name_len:pos + name_len + env_len])
        fields = _unpack_search(bytes(view[pos + name_len + env_len:stop]))
        entries[base] = (size, envelope or None, fields)
        pos = stop
    return entries


class MessageCache:
    """ENVELOPEs and SEARCH header texts of one folder's messages.

    ``get``/``put`` may run on any thread (the FETCH and SEARCH workers);
    the first ``get`` loads the file. ``save(current)`` runs on a thread
    too; ``dirty`` says whether there is anything to save.
    """

    def __init__(self, directory):
        self.path = os.path.join(directory, CACHE_FILE)
        self._entries = {}          # base -> (size, envelope, search fields)
        self._loaded = False
        self._load_lock = threading.Lock()
        self._save_lock = threading.Lock()
        self.dirty = False
        self.damaged = False        # the last load found a damaged file

    def _load(self):
        with self._load_lock:
            if self._loaded:
                return
            try:
                with open(self.path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = None
            except OSError:
                data = None
                self.damaged = True
            if data is not None:
                try:
                    found = decode(data)
                except (ValueError, struct.error, UnicodeError):
                    found = {}
                    self.damaged = True
                    self.dirty = True       # replace the damaged file at the next save
                found.update(self._entries)
                self._entries = found
            self._loaded = True

    def get(self, base, size):
        """``(envelope, search fields)`` of the message ``base`` of ``size``
        octets, or None. The envelope is None when only a SEARCH saw it."""
        if not self._loaded:
            self._load()
        entry = self._entries.get(base)
        if entry is None or entry[0] != size:
            return None
        return entry[1], entry[2]

    def put(self, base, size, envelope, fields):
        """Remember a message's ENVELOPE (None: not computed) and search fields."""
        self._entries[base] = (size, envelope, fields)
        self.dirty = True

    def forget(self, bases):
        """Messages that left the folder: their entries go (from the file at the next save)."""
        for base in bases:
            if self._entries.pop(base, None) is not None:
                self.dirty = True

    def __len__(self):
        return len(self._entries)

    def save(self, messages):
        """Write the entries of ``messages`` (the folder's current Message
        list) to the file and forget the others. Blocking: on a thread."""
        with self._save_lock:
            if not self.dirty:
                return False
            if not self._loaded:
                self._load()
            self.dirty = False
            entries = self._entries
            kept, rows = {}, []
            for message in messages:
                entry = entries.get(message.base)
                if entry is not None and entry[0] == message.size:
                    kept[message.base] = entry
                    rows.append((message.base, entry[0], entry[1], entry[2]))
            # Expunged messages' entries go. One put by a worker meanwhile
            # may be lost with them: it is computed again when next needed.
            self._entries = kept
            try:
                write_atomic(self.path, encode(rows))
            except OSError:
                self.dirty = True
                raise
            return True

"""The Maildir format, the one definition that every writer and reader uses.

``<data_dir>/mail/<domain>/<localpart>/{tmp,new,cur}``; Maildir++ folders are
``<maildir>/.<name>/`` with a ``maildirfolder`` marker. Stored files use LF
line endings and start with ``Return-Path:`` (``maildir_bytes``), like
Postfix local or Dovecot LDA; the wire form (CRLF, as received and relayed)
comes back with ``wire_bytes`` or ``crlf``. File names: ``message_name`` for
what the queue delivers (derived from the queue id, so a redo finds it),
``unique_name`` for what a client stores; both escape the host part the
same way. Delivery (``appliance.deliver.maildir``) and the IMAP/POP3 folders
(``appliance.access.folders``) both build on this module.
"""

import os
import re
from collections import namedtuple

SUBDIRS = ("tmp", "new", "cur")
FOLDER_MARKER = "maildirfolder"     # Maildir++: marks <inbox>/.<name> as a folder
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\%]")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")

SpoolFile = namedtuple("SpoolFile", "path maildir_form size")
SpoolFile.__doc__ = """A committed spool message file that deliveries link (or copy) from:
``maildir_form`` True when it already holds the stored form (``maildir_bytes``),
False for the wire form; ``size`` in bytes as stored."""


def host_part(hostname):
    """The host part of a file name: the Maildir spec's escapes for ``/`` and
    ``:`` keep the name one path component and ``:`` free for the flags
    suffix of ``cur/``."""
    return (hostname or "localhost").replace("/", "\\057").replace(":", "\\072")


def path_component(text):
    """``text`` as one safe directory name: no ``/``, no control bytes, no leading dot.

    Addresses come from the directory, but a quoted local part may hold
    anything; percent-encoding keeps every mailbox inside the mail root and
    keeps distinct addresses in distinct directories.
    """
    if not text:
        raise ValueError("empty mailbox name")
    encoded = _UNSAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m.group().encode()), text)
    if encoded.startswith("."):
        encoded = "%2E" + encoded[1:]
    return encoded


def maildir_path(root, address):
    """The Maildir of a canonical local address under ``root`` (``<data_dir>/mail``)."""
    local, at, domain = address.rpartition("@")
    if not at:
        raise ValueError(f"{address!r} is not an address")
    return os.path.join(root, path_component(domain), path_component(local))


def message_name(queue_id, received_at, hostname):
    """The base name of a delivered message, ``<seconds>.Q<queue_id>.<host>``:
    unique per message, the same on every redo (a redo after a crash finds
    the file it made instead of adding a second copy)."""
    return f"{int(received_at)}.Q{queue_id}.{host_part(hostname)}"


def maildir_bytes(sender, message):
    """The stored form: ``Return-Path:`` first, LF line endings."""
    path = _HEADER_UNSAFE.sub("", sender)
    return f"Return-Path: <{path}>\n".encode("utf-8") + message.replace(b"\r\n", b"\n")


def round_trips(message):
    """True when ``wire_bytes(maildir_bytes(s, message)) == message``: every LF
    in it ends a CRLF (SMTP's framing refuses bare LF, so that is every message
    received; a bare LF would come back as CRLF)."""
    return message.count(b"\n") == message.count(b"\r\n")


def wire_bytes(stored):
    """The message as received, from its stored form: without the
    ``Return-Path:`` line, CRLF line endings (for relaying, bounces)."""
    end = stored.find(b"\n")
    return stored[end + 1:].replace(b"\n", b"\r\n") if end >= 0 else b""


def already_in_cur(fs, maildir, name):
    """True if ``cur/`` holds ``name`` with any flags (``name:2,S``) or size info (``name,S=``)."""
    for entry in fs.listdir(os.path.join(maildir, "cur")):
        if entry == name or entry.startswith(name + ":") or entry.startswith(name + ","):
            return True
    return False


def split_name(filename):
    """``(base, info letters)`` of a file in cur/ or new/; no info is ``""``."""
    base, sep, info = filename.partition(":")
    if sep and info.startswith("2,"):
        return base, "".join(sorted(set(info[2:])))
    return base, ""


def crlf(data):
    """Stored bytes (LF, maybe some CRLF) as CRLF lines."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def crlf_size(data):
    """``len(crlf(data))`` without building the copy."""
    if b"\r" not in data:             # the usual stored form: LF only
        return len(data) + data.count(b"\n")
    return len(data) - data.count(b"\r\n") + data.count(b"\n")


def to_stored(data):
    """Client bytes (CRLF) as the LF form kept on disk."""
    return data.replace(b"\r\n", b"\n")


def unique_name(now, hostname, counter=[0]):
    """A new base name, at time ``now``, for a message a client stores (IMAP
    APPEND, COPY): ``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>``."""
    counter[0] += 1
    host = host_part(hostname)
    return (f"{int(now)}.M{int(now * 1e6) % 1000000}P{os.getpid()}Q{counter[0]}"
            f"R{os.urandom(4).hex()}.{host}")

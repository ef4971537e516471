"""Maildir delivery: ``<data_dir>/mail/<domain>/<localpart>/{tmp,new,cur}``.

Each delivery writes ``tmp/<name>``, fsyncs it, renames it into ``new/`` and
fsyncs ``new/``, all through the group-commit writer, so deliveries of many
messages share their fsyncs. The file name derives from the queue id only, so
a redo after a crash replaces the file instead of adding a second copy; and a
file with that base name already in ``cur/`` (an IMAP client moved it there)
means the delivery happened already.

Stored files use LF line endings (the Maildir convention) and start with a
``Return-Path:`` header, like Postfix local or Dovecot LDA.
"""

import os
import re
from collections import namedtuple

from twisted.internet import defer

from appliance.queue.commit import Durable, makedirs

SUBDIRS = ("tmp", "new", "cur")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\%]")
_HEADER_UNSAFE = re.compile(r"[\x00-\x1f\x7f<>]")

Delivered = namedtuple("Delivered", "address path name size existed")
Delivered.__doc__ = """One mailbox's copy: its path, size, and whether it was there already."""


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
    """``<seconds>.Q<queue_id>.<host>``: unique per message, the same on every redo.

    The Maildir spec's escapes for ``/`` and ``:`` in the host part keep the
    name one path component and keep ``:`` for the flags suffix of ``cur/``.
    """
    host = (hostname or "localhost").replace("/", "\\057").replace(":", "\\072")
    return f"{int(received_at)}.Q{queue_id}.{host}"


def maildir_bytes(sender, message):
    """The stored form: ``Return-Path:`` first, LF line endings."""
    path = _HEADER_UNSAFE.sub("", sender)
    return f"Return-Path: <{path}>\n".encode("utf-8") + message.replace(b"\r\n", b"\n")


def already_in_cur(fs, maildir, name):
    """True if ``cur/`` holds ``name`` with any flags (``name:2,S``) or size info (``name,S=``)."""
    for entry in fs.listdir(os.path.join(maildir, "cur")):
        if entry == name or entry.startswith(name + ":") or entry.startswith(name + ","):
            return True
    return False


class _Content:
    """The converted message, made once on the writer thread for all its mailboxes."""

    def __init__(self, sender, message):
        self.sender = sender
        self.message = message
        self._data = None

    def get(self):
        if self._data is None:
            self._data = maildir_bytes(self.sender, self.message)
        return self._data


class MaildirDeliverer:
    """Delivers to Maildirs under ``root`` through a GroupCommitWriter."""

    def __init__(self, root, writer, hostname):
        self.root = root
        self.writer = writer
        self.hostname = hostname

    def deliver(self, envelope, message, addresses):
        """Deliver ``message`` to each local address.

        Fires with ``{address: Delivered or Failure}``: every copy is
        attempted (one failing Maildir does not stop the others), and each
        Delivered is durable, its rename into ``new/`` fsynced.
        """
        content = _Content(envelope.sender, message)
        name = message_name(envelope.queue_id, envelope.received_at, self.hostname)
        addresses = list(dict.fromkeys(addresses))
        ds = [self.writer.submit(self._plan(address, name, content), "maildir.deliver")
              for address in addresses]
        d = defer.DeferredList(ds, consumeErrors=True)
        d.addCallback(lambda results: {
            address: value for address, (_, value) in zip(addresses, results)})
        return d

    def _plan(self, address, name, content):
        def plan(fs):
            maildir = maildir_path(self.root, address)
            parents = [os.path.dirname(p) for p in makedirs(fs, maildir)]
            for sub in SUBDIRS:
                parents += [os.path.dirname(p) for p in makedirs(fs, os.path.join(maildir, sub))]
            new = os.path.join(maildir, "new", name)
            if already_in_cur(fs, maildir, name):
                return Durable(sync_dirs=parents, result=Delivered(
                    address, os.path.join(maildir, "cur"), name, 0, True))
            data = content.get()
            tmp = os.path.join(maildir, "tmp", name)
            return Durable(writes=[(tmp, data)], renames=[(tmp, new)],
                           sync_dirs=parents + [os.path.dirname(new)],
                           result=Delivered(address, new, name, len(data), False))
        return plan

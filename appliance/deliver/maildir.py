"""Maildir delivery: ``<data_dir>/mail/<domain>/<localpart>/{tmp,new,cur}``.

Stored files use LF line endings (the Maildir convention) and start with a
``Return-Path:`` header, like Postfix local or Dovecot LDA. The spool keeps
its message file in that same form (``SpoolFile``), already fsynced, so a
delivery is a hard link of the spool file into ``new/`` plus an fsync of
``new/``: no copy, no second fsync of the data, one inode for every mailbox
that receives the message (Dovecot's "hardlinks" delivery). Maildir files are
never changed in place (flags live in the name), so sharing the inode is safe.
Where a link is impossible (another file system, link limit, a spool file in
the wire form) the message is copied: ``tmp/<name>``, fsync, rename into
``new/``. Either way it goes through the group-commit writer, so deliveries of
many messages share their directory fsyncs.

The file name derives from the queue id only, so a redo after a crash finds
(link) or replaces (copy) the same name instead of adding a second copy; and a
file with that base name already in ``cur/`` (an IMAP client moved it there)
means the delivery happened already.

An envelope with ``params["folder"]`` (DMARC quarantine: "Junk") is delivered
into that Maildir++ folder instead of the inbox: ``<maildir>/.Junk/`` with
its own tmp/new/cur and a ``maildirfolder`` marker file, as Dovecot and
Courier lay it out.
"""

import errno
import os
import re
from collections import namedtuple

from twisted.internet import defer
from twisted.python.failure import Failure

from appliance.durable.commit import Durable, makedirs
from appliance.maildir import (FOLDER_MARKER, SUBDIRS, SpoolFile, already_in_cur, maildir_bytes,
                               maildir_path, message_name)

_FOLDER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

# A link that cannot be made for these reasons is done as a copy instead.
_COPY_INSTEAD = frozenset({errno.EXDEV, errno.EMLINK, errno.EPERM, errno.ENOTSUP,
                           errno.EOPNOTSUPP})

Delivered = namedtuple("Delivered", "address path name size existed")
Delivered.__doc__ = """One mailbox's copy: its path, size, and whether it was there already."""

class _Content:
    """The stored form of the message, made once on the writer thread for all
    its mailboxes: converted from bytes, or read from the spool file."""

    def __init__(self, sender, message):
        self.sender = sender
        self.message = message
        self._data = None

    @property
    def source(self):
        """The SpoolFile to link from, or None (bytes: copy)."""
        return self.message if isinstance(self.message, SpoolFile) else None

    def get(self, fs):
        if self._data is None:
            message = self.message
            if isinstance(message, SpoolFile):
                data = fs.read(message.path)
                self._data = data if message.maildir_form else maildir_bytes(self.sender, data)
            else:
                self._data = maildir_bytes(self.sender, message)
        return self._data


class MaildirDeliverer:
    """Delivers to Maildirs under ``root`` through a GroupCommitWriter."""

    def __init__(self, root, writer, hostname):
        self.root = root
        self.writer = writer
        self.hostname = hostname
        # Maildirs seen complete (tmp/new/cur) by the writer thread: commit
        # links skip the four mkdir calls. A Maildir removed behind our back
        # makes a link fail; the redo through ``deliver`` creates it again.
        self._complete = set()

    def deliver(self, envelope, message, addresses):
        """Deliver ``message`` (bytes as received, or the SpoolFile holding
        it) to each local address.

        Fires with ``{address: Delivered or Failure}``: every copy is
        attempted (one failing Maildir does not stop the others), and each
        Delivered is durable: its link or rename into ``new/`` fsynced.
        """
        content = _Content(envelope.sender, message)
        name = message_name(envelope.queue_id, envelope.received_at, self.hostname)
        addresses = list(dict.fromkeys(addresses))
        folder = delivery_folder(envelope)
        ds = [self.writer.submit(self._plan(address, name, content, folder), "maildir.deliver")
              for address in addresses]
        d = defer.DeferredList(ds, consumeErrors=True)
        d.addCallback(lambda results: {
            address: value for address, (_, value) in zip(addresses, results)})
        return d

    def _plan(self, address, name, content, folder):
        def plan(fs):
            inbox = maildir_path(self.root, address)
            parents = _make_maildir(fs, inbox)
            self._complete.add(inbox)
            maildir, writes = inbox, []
            if folder is not None:      # a Maildir++ subfolder: <inbox>/.<folder>
                maildir = os.path.join(inbox, "." + folder)
                parents += _make_maildir(fs, maildir)
                if FOLDER_MARKER not in fs.listdir(maildir):
                    # Made now, before the link below can show the message:
                    # a reader never finds a folder's mail without its marker.
                    _touch(fs, os.path.join(maildir, FOLDER_MARKER))
                    parents.append(maildir)
            new = os.path.join(maildir, "new", name)
            if already_in_cur(fs, maildir, name):
                return Durable(writes=writes, sync_dirs=parents, result=Delivered(
                    address, os.path.join(maildir, "cur"), name, 0, True))
            source = content.source
            if source is not None and source.maildir_form and _linked(fs, source.path, new):
                return Durable(writes=writes, sync_dirs=parents + [os.path.dirname(new)],
                               result=Delivered(address, new, name, source.size, False))
            data = content.get(fs)
            tmp = os.path.join(maildir, "tmp", name)
            return Durable(writes=writes + [(tmp, data)], renames=[(tmp, new)],
                           sync_dirs=parents + [os.path.dirname(new)],
                           result=Delivered(address, new, name, len(data), False))
        return plan

    def commit_links(self, envelope, addresses):
        """``CommitLinks`` delivering a message in the same batch as its spool
        commit (see ``appliance.queue.store.Spool.accept``), or None when these
        deliveries need the full path (a Maildir++ folder)."""
        if delivery_folder(envelope) is not None:
            return None
        name = message_name(envelope.queue_id, envelope.received_at, self.hostname)
        return CommitLinks(self, name, list(dict.fromkeys(addresses)))


def _touch(fs, path):
    """An empty file (its directory is fsynced with the batch)."""
    fs.close(fs.open_new(path))


def _linked(fs, src, dst):
    """Hard-link ``src`` as ``dst``; False when only a copy can do it.
    An existing ``dst`` is this message from an earlier attempt."""
    try:
        fs.link(src, dst)
    except FileExistsError:
        pass
    except OSError as e:
        if e.errno not in _COPY_INSTEAD:
            raise
        return False
    return True


class CommitLinks:
    """The Maildir links of a message that is being committed to the spool.

    The queue id is new, so no ``cur/`` can hold it yet and there is nothing
    to check: ``prepare`` (writer thread, plan phase) makes missing Maildirs
    and names the links; the writer makes them after the spool's commit rename
    and fsyncs their directories with the batch; ``results`` turns what the
    writer reports into ``{address: Delivered or Failure}``. A link that fails
    is simply not delivered yet: the queue runner delivers it the usual way.
    """

    def __init__(self, deliverer, name, addresses):
        self.deliverer = deliverer
        self.name = name
        self.addresses = addresses
        self._targets = {}          # address -> path in new/ (for those prepared)
        self._errors = {}           # address -> exception while preparing

    def prepare(self, fs, src):
        """``(links, sync_dirs)`` for the writer's Durable."""
        links, parents = [], []
        complete = self.deliverer._complete
        for address in self.addresses:
            try:
                maildir = maildir_path(self.deliverer.root, address)
                if maildir not in complete:
                    parents += _make_maildir(fs, maildir)
                    complete.add(maildir)
            except (OSError, ValueError) as e:
                self._errors[address] = e
                continue
            dst = os.path.join(maildir, "new", self.name)
            self._targets[address] = dst
            links.append((src, dst))
        return links, parents

    @property
    def all_prepared(self):
        """Every address got its link named (no Maildir failed to be made)."""
        return not self._errors and len(self._targets) == len(self.addresses)

    def results(self, failed, size):
        """``{address: Delivered or Failure}`` from the writer's failed links."""
        out = {address: Failure(error) for address, error in self._errors.items()}
        for address, dst in self._targets.items():
            error = failed.get(dst)
            if error is None:
                out[address] = Delivered(address, dst, self.name, size, False)
            else:
                self.deliverer._complete.discard(os.path.dirname(os.path.dirname(dst)))
                out[address] = Failure(error)
        return out


def _make_maildir(fs, maildir):
    """mkdir -p the Maildir and its tmp/new/cur; the parents to fsync."""
    parents = [os.path.dirname(p) for p in makedirs(fs, maildir)]
    for sub in SUBDIRS:
        parents += [os.path.dirname(p) for p in makedirs(fs, os.path.join(maildir, sub))]
    return parents


def delivery_folder(envelope):
    """The Maildir++ folder the envelope asks for (``params["folder"]``, e.g.
    "Junk" for DMARC quarantine), or None for the inbox. A name that is not
    a plain folder name is ignored: the inbox is never the wrong answer."""
    folder = envelope.params.get("folder") if envelope.params else None
    if isinstance(folder, str) and _FOLDER_NAME.fullmatch(folder):
        return folder
    return None

"""Small files written so they are all there or not at all, even across a crash.

The users file, the aliases, DKIM keys, the certificate, IMAP's UID lists
and the defence state all go through ``write_atomic``: a temp file created
with the final mode (never readable by others in between), written, fsynced,
renamed over the old one, and the directory fsynced. Blocking: call it from a
thread (or an offline command). The spool's own commits are the group-commit
writer's (``appliance.durable.commit``), batched.
"""

import contextlib
import os


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_owner(target, like):
    """As root (a CLI command under sudo), give ``target`` (an open file's fd,
    or a path) the owner of ``like`` (or of its directory when it does not
    exist yet): the server, running as its own user, must still read what
    root wrote for it."""
    if os.geteuid() != 0:
        return
    try:
        st = os.stat(like)
    except FileNotFoundError:
        st = os.stat(os.path.dirname(os.path.abspath(like)))
    if (st.st_uid, st.st_gid) != (0, 0):
        (os.fchown if isinstance(target, int) else os.chown)(target, st.st_uid, st.st_gid)


def write_new(path, data, mode=0o600, exclusive=True, owner_like=None):
    """Create ``path`` (it must not exist, unless ``exclusive`` is False) with
    ``data`` and fsync it; the caller renames it into place."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)             # not narrowed by the umask
        if owner_like is not None:
            adopt_owner(fd, owner_like)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path, data, mode=0o600, owner_like=None):
    """Replace ``path`` with ``data`` (bytes or str, UTF-8) durably.

    ``owner_like``: a path whose owner the file takes when root writes it.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        write_new(temporary, data, mode, exclusive=False, owner_like=owner_like)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_dir(directory)


def file_signature(*paths, ignore=OSError):
    """What changes when any of ``paths`` is replaced or rewritten: (inode,
    size, mtime_ns) of each; None when one cannot be looked at (an error of
    class ``ignore``; other errors are raised)."""
    signature = []
    for path in paths:
        try:
            st = os.stat(path)
        except ignore:
            return None
        signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(signature)


class FileWatch:
    """Files read once and re-read when they change, looking (a ``stat`` each)
    at most every ``interval`` seconds of ``clock``: the users and aliases
    files, the JWKS, the TLS certificate and key.

    ``loaded`` is the signature of what is in use; the owner sets it after a
    successful read.
    """

    loaded = None
    _looked_at = None           # clock time of the last look

    def __init__(self, paths, clock, interval, ignore=OSError):
        self.paths = tuple(paths)
        self.clock = clock
        self.interval = interval
        self.ignore = ignore

    def watch(self, *paths):
        """Watch other files from now on (their change is seen at the next look)."""
        self.paths = paths

    def due(self):
        """True, at most once an interval, when it is time to look again."""
        now = self.clock.seconds()
        if self._looked_at is not None and now - self._looked_at < self.interval:
            return False
        self._looked_at = now
        return True

    def looked(self):
        """A look was just taken (a reload on demand): the interval starts now."""
        self._looked_at = self.clock.seconds()

    def forget(self):
        """The next ``due()`` is True (we changed the file ourselves)."""
        self._looked_at = None

    def current(self):
        return file_signature(*self.paths, ignore=self.ignore)

"""A private Postfix that plays a remote MX accepting mail for any domain.

Built on ``postfix_peer.PostfixInstance`` (its own config dir, queue, log and
virtual Maildirs, on a loopback address and port). Every recipient of every
domain is accepted (``virtual_mailbox_domains = static:ALL``) and stored by
the virtual(8) agent in one Maildir, ``<dir>/vmail/inbox/``; virtual(8) puts
a ``Delivered-To:`` header on each copy, which ``messages_for`` reads.

    mx = PostfixMX(tmpdir, port, host="127.0.0.2")
    mx.start()                            # stop() it even if start() raised
    ... deliver to anything@anything.test at 127.0.0.2:port ...
    mx.messages_for("bob@remote.test")    # the delivered files
    mx.stop()
"""

import contextlib
import email.parser
import email.policy
import shutil
import tempfile

from postfix_peer import PostfixError, PostfixInstance, postfix_available  # noqa: F401

INBOX = "inbox"


class PostfixMX(PostfixInstance):
    def __init__(self, workdir, port, host="127.0.0.2", hostname="mx.postfix.test",
                 extra_main=None):
        settings = {
            "virtual_mailbox_domains": "static:ALL",
            "virtual_mailbox_maps": f"static:{INBOX}/",
            "mydestination": "",
            # Postfix refuses an inet_interfaces address that no interface
            # carries (127.0.0.2 is only inside lo's 127/8): it listens there
            # through the master.cf service name instead (see configure).
            "inet_interfaces": "127.0.0.1",
        }
        settings.update(extra_main or {})
        super().__init__(workdir, port, domain="any.invalid", mailboxes=(), host=host,
                         hostname=hostname, extra_main=settings)

    def start(self, timeout=30.0):
        self.started = True         # so that stop() cleans up after a failed start
        return super().start(timeout)

    def configure(self):
        super().configure()
        self._postconf("-MX", f"{self.port}/inet")
        self._postconf("-M", f"{self.host}:{self.port}/inet="
                             f"{self.host}:{self.port} inet n - n - - smtpd")

    def messages_for(self, address):
        """The delivered files whose Delivered-To is ``address``."""
        found = []
        for folder in ("new", "cur"):
            path = self.vmail / INBOX / folder
            if path.is_dir():
                found.extend(p for p in path.iterdir() if p.is_file()
                             and _delivered_to(p) == address.lower())
        return sorted(found)


@contextlib.contextmanager
def running_postfix_mx(port, host, prefix="postfix-mx-"):
    """A started PostfixMX in a new temp dir, stopped and removed at the end.
    Not under pytest's tmp dir: its 0700 parents keep Postfix's daemons out."""
    workdir = tempfile.mkdtemp(prefix=prefix)
    instance = PostfixMX(workdir, port, host=host)
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _delivered_to(path):
    with open(path, "rb") as handle:
        headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parse(handle)
    return (headers.get("Delivered-To") or "").strip().lower()

"""Route kinds: where the queue sends each recipient (SPEC §7).

Every recipient of a spool entry takes one of three routes:

- ``LOCAL``: a Maildir on this appliance (``appliance.deliver.local``);
- ``MAILBOX``: this appliance is an edge (``[relay] mailbox_host``): mail for
  the local domains is relayed to the mailbox host, over SMTP, through the
  queue like any remote delivery (retries, backoff, nothing lost while the
  mailbox host is down). The recipient is sent as it was given: the mailbox
  host expands aliases and delivers, as a Postfix edge hands mail to the
  mailbox host with ``relay_domains`` and a transport map;
- ``REMOTE``: another domain's MX (or ``[relay] smarthost``).

``Routing.kind(recipient)`` decides, once, for the queue runner
(``appliance.queue.runner``); ``appliance.deliver.remote`` sends a
``MAILBOX`` group to the mailbox host (``appliance.deliver.mx``'s
``MXResolver.resolve(domain, MAILBOX)``) and a ``REMOTE`` one by MX.
"""

from appliance.address import domain_of

LOCAL = "local"
MAILBOX = "mailbox"
REMOTE = "remote"


class Routing:
    """The route kind of a recipient. ``directory``: ``is_local_domain``
    (synchronous, from the config); ``mailbox_host``: the ``[relay]
    mailbox_host`` HostPort or None (this appliance keeps the mailboxes)."""

    def __init__(self, directory, mailbox_host=None):
        self.directory = directory
        self.mailbox_host = mailbox_host

    @classmethod
    def from_config(cls, config, directory):
        return cls(directory, config.relay.mailbox_host)

    @property
    def edge(self):
        return self.mailbox_host is not None

    def kind(self, recipient):
        """LOCAL, MAILBOX or REMOTE for ``recipient`` (an address); a
        directory that cannot answer is LOCAL on a mailbox host (the local
        path defers it) and MAILBOX on an edge (the mailbox host decides)."""
        try:
            local = self.directory.is_local_domain(domain_of(recipient))
        except Exception:  # noqa: BLE001 - see above: a safe route, never a bounce
            local = True
        if not local:
            return REMOTE
        return MAILBOX if self.edge else LOCAL

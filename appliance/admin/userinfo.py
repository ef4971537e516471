"""The users as ``user list``, ``user show`` and Tab see them, for either backend.

With ``[auth] backend = file`` the users file answers (``UsersFile``); with
``ldap`` the directory does, read-only (``LdapUsers``): the appliance never
writes to it, so ``user add``, ``user del`` and ``user passwd`` refuse with
one line saying where the users are managed, as ``doveadm`` does for an LDAP
userdb.

``LdapUsers`` works over an ``LdapAccounts`` (``appliance.auth.ldap``): in
the server the directory's own recipient lookups (``LdapDirectory.accounts``:
the ``ldap-directory`` pool, socket timeouts, an overall deadline on the
reactor's clock), in the offline CLI one built here over a synchronous
runner (only the socket timeouts bound it; the CLI may block). Listing is a
paged search, at most ``LIST_LIMIT`` accounts; filter input is escaped
(RFC 4515) by the client. An outage or a hung directory is
``DirectoryUnavailable``: one line naming the directory and why.

``mailbox_usage`` counts a Maildir (with its Maildir++ folders) on a thread:
files and bytes, at most ``MAILBOX_FILES`` files looked at.
"""

import os

from twisted.internet import defer

from appliance.auth.accounts import BackendUnavailable
from appliance.maildir import FOLDER_MARKER, maildir_path

LIST_LIMIT = 10_000         # accounts `user list` shows at most
NAMES_TTL = 60.0            # seconds Tab's list of LDAP user names is reused
MAILBOX_FILES = 200_000     # files `user show` counts at most in one mailbox


class DirectoryUnavailable(Exception):
    """The LDAP directory did not answer (down, hung, refused): one line."""


class LdapUsers:
    """The users of the LDAP directory, read-only.

    ``accounts``: an ``LdapAccounts`` with ``listing(limit)`` and
    ``entries(address)``; ``clock``: ``seconds()`` for the Tab cache (None:
    the cache is never reused).
    """

    def __init__(self, accounts, clock=None, limit=LIST_LIMIT):
        self.accounts = accounts
        self.clock = clock
        self.limit = limit
        self._names = []
        self._names_at = None
        self._refreshing = None

    @property
    def url(self):
        return getattr(self.accounts, "url", "the LDAP directory")

    @classmethod
    def offline(cls, cfg, timeout=None):
        """For the ``mailappliance`` CLI without the server: an own client
        whose calls run in this thread. Raises ``LdapConfigError``."""
        from appliance.directory import recipient_accounts
        from appliance.threads import synchronous_runner
        return cls(recipient_accounts(cfg, synchronous_runner, clock=None, timeout=timeout,
                                      pool_size=1))

    def list(self):
        """Deferred[(accounts, warning)]: the ``Account``s by address, at
        most ``limit``; ``warning`` (else None) says when the directory holds
        more than were listed (our limit, or the directory's own size limit)."""
        d = self.accounts.listing(self.limit + 1)
        d.addCallbacks(self._listed, self._unavailable)
        return d

    def _listed(self, result):
        accounts, cut = result
        accounts = list(accounts)
        warning = None
        if len(accounts) > self.limit:
            accounts = accounts[:self.limit]
            warning = f"only the first {self.limit} accounts of {self.url} are listed"
        elif cut:
            warning = (f"{self.url} ended the listing after {len(accounts)} accounts with "
                       "its own size limit: there may be more (raise the limit for [auth] "
                       "ldap_bind_dn, e.g. OpenLDAP's limits size.prtotal)")
        self._keep_names([a.address for a in accounts])
        return accounts, warning

    def describe(self, address):
        """Deferred[list of {"dn", "addresses"}]: the entries holding
        ``address`` in any address attribute (none, one, or two: ambiguous)."""
        d = self.accounts.entries(address)
        d.addErrback(self._unavailable)
        return d

    def _unavailable(self, failure):
        failure.trap(BackendUnavailable)
        raise DirectoryUnavailable(f"the LDAP directory {self.url} did not answer: "
                                   f"{failure.value}")

    # -- Tab completion (synchronous: the last list, refreshed behind the scenes)

    def names(self):
        """The user names known from the last listing; a stale or missing
        list is fetched anew in the background (the next Tab sees it)."""
        if self._stale():
            self.refresh()
        return list(self._names)

    def refresh(self):
        """Fetch the names now (at most one fetch at a time); never fails."""
        if self._refreshing is None:
            d = self.list()
            d.addErrback(lambda failure: None)     # Tab offers the old names meanwhile
            self._refreshing = d

            def done(result):
                self._refreshing = None
                return result
            d.addBoth(done)
        return self._refreshing

    def _stale(self):
        if self._names_at is None:
            return True
        return self.clock is None or self.clock.seconds() - self._names_at > NAMES_TTL

    def _keep_names(self, names):
        self._names = names
        self._names_at = self.clock.seconds() if self.clock is not None else 0.0

    def close(self):
        return defer.maybeDeferred(self.accounts.close)


def aliases_of(aliases, addresses):
    """The entries of the aliases file that name one of ``addresses`` as a
    target (catch-alls included): ``[(alias, targets)]``."""
    if aliases is None:
        return []
    wanted = {a.lower() for a in addresses}
    return [(alias, list(targets)) for alias, targets in aliases.list()
            if wanted & {t.lower() for t in targets}]


def mailbox_usage(root, address, limit=MAILBOX_FILES):
    """``{"path", "exists", "messages", "bytes", "folders", "complete"}`` of
    the Maildir of ``address`` under ``root`` (``<data_dir>/mail``): every
    message file in ``new`` and ``cur`` of the inbox and of its Maildir++
    folders (``tmp`` holds deliveries in progress). Stops after ``limit`` files (``complete`` False). Blocking."""
    path = maildir_path(root, address)
    usage = {"path": path, "exists": os.path.isdir(path), "messages": 0, "bytes": 0,
             "folders": 0, "complete": True}
    if not usage["exists"]:
        return usage
    boxes = [path]
    try:
        with os.scandir(path) as found:
            for entry in found:
                if entry.name.startswith(".") and entry.name not in (".", "..") and \
                        entry.is_dir(follow_symlinks=False) and \
                        os.path.exists(os.path.join(entry.path, FOLDER_MARKER)):
                    boxes.append(entry.path)
    except OSError:
        pass
    usage["folders"] = len(boxes) - 1
    for box in boxes:
        for sub in ("new", "cur"):
            try:
                with os.scandir(os.path.join(box, sub)) as found:
                    for entry in found:
                        if usage["messages"] >= limit:
                            usage["complete"] = False
                            return usage
                        try:
                            if entry.is_file(follow_symlinks=False):
                                usage["messages"] += 1
                                usage["bytes"] += entry.stat(follow_symlinks=False).st_size
                        except OSError:         # expunged meanwhile
                            continue
            except OSError:
                continue
    return usage

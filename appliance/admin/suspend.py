"""Suspended users: ``user suspend`` refuses their logins (SMTP AUTH, IMAP,
POP3) without deleting anything; ``user resume`` undoes it.

The list lives in ``<data_dir>/suspended`` (lines ``address:since``), written
like the users file (lock, atomic replace) and re-read when it changes, so
the CLI and the running server share it. ``SuspendableAccounts`` wraps the
account store every listener authenticates against.
"""

import os

from twisted.internet import defer
from zope.interface import implementer

from appliance import events
from appliance.auth.accounts import BadCredentials, IAccounts
from appliance.auth.users import UsersError, WatchedFile, canonical_address

events.register("user.suspended", "an admin suspended a user (logins refused, mail held)",
                ("address",))
events.register("user.resumed", "an admin lifted a user's suspension", ("address",))
events.register("auth.suspended", "a suspended user tried to log in", ("address",))


class Suspensions(WatchedFile):
    """``address:since`` lines (``since``: Unix time of the suspension)."""

    def _parse_line(self, line):
        address, sep, since = line.strip().rpartition(":")
        if not sep:
            raise ValueError("not address:since")
        return canonical_address(address), float(since)

    def _format_line(self, address, since):
        return f"{address}:{since:.0f}"

    def list(self):
        """``{address: since}`` of the suspended users."""
        return dict(self._entries_now())

    def is_suspended(self, address):
        try:
            return canonical_address(address) in self._entries_now()
        except UsersError:
            return False

    def suspend(self, address, since):
        address = canonical_address(address)
        if address not in self._entries_now():
            self._add(address, since)
        events.emit("user.suspended", address=address)

    def resume(self, address):
        address = canonical_address(address)
        self._delete(address)
        events.emit("user.resumed", address=address)


def suspensions_path(cfg):
    return os.path.join(cfg.server.data_dir, "suspended")


@implementer(IAccounts)
class SuspendableAccounts:
    """``accounts`` (an IAccounts), but a suspended user's login fails as a
    wrong password would (``535``, ``NO``, ``-ERR``): nothing tells a
    stranger the account exists."""

    def __init__(self, accounts, suspensions):
        self._accounts = accounts
        self._suspensions = suspensions

    def authenticate(self, address, password):
        if isinstance(address, str) and self._suspensions.is_suspended(address):
            events.emit("auth.suspended", address=address)
            return defer.fail(BadCredentials("account suspended"))
        return self._accounts.authenticate(address, password)

    def account(self, address):
        return self._accounts.account(address)

    def __getattr__(self, name):
        # close(), stop() ... of the wrapped store (LDAP's connection pool).
        return getattr(self._accounts, name)

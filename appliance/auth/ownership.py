"""May an authenticated account send as an address? (MAIL FROM, From:)

``Account.addresses`` holds the account's own address and the aliases that
reach it. A ``+tag`` form of one of those is the account's too -- unless
the tagged address is something else in the directory: another account
(``alice+sales@`` may be a mailbox of its own) or an alias pointing
elsewhere. Postfix's ``smtpd_sender_login_maps`` looks up the full address
before the one without its extension for the same reason; 092f303 let
alice send as ``alice+sales@`` whoever owned it.

Everything is compared in canonical form (``appliance.address.canonical``:
local part and domain lower-cased), so case never makes a different owner.
"""

from twisted.internet import defer

from appliance.auth.users import UsersError, base_address, canonical_address


def may_send_as(directory, account, address):
    """Deferred[bool]: may ``account`` (an ``Account``) use ``address``?

    ``directory`` answers ``resolve(address)`` (a list, or a Deferred of
    one); it is asked only for a ``+tag`` form, and its failure (LDAP down)
    fails the Deferred."""
    try:
        value = canonical_address(address)
    except UsersError:
        return defer.succeed(False)
    if value in account.addresses:
        return defer.succeed(True)
    base = base_address(value)
    if base == value or base not in account.addresses:
        return defer.succeed(False)
    d = defer.maybeDeferred(directory.resolve, value)
    d.addCallback(lambda found: account.address in (found or ()))
    return d


def may_send_as_all(directory, account, addresses):
    """Deferred[bool]: every one of ``addresses`` is the account's."""
    if not addresses:
        return defer.succeed(True)
    d = defer.gatherResults([may_send_as(directory, account, a) for a in addresses],
                            consumeErrors=True)
    d.addCallback(all)
    d.addErrback(lambda failure: failure.value.subFailure
                 if isinstance(failure.value, defer.FirstError) else failure)
    return d

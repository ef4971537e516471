"""The SSH channel's data, as the admin shells read it (both doors of ssh.py)."""

from twisted.conch.ssh import session
from twisted.internet import protocol


class Feed(protocol.Protocol):
    """Where the client's channel data goes: ``on_data(bytes)``."""

    def __init__(self, on_data):
        self.on_data = on_data

    def dataReceived(self, data):
        self.on_data(data)


def connect_feed(pp, proto):
    """Wire ``proto`` to the channel (ADMIN-SHELL.md §4.1): first give it its
    transport (26.10's wrapProtocol asserts one), then connect the channel's
    process protocol to it (without that, an asynchronous answer hangs the
    client on Twisted <= 26.4)."""
    proto.makeConnection(pp)
    pp.makeConnection(session.wrapProtocol(proto))

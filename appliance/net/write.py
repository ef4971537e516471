"""Sending a protocol's reply without waiting for the next reactor turn.

Twisted's ``transport.write`` only buffers: the bytes leave in ``doWrite``
on a later turn, after an ``epoll_ctl`` to ask for writability and before
another to stop asking. A mail protocol answers one short line per command,
so that round costs more than the answer. ``write_now`` sends at once when
nothing is queued before it (the common case); anything it cannot send (a
full socket buffer, an error, TLS, a non-TCP transport) goes through
``transport.write`` as usual, and order is kept: when Twisted's buffer holds
anything, everything after it goes there too.
"""

from twisted.internet import tcp


def write_now(transport, data):
    """Write ``data`` to ``transport``, sending it in this turn when possible."""
    if _idle_plain_tcp(transport):
        sent = transport.writeSomeData(data)
        if isinstance(sent, int):           # else an error: doWrite will meet it again
            if sent >= len(data):
                return
            data = data[sent:]
    transport.write(data)


def _idle_plain_tcp(transport):
    return (isinstance(transport, tcp.Connection) and not transport.TLS
            and transport.connected and not transport.disconnecting
            and not transport._writeDisconnected and not transport._tempDataLen
            and len(transport.dataBuffer) == transport.offset)

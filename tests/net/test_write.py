"""write_now: a reply leaves in the same reactor turn, in order with anything buffered.

Real TCP on loopback: the fast path is for Twisted's own TCP transport only.
"""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from appliance.net.write import write_now


class Keep(protocol.Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)


class NetIOTest(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        factory = protocol.Factory.forProtocol(Keep)
        factory.made = defer.Deferred()
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = socket.create_connection(("127.0.0.1", self.port.getHost().port))
        self.addCleanup(self.client.close)
        self.server = yield factory.made
        self.addCleanup(self.server.transport.abortConnection)

    def received(self):
        self.client.setblocking(False)
        try:
            return self.client.recv(65536)
        except BlockingIOError:
            return b""

    def test_an_idle_connection_sends_at_once(self):
        write_now(self.server.transport, b"250 ok\r\n")
        # No reactor turn has run: only a direct send can have put it there.
        self.client.settimeout(5)
        self.assertEqual(self.client.recv(100), b"250 ok\r\n")
        self.assertEqual(self.server.transport._tempDataLen, 0)

    @defer.inlineCallbacks
    def test_bytes_already_buffered_go_first(self):
        self.server.transport.write(b"first\r\n")
        write_now(self.server.transport, b"second\r\n")
        self.assertEqual(self.received(), b"")          # both wait for the reactor
        got = b""
        for _ in range(100):
            d = defer.Deferred()
            reactor.callLater(0.01, d.callback, None)
            yield d
            got += self.received()
            if got == b"first\r\nsecond\r\n":
                break
        self.assertEqual(got, b"first\r\nsecond\r\n")

    def test_other_transports_just_write(self):
        transport = StringTransport()
        write_now(transport, b"221 bye\r\n")
        self.assertEqual(transport.value(), b"221 bye\r\n")

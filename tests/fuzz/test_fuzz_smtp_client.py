"""Fuzz the outbound SMTP client (appliance.deliver.remote) with hostile servers.

The client delivers one message to a server that answers each of its lines
with replies drawn from real ones, broken ones and random bytes, over a
StringTransport with a Clock. Whatever the server says, the delivery ends
(its Deferred fires, with a result per recipient) once the connection is
gone and the timeouts have run, and ``guard`` (conftest) holds the
no-traceback, time and memory bounds.
"""

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python import failure

from appliance.deliver.mx import Route
from appliance.deliver.remote import RemoteDelivery
from appliance.envelope import Envelope
from appliance.testing import StringTransport, make_config

ROUTE = Route("remote.test", [("mx1.remote.test", ["127.0.0.2"])], port=25)
MESSAGE = b"From: alice@example.test\r\nSubject: hi\r\n\r\nbody\r\n.dot\r\n"

REPLY = st.one_of(
    st.sampled_from([b"220 mx ESMTP", b"250 ok", b"250-mx\r\n250-PIPELINING\r\n250-SIZE 10\r\n"
                     b"250-8BITMIME\r\n250-SMTPUTF8\r\n250 STARTTLS", b"354 go", b"421 bye",
                     b"450 later", b"550 no", b"552 too big", b"250-", b"2", b"999 what",
                     b"250 " + b"x" * 3000, b"250-a\r\n250-b\r\n250-c", b"220-", b"\r",
                     b"250\tok", b"-250 x", b"", b"354-go\r\n354 go"]),
    st.binary(max_size=60).map(lambda b: b.replace(b"\r\n", b"")))


class FakeResolver:
    def resolve(self, domain):
        return defer.succeed(ROUTE)


@given(st.lists(REPLY, min_size=1, max_size=20), st.booleans(),
       st.lists(st.sampled_from(["bob@remote.test", "carol@remote.test"]), min_size=1,
                max_size=3, unique=True))
def test_fuzz_smtp_client(guard, replies, lose_early, recipients):
    with guard.check("SMTP client"):
        clock = Clock()
        peers = []

        def connect(ip, port, factory, timeout):
            address = IPv4Address("TCP", ip, port)
            protocol = factory.buildProtocol(address)
            transport = StringTransport(peerAddress=address)
            protocol.makeConnection(transport)
            peers.append((protocol, transport))
            return defer.succeed(protocol)

        delivery = RemoteDelivery(make_config(outbound={"tls": "opportunistic"}),
                                  FakeResolver(), clock,
                                  tls_context_factory=lambda host, verify: None,
                                  connect=connect)
        envelope = Envelope("0123456789abcdef", "alice@example.test", list(recipients), 0.0)
        outcome = []
        delivery.deliver(envelope, MESSAGE, list(recipients), "remote.test").addBoth(
            outcome.append)
        for reply in replies:
            if not peers or outcome:
                break
            protocol, transport = peers[-1]
            if transport.disconnecting:
                break
            protocol.dataReceived(reply + b"\r\n")
            clock.advance(1)
        for protocol, transport in peers:
            if lose_early or not outcome:
                protocol.connectionLost(failure.Failure(error.ConnectionLost()))
        for _ in range(20):         # every timeout the client has
            if outcome:
                break
            clock.advance(600)
        assert len(outcome) == 1, "the delivery never ended"
        result = outcome[0]
        assert not isinstance(result, failure.Failure), result.getTraceback()
        assert sorted(r.recipient for r in result) == sorted(recipients)

"""The outbound SMTP client (appliance.deliver.remote).

The first part drives the client over StringTransports with a Clock: every
byte it writes is checked, every wait is a clock step (T12, T13, T14, the
reply cap). The second part uses real sockets: small SMTP servers on
127.0.0.2 / 127.0.0.3 that accept, refuse, hang or drop, real TLS, the test
DNS server, and a real Postfix.
"""

import functools
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from OpenSSL import SSL
from twisted.internet import defer, error, protocol, reactor, ssl, task
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import Clock
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python import failure
from twisted.trial import unittest
from zope.interface import implementer

from appliance.deliver import remote
from appliance.deliver.mx import MXResolver, Route, RoutingError
from appliance.deliver import smtpclient
from appliance.deliver.remote import RemoteDelivery
from appliance.deliver.smtpclient import BLOCK, Timeouts, default_tls_context, wire_body
from appliance.envelope import Envelope
from appliance.testing import Conversation, StringTransport, capture_events, make_config
from appliance.net.tls import make_context, make_self_signed
from dns_server import DNSServer

from postfix_mx import PostfixMX, postfix_available

MESSAGE = b"From: alice@example.test\r\nSubject: hi\r\n\r\nbody\r\n"
ROUTE = Route("remote.test", [("mx1.remote.test", ["127.0.0.2"]),
                              ("mx2.remote.test", ["127.0.0.3"])], port=25)
ONE_HOST = Route("remote.test", [("mx1.remote.test", ["127.0.0.2"])])


class TLSStringTransport(StringTransport):
    """A StringTransport that records STARTTLS instead of doing it.

    With ``fill_at`` set, it pauses its producer once that many bytes were
    written since, as a socket with a full send buffer does.
    """

    tls_creator = None
    fill_at = None

    def startTLS(self, creator):
        self.tls_creator = creator

    def write(self, data):
        super().write(data)
        if self.fill_at is not None and self.producer is not None:
            self.fill_at -= len(data)
            if self.fill_at <= 0:
                self.fill_at = None
                self.producer.pauseProducing()


class FakeResolver:
    def __init__(self, outcome):
        self.outcome = outcome
        self.asked = []

    def resolve(self, domain):
        self.asked.append(domain)
        if isinstance(self.outcome, Exception):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


class Peer(Conversation):
    """The far end of one connection: what the client wrote (``output``,
    ``lines``), what we answer (``send``)."""

    def __init__(self, ip, protocol, transport):
        self.ip = ip
        super().__init__(protocol, transport)

    def greet(self, *extensions):
        """220, then answer the EHLO with ``extensions``."""
        self.send("220 mx ESMTP\r\n")
        assert self.lines() == ["EHLO mx.example.test"]
        self.send(ehlo_reply(*extensions))

    def lose(self):
        super().lose(error.ConnectionLost())


def ehlo_reply(*extensions):
    lines = ["mx.remote.test"] + list(extensions)
    return "".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n"
                   for i, line in enumerate(lines))


class Harness:
    def __init__(self, route=ROUTE, tls="opportunistic", refuse=(), timeouts=None):
        self.clock = Clock()
        self.config = make_config(outbound={"tls": tls})
        self.resolver = FakeResolver(route)
        self.refuse = set(refuse)
        self.peers = []
        self.tls_requests = []
        self.delivery = RemoteDelivery(self.config, self.resolver, self.clock,
                                       tls_context_factory=self.tls_context,
                                       timeouts=timeouts, connect=self.connect)

    def tls_context(self, hostname, verify):
        self.tls_requests.append((hostname, verify))
        return ("creator", hostname, verify)

    def connect(self, ip, port, factory, timeout):
        self.connect_timeout = timeout
        if ip in self.refuse:
            return defer.fail(error.ConnectionRefusedError())
        address = IPv4Address("TCP", ip, port)
        protocol = factory.buildProtocol(address)
        self.peers.append(Peer(ip, protocol, TLSStringTransport(peerAddress=address)))
        return defer.succeed(protocol)

    def deliver(self, recipients=("bob@remote.test",), message=MESSAGE,
                sender="alice@example.test", params=None):
        envelope = Envelope("0123456789abcdef", sender, list(recipients), 0.0,
                            params=dict(params or {}))
        self.outcome = []
        self.delivery.deliver(envelope, message, list(recipients), "remote.test") \
            .addBoth(self.outcome.append)
        return self.outcome

    @property
    def peer(self):
        return self.peers[-1]

    def results(self):
        assert len(self.outcome) == 1, "the delivery has not finished"
        assert isinstance(self.outcome[0], list), self.outcome[0]
        return self.outcome[0]


def started(message=MESSAGE, **options):
    """A Harness of ``options`` delivering ``message`` to bob: connected, not yet greeted."""
    h = Harness(**options)
    h.deliver(message=message)
    return h


def deliver_plainly(peer, body_reply="250 2.0.0 Ok: queued as X", rcpt_reply="250 Ok"):
    """The lock-step conversation after EHLO, for one recipient."""
    lines = peer.lines()
    assert lines[0].startswith("MAIL FROM:<alice@example.test>"), lines
    peer.send("250 2.1.0 Ok\r\n")
    assert peer.lines() == ["RCPT TO:<bob@remote.test>"]
    peer.send(rcpt_reply + "\r\n")
    assert peer.lines() == ["DATA"]
    peer.send("354 go ahead\r\n")
    body = peer.output()
    peer.send(body_reply + "\r\n")
    return body


def unstuff(wire):
    """What a correct server stores from DATA content (up to the final dot)."""
    lines = wire.split(b"\r\n")
    end = lines.index(b".")
    return b"".join((line[1:] if line.startswith(b".") else line) + b"\r\n"
                    for line in lines[:end])


# ---------------------------------------------------------------------------
# The conversation

def greeted(*extensions, **options):
    """A delivery under way (``started(**options)``): the peer greeted with
    ``extensions``, our next command (MAIL, or STARTTLS if offered) read."""
    h = started(**options)
    h.peer.greet(*extensions)
    h.peer.lines()
    return h


def at_rcpt(**options):
    """MAIL accepted, our RCPT read: the peer answers it next."""
    h = greeted(**options)
    h.peer.send("250 Ok\r\n")
    h.peer.lines()
    return h


def at_data(**options):
    """MAIL and RCPT accepted (no PIPELINING), our DATA read: the peer answers it next."""
    h = at_rcpt(**options)
    h.peer.send("250 Ok\r\n")
    h.peer.lines()
    return h


def test_a_lockstep_delivery_says_every_command_in_order():
    h = Harness()
    with capture_events() as seen:
        h.deliver()
        h.peer.greet("SIZE 10000000", "8BITMIME")
        body = deliver_plainly(h.peer)
        assert h.peer.lines() == [] and not h.peer.closed     # kept for the next message
        h.clock.advance(remote.IDLE_LIMIT)
        assert h.peer.lines() == ["QUIT"]
    assert body == MESSAGE + b".\r\n"
    assert h.peer.closed
    [result] = h.results()
    assert (result.recipient, result.code, result.status) == ("bob@remote.test", 250, "2.0.0")
    assert result.delivered and not result.deferred and not result.failed
    assert (result.remote_host, result.remote_ip, result.tls) == \
        ("mx1.remote.test", "127.0.0.2", False)
    assert result.response == "250 2.0.0 Ok: queued as X"
    [event] = seen.named("delivery.remote")
    assert event["queue_id"] == "0123456789abcdef" and event["code"] == 250
    assert event["remote_host"] == "mx1.remote.test" and event["tls"] is False


def test_mail_from_carries_size_when_offered_and_not_otherwise():
    h = started()
    h.peer.greet("SIZE 10000000")
    assert h.peer.lines() == [f"MAIL FROM:<alice@example.test> SIZE={len(MESSAGE)}"]
    h = started()
    h.peer.greet()
    assert h.peer.lines() == ["MAIL FROM:<alice@example.test>"]


def test_pipelining_sends_mail_rcpt_and_data_at_once_and_reads_replies_in_order():
    h = Harness()
    h.deliver(recipients=["bob@remote.test", "nobody@remote.test", "carol@remote.test"])
    h.peer.greet("PIPELINING")
    assert h.peer.lines() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@remote.test>",
                              "RCPT TO:<nobody@remote.test>", "RCPT TO:<carol@remote.test>",
                              "DATA"]
    h.peer.send("250 Ok\r\n250 Ok\r\n550 5.1.1 <nobody@remote.test>: no such user\r\n"
                "450 4.2.1 carol is over quota\r\n354 go\r\n")
    assert h.peer.output() == MESSAGE + b".\r\n"
    h.peer.send("250 2.0.0 queued\r\n")
    bob, nobody, carol = h.results()
    assert bob.delivered and bob.response == "250 2.0.0 queued"
    assert nobody.failed and nobody.status == "5.1.1"
    assert nobody.text == "5.1.1 <nobody@remote.test>: no such user" and nobody.from_remote
    assert carol.deferred and carol.status == "4.2.1"


def test_pipelined_rejection_of_every_recipient_ends_an_invited_data_empty():
    h = greeted("PIPELINING")
    # A server that says 354 although no recipient was accepted gets only
    # the final dot, never the message (RFC 2920 §3.1).
    h.peer.send("250 Ok\r\n550 5.1.1 no\r\n354 go\r\n")
    assert h.peer.output() == b".\r\n"
    h.peer.send("554 5.5.1 no valid recipients\r\n")
    assert h.peer.lines() == ["QUIT"]
    [result] = h.results()
    assert result.failed and result.status == "5.1.1"


def test_a_rejected_recipient_without_pipelining_sends_no_data():
    h = at_rcpt()
    h.peer.send("550 5.7.1 relay denied\r\n")
    assert h.peer.lines() == ["QUIT"]
    [result] = h.results()
    assert result.failed and result.text == "5.7.1 relay denied"


def test_the_final_reply_applies_to_every_accepted_recipient():
    for final, check in (("451 4.3.0 try later", "deferred"), ("554 5.6.0 spam", "failed")):
        h = Harness()
        h.deliver(recipients=["bob@remote.test", "carol@remote.test"])
        h.peer.greet("PIPELINING")
        h.peer.lines()
        h.peer.send("250 Ok\r\n250 Ok\r\n250 Ok\r\n354 go\r\n")
        h.peer.output()
        h.peer.send(final + "\r\n")
        results = h.results()
        assert [getattr(r, check) for r in results] == [True, True]
        assert {r.response for r in results} == {final}


def test_a_data_refusal_applies_to_the_accepted_recipients():
    h = at_rcpt()
    h.peer.send("250 Ok\r\n")
    assert h.peer.lines() == ["DATA"]
    h.peer.send("451 4.3.0 not now\r\n")
    [result] = h.results()
    assert result.deferred and result.response == "451 4.3.0 not now"


def test_mail_refused_permanently_fails_every_recipient():
    h = Harness()
    h.deliver(recipients=["bob@remote.test", "carol@remote.test"])
    h.peer.greet()
    h.peer.lines()
    h.peer.send("553 5.1.8 sender domain does not exist\r\n")
    assert h.peer.lines() == ["QUIT"]
    assert [r.status for r in h.results()] == ["5.1.8", "5.1.8"]
    assert len(h.peers) == 1


def test_mail_refused_temporarily_moves_to_the_next_host():
    h = greeted()
    h.peer.send("421 4.3.2 shutting down\r\n")
    assert h.peers[0].closed and len(h.peers) == 2
    h.peer.greet()
    deliver_plainly(h.peer)
    [result] = h.results()
    assert result.delivered and result.remote_host == "mx2.remote.test"


def test_ehlo_refused_falls_back_to_helo_without_extensions():
    h = started()
    h.peer.send("220 old ESMTP\r\n")
    assert h.peer.lines() == ["EHLO mx.example.test"]
    h.peer.send("502 5.5.2 what?\r\n")
    assert h.peer.lines() == ["HELO mx.example.test"]
    h.peer.send("250 old\r\n")
    deliver_plainly(h.peer)
    assert h.results()[0].delivered


def test_helo_refused_as_well_moves_on():
    h = started(route=ONE_HOST)
    h.peer.send("220 old\r\n")
    h.peer.lines()
    h.peer.send("500 no\r\n")
    h.peer.lines()
    h.peer.send("501 no\r\n")
    [result] = h.results()
    assert result.deferred and "refused HELO/EHLO" in result.text


def test_a_message_larger_than_the_servers_size_fails_with_5_3_4():
    h = Harness()
    h.deliver(recipients=["bob@remote.test", "carol@remote.test"])
    h.peer.greet("SIZE 10")
    assert h.peer.lines() == ["QUIT"]
    results = h.results()
    assert [(r.code, r.status) for r in results] == [(552, "5.3.4")] * 2
    assert "exceeds" in results[0].text and not results[0].from_remote


def test_addresses_are_requoted_and_domains_sent_as_a_labels():
    h = Harness()
    h.deliver(recipients=['john doe@remote.test', "eve@bücher.test"],
              sender='a"b@example.test')
    h.peer.greet("PIPELINING")
    assert h.peer.lines()[:3] == ['MAIL FROM:<"a\\"b"@example.test>',
                                  'RCPT TO:<"john doe"@remote.test>',
                                  "RCPT TO:<eve@xn--bcher-kva.test>"]


def test_a_non_ascii_local_part_needs_smtputf8():
    h = Harness()
    h.deliver(recipients=["jörg@remote.test", "bob@remote.test"])
    h.peer.greet("PIPELINING")
    assert h.peer.lines() == ["MAIL FROM:<alice@example.test>", "RCPT TO:<bob@remote.test>",
                              "DATA"]
    h.peer.send("250 Ok\r\n250 Ok\r\n354 go\r\n")
    h.peer.output()
    h.peer.send("250 Ok\r\n")
    jorg, bob = h.results()
    assert (jorg.code, jorg.status) == (553, "5.6.7") and bob.delivered

    h = Harness()
    h.deliver(recipients=["jörg@remote.test"], params={"SMTPUTF8": True})
    h.peer.greet("PIPELINING", "SMTPUTF8")
    assert h.peer.lines()[:2] == ["MAIL FROM:<alice@example.test> SMTPUTF8",
                                  "RCPT TO:<jörg@remote.test>"]


def test_body_8bitmime_is_declared_when_the_message_did_and_the_server_offers_it():
    h = Harness()
    h.deliver(params={"BODY": "8BITMIME"})
    h.peer.greet("8BITMIME")
    assert h.peer.lines() == ["MAIL FROM:<alice@example.test> BODY=8BITMIME"]


def test_the_null_sender_is_sent_as_empty_brackets():
    h = Harness()
    h.deliver(sender="")
    h.peer.greet()
    assert h.peer.lines() == ["MAIL FROM:<>"]


# ---------------------------------------------------------------------------
# Hosts that fail: the next one is tried; all failing defers everyone

def test_a_refused_connection_moves_to_the_next_mx():
    h = Harness(refuse={"127.0.0.2"})
    with capture_events() as seen:
        h.deliver()
        h.peer.greet()
        deliver_plainly(h.peer)
    [result] = h.results()
    assert result.delivered and result.remote_ip == "127.0.0.3"
    [attempt] = seen.named("delivery.remote.attempt")
    assert attempt["host"] == "mx1.remote.test" and attempt["ip"] == "127.0.0.2"
    assert "Connection refused" in attempt["error"]
    assert attempt["domain"] == "remote.test"


def test_every_host_failing_defers_every_recipient_with_the_last_error():
    h = Harness(refuse={"127.0.0.2", "127.0.0.3"})
    h.deliver(recipients=["bob@remote.test", "carol@remote.test"])
    results = h.results()
    assert [(r.code, r.status) for r in results] == [(451, "4.4.1")] * 2
    assert all(r.deferred and not r.from_remote for r in results)
    assert results[0].text == "connect to mx2.remote.test[127.0.0.3]:25: Connection refused"
    assert results[0].remote_host == "mx2.remote.test"


def test_greetings_that_are_not_2xx_move_on_and_a_5xx_one_only_defers():
    h = started()
    h.peer.send("421 4.7.0 too busy\r\n")
    assert h.peers[0].closed
    h.peer.send("554 5.7.1 go away\r\n")
    [result] = h.results()
    assert result.deferred and result.code == 451 and result.status == "4.7.1"
    assert "refused to talk to me" in result.text and "554 5.7.1 go away" in result.text


def test_a_lost_connection_mid_transaction_moves_on():
    h = greeted()
    h.peer.send("250 Ok\r\n")
    h.peer.lose()
    assert len(h.peers) == 2
    h.peer.lose()
    [result] = h.results()
    assert result.deferred and result.status == "4.4.2"
    assert result.text == "lost connection with mx2.remote.test[127.0.0.3]"


def test_a_lost_connection_while_the_body_is_sent_defers():
    h = at_data(route=ONE_HOST)
    h.peer.transport.fill_at = 1              # the transport is full ...
    h.peer.send("354 go\r\n")
    h.peer.lose()                             # ... and then gone
    [result] = h.results()
    assert result.deferred and result.status == "4.4.2"


def test_routing_errors_become_results_without_any_connection():
    for error_, code in ((RoutingError(True, "5.1.10", "null MX"), 550),
                         (RoutingError(False, "4.4.3", "SERVFAIL"), 451),
                         (RoutingError(True, "5.4.6", "loops back to myself"), 554)):
        h = Harness(route=error_)
        h.deliver(recipients=["bob@remote.test", "carol@remote.test"])
        results = h.results()
        assert [(r.code, r.status, r.text) for r in results] == \
            [(code, error_.status, error_.text)] * 2
        assert h.peers == []


def test_an_unsolicited_reply_is_a_protocol_error():
    h = started(route=ONE_HOST)
    h.peer.send("220 mx\r\n250 surprise\r\n")
    [result] = h.results()
    assert result.deferred and result.status == "4.5.0" and "unexpected reply" in result.text


def test_a_malformed_reply_is_a_protocol_error():
    h = started(route=ONE_HOST)
    h.peer.send("hello there\r\n")
    [result] = h.results()
    assert result.status == "4.5.0" and "malformed reply" in result.text


def test_an_empty_recipient_list_does_nothing():
    h = Harness()
    assert h.deliver(recipients=[]) == [[]]
    assert h.resolver.asked == [] and h.peers == []


def test_an_internal_error_defers_instead_of_losing_the_message():
    h = Harness(route="not a route")
    with capture_events():
        h.deliver()
    [result] = h.results()
    assert result.deferred and result.status == "4.3.0"


# ---------------------------------------------------------------------------
# The unbounded multi-line reply

def test_a_reply_of_more_than_100_lines_is_refused():
    h = started()
    h.peer.send("220-mx\r\n" * smtpclient.MAX_REPLY_LINES)
    assert not h.peers[0].closed                       # 100 lines are allowed
    h.peer.send("220-mx\r\n")
    assert h.peers[0].closed and len(h.peers) == 2     # moved on to the next host
    h.peer.send("220 mx\r\n")
    h.peer.lines()
    h.peer.send("250-x\r\n" * 1000)
    [result] = h.results()
    assert result.deferred and result.status == "4.5.0"
    assert "reply too long" in result.text


def test_a_reply_of_more_than_64_kib_is_refused():
    h = started()
    line = "220-" + "x" * 1000 + "\r\n"
    h.peer.send(line * 70)
    assert h.peers[0].closed and len(h.peers) == 2


def test_an_endless_reply_line_is_refused():
    h = started(route=ONE_HOST)
    for _ in range(10):
        h.peer.send("220 " + "x" * 1000)
    [result] = h.results()
    assert result.status == "4.5.0" and "reply line too long" in result.text


# ---------------------------------------------------------------------------
# T12: dot-stuffing over the whole message, CRLF only

def test_wire_body_stuffs_every_dot_line_and_makes_every_line_end_crlf():
    assert wire_body(b".hidden\r\nok\r\n.\r\n..two\r\n") == b"..hidden\r\nok\r\n..\r\n...two\r\n"
    assert wire_body(b"a\rb\nc\r\nd") == b"a\r\nb\r\nc\r\nd\r\n"
    assert wire_body(b"x\n.\nMAIL FROM:<evil>\n") == b"x\r\n..\r\nMAIL FROM:<evil>\r\n"
    assert wire_body(b"\r\r\n\n") == b"\r\n\r\n\r\n"
    assert wire_body(b"") == b""


def test_a_dot_line_at_the_16k_boundary_goes_out_stuffed():
    head = b"Subject: smuggle\r\n\r\n"
    filler = b"a" * 78 + b"\r\n"
    body = head + filler * ((BLOCK - len(head)) // len(filler))
    body += b"b" * (BLOCK - len(body) - 2) + b"\r\n"
    assert len(body) == BLOCK
    smuggled = b".\r\nMAIL FROM:<evil@attacker.test>\r\nRCPT TO:<victim@remote.test>\r\n"
    message = body + smuggled + b".dot at the start\r\n"

    h = Harness()
    h.deliver(message=message)
    h.peer.greet()
    wire = deliver_plainly(h.peer)
    assert wire[BLOCK:BLOCK + 4] == b"..\r\n"
    assert wire.count(b"\r\n.\r\n") == 1 and wire.endswith(b"\r\n.\r\n")
    assert unstuff(wire) == message
    assert b"\r\n...dot at the start\r\n" not in wire
    assert b"\r\n..dot at the start\r\n" in wire


def test_bare_cr_and_lf_in_the_stored_body_go_out_as_crlf():
    message = b"Subject: x\r\n\r\nline one\rline two\nline three\r\n.\n.\rend"
    h = Harness()
    h.deliver(message=message)
    h.peer.greet()
    wire = deliver_plainly(h.peer)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    assert wire == (b"Subject: x\r\n\r\nline one\r\nline two\r\nline three\r\n..\r\n..\r\n"
                    b"end\r\n.\r\n")


def test_a_large_body_is_written_in_blocks_and_waits_while_the_transport_is_full():
    message = b"x" * 70 + b"\r\n"
    message = message * 2000            # 144 KB: nine blocks
    h = at_data(message=message)
    h.peer.transport.fill_at = 1
    h.peer.send("354 go\r\n")
    first = h.peer.output()
    assert len(first) == BLOCK                     # one block, then it waits
    h.clock.advance(179)
    h.peer.protocol.resumeProducing()
    wire = first + h.peer.output()
    assert unstuff(wire) == message and wire.endswith(b"\r\n.\r\n")
    assert h.peer.transport.producer is None


# ---------------------------------------------------------------------------
# T13: nothing after STARTTLS's 220 is read

def test_bytes_after_the_starttls_220_are_discarded():
    h = started()
    h.peer.greet("STARTTLS", "PIPELINING")
    assert h.peer.lines() == ["STARTTLS"]
    # An attacker in the path appends a forged EHLO reply (without STARTTLS,
    # with a huge SIZE ...) to the 220, in the same packet.
    h.peer.send("220 2.0.0 go ahead\r\n250-forged\r\n250 SIZE 1\r\n")
    assert h.peer.transport.tls_creator == ("creator", "mx1.remote.test", False)
    assert h.peer.lines() == ["EHLO mx.example.test"]      # waiting: nothing was taken
    h.peer.send(ehlo_reply("PIPELINING", "SIZE 100000"))
    assert h.peer.lines()[0] == f"MAIL FROM:<alice@example.test> SIZE={len(MESSAGE)}"
    h.peer.send("250 Ok\r\n250 Ok\r\n354 go\r\n")
    h.peer.output()
    h.peer.send("250 Ok\r\n")
    [result] = h.results()
    assert result.delivered and result.tls


def test_starttls_refused_continues_in_plain_text_when_opportunistic():
    h = started()
    h.peer.greet("STARTTLS")
    assert h.peer.lines() == ["STARTTLS"]
    h.peer.send("454 4.7.0 TLS not available\r\n")
    deliver_plainly(h.peer)
    [result] = h.results()
    assert result.delivered and not result.tls


def test_tls_off_never_sends_starttls():
    h = started(tls="off")
    h.peer.greet("STARTTLS")
    assert h.peer.lines()[0].startswith("MAIL FROM:")


def test_tls_required_asks_for_a_verified_connection():
    h = started(tls="required")
    h.peer.greet("STARTTLS")
    h.peer.lines()
    h.peer.send("220 go\r\n")
    assert h.tls_requests == [("mx1.remote.test", True)]


def test_tls_required_but_not_offered_defers():
    h = started(tls="required")
    h.peer.greet()
    assert h.peers[0].closed
    h.peer.greet("SIZE 1000")
    [result] = h.results()
    assert result.deferred and result.status == "4.7.4"
    assert "TLS is required, but was not offered" in result.text


def test_tls_required_and_starttls_refused_defers():
    h = started(tls="required", route=ONE_HOST)
    h.peer.greet("STARTTLS")
    h.peer.lines()
    h.peer.send("454 4.7.0 not now\r\n")
    [result] = h.results()
    assert result.deferred and result.status == "4.7.0"


def test_a_failed_handshake_is_a_tls_failure_and_moves_on():
    h = greeted("STARTTLS")
    h.peer.send("220 go\r\n")
    h.peer.lose()                        # what a failed handshake looks like
    assert len(h.peers) == 2
    h.peer.greet()
    deliver_plainly(h.peer)
    assert h.results()[0].delivered


# ---------------------------------------------------------------------------
# T14: every wait has a timeout (RFC 5321 §4.5.3.2)

def test_rfc_5321_timeouts_are_the_defaults():
    t = Timeouts()
    assert (t.connect, t.greeting, t.command, t.data_init, t.data_block, t.data_end) == \
        (30.0, 300.0, 300.0, 120.0, 180.0, 600.0)
    h = started()
    assert h.connect_timeout == 30.0


def test_a_silent_server_times_out_after_five_minutes():
    h = started(route=ONE_HOST)
    h.clock.advance(299)
    assert h.outcome == [] and not h.peer.closed
    h.clock.advance(1)
    assert h.peer.closed
    [result] = h.results()
    assert result.deferred and result.status == "4.4.2"
    assert "timed out while receiving the initial server greeting" in result.text


def test_each_stage_has_its_own_timeout():
    stages = [
        ("EHLO", 300, lambda p: p.send("220 mx\r\n")),
        ("MAIL FROM", 300, lambda p: p.greet()),
        ("RCPT TO", 300, lambda p: (p.greet(), p.send("250 Ok\r\n"))),
        ("DATA", 120, lambda p: (p.greet(), p.send("250 Ok\r\n"), p.send("250 Ok\r\n"))),
        ("end of data", 600, lambda p: (p.greet(), p.send("250 Ok\r\n"), p.send("250 Ok\r\n"),
                                        p.send("354 go\r\n"))),
    ]
    for what, seconds, reach in stages:
        h = started(route=ONE_HOST)
        reach(h.peer)
        h.clock.advance(seconds - 1)
        assert h.outcome == [], what
        h.clock.advance(1)
        [result] = h.results()
        assert result.status == "4.4.2" and what in result.text, (what, result.text)
        assert h.clock.getDelayedCalls() == [], what


def test_a_transport_that_stays_full_times_out_after_three_minutes():
    h = at_data(route=ONE_HOST, message=b"y" * 100_000)
    h.peer.transport.fill_at = 1
    h.peer.send("354 go\r\n")
    h.clock.advance(179.9)
    assert h.outcome == []
    h.clock.advance(0.1)
    [result] = h.results()
    assert result.status == "4.4.2" and "message body" in result.text
    assert h.peer.closed


def test_timeouts_are_constructor_arguments():
    h = started(route=ONE_HOST, timeouts=Timeouts(greeting=2))
    h.clock.advance(2)
    assert h.results()[0].status == "4.4.2"


def test_no_timer_is_left_behind_after_a_delivery():
    h = greeted("PIPELINING")
    h.peer.send("250 Ok\r\n250 Ok\r\n354 go\r\n")
    h.peer.send("250 Ok\r\n")
    assert h.results()[0].delivered
    [idle] = h.clock.getDelayedCalls()              # the idle connection's expiry
    h.clock.advance(remote.IDLE_LIMIT)
    assert h.clock.getDelayedCalls() == [] and h.peer.closed


@pytest.mark.parametrize("reason", [error.ConnectionDone(), error.ConnectionLost()])
def test_a_connection_closed_after_quit_is_quiet(reason):
    h = started()
    h.peer.greet()
    deliver_plainly(h.peer)
    h.peer.protocol.connectionLost(failure.Failure(reason))
    assert h.results()[0].delivered


# ---------------------------------------------------------------------------
# Connection reuse (Postfix's connection cache)

def deliver_pipelined(h, peer, body_reply="250 2.0.0 Ok"):
    """MAIL, RCPT and DATA at once, then the body's reply."""
    lines = peer.lines()
    assert lines[0].startswith("MAIL FROM:") and lines[-1] == "DATA", lines
    peer.send("250 Ok\r\n250 Ok\r\n354 go\r\n")
    body = peer.output()
    peer.send(body_reply + "\r\n")
    return body


def with_an_idle_connection():
    """A Harness whose first message went through and left its connection idle."""
    h = started()
    h.peer.greet("PIPELINING")
    deliver_pipelined(h, h.peer)
    return h


def test_the_next_message_to_the_same_host_reuses_the_idle_connection():
    h = with_an_idle_connection()
    assert h.results()[0].delivered
    h.clock.advance(remote.IDLE_LIMIT - 0.5)
    h.deliver(recipients=["carol@remote.test"])
    assert len(h.peers) == 1 and h.resolver.asked == ["remote.test", "remote.test"]
    lines = h.peer.lines()          # no greeting, no EHLO: MAIL straight away
    assert lines == ["MAIL FROM:<alice@example.test>", "RCPT TO:<carol@remote.test>", "DATA"]
    h.peer.send("250 Ok\r\n250 Ok\r\n354 go\r\n")
    assert h.peer.output() == MESSAGE + b".\r\n"
    h.peer.send("250 2.0.0 Ok: second\r\n")
    [result] = h.results()
    assert result.delivered and result.response == "250 2.0.0 Ok: second"
    h.clock.advance(remote.IDLE_LIMIT)
    assert h.peer.lines() == ["QUIT"] and h.peer.closed


def test_a_failed_transaction_does_not_keep_its_connection():
    h = started()
    h.peer.greet("PIPELINING")
    deliver_pipelined(h, h.peer, body_reply="451 4.3.0 try later")
    assert h.results()[0].deferred
    assert h.peer.lines() == ["QUIT"] and h.peer.closed
    h.deliver()
    assert len(h.peers) == 2


def test_an_idle_connection_the_peer_closes_is_forgotten():
    h = with_an_idle_connection()
    h.peer.lose()
    assert h.clock.getDelayedCalls() == []
    h.deliver()
    assert len(h.peers) == 2
    h.peer.greet("PIPELINING")


def test_a_stale_idle_connection_hands_the_message_to_a_new_one():
    h = with_an_idle_connection()
    first = h.peer
    h.deliver()
    assert first.lines()[0].startswith("MAIL FROM:")
    first.lose()                    # closed before it answered anything
    assert len(h.peers) == 2 and h.outcome == []
    h.peer.greet("PIPELINING")
    deliver_pipelined(h, h.peer)
    assert h.results()[0].delivered and h.results()[0].remote_ip == "127.0.0.2"


def test_a_reused_connection_that_answered_is_not_retried():
    h = with_an_idle_connection()
    first = h.peer
    h.deliver()
    first.lines()
    first.send("250 Ok\r\n")      # MAIL answered, then the connection drops
    first.lose()
    # Like a connection lost mid-transaction: the next host, not the same again.
    assert h.peer is not first and h.peer.ip == "127.0.0.3"


def test_a_connection_is_not_reused_past_the_reuse_limit(monkeypatch):
    monkeypatch.setattr(remote, "REUSE_LIMIT", 60.0)
    h = started()
    h.peer.greet("PIPELINING")
    h.clock.advance(60)
    deliver_pipelined(h, h.peer)
    assert h.results()[0].delivered
    assert h.peer.lines() == ["QUIT"] and h.peer.closed


def test_stop_quits_the_idle_connections_and_keeps_none_after():
    h = with_an_idle_connection()
    h.delivery.stop()
    assert h.peer.lines() == ["QUIT"] and h.peer.closed
    assert h.clock.getDelayedCalls() == []


# ---------------------------------------------------------------------------
# Real sockets: small SMTP servers on 127.0.0.2 / 127.0.0.3, the test DNS
# server, real TLS, and a real Postfix.

MX_ZONES = {
    "remote.test": {"MX": [(10, "mx1.remote.test"), (20, "mx2.remote.test")]},
    "mx1.remote.test": {"A": ["127.0.0.2"]},
    "mx2.remote.test": {"A": ["127.0.0.3"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "broken.test": "SERVFAIL",
}


class SinkProtocol(LineOnlyReceiver):
    """A small SMTP server whose answers the test chooses (see SinkFactory)."""

    delimiter = b"\r\n"
    MAX_LENGTH = 1_000_000

    def connectionMade(self):
        self.factory.connections.append(self)
        self.in_data = False
        self.tls = False
        behaviour = self.factory.behaviour
        if behaviour == "drop":
            self.transport.loseConnection()
        elif behaviour != "hang":
            self.sendLine(self.factory.greeting.encode())

    def connectionLost(self, reason=None):
        self.factory.connections.remove(self)
        if not self.factory.connections:
            waiting, self.factory.closed = self.factory.closed, []
            for d in waiting:
                d.callback(None)

    def lineReceived(self, line):
        if self.in_data:
            self._data_line(line)
            return
        verb = line[:4].upper().decode()
        if verb == "EHLO":
            extensions = list(self.factory.extensions)
            if self.factory.tls_context is not None and not self.tls:
                extensions.append("STARTTLS")
            self.sendLine(ehlo_reply(*extensions).rstrip("\r\n").encode())
        elif verb == "STAR":
            self.sendLine(b"220 2.0.0 go ahead")
            self.transport.startTLS(self.factory.tls_context)
            self.tls = True
        elif verb == "MAIL":
            self.mail, self.rcpts, self.body = line[10:].decode(), [], []
            self.sendLine(b"250 2.1.0 Ok")
        elif verb == "RCPT":
            self.rcpts.append(line[8:].decode())
            self.sendLine(self.factory.rcpt_reply.encode())
        elif verb == "DATA":
            self.in_data = True
            self.sendLine(b"354 go ahead")
        elif verb == "QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.2 what?")

    def _data_line(self, line):
        if line == b".":
            self.in_data = False
            self.factory.messages.append((self.mail, self.rcpts, b"".join(self.body),
                                          self.tls))
            self.sendLine(self.factory.data_reply.encode())
        else:
            self.body.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    def __init__(self, context):
        self.context = context

    def serverConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self.context, None)


class SinkFactory(protocol.Factory):
    protocol = SinkProtocol

    def __init__(self, behaviour="accept", greeting="220 sink ESMTP", extensions=("PIPELINING",),
                 rcpt_reply="250 2.1.5 Ok", data_reply="250 2.0.0 Ok: queued",
                 tls_context=None):
        self.behaviour = behaviour
        self.greeting = greeting
        self.extensions = extensions
        self.rcpt_reply = rcpt_reply
        self.data_reply = data_reply
        self.tls_context = _ServerTLS(tls_context) if tls_context is not None else None
        self.messages = []
        self.connections = []
        self.closed = []

    def all_closed(self):
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self.closed.append(d)
        return d


def listen_pair(test, factories):
    """Listen with ``factories`` on 127.0.0.2 and 127.0.0.3, the same port.

    A None factory leaves that address closed (connection refused).
    """
    for _attempt in range(20):
        probe = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.4")
        port = probe.getHost().port
        probe.stopListening()
        listening = []
        try:
            for ip, factory in zip(("127.0.0.2", "127.0.0.3"), factories):
                if factory is not None:
                    listening.append(reactor.listenTCP(port, factory, interface=ip))
        except error.CannotListenError:
            for p in listening:
                p.stopListening()
            continue
        for p in listening:
            test.addCleanup(p.stopListening)
        return port
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


def certificate_files(directory, hostname):
    cert_pem, key_pem = make_self_signed(hostname)
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert_pem)
    with open(key_path, "wb") as f:
        f.write(key_pem)
    return cert_pem, cert_path, key_path


class RealSocketTests(unittest.TestCase):
    """RemoteDelivery with the real reactor, the DNS server and loopback SMTP servers."""

    timeout = 30

    def setUp(self):
        self.dns = DNSServer(MX_ZONES).start()
        self.addCleanup(self.dns.stop)
        self.factories = []

    def directory(self):
        path = tempfile.mkdtemp(prefix="remote-client-")
        self.addCleanup(shutil.rmtree, path, True)
        return path

    def delivery(self, factories, tls="opportunistic", timeouts=None, trust=None):
        self.factories = [f for f in factories if f is not None]
        port = listen_pair(self, factories)
        config = make_config(dns={"nameservers": self.dns.address, "timeout": "2s"},
                             outbound={"port": str(port), "tls": tls})
        context = functools.partial(default_tls_context, trust_root=trust) if trust else None
        delivery = RemoteDelivery(config, MXResolver(config), reactor,
                                  tls_context_factory=context,
                                  timeouts=timeouts or Timeouts(connect=2, greeting=2,
                                                                command=2, data_init=2,
                                                                data_block=2, data_end=2))
        self.addCleanup(delivery.stop)      # QUIT the idle connections, wait till closed
        return delivery

    @defer.inlineCallbacks
    def send(self, delivery, message=MESSAGE, recipients=("bob@remote.test",),
             domain="remote.test"):
        envelope = Envelope("00000000000000aa", "alice@example.test", list(recipients), 0.0)
        results = yield delivery.deliver(envelope, message, list(recipients), domain)
        for factory in self.factories:      # no connection may outlive the test
            yield factory.all_closed()
        return results

    @defer.inlineCallbacks
    def test_delivery_to_the_first_mx(self):
        first, second = SinkFactory(), SinkFactory()
        [result] = yield self.send(self.delivery([first, second]))
        self.assertTrue(result.delivered)
        self.assertEqual((result.remote_host, result.remote_ip), ("mx1.remote.test", "127.0.0.2"))
        self.assertEqual(first.messages, [("<alice@example.test>", ["<bob@remote.test>"],
                                           MESSAGE, False)])
        self.assertEqual(second.messages, [])

    @defer.inlineCallbacks
    def test_the_second_mx_takes_it_when_the_first_refuses_connections(self):
        second = SinkFactory()
        with capture_events() as seen:
            [result] = yield self.send(self.delivery([None, second]))
        self.assertTrue(result.delivered)
        self.assertEqual(result.remote_host, "mx2.remote.test")
        self.assertEqual(len(second.messages), 1)
        [attempt] = seen.named("delivery.remote.attempt")
        self.assertIn("Connection refused", attempt["error"])

    @defer.inlineCallbacks
    def test_a_4xx_greeting_hands_over_to_the_next_mx(self):
        first, second = SinkFactory(greeting="421 4.3.2 busy"), SinkFactory()
        [result] = yield self.send(self.delivery([first, second]))
        self.assertEqual(result.remote_host, "mx2.remote.test")
        self.assertTrue(result.delivered)

    @defer.inlineCallbacks
    def test_a_hanging_mx_times_out_and_the_next_takes_it(self):
        first, second = SinkFactory("hang"), SinkFactory()
        delivery = self.delivery([first, second], timeouts=Timeouts(greeting=0.3))
        [result] = yield self.send(delivery)
        self.assertTrue(result.delivered)
        self.assertEqual(result.remote_host, "mx2.remote.test")

    @defer.inlineCallbacks
    def test_a_dropping_mx_is_skipped(self):
        first, second = SinkFactory("drop"), SinkFactory()
        [result] = yield self.send(self.delivery([first, second]))
        self.assertTrue(result.delivered)
        self.assertEqual(result.remote_host, "mx2.remote.test")

    @defer.inlineCallbacks
    def test_every_mx_failing_defers(self):
        first, second = SinkFactory("drop"), SinkFactory(greeting="554 5.7.1 no")
        results = yield self.send(self.delivery([first, second]),
                                  recipients=["bob@remote.test", "carol@remote.test"])
        self.assertEqual([r.code for r in results], [451, 451])
        self.assertIn("554 5.7.1 no", results[0].text)

    @defer.inlineCallbacks
    def test_a_5xx_recipient_fails_and_a_4xx_one_defers(self):
        for reply, check in (("550 5.1.1 no such user", "failed"),
                             ("450 4.2.0 try later", "deferred")):
            first = SinkFactory(rcpt_reply=reply)
            [result] = yield self.send(self.delivery([first, SinkFactory()]))
            self.assertTrue(getattr(result, check))
            self.assertEqual(result.response, reply)
            self.assertEqual(result.remote_host, "mx1.remote.test")

    @defer.inlineCallbacks
    def test_dns_outcomes_become_results(self):
        delivery = self.delivery([SinkFactory(), None])
        [null] = yield self.send(delivery, domain="nullmx.test",
                                 recipients=["x@nullmx.test"])
        self.assertEqual((null.code, null.status), (550, "5.1.10"))
        [broken] = yield self.send(delivery, domain="broken.test",
                                   recipients=["x@broken.test"])
        self.assertEqual((broken.code, broken.status), (451, "4.4.3"))

    @defer.inlineCallbacks
    def test_the_body_arrives_intact_across_16k_blocks(self):
        first = SinkFactory()
        line = b"." + b"z" * 99 + b"\r\n"              # every line starts with a dot
        message = b"Subject: dots\r\n\r\n" + line * 600 + b"bare\nlf\rcr\r\n"
        [result] = yield self.send(self.delivery([first, None]), message=message)
        self.assertTrue(result.delivered)
        body = first.messages[0][2]
        self.assertEqual(body, b"Subject: dots\r\n\r\n" + line * 600 + b"bare\r\nlf\r\ncr\r\n")

    @defer.inlineCallbacks
    def test_opportunistic_tls_with_a_self_signed_certificate(self):
        _pem, cert, key = certificate_files(self.directory(), "whatever.test")
        first = SinkFactory(tls_context=make_context(cert, key))
        [result] = yield self.send(self.delivery([first, None]))
        self.assertTrue(result.delivered and result.tls)
        self.assertTrue(first.messages[0][3])

    @defer.inlineCallbacks
    def test_required_tls_verifies_the_mx_name(self):
        pem, cert, key = certificate_files(self.directory(), "mx1.remote.test")
        trust = ssl.Certificate.loadPEM(pem)
        good = SinkFactory(tls_context=make_context(cert, key))
        [result] = yield self.send(self.delivery([good, None], tls="required", trust=trust))
        self.assertTrue(result.delivered and result.tls)

    @defer.inlineCallbacks
    def test_required_tls_with_the_wrong_name_defers(self):
        pem, cert, key = certificate_files(self.directory(), "someone-else.test")
        trust = ssl.Certificate.loadPEM(pem)
        first = SinkFactory(tls_context=make_context(cert, key))
        second = SinkFactory(tls_context=make_context(cert, key))
        with capture_events() as seen:
            [result] = yield self.send(self.delivery([first, second], tls="required",
                                                     trust=trust))
        self.assertTrue(result.deferred)
        self.assertEqual(result.status, "4.7.5")
        self.assertEqual(first.messages + second.messages, [])
        self.assertEqual(len(seen.named("delivery.remote.attempt")), 2)


@pytest.mark.skipif(postfix_available() is not None,
                    reason=str(postfix_available()))
class PostfixTests(unittest.TestCase):
    """Deliveries through one real, private Postfix listening on 127.0.0.2.

    It offers STARTTLS (a self-signed certificate) and rejects
    nobody@remote.test; starting it takes seconds, so the class shares it.
    """

    timeout = 60

    @classmethod
    def setUpClass(cls):
        from harness import free_ports
        cls.workdir = tempfile.mkdtemp(prefix="postfix-mx-")
        os.chmod(cls.workdir, 0o755)        # Postfix's daemons must get through
        cls.port = free_ports(1, host="127.0.0.2")[0]
        cert_pem, key_pem = make_self_signed("mx.postfix.test")
        # Postfix wants the key first, then its certificate chain (read as root).
        chain = Path(cls.workdir, "chain.pem")
        chain.touch(mode=0o600)
        chain.write_bytes(key_pem + cert_pem)
        cls.mx = PostfixMX(Path(cls.workdir, "postfix"), cls.port, host="127.0.0.2",
                           extra_main={
                               "smtpd_tls_security_level": "may",
                               "smtpd_tls_chain_files": f"{cls.workdir}/chain.pem",
                               "smtpd_recipient_restrictions":
                                   "check_recipient_access inline:{nobody@remote.test=REJECT}",
                           })
        try:
            cls.mx.start()
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        cls.mx.stop()
        shutil.rmtree(cls.workdir, True)

    def setUp(self):
        self.dns = DNSServer(MX_ZONES).start()
        self.addCleanup(self.dns.stop)

    def delivery(self, tls="opportunistic"):
        config = make_config(dns={"nameservers": self.dns.address, "timeout": "2s"},
                             outbound={"port": str(self.port), "tls": tls})
        delivery = RemoteDelivery(config, MXResolver(config), reactor)
        self.addCleanup(delivery.stop)
        return delivery

    @defer.inlineCallbacks
    def wait_for(self, address, count=1):
        for _ in range(300):
            found = self.mx.messages_for(address)
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.fail(f"nothing delivered to {address}:\n{self.mx.log()}")

    @defer.inlineCallbacks
    def test_postfix_takes_the_message_with_opportunistic_tls(self):
        head = b"From: alice@example.test\r\nTo: bob@remote.test\r\nSubject: via postfix\r\n\r\n"
        message = head + b"x" * (BLOCK - len(head) - 2) + b"\r\n.\r\nQUIT\r\nafter\r\n"
        recipients = ["bob@remote.test", "carol@other.test"]
        envelope = Envelope("00000000000000bb", "alice@example.test", recipients, 0.0)
        results = yield self.delivery().deliver(envelope, message, recipients, "remote.test")
        self.assertEqual([r.code for r in results], [250, 250])
        self.assertTrue(results[0].tls)
        self.assertIn("queued as", results[0].text)
        found = yield self.wait_for("bob@remote.test")
        stored = [p.read_bytes().replace(b"\n", b"\r\n") for p in found]
        [bob] = [m for m in stored if b"Subject: via postfix" in m]
        self.assertIn(b"\r\n.\r\nQUIT\r\nafter\r\n", bob)     # the dot line survived
        yield self.wait_for("carol@other.test")

    @defer.inlineCallbacks
    def test_postfix_refusing_a_recipient_fails_it_and_tls_off_stays_plain(self):
        recipients = ["nobody@remote.test", "dave@remote.test"]
        envelope = Envelope("00000000000000cc", "alice@example.test", recipients, 0.0)
        nobody, dave = yield self.delivery(tls="off").deliver(envelope, MESSAGE, recipients,
                                                              "remote.test")
        self.assertTrue(nobody.failed)
        self.assertEqual((nobody.code, nobody.status), (554, "5.7.1"))
        self.assertTrue(dave.delivered)
        self.assertFalse(dave.tls)
        yield self.wait_for("dave@remote.test")

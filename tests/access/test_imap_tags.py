"""IMAP tags (RFC 3501 §9): found by the fuzz harness (tests/fuzz)."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from appliance.access.folders import MaildirStore
from appliance.access.imap.server import IMAPFactory
from appliance.auth.sasl import Mechanisms
from appliance.testing import FakeAccounts, TLSStringTransport, make_config
from appliance.threads import synchronous_runner


class FakeTLS:
    context = object()


def answer(tmp_path, line):
    accounts = FakeAccounts({"alice@example.test": "pw"})
    factory = IMAPFactory(make_config(str(tmp_path)), MaildirStore(str(tmp_path),
                                                                   synchronous_runner),
                          accounts, Mechanisms(accounts), FakeTLS(), Clock(),
                          implicit_tls=True)
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", "192.0.2.10", 40000))
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    transport.clear()
    protocol.dataReceived(line)
    return transport.value().split(b"\r\n")[:-1]


@pytest.mark.parametrize("tag", [b"*", b"%", b"a*", b"x%y"])
def test_a_wildcard_in_a_tag_is_refused_untagged(tmp_path, tag):
    # "* CAPABILITY" was run with the tag "*": its "* OK completed" read as untagged.
    assert answer(tmp_path, tag + b" CAPABILITY\r\n") == [b"* BAD Invalid tag"]


@pytest.mark.parametrize("tag", [b"a1", b"A.b-c", b"!#$&'", b"[x]", b"~|^_`"])
def test_other_astring_chars_make_a_tag(tmp_path, tag):
    lines = answer(tmp_path, tag + b" NOOP\r\n")
    assert lines[-1].startswith(tag + b" OK")

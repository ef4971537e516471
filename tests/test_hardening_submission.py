"""Issue 17, policy gaps on submission (and trusted networks): forged
Authentication-Results, the From: header as readers parse it, and which
addresses an account may send as."""

import pytest

from appliance.testing import FakeDirectory, FakeSpool, SMTPHarness, make_config
from test_submission import ALICE, authenticated, send_message

FORGED = ("Authentication-Results: mx.example.test; dkim=pass header.d=bank.test;\r\n"
          " dmarc=pass header.from=bank.test\r\n"
          "Authentication-Results: (comment) MX.Example.Test.; spf=pass\r\n"
          "Authentication-Results: other.example; spf=fail\r\n")


def test_forged_authentication_results_are_removed_from_submitted_mail():
    """092f303 removed them only on MX: a user's message reached local
    mailboxes (and readers who trust our authserv-id) with them intact."""
    h = authenticated()
    replies = send_message(h, f"From: {ALICE}\r\n" + FORGED, rcpt="bob@example.test")
    assert replies[0].startswith("250 ")
    [(_, message)] = h.factory.spool.accepted
    head = message.split(b"\r\n\r\n", 1)[0]
    assert b"mx.example.test;" not in head.lower()
    assert b"dmarc=pass" not in head
    assert b"Authentication-Results: other.example; spf=fail" in head     # not ours: kept


def test_forged_authentication_results_are_removed_from_trusted_network_mail():
    h = SMTPHarness(config=make_config(relay={"trusted_networks": "192.0.2.0/24"}),
                    directory=FakeDirectory({"bob@example.test": ["bob@example.test"]},
                                            ("example.test",)),
                    spool=FakeSpool(), peer="192.0.2.7")
    h.send("EHLO app.test\r\nMAIL FROM:<app@example.test>\r\nRCPT TO:<bob@example.test>\r\n"
           "DATA\r\n" + "From: app@example.test\r\n" + FORGED + "\r\nhi\r\n.\r\n")
    assert h.codes() == [220, 250, 250, 250, 354, 250]
    [(_, message)] = h.factory.spool.accepted
    assert b"mx.example.test;" not in message.lower()
    assert message.count(b"Authentication-Results:") == 1

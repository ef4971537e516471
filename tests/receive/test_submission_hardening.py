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
    [(_, message)] = h.factory.queue.accepted
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
    [(_, message)] = h.factory.queue.accepted
    assert b"mx.example.test;" not in message.lower()
    assert message.count(b"Authentication-Results:") == 1


# -- the From: header, read the way IMAP ENVELOPE and mail clients read it ------------

def submit(headers):
    h = authenticated()
    return send_message(h, headers + "Subject: hi\r\n")[0]


NOT_OWNED = "550 5.7.1 From: header address not owned by the authenticated user"


@pytest.mark.parametrize("headers", [
    # 092f303 passed each of these: the email package skipped or decoded
    # what a reader shows as bob.
    "From : bob@example.test\r\nFrom: alice@example.test\r\n",
    "From: alice@example.test\r\nFrom\t: bob@example.test\r\n",
    " From: bob@example.test\r\nFrom: alice@example.test\r\n",
    "From: \"bob@example.test\" <alice@example.test>\r\n",
    "From: =?utf-8?q?bob=40example.test?= <alice@example.test>\r\n",
    # and these were refused before and still are
    "From: Alice <alice@example.test> bob@example.test\r\n",
    "From: =?utf-8?q?alice?=@example.test\r\n",
    "From: alice@example.test,\r\n bob@example.test\r\n",
    "From: friends: alice@example.test, bob@example.test;\r\n",
    "From: =?utf-8?q?bob?=@example.test\r\n",
])
def test_from_header_forms_a_reader_shows_as_someone_else_are_refused(headers):
    assert submit(headers) == NOT_OWNED


@pytest.mark.parametrize("headers", [
    "From: Alice\r\n <alice@example.test>\r\n",
    "From: =?utf-8?q?Alice_M=C3=BCller?= <alice@example.test>\r\n",
    "From: alice@example.test (Alice at home)\r\n",
    "From: friends: alice@example.test;\r\n",
    "From: alice@example.test\r\nFrom : Alice <ALICE@example.test>\r\n",
    "From: \"Alice, the one\" <postmaster@example.test>\r\n",
])
def test_from_header_forms_naming_only_the_account_pass(headers):
    assert submit(headers).startswith("250 ")


def test_envelope_shows_exactly_the_addresses_the_check_saw():
    """One parser: whatever passes the check is what IMAP ENVELOPE shows."""
    from appliance.access.imap import mime as imapmime
    from appliance.message import from_addresses
    for value in [b"Alice <alice@example.test>", b'"A, B" <a@x.test>, c@y.test (C)',
                  b"g: a@x.test, <b@y.test>;, c@z.test", b"A. Smith <s@x.test>,",
                  b"alice@example\r\n .test", b"<@route.test:r@x.test>"]:
        message = b"From: " + value + b"\r\nTo: t@x.test\r\n\r\nbody\r\n"
        checked = from_addresses(message)
        header, _ = imapmime.split_message(message)
        shown = imapmime.envelope(imapmime.Headers(header))
        from_part = shown.split(b") (", 1)[0]
        pairs = [b'"%s" "%s"' % tuple(a.encode().split(b"@")) for a in checked]
        assert all(pair in from_part for pair in pairs), (value, shown)
        assert from_part.count(b"@") == 0 and len(pairs) == from_part.count(b'" "'), \
            (value, shown)


def test_from_parse_of_a_first_line_from_with_a_space_matches_imap():
    from appliance.access.imap import mime as imapmime
    message = b"From : bob@example.test\r\nFrom: alice@example.test\r\n\r\nx\r\n"
    header, _ = imapmime.split_message(message)
    assert imapmime.Headers(header).get(b"from") == b"bob@example.test"


# -- +tag and case: an address that is somebody else's -------------------------------------

def tagged_factory():
    from twisted.internet.task import Clock

    from appliance.auth.sasl import Mechanisms
    from appliance.receive.submission import SubmissionFactory
    from appliance.testing import FakeAccounts
    from test_submission import FakeTLS, PASSWORD
    users = {ALICE: [ALICE], "alice+sales@example.test": ["alice+sales@example.test"],
             "alice+team@example.test": ["carol@example.test"],
             "carol@example.test": ["carol@example.test"]}
    accounts = FakeAccounts({ALICE: PASSWORD, "alice+sales@example.test": "pw"})
    return SubmissionFactory(make_config(), FakeDirectory(users, ("example.test",)),
                             FakeSpool(), Clock(), "submission", Mechanisms(accounts),
                             FakeTLS())


@pytest.mark.parametrize("sender,reply", [
    ("alice+sales@example.test", "553 5.7.1 Sender address not owned by the authenticated user"),
    ("ALICE+Sales@Example.TEST", "553 5.7.1 Sender address not owned by the authenticated user"),
    ("alice+team@example.test", "553 5.7.1 Sender address not owned by the authenticated user"),
    ("alice+lists@example.test", "250 2.1.0 Sender ok"),
    ("Alice@Example.Test", "250 2.1.0 Sender ok"),
])
def test_a_tag_form_that_is_another_account_is_not_ours(sender, reply):
    """092f303: alice could send as alice+sales@ (another account) and as
    alice+team@ (an alias of carol's), in any case: only the +tag was looked at."""
    h = authenticated(factory=tagged_factory())
    h.send(f"MAIL FROM:<{sender}>\r\n")
    assert h.replies() == [reply]


def test_a_tag_form_that_is_another_account_is_refused_in_from():
    h = authenticated(factory=tagged_factory())
    assert send_message(h, "From: <Alice+Sales@example.test>\r\n") == [NOT_OWNED]
    assert send_message(h, "From: <alice+lists@example.test>\r\n")[0].startswith("250 ")


def test_directory_may_send_as_looks_at_the_tagged_address_first(tmp_path):
    import os

    from appliance.directory import Directory
    cfg = make_config(str(tmp_path), server={"data_dir": str(tmp_path / "var")})
    os.makedirs(cfg.server.data_dir)
    directory = Directory.from_config(cfg)
    for user in ("alice@example.test", "alice+sales@example.test"):
        directory.users.add(user, "$2b$04$" + "a" * 53)
    directory.aliases.add("alice+team@example.test", ["carol@example.test"])
    directory.aliases.add("info@example.test", ["alice@example.test"])
    may = directory.may_send_as
    assert may("alice@example.test", "alice+lists@example.test")
    assert may("alice@example.test", "info+x@example.test")
    assert not may("alice@example.test", "alice+sales@example.test")
    assert not may("alice@example.test", "ALICE+SALES@example.test")
    assert not may("alice@example.test", "alice+team@example.test")

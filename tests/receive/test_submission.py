"""STARTTLS, AUTH and the submission policy, over a StringTransport.

The TWISTED-TRAPS items of this issue (T1, T2, T4, T5, T6) each have a test
whose docstring says what stock twisted.mail.smtp.ESMTP did.
"""

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.task import Clock

from appliance.testing import oauth2_issuer
from appliance.auth.accounts import BackendUnavailable
from appliance.auth.sasl import Mechanisms
from appliance.receive.smtp import SMTPFactory
from appliance.message import AmbiguousFrom, from_addresses
from appliance.receive.submission import AUTH_LINE_LIMIT, SubmissionFactory
from appliance.testing import (
    FakeAccounts, FakeDirectory, FakeSpool, SMTPHarness, StringTransport, TLSStringTransport,
    capture_events, make_config)

ALICE, PASSWORD = "alice@example.test", "correct horse"
USERS = {ALICE: [ALICE], "bob@example.test": ["bob@example.test"],
         "postmaster@example.test": [ALICE]}
DOMAINS = ("example.test", "example.org")


class FakeTLS:
    """Stands for ServerTLS: the protocol only hands it to startTLS."""

    context = "the SSL context"


def make_factory(listener="submission", implicit=False, accounts=None, verifier=None,
                 spool=None, config=None):
    accounts = accounts if accounts is not None else FakeAccounts(
        {ALICE: PASSWORD, "bob@example.test": "bobs"},
        aliases={ALICE: ["postmaster@example.test"]})
    return SubmissionFactory(
        config or make_config(), FakeDirectory(USERS, DOMAINS),
        spool if spool is not None else FakeSpool(), Clock(), listener,
        Mechanisms(accounts, verifier), FakeTLS(), implicit_tls=implicit)


def connect(factory=None, transport_class=TLSStringTransport, **kwargs):
    h = SMTPHarness(factory or make_factory(**kwargs), transport_class=transport_class)
    h.replies()
    return h


def under_tls(**kwargs):
    """Connected, EHLO, STARTTLS done (as far as the protocol can tell), EHLO again."""
    h = connect(**kwargs)
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    assert h.replies()[-1] == "220 2.0.0 Ready to start TLS"
    h.send("EHLO client.test\r\n")
    h.replies()
    return h


def plain(user=ALICE, password=PASSWORD, authzid=""):
    raw = f"{authzid}\0{user}\0{password}".encode()
    return base64.b64encode(raw).decode()


def authenticated(**kwargs):
    h = under_tls(**kwargs)
    h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    return h


def last(h):
    return h.replies()[-1]


def b64(text):
    return base64.b64encode(text.encode()).decode()


# -- EHLO: what is offered when ----------------------------------------------------

def test_ehlo_before_tls_offers_starttls_and_no_auth():
    h = connect()
    h.send("EHLO client.test\r\n")
    lines = h.replies()
    assert "250-STARTTLS" in lines or "250 STARTTLS" in lines
    assert not [line for line in lines if "AUTH" in line]


def test_ehlo_under_tls_offers_auth_and_no_starttls():
    h = under_tls()
    h.send("EHLO client.test\r\n")
    lines = h.replies()
    assert lines[-1] == "250 AUTH PLAIN LOGIN"
    assert not [line for line in lines if "STARTTLS" in line]


def test_oauth_mechanisms_are_offered_when_configured():
    h = under_tls(verifier=object())
    h.send("EHLO client.test\r\n")
    assert last(h) == "250 AUTH PLAIN LOGIN XOAUTH2 OAUTHBEARER"


def test_implicit_tls_offers_auth_at_once_and_no_starttls():
    h = connect(listener="submissions", implicit=True)
    assert h.protocol.session.tls
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    lines = h.replies()
    assert "250 AUTH PLAIN LOGIN" in lines
    assert lines[-1] == "502 5.5.1 Command not implemented"


def test_mx_offers_starttls_but_never_auth():
    factory = SMTPFactory(make_config(), FakeDirectory(USERS, DOMAINS), FakeSpool(), Clock(),
                          "mx", tls=FakeTLS())
    h = connect(factory)
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    assert h.replies()[-2:] == ["250 STARTTLS", "220 2.0.0 Ready to start TLS"]
    h.send("EHLO client.test\r\n")
    lines = h.replies()
    assert not [line for line in lines if "AUTH" in line or "STARTTLS" in line]
    h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["502 5.5.1 Command not implemented"]


def test_mx_without_tls_does_not_offer_starttls():
    factory = SMTPFactory(make_config(), FakeDirectory(USERS, DOMAINS), FakeSpool(), Clock())
    h = connect(factory)
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    lines = h.replies()
    assert "250 SMTPUTF8" in lines and lines[-1] == "502 5.5.1 Command not implemented"


# -- STARTTLS ----------------------------------------------------------------------

def test_starttls_hands_the_tls_context_to_the_transport_after_the_220():
    h = connect()
    h.send("EHLO client.test\r\nSTARTTLS\r\n")
    assert h.transport.tls is h.factory.tls
    assert h.transport.written_before_tls.endswith(b"220 2.0.0 Ready to start TLS\r\n")


def test_t1_lines_pipelined_after_starttls_are_discarded():
    """T1 (CVE-2011-0411 class): stock ESMTP runs the lines that came in the
    same read as STARTTLS after the handshake, as if the client had sent
    them under TLS."""
    h = connect()
    h.send("EHLO client.test\r\n")
    h.replies()
    with capture_events() as events:
        h.send(f"STARTTLS\r\nEHLO evil.test\r\nAUTH PLAIN {plain()}\r\n"
               f"MAIL FROM:<{ALICE}>\r\n")
    assert h.replies() == ["220 2.0.0 Ready to start TLS"]
    [discarded] = events.named("smtp.starttls.discarded")
    assert discarded["octets"] > 0
    # Nothing of it happened: no HELO name, not authenticated, no transaction.
    assert h.protocol.session.helo == "" and h.protocol.session.account is None
    h.send(f"MAIL FROM:<{ALICE}>\r\n")
    assert h.replies() == ["503 5.5.1 Send EHLO or HELO first"]


def test_t1_on_the_mx_port_too():
    """T1: stock runs ``MAIL FROM`` pipelined after STARTTLS inside TLS."""
    factory = SMTPFactory(make_config(), FakeDirectory(USERS, DOMAINS), FakeSpool(), Clock(),
                          "mx", tls=FakeTLS())
    h = connect(factory)
    h.send("EHLO c.test\r\n")
    h.replies()
    h.send("STARTTLS\r\nEHLO c.test\r\nMAIL FROM:<x@remote.test>\r\n")
    assert h.replies() == ["220 2.0.0 Ready to start TLS"]
    h.send("RCPT TO:<alice@example.test>\r\n")
    assert h.replies() == ["503 5.5.1 Need MAIL command"]


def test_t2_starttls_forgets_helo_transaction_and_authentication():
    """T2: stock keeps the HELO name, MAIL, RCPTs and even ``authenticated``
    across the handshake; RFC 3207 §4.2 says the session starts over."""
    factory = SMTPFactory(make_config(), FakeDirectory(USERS, DOMAINS), FakeSpool(), Clock(),
                          "mx", tls=FakeTLS())
    h = connect(factory)
    h.send("EHLO c.test\r\nMAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\n")
    assert h.codes()[-2:] == [250, 250]
    h.protocol.session.auth_user = ALICE        # as if stock had let AUTH happen
    h.send("STARTTLS\r\n")
    assert h.replies() == ["220 2.0.0 Ready to start TLS"]
    session = h.protocol.session
    assert (session.helo, session.auth_user, session.account, session.tls) == ("", "", None, True)
    h.send("DATA\r\n")
    assert h.replies() == ["503 5.5.1 Need MAIL command"]
    h.send("EHLO c.test\r\nRCPT TO:<alice@example.test>\r\n")
    assert last(h) == "503 5.5.1 Need MAIL command"


def test_t2_authentication_is_forgotten_on_submission():
    """T2: an authenticated session (stock: kept) must AUTH again after TLS."""
    h = connect()
    h.send("EHLO c.test\r\n")
    h.replies()
    h.protocol.session.account = object()       # as if stock had let AUTH happen
    h.protocol.session.auth_user = ALICE
    h.send("STARTTLS\r\n")
    h.send("EHLO c.test\r\n")
    h.replies()
    h.send(f"MAIL FROM:<{ALICE}>\r\n")
    assert h.replies() == ["530 5.7.0 Authentication required"]


def test_starttls_twice_and_with_an_argument():
    h = connect()
    h.send("EHLO c.test\r\nSTARTTLS now\r\n")
    assert last(h) == "501 5.5.4 Syntax: no arguments allowed"
    h.send("STARTTLS\r\n")
    h.send("EHLO c.test\r\n")
    h.replies()
    h.send("STARTTLS\r\n")
    assert h.replies() == ["503 5.5.1 TLS already active"]


def test_starttls_on_a_transport_without_tls_is_a_temporary_refusal():
    h = connect(transport_class=StringTransport)
    h.send("EHLO c.test\r\nSTARTTLS\r\n")
    assert last(h) == "454 4.7.0 TLS not available due to temporary reason"
    assert not h.protocol.session.tls


def test_handshake_completion_is_an_event():
    h = connect()
    h.send("EHLO c.test\r\nSTARTTLS\r\n")
    with capture_events() as events:
        h.protocol.handshakeCompleted()
    [event] = events.named("smtp.starttls")
    assert event["listener"] == "submission" and event["implicit"] is False
    assert event["session"] == h.protocol.session_id


# -- AUTH refusals --------------------------------------------------------------------

def test_t4_auth_before_tls_is_refused():
    """T4: stock advertises AUTH on a plaintext connection and accepts it."""
    h = connect()
    h.send(f"EHLO c.test\r\nAUTH PLAIN {plain()}\r\n")
    assert last(h) == ("538 5.7.11 Encryption required for requested "
                       "authentication mechanism")
    h.send("AUTH LOGIN\r\n")
    assert last(h).startswith("538 5.7.11 ")
    assert h.factory.mechanisms.accounts.calls == []


def test_t5_auth_before_ehlo():
    """T5: stock accepts AUTH before EHLO. After STARTTLS the EHLO must come again."""
    h = connect()
    h.send("EHLO c.test\r\nSTARTTLS\r\n")
    h.replies()
    h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["503 5.5.1 Send EHLO first"]


def test_t5_auth_after_helo_is_refused():
    h = connect(listener="submissions", implicit=True)
    h.send(f"HELO c.test\r\nAUTH PLAIN {plain()}\r\n")
    assert last(h) == "503 5.5.1 Send EHLO first"


def test_t5_auth_inside_a_transaction():
    """T5: stock accepts AUTH between MAIL and DATA."""
    h = authenticated()
    h.send(f"MAIL FROM:<{ALICE}>\r\nAUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["250 2.1.0 Sender ok",
                           "503 5.5.1 Already authenticated"]
    h = connect(listener="submissions", implicit=True)
    h.send("EHLO c.test\r\n")
    h.replies()
    h.protocol._txn = object()                 # a transaction under way
    h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["503 5.5.1 AUTH not permitted during a mail transaction"]


def test_t5_second_auth_is_refused():
    h = authenticated()
    h.send(f"AUTH PLAIN {plain('bob@example.test', 'bobs')}\r\n")
    assert h.replies() == ["503 5.5.1 Already authenticated"]
    assert h.protocol.session.auth_user == ALICE


def test_t5_plain_authzid_of_someone_else():
    """T5: stock drops the authorization identity: ``root\\0alice\\0pw`` logs in as alice."""
    h = under_tls()
    h.send(f"AUTH PLAIN {plain(authzid='bob@example.test')}\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    assert h.protocol.session.account is None


@pytest.mark.parametrize("response", [
    plain() + "junk",               # T5: stock decodes leniently, trailing junk accepted
    plain()[:-1],                   # bad padding
    "!!!!",
])
def test_t5_strict_base64(response):
    """T5: stock's base64 decoding accepts trailing junk."""
    h = under_tls()
    h.send(f"AUTH PLAIN {response}\r\n")
    assert h.replies() == ["501 5.5.2 Cannot decode response"]
    assert h.protocol.session.account is None


def test_t6_two_field_plain_is_a_501_not_a_dropped_connection():
    """T6: stock raises on a two-field PLAIN response and drops the connection."""
    h = under_tls()
    h.send(f"AUTH PLAIN {b64(ALICE + chr(0) + PASSWORD)}\r\n")
    assert h.replies() == ["501 5.5.2 Cannot decode response"]
    assert not h.closed
    h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]


def test_t5_failures_are_limited_per_connection():
    """T5: stock allows unlimited AUTH failures on one connection."""
    h = under_tls()
    with capture_events() as events:
        for _ in range(2):
            h.send(f"AUTH PLAIN {plain(password='guess')}\r\n")
            assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
        h.send(f"AUTH PLAIN {plain(password='guess')}\r\nAUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid",
                           "421 4.7.0 Too many authentication failures"]
    assert h.closed
    assert len(events.named("auth.failure")) == 3
    assert events.named("smtp.limit")[0]["kind"] == "auth_failures"


def test_cancel_with_star():
    h = under_tls()
    h.send("AUTH LOGIN\r\n")
    assert h.replies() == ["334 VXNlcm5hbWU6"]
    h.send("*\r\n")
    assert h.replies() == ["501 5.7.0 Authentication cancelled"]
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("line,reply", [
    ("AUTH", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    ("AUTH PLAIN a b", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
    ("AUTH CRAM-MD5", "504 5.5.4 Unrecognized authentication type"),
    ("AUTH XOAUTH2 dXNlcj0=", "504 5.5.4 Unrecognized authentication type"),
    ("AUTH PL@IN x", "501 5.5.4 Syntax: AUTH mechanism [initial-response]"),
])
def test_auth_syntax_and_unknown_mechanisms(line, reply):
    h = under_tls()
    h.send(line + "\r\n")
    assert h.replies() == [reply]


@pytest.mark.parametrize("user,password", [
    (ALICE, "Tr0ub4dor&3"), ("nobody@example.test", PASSWORD),
    ("not an address", PASSWORD)])
def test_wrong_password_and_unknown_user(user, password):
    h = under_tls()
    with capture_events() as events:
        h.send(f"AUTH PLAIN {plain(user, password)}\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    [failure] = events.named("auth.failure")
    assert failure["mechanism"] == "PLAIN" and failure["account"] == user
    assert failure["listener"] == "submission"
    assert password not in json.dumps(events.records)


def test_empty_password_never_reaches_the_backend():
    h = under_tls()
    h.send(f"AUTH PLAIN {plain(password='')}\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    assert h.factory.mechanisms.accounts.calls == []


def test_backend_down_is_454_and_not_counted_as_a_failure():
    h = under_tls(accounts=FakeAccounts(error=BackendUnavailable("ldap down")))
    with capture_events() as events:
        for _ in range(4):
            h.send(f"AUTH PLAIN {plain()}\r\n")
            assert h.replies() == ["454 4.7.0 Temporary authentication failure"]
    assert not h.closed
    assert not events.named("auth.failure")
    assert len(events.named("auth.unavailable")) == 4


def test_over_long_auth_line():
    h = under_tls()
    h.send("AUTH PLAIN " + "QUFB" * (AUTH_LINE_LIMIT // 4) + "\r\n")
    assert h.replies() == ["500 5.5.2 Line too long"]
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("line", ["QUFB" * (AUTH_LINE_LIMIT // 4), "QUFB\rQUFB"])
def test_a_bad_response_line_ends_the_exchange(line):
    h = under_tls()
    h.send("AUTH LOGIN\r\n")
    h.replies()
    h.send(line + "\r\nNOOP\r\n")
    assert h.replies()[-1] == "250 2.0.0 Ok"
    assert h.protocol.mode == "COMMAND"


def test_a_response_still_growing_past_the_limit_ends_the_exchange():
    h = under_tls()
    h.send("AUTH PLAIN\r\n")
    h.replies()
    h.send("QUFB" * (AUTH_LINE_LIMIT // 2))         # no CRLF yet
    assert h.replies() == ["500 5.5.2 Line too long"]
    h.send("\r\nNOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_command_lines_are_back_to_512_after_auth():
    h = authenticated()
    h.send("NOOP " + "x" * 600 + "\r\n")
    assert h.replies() == ["500 5.5.2 Line too long"]


# -- AUTH success -------------------------------------------------------------------

def test_plain_success_is_an_event_without_the_password():
    h = under_tls()
    with capture_events() as events:
        h.send(f"AUTH PLAIN {plain()}\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    [success] = events.named("auth.success")
    assert (success["account"], success["mechanism"]) == (ALICE, "PLAIN")
    assert PASSWORD not in json.dumps(events.records)
    assert plain() not in json.dumps(events.records)


def test_plain_with_an_empty_initial_challenge():
    h = under_tls()
    h.send("AUTH PLAIN\r\n")
    assert h.replies() == ["334 "]
    h.send(plain() + "\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]


def test_login_mechanism():
    h = under_tls()
    h.send("AUTH LOGIN\r\n")
    assert h.replies() == ["334 VXNlcm5hbWU6"]
    h.send(b64(ALICE) + "\r\n")
    assert h.replies() == ["334 UGFzc3dvcmQ6"]
    h.send(b64(PASSWORD) + "\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]


def test_login_with_initial_response_and_malformed_password():
    h = under_tls()
    h.send(f"AUTH LOGIN {b64(ALICE)}\r\n")
    assert h.replies() == ["334 UGFzc3dvcmQ6"]
    h.send("not base64!\r\n")
    assert h.replies() == ["501 5.5.2 Cannot decode response"]
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


def test_pipelined_commands_wait_for_a_slow_backend():
    accounts = FakeAccounts({ALICE: PASSWORD}, hold=True)
    h = under_tls(accounts=accounts)
    h.send(f"AUTH PLAIN {plain()}\r\nMAIL FROM:<{ALICE}>\r\n")
    assert h.replies() == []            # MAIL waits in the buffer for the AUTH's answer
    accounts.release()
    assert h.replies() == ["235 2.7.0 Authentication successful", "250 2.1.0 Sender ok"]


# -- OAuth2 over SMTP ----------------------------------------------------------------

ISSUER, AUDIENCE = "https://id.example.test", "mail.example.test"


@pytest.fixture
def oauth(tmp_path):
    verifier, key = oauth2_issuer(tmp_path, ISSUER, AUDIENCE)

    def token(signing_key=key, **claims):
        payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": time.time() + 600,
                   "email": ALICE, "email_verified": True, "scope": "x" * 600}     # long: past 512 octets
        payload.update(claims)
        return jwt.encode(payload, signing_key, algorithm="ES256", headers={"kid": "k1"})
    return verifier, token


def test_xoauth2_with_a_long_token(oauth):
    verifier, token = oauth
    h = under_tls(verifier=verifier)
    response = b64(f"user={ALICE}\x01auth=Bearer {token()}\x01\x01")
    assert len(response) > 1000
    h.send(f"AUTH XOAUTH2 {response}\r\n")
    assert h.replies() == ["235 2.7.0 Authentication successful"]
    assert h.protocol.session.auth_user == ALICE


def test_oauthbearer_expired_token(oauth):
    verifier, token = oauth
    h = under_tls(verifier=verifier)
    with capture_events() as events:
        h.send("AUTH OAUTHBEARER "
               + b64(f"n,a={ALICE},\x01auth=Bearer {token(exp=time.time() - 3600)}\x01\x01")
               + "\r\n")
        [challenge] = h.replies()
        assert challenge.startswith("334 ")
        assert json.loads(base64.b64decode(challenge[4:]))["status"] == "invalid_token"
        h.send(b64("\x01") + "\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]
    [failure] = events.named("auth.failure")
    assert failure["reason"] == "expired" and failure["mechanism"] == "OAUTHBEARER"
    assert "Bearer" not in json.dumps(events.records)


def test_xoauth2_wrongly_signed_token(oauth):
    verifier, token = oauth
    other = ec.generate_private_key(ec.SECP256R1())
    h = under_tls(verifier=verifier)
    h.send("AUTH XOAUTH2 " + b64(f"user={ALICE}\x01auth=Bearer {token(other)}\x01\x01")
           + "\r\n")
    assert h.replies()[0].startswith("334 ")
    h.send("\r\n")
    assert h.replies() == ["535 5.7.8 Authentication credentials invalid"]


# -- the submission policy ------------------------------------------------------------

def test_mail_before_auth():
    h = under_tls()
    h.send(f"MAIL FROM:<{ALICE}>\r\n")
    assert h.replies() == ["530 5.7.0 Authentication required"]


def test_mail_before_auth_even_in_the_clear():
    h = connect()
    h.send(f"EHLO c.test\r\nMAIL FROM:<{ALICE}>\r\n")
    assert last(h) == "530 5.7.0 Authentication required"


@pytest.mark.parametrize("sender,reply", [
    (ALICE, "250 2.1.0 Sender ok"),
    ("Alice+lists@EXAMPLE.test", "250 2.1.0 Sender ok"),
    ("postmaster@example.test", "250 2.1.0 Sender ok"),       # an alias of alice
    ("", "250 2.1.0 Sender ok"),
    ("bob@example.test", "553 5.7.1 Sender address not owned by the authenticated user"),
    ("alice@example.org", "553 5.7.1 Sender address not owned by the authenticated user"),
])
def test_mail_from_must_be_the_accounts(sender, reply):
    h = authenticated()
    h.send(f"MAIL FROM:<{sender}>\r\n")
    assert h.replies() == [reply]


def send_message(h, headers, rcpt="someone@remote.test"):
    h.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
    assert h.codes() == [250, 250, 354]
    h.send(headers + "\r\nHello.\r\n.\r\n")
    return h.replies()


def test_a_submitted_message_goes_anywhere_and_carries_the_user():
    h = authenticated()
    replies = send_message(h, f"From: Alice <{ALICE}>\r\nTo: x@remote.test\r\n")
    assert replies[0].startswith("250 2.0.0 Ok: queued as ")
    [(envelope, message)] = h.factory.queue.accepted
    assert envelope.auth_user == ALICE and envelope.listener == "submission"
    assert envelope.recipients == ["someone@remote.test"]
    assert b"with ESMTPSA" in message


def test_unknown_local_recipient_is_still_refused():
    h = authenticated()
    h.send(f"MAIL FROM:<{ALICE}>\r\nRCPT TO:<ghost@example.test>\r\n")
    assert h.replies()[-1] == "550 5.1.1 User unknown"


@pytest.mark.parametrize("headers", [
    "From: bob@example.test\r\n",
    "From: Alice <alice@example.test>, bob@example.test\r\n",
    f"From: {ALICE}\r\nFrom: bob@example.test\r\n",
    "From: \"alice@example.test\" <mallory@evil.test>\r\n",
    "From: alice@example.test <mallory@evil.test>\r\n",
])
def test_spoofed_from_header_is_refused_after_data(headers):
    h = authenticated()
    with capture_events() as events:
        replies = send_message(h, headers + "Subject: hi\r\n")
    assert replies == ["550 5.7.1 From: header address not owned by the authenticated user"]
    assert h.factory.queue.accepted == []
    assert events.named("smtp.message.rejected")[0]["code"] == 550
    h.send("NOOP\r\n")
    assert h.replies() == ["250 2.0.0 Ok"]


@pytest.mark.parametrize("headers", ["Subject: no from\r\n", "From: undisclosed:;\r\n"])
def test_a_message_without_from_address_is_refused(headers):
    h = authenticated()
    assert send_message(h, headers) == [
        "550 5.7.1 Message needs a From: header with an address"]


def test_from_header_may_use_an_alias_and_a_tag():
    h = authenticated()
    replies = send_message(h, "From: =?utf-8?q?J=C3=B6rg?= <postmaster@example.test>,\r\n"
                              " <ALICE+x@example.test>\r\n")
    assert replies[0].startswith("250 ")


def test_from_header_with_obsolete_but_harmless_syntax_is_fine():
    h = authenticated()
    assert send_message(h, f"From: A. Smith <{ALICE}>,\r\n")[0].startswith("250 ")


def test_from_addresses_parser():
    assert from_addresses(b"From: a@b.test\r\n\r\nFrom: c@d.test\r\n") == ["a@b.test"]
    assert from_addresses(b"\r\nFrom: a@b.test\r\n") == []
    assert from_addresses(b"Subject: x\r\n") == []
    with pytest.raises(AmbiguousFrom):
        from_addresses(b"From: a@b.test <m@evil.test>\r\n")

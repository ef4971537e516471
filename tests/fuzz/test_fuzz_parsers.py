"""Fuzz the parsers: each takes hostile input and answers, or refuses with its own error.

Targets: SMTP paths (``appliance.address``), IMAP command syntax (tokenizer,
FETCH items, SEARCH keys), MIME structure (BODYSTRUCTURE, ENVELOPE, sections),
the From: parse, SASL responses and mechanisms, DKIM verification, and the
config loader. ``guard`` (conftest) holds the no-traceback, time and memory
bounds; any exception but the parser's own refusal fails.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.python.failure import Failure

from appliance import config as config_module
from appliance.access.imap import mime as imapmime
from appliance.access.imap.search import Query, UnknownCharset
from appliance.access.imap.syntax import SyntaxError_, parse_fetch_items, tokenize
from appliance.address import AddressError, parse_path
from appliance.auth.accounts import BackendUnavailable, BadCredentials
from appliance.auth.sasl import Mechanisms, SASLError, decode_response
from appliance.message import AmbiguousFrom, from_addresses
from appliance.policy.dkim_verify import verify_signatures
from appliance.testing import FakeAccounts

# Parsers are cheap: five times the profile's inputs each.
more = settings(max_examples=settings.default.max_examples * 5)

ALPHABET = b" \t\r\n()<>[]{}\"\\@:;,.%*=?+-/~!#$&'|^_`0123456789AZaz\x00\x7f\x80\xff"


def chunks(pieces, max_size=40):
    """Bytes built from ``pieces`` and random characters of ``ALPHABET``."""
    return st.lists(st.one_of(st.sampled_from(pieces),
                              st.binary(max_size=4),
                              st.lists(st.sampled_from(list(ALPHABET)), max_size=8).map(bytes)),
                    max_size=max_size).map(b"".join)


# -- SMTP paths -------------------------------------------------------------------------

PATH_PIECES = [b"<", b">", b"@", b"a", b"example.test", b"[127.0.0.1]", b"[IPv6:::1]",
               b"\"q uo\\\"te\"", b"@relay.test,@other.test:", b"postmaster", b"xn--bcher-kva",
               b"b\xc3\xbccher", b".", b"..", b"-", b"a" * 70, b"<>", b" "]


@more
@given(chunks(PATH_PIECES), st.booleans(), st.booleans(), st.booleans())
def test_fuzz_smtp_path(guard, text, null, utf8, postmaster):
    with guard.check("parse_path"):
        for value in (text.decode("utf-8", "replace"), text.decode("latin-1")):
            try:
                parse_path(value, allow_null=null, allow_utf8=utf8, allow_postmaster=postmaster)
            except AddressError:
                pass


# -- IMAP command syntax ----------------------------------------------------------------

IMAP_PIECES = [b"(", b")", b"[", b"]", b"<", b">", b"\"", b"\\", b"{3}", b"{0}", b" ", b"1:*",
               b"*", b"BODY", b"BODY.PEEK", b"HEADER.FIELDS", b"(FROM TO)", b"TEXT", b"MIME",
               b"1.2.3", b"<0.10>", b"FLAGS", b"OR", b"NOT", b"UID", b"ALL", b"SINCE",
               b"1-Jan-2024", b"CHARSET", b"UTF-8", b"KEYWORD", b"HEADER", b"LARGER", b"NIL"]


@more
@given(chunks(IMAP_PIECES, 60), st.lists(st.integers(1, 50), unique=True, max_size=20))
def test_fuzz_imap_syntax(guard, line, uids):
    with guard.check("IMAP syntax"):
        try:
            tokens = tokenize([line])
        except SyntaxError_:
            return
        try:
            parse_fetch_items(tokens)
        except SyntaxError_:
            pass
        try:
            Query(tokens, sorted(uids))
        except (SyntaxError_, UnknownCharset):
            pass


# -- MIME structure -----------------------------------------------------------------------

MIME_PIECES = [b"Content-Type: multipart/mixed; boundary=\"b\"\r\n",
               b"Content-Type: message/rfc822\r\n", b"Content-Type: text/plain; charset=x\r\n",
               b"Content-Type: multipart/digest; boundary=b\r\n",
               b"Content-Type: ;;;=\"\r\n", b"Content-Transfer-Encoding: base64\r\n",
               b"Content-Disposition: attachment; filename*=utf-8''%e2\r\n",
               b"From: \"A\" <a@b.c>, (c) d@e.f\r\n", b"To: undisclosed:;\r\n",
               b"Subject: =?utf-8?b?w6k=?=\r\n", b"\r\n", b"--b\r\n", b"--b--\r\n", b"body\r\n",
               b" folded\r\n", b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\n", b"\n", b"\r"]


@more
@given(chunks(MIME_PIECES, 50))
def test_fuzz_mime_structure(guard, raw):
    with guard.check("MIME"):
        root = imapmime.Part(raw)
        imapmime.body_structure(root, True)
        imapmime.body_structure(root, False)
        imapmime.envelope(root.headers)
        for numbers in ((), (1,), (1, 1), (2, 1, 3)):
            for kind in ("", "HEADER", "TEXT", "MIME", "HEADER.FIELDS"):
                imapmime.section(root, numbers, kind, (b"FROM",))


# -- the From: parse and DKIM verification ----------------------------------------------

HEADER_PIECES = MIME_PIECES + [b"From: ", b"FROM : ", b"from:", b"(", b")", b"<", b">",
                               b"a@example.test", b",", b"DKIM-Signature: v=1; a=rsa-sha256; "
                               b"d=example.test; s=s; h=from; bh=AAAA; b=AAAA\r\n",
                               b"; l=1", b"; c=relaxed/simple", b"\t", b"    "]


class NoKeys:
    """Lookups with no key anywhere and all the time in the world."""

    def txt(self, name):
        return []

    def remaining(self):
        return 60.0


@more
@given(chunks(HEADER_PIECES, 50))
def test_fuzz_from_and_dkim(guard, message):
    with guard.check("From/DKIM"):
        try:
            from_addresses(message)
        except AmbiguousFrom:
            pass
        results, skipped = verify_signatures(message, NoKeys())
        assert all(r.result in ("pass", "fail", "permerror", "temperror") for r in results)


# -- SASL -----------------------------------------------------------------------------------

@more
@given(st.sampled_from(["PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER", "CRAM-MD5", "plain", ""]),
       st.lists(st.one_of(st.binary(max_size=60), st.sampled_from(
           [b"*", b"=", b"AGFsaWNlQGV4YW1wbGUudGVzdABwdw==", b"YQ==", b"!!", b"\x00"])),
           max_size=4))
def test_fuzz_sasl(guard, name, responses):
    accounts = FakeAccounts({"alice@example.test": "pw"})
    with guard.check("SASL"):
        mechanism = Mechanisms(accounts).create(name)
        for response in responses:
            try:
                decoded = decode_response(response)
            except SASLError:
                continue
            if mechanism is None:
                continue
            outcome = []
            defer.maybeDeferred(mechanism.step, decoded).addBoth(outcome.append)
            if outcome and isinstance(outcome[0], Failure):
                # Refused: the exchange's own errors or the accounts' verdict, not a crash.
                assert outcome[0].check(SASLError, BadCredentials, BackendUnavailable), \
                    outcome[0].getTraceback()
                break


# -- the config loader ----------------------------------------------------------------------

CONFIG_PIECES = [b"[server]\n", b"[listen]\n", b"[limits]\n", b"[dkim]\n", b"[checks]\n",
                 b"hostname = mail.example.test\n", b"domains = example.test, \n",
                 b"max_message_size = 25M\n", b"max_message_size = -1\n", b"= x\n",
                 b"mx = 127.0.0.1:25\n", b"mx = [::1]:99999\n", b"spf = enforce\n",
                 b"timeout = 1e999\n", b"max_errors = 0x10\n", b"%(x)s\n", b"[\n", b"]\n",
                 b"data_dir = relative\n", b"\xff\n", b"  continued\n", b"# c\n", b";\n"]


@more
@given(chunks(CONFIG_PIECES, 30))
def test_fuzz_config_loader(guard, text):
    with guard.check("config"):
        try:
            config_module.parse(text.decode("utf-8", "replace"), base_dir="/nonexistent/fuzz")
        except config_module.ConfigError as exc:
            assert exc.problems and all(isinstance(p, str) and "\n" not in p
                                        for p in exc.problems), exc.problems

"""appliance.address: RFC 5321 paths and the canonical lookup form."""

import pytest
from twisted.mail import smtp as stock_smtp

from appliance.address import (
    AddressError, NULL_PATH, Path, canonical, canonical_domain, dns_name, parse_path,
    quote_local, smtp_path, split_path)


def test_plain_path():
    assert parse_path("<Alice@Example.TEST>") == Path("Alice", "Example.TEST")


def test_quoted_local_part_is_unquoted():
    """T18: stock ``Address.dequote`` fails on Python 3, so quoted local parts
    keep their quotes (``Address(b'"a b"@x').local == b'"a b"'``) and a lookup
    of ``"alice"@example.test`` misses alice. We decode the quoted-string."""
    assert stock_smtp.Address(b'"alice"@example.test').local == b'"alice"'  # the trap
    assert parse_path('<"alice"@example.test>').canonical() == "alice@example.test"
    assert parse_path('<"a b"@x.test>').local == "a b"
    assert parse_path(r'<"a\"b\\c"@x.test>').local == 'a"b\\c'


def test_source_route_is_stripped():
    assert parse_path("<@relay1.test,@relay2.test:u@d.test>") == Path("u", "d.test")


@pytest.mark.parametrize("text", [
    "<@relay1.test:@x:u@d.test>", "<@:u@d.test>", "<@relay1.test u@d.test>",
])
def test_malformed_source_route_refused(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_null_path_only_where_allowed():
    assert parse_path("<>", allow_null=True) is NULL_PATH
    assert NULL_PATH.is_null and NULL_PATH.canonical() == "" and str(NULL_PATH) == ""
    with pytest.raises(AddressError):
        parse_path("<>")


def test_postmaster_without_domain_only_where_allowed():
    assert parse_path("<Postmaster>", allow_postmaster=True) == Path("postmaster", "")
    with pytest.raises(AddressError):
        parse_path("<postmaster>")


@pytest.mark.parametrize("text", [
    "alice@example.test", "<alice@example.test", "<alice>", "<alice@>", "<@example.test>",
    "<a..b@x.test>", "<.a@x.test>", "<a.@x.test>", "<a b@x.test>", "<a@b@x.test>",
    "<a@-x.test>", "<a@x-.test>", "<a@x..test>", "<a@x.test.>", '<"a@x.test>',
    '<"a"b@x.test>', "<a@[1.2.3.999]>", "<a@[foo:bar]>", "<a@[IPv6:zz::1]>",
    "<a\x00b@x.test>", '<"a\tb"@x.test>', "<a@x_y.test>",
])
def test_malformed_paths_refused(text):
    with pytest.raises(AddressError) as caught:
        parse_path(text)
    assert caught.value.kind == "syntax"


def test_address_literals():
    assert parse_path("<u@[192.0.2.1]>").domain == "[192.0.2.1]"
    assert parse_path("<u@[IPv6:2001:DB8::1]>").canonical() == "u@[ipv6:2001:db8::1]"


def test_length_limits():
    """T16: RFC 5321 §4.5.3.1: local part 64, domain 255, path 256 octets."""
    assert parse_path(f"<{'a' * 64}@x.test>").local == "a" * 64
    with pytest.raises(AddressError) as caught:
        parse_path(f"<{'a' * 65}@x.test>")
    assert caught.value.kind == "too_long"
    long_domain = ".".join(["d" * 60] * 4) + ".test"            # 249 octets
    assert parse_path(f"<a@{long_domain}>").domain == long_domain
    with pytest.raises(AddressError) as caught:
        parse_path(f"<{'a' * 10}@{long_domain}>")               # 262-octet path
    assert caught.value.kind == "too_long"


def test_non_ascii_needs_smtputf8():
    with pytest.raises(AddressError) as caught:
        parse_path("<jörg@example.test>")
    assert caught.value.kind == "non_ascii"
    path = parse_path("<Jörg@Bücher.example>", allow_utf8=True)
    assert path.canonical() == "jörg@bücher.example"


def test_non_ascii_control_characters_refused_even_with_smtputf8():
    with pytest.raises(AddressError):
        parse_path("<a\u0085b@x.test>", allow_utf8=True)
    with pytest.raises(AddressError):       # an undecodable byte, surrogate-escaped
        parse_path("<a\udcffb@x.test>", allow_utf8=True)


def test_canonical_forms():
    assert canonical("Alice@Example.TEST") == "alice@example.test"
    assert canonical('"Alice"@example.test.') == "alice@example.test"
    assert canonical('"a b"@x.test') == "a b@x.test"
    assert canonical("<Bob@X.test>") == "bob@x.test"
    assert canonical("@Example.TEST") == "@example.test"        # a catch-all key
    assert canonical("") == "" and canonical("<>") == ""
    assert canonical("u@XN--BCHER-KVA.example") == "u@bücher.example"
    assert canonical("u@Bücher.Example") == "u@bücher.example"


def test_canonical_refuses_what_it_cannot_decode():
    with pytest.raises(AddressError):
        canonical('"unterminated@x.test')
    with pytest.raises(AddressError):
        canonical_domain("xn--ü.test")


def test_quote_local_and_smtp_path_round_trip():
    assert quote_local("alice.smith") == "alice.smith"
    assert quote_local("a b") == '"a b"'
    assert quote_local('a"b') == '"a\\"b"'
    assert smtp_path("a b@x.test") == '<"a b"@x.test>'
    assert smtp_path("") == "<>"
    for local in ("a b", 'a"b', "a\\b", "plain"):
        assert parse_path(smtp_path(f"{local}@x.test")).local == local


def test_split_path_respects_quotes():
    assert split_path('<"a>b"@x.test> SIZE=10') == ('<"a>b"@x.test>', " SIZE=10")
    with pytest.raises(AddressError):
        split_path("<a@x.test")
    with pytest.raises(AddressError):
        split_path("a@x.test>")


@pytest.mark.parametrize("given, expected", [
    ("Example.TEST.", "example.test"),
    (" mail.example.test ", "mail.example.test"),
    ("bücher.example", "xn--bcher-kva.example"),
    ("_dmarc.example.test", "_dmarc.example.test"),
    ("localhost", None),                    # one label: no host name to report
    ("bad;name.example", None),
    ("a..b.example", None),                 # IDNA refuses an empty label
    ("x" * 300 + ".test", None),            # a label over 63 octets
])
def test_dns_name(given, expected):
    assert dns_name(given) == expected

"""The From: parse is bounded: a few fields, a few KiB, no exception escapes."""

import pytest

from appliance.headers import values_of
from appliance.message import MAX_FROM_FIELDS, MAX_FROM_OCTETS, AmbiguousFrom, from_addresses


def message(*fields):
    return b"".join(f + b"\r\n" for f in fields) + b"Subject: x\r\n\r\nbody\r\n"


def test_from_fields_are_found_with_their_folding():
    head = b"To: x@y.z\r\nFROM : a@b.c\r\n (comment)\r\nSubject: s\r\nfrom:d@e.f\r\n"
    assert values_of(head, b"from", loose=True) == [b"a@b.c (comment)", b"d@e.f"]


def test_up_to_the_limit_every_from_is_read():
    fields = [b"From: u%d@example.test" % n for n in range(MAX_FROM_FIELDS)]
    assert from_addresses(message(*fields)) == [
        "u%d@example.test" % n for n in range(MAX_FROM_FIELDS)]


@pytest.mark.parametrize("fields", [
    [b"From: a@example.test"] * (MAX_FROM_FIELDS + 1),
    [b"From: " + b"a@example.test, " * (MAX_FROM_OCTETS // 16) + b"b@example.test"],
])
def test_over_the_limit_is_ambiguous(fields):
    with pytest.raises(AmbiguousFrom):
        from_addresses(message(*fields))


@pytest.mark.parametrize("value", [
    b"(" * 900 + b"x" + b")" * 900 + b" a@example.test",    # RecursionError in the parser
    b"<" * 1500 + b"a@example.test",
    b"g:" * 600 + b"a@example.test",
])
def test_hostile_nesting_is_ambiguous_or_read_never_an_exception(value):
    # Found while timing the bounded parse: the email package recurses per
    # nesting level and raised RecursionError out of the submission check.
    # The address parser (appliance.headers) reads comments without
    # recursion: the answer is the address or AmbiguousFrom, nothing else.
    try:
        assert from_addresses(message(b"From: " + value)) == ["a@example.test"]
    except AmbiguousFrom:
        pass

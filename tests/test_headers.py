"""appliance.headers: the everyday-address fast path gives what the parser gives."""

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.headers import AddressList, Mailbox, _Parser, _simple_list, parse_addresses

ATOMS = st.sampled_from(["a", "bob", "sender-17", "x.y", "=?utf-8?q?J=C3=B6rg?=", "o'neil",
                         "team+tag", "1", "é", "a=?b", "=?x?q?y?="])
PIECES = st.sampled_from([" ", "  ", "\t", ",", ", ", "<", ">", "@", ".", "\"", "\\", "(",
                          ")", ":", ";", "[", "]", "example.org", "\r\n ", ""])


@settings(max_examples=1500)
@given(st.lists(st.one_of(ATOMS, PIECES), max_size=14).map("".join))
def test_fast_path_agrees_with_the_parser(value):
    fast = _simple_list(value)
    if fast is not None:
        assert fast == _Parser(value).address_list()
    assert parse_addresses(value) == _Parser(value).address_list()


@given(st.lists(st.tuples(st.one_of(st.none(), st.sampled_from(["Sender 17", "Al", "\"A, B\"",
                                                                 "\"\"", "x y z"])),
                          st.sampled_from(["a@b", "sender-17@example.org", "x.y@z.w"])),
                min_size=1, max_size=4),
       st.sampled_from([",", ", ", " ,  "]))
def test_everyday_lists_take_the_fast_path(pairs, separator):
    value = separator.join(address if name is None else f"{name} <{address}>"
                           for name, address in pairs)
    fast = _simple_list(value)
    assert fast is not None
    assert fast == _Parser(value).address_list()
    assert not fast.defects


def test_fast_path_results():
    assert parse_addresses(b'Sender 17 <sender-17@example.org>, "A, B" <a@b.c>, d@e') == \
        AddressList((Mailbox("Sender 17", "sender-17", "example.org"), Mailbox("A, B", "a", "b.c"),
                     Mailbox(None, "d", "e")), ())


def test_what_the_fast_path_leaves_to_the_parser():
    for value in ("a@b,", "a@b,,c@d", "Sender\t17 <a@b>", "a@b (Bob)", "Group: a@b;",
                  "<a@b>", "=?utf-8?q?bob?=@example.test", "bob@=?x?q?y?=", "\"a\\\"b\" <c@d>",
                  "é <a@b>", "", "a.@b", "a@b.", "a@b <c@d>"):
        assert _simple_list(value) is None, value
        assert parse_addresses(value) == _Parser(value).address_list()

"""LIST/LSUB patterns: the same answers as the old regular expression, in linear time."""

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.access.imap.mailbox import matching_folders
from appliance.access.imap.listmatch import Pattern


def regex_for(text, flags=0):
    """The old translation: * is .*, % is [^.]*."""
    out = "".join(".*" if c == "*" else "[^.]*" if c == "%" else re.escape(c) for c in text)
    return re.compile(out + r"\Z", re.S | flags)


@settings(max_examples=600, deadline=None)
@given(st.text(alphabet="ab.*%A", max_size=10), st.text(alphabet="ab.A", max_size=12))
def test_pattern_matches_as_the_regex_did(pattern, name):
    assert Pattern(pattern).match(name) == bool(regex_for(pattern).match(name))
    assert Pattern(pattern, fold_case=True).match(name) == bool(
        regex_for(pattern, re.I).match(name))


def test_list_examples():
    names = ["INBOX", "Sent", "Archive.2024", "Archive.2024.Q1", "Archive.2025"]
    found = [name for name, _ in matching_folders(names, "", "Archive.%")]
    assert found == ["Archive.2024", "Archive.2025"]
    found = [name for name, _ in matching_folders(names, "Archive.", "*")]
    assert found == ["Archive.2024", "Archive.2024.Q1", "Archive.2025"]
    assert [n for n, _ in matching_folders(names, "", "inbox")] == ["INBOX"]
    assert [n for n, _ in matching_folders(names, "", "sent")] == []
    assert [n for n, _ in matching_folders(names, "", "%")] == [
        "INBOX", "Archive", "Sent"]

"""appliance.policy.psl: the Public Suffix List fallback read from a file
(Debian's publicsuffix package), used when publicsuffixlist is missing."""

import os
import re

import pytest

from appliance.policy import psl

LIST = """\
// a comment
com
uk
co.uk
*.ck
!www.ck
*.kawasaki.jp
!city.kawasaki.jp
jp
\u516c\u53f8.cn
cn
github.io    trailing words are ignored
"""


@pytest.fixture
def small(tmp_path):
    path = tmp_path / "list.dat"
    path.write_text(LIST, encoding="utf-8")
    return psl.PublicSuffixList(str(path))


@pytest.mark.parametrize("domain, expected", [
    ("com", None),
    ("example.com", "example.com"),
    ("a.b.Example.COM", "example.com"),
    ("example.co.uk", "example.co.uk"),
    ("mail.example.co.uk", "example.co.uk"),
    ("co.uk", None),
    ("ck", None),
    ("test.ck", None),                      # *.ck: test.ck is a public suffix
    ("b.test.ck", "b.test.ck"),
    ("www.ck", "www.ck"),                   # !www.ck: the exception wins
    ("a.www.ck", "www.ck"),
    ("a.b.kawasaki.jp", "a.b.kawasaki.jp"),
    ("city.kawasaki.jp", "city.kawasaki.jp"),
    ("x.city.kawasaki.jp", "city.kawasaki.jp"),
    ("example", None),                      # the default rule "*"
    ("b.example.example", "example.example"),
    ("x.user.github.io", "user.github.io"),
    ("shishi.\u516c\u53f8.cn", "shishi.\u516c\u53f8.cn"),
    ("shishi.xn--55qx5d.cn", "shishi.xn--55qx5d.cn"),   # the same rule, A-label form
    ("xn--55qx5d.cn", None),
    (".example.com", None),
    ("a..example.com", None),
])
def test_rules(small, domain, expected):
    assert small.privatesuffix(domain) == expected


_CHECK = re.compile(r"^checkPublicSuffix\('([^']*)', (?:'([^']*)'|null)\);", re.M)
VECTORS = "/usr/share/doc/publicsuffix/examples/test_psl.txt"


@pytest.mark.skipif(not (os.path.exists(VECTORS) and os.path.exists(psl.DEFAULT_PATH)),
                    reason="Debian's publicsuffix package is not installed")
def test_debian_list_passes_the_official_vectors():
    """The list's own test file (shipped by Debian's publicsuffix package)."""
    with open(VECTORS, encoding="utf-8") as handle:
        cases = _CHECK.findall(handle.read())
    assert len(cases) > 50
    suffixes = psl.PublicSuffixList()
    for domain, expected in cases:
        got = suffixes.privatesuffix(domain)
        assert got == (expected.lower() or None), domain

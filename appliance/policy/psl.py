"""The Public Suffix List read from a local file: the fallback when the
``publicsuffixlist`` module is not installed.

Debian 12 has no python3-publicsuffixlist; its ``publicsuffix`` package keeps
the list current in ``/usr/share/publicsuffix/public_suffix_list.dat``, and
the Debian package of mailappliance depends on it. Only what DMARC needs is
here: ``privatesuffix`` (the registrable domain), with the list's normal,
wildcard (``*.ck``) and exception (``!www.ck``) rules and its default rule
``*`` (an unlisted TLD is a public suffix), as publicsuffix.org describes.
"""

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"


def _forms(name):
    """The rule as written and, for an IDN rule, its A-label (xn--) form."""
    yield name
    try:
        ascii_name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return
    if ascii_name != name:
        yield ascii_name


class PublicSuffixList:
    """The subset of ``publicsuffixlist.PublicSuffixList`` that DMARC uses."""

    def __init__(self, path=DEFAULT_PATH):
        self._rules, self._wildcards, self._exceptions = set(), set(), set()
        with open(path, encoding="utf-8") as source:
            for line in source:
                words = line.split()
                if not words or words[0].startswith("//"):
                    continue
                rule = words[0].lower()
                if rule.startswith("!"):
                    target, rule = self._exceptions, rule[1:]
                elif rule.startswith("*."):
                    target, rule = self._wildcards, rule[2:]
                else:
                    target = self._rules
                target.update(_forms(rule))

    def _suffix_labels(self, labels):
        """How many trailing labels of ``labels`` the public suffix has."""
        count = len(labels)
        for start in range(count):
            if ".".join(labels[start:]) in self._exceptions:
                return count - start - 1
        for start in range(count):
            name = ".".join(labels[start:])
            if start > 0 and name in self._wildcards:
                return count - start + 1
            if name in self._rules:
                return count - start
        return 1

    def privatesuffix(self, domain):
        """The registrable domain (public suffix plus one label), or None when
        ``domain`` is itself a public suffix or not a domain name."""
        labels = domain.lower().split(".")
        if not all(labels):
            return None
        suffix = self._suffix_labels(labels)
        if len(labels) <= suffix:
            return None
        return ".".join(labels[-suffix - 1:])

"""LIST and LSUB patterns (RFC 3501 §6.3.8) matched in linear time.

``*`` matches anything, ``%`` anything but the hierarchy delimiter. A regular
expression built from the pattern (``.*`` per ``*``) backtracks: ``*a*a*a*b``
against a 200-character name took seconds on the reactor, longer patterns
hours. Here the pattern is a small automaton run over the name once, all its
states at a time as the bits of one integer: each character of the name
costs a few integer operations on a number of ``len(pattern)`` bits.
"""

from appliance.access.folders import DELIMITER


class Pattern:
    """One LIST pattern (``ref`` and ``wildcard`` already joined)."""

    def __init__(self, text, fold_case=False):
        if fold_case:
            text = text.lower()
        self.fold_case = fold_case
        tokens = []
        for char in text:
            # Runs of wildcards are one: ** is *, %% is %, and *% or %* is *.
            if char in "*%" and tokens and tokens[-1] in "*%":
                tokens[-1] = "*" if "*" in (char, tokens[-1]) else "%"
                continue
            tokens.append(char)
        self.size = len(tokens)
        self.literal = {}       # char -> bits of the states expecting it
        self.star = self.percent = 0
        for position, token in enumerate(tokens):
            bit = 1 << position
            if token == "*":
                self.star |= bit
            elif token == "%":
                self.percent |= bit
            else:
                self.literal[token] = self.literal.get(token, 0) | bit
        self.wild = self.star | self.percent
        self.start = self._closure(1)
        self.accept = 1 << self.size

    def _closure(self, states):
        # A wildcard may match nothing; no two wildcards are adjacent.
        return states | ((states & self.wild) << 1)

    def match(self, name):
        """True when the whole of ``name`` matches."""
        if self.fold_case:
            name = name.lower()
        states = self.start
        for char in name:
            moved = ((states & self.literal.get(char, 0)) << 1) | (states & self.star)
            if char != DELIMITER:
                moved |= states & self.percent
            states = self._closure(moved)
            if not states:
                return False
        return bool(states & self.accept)

"""Junk commands: NOOP, RSET, VRFY, HELP and duplicate RCPT that keep a
session open without moving mail. More than ``[limits] junk_commands`` in
one session is 421 and the end of it (SPEC §3); one counter per session."""

from appliance import events
from appliance.defence import authfail  # noqa: F401  (registers defence.limit)

JUNK_VERBS = frozenset({"NOOP", "RSET", "VRFY", "HELP"})


class JunkCounter:
    """``count()`` once per junk command; True when the session is over the
    limit and must be closed (the event is emitted once, then)."""

    __slots__ = ("limit", "count_so_far", "key")

    def __init__(self, limit, key=""):
        self.limit = limit
        self.count_so_far = 0
        self.key = key

    def count(self):
        self.count_so_far += 1
        if self.count_so_far == self.limit + 1:
            events.emit("defence.limit", kind="junk_commands", key=self.key,
                        count=self.count_so_far, limit=self.limit)
        return self.count_so_far > self.limit

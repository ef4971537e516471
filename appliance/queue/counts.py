"""The queue's counts for ``status``, kept as the spool changes: O(1) to read.

``QueueCounts`` holds how many messages the spool has, how many are held,
how many have a deferred recipient, and (a heap of received times with lazy
removal) the oldest message's time. The spool (``appliance.queue.store``)
tells it each change in the one place each happens:

- an entry joins (accepted, or found by the recovery scan) -> ``add``;
- an entry's recipients or flags changed (``Spool.update``: deferred,
  delivered, bounced, held, released) -> ``changed``;
- an entry leaves (removed, or retired by its commit) -> ``removed``.

Each entry remembers what it counts as (``SpoolEntry.counted``: ``(held,
deferred)``), so a change costs the entry's own recipients, never the
queue's. After a restart the recovery scan classifies every entry on the
writer's thread (``classify_all``) and the reactor only adds the totals.
"""

import heapq

from appliance.envelope import DEFERRED

REBUILD_SLACK = 1024        # stale heap items tolerated beyond the live ones


def kind_of(entry):
    """``(held, deferred)`` of a spool entry: on hold; a recipient deferred."""
    deferred = any(st["state"] == DEFERRED for st in entry.recipients.values())
    return bool(entry.flags.get("held")), deferred


def classify_all(entries):
    """Mark each entry with its kind and total them (any thread: the entries
    are nobody else's yet). ``Totals`` for ``QueueCounts.merge``."""
    totals = Totals()
    for entry in entries:
        kind = entry.counted = kind_of(entry)
        totals.messages += 1
        totals.held += kind[0]
        totals.deferred += kind[1]
        totals.ages.append((entry.envelope.received_at, entry.queue_id))
    heapq.heapify(totals.ages)
    return totals


class Totals:
    def __init__(self):
        self.messages = self.held = self.deferred = 0
        self.ages = []


class QueueCounts:
    """See the module docstring. ``live(received_at, qid)`` says whether
    that message is still in the spool (the oldest-time heap's lazy removal)."""

    def __init__(self, live):
        self._live = live
        self.messages = 0
        self.held = 0
        self.deferred = 0
        self._ages = []         # heap of (received_at, queue id), stale items included

    def add(self, entry):
        kind = entry.counted = kind_of(entry)
        self.messages += 1
        self.held += kind[0]
        self.deferred += kind[1]
        heapq.heappush(self._ages, (entry.envelope.received_at, entry.queue_id))

    def merge(self, totals):
        """Add entries ``classify_all`` counted (their ``counted`` is set)."""
        self.messages += totals.messages
        self.held += totals.held
        self.deferred += totals.deferred
        if self._ages:
            self._ages.extend(totals.ages)
            heapq.heapify(self._ages)
        else:
            self._ages = totals.ages

    def changed(self, entry):
        old = entry.counted
        if old is None:
            return
        new = entry.counted = kind_of(entry)
        if new != old:
            self.held += new[0] - old[0]
            self.deferred += new[1] - old[1]

    def removed(self, entry):
        old = entry.counted
        if old is None:
            return
        entry.counted = None
        self.messages -= 1
        self.held -= old[0]
        self.deferred -= old[1]
        if len(self._ages) > 2 * self.messages + REBUILD_SLACK:
            self._ages = [item for item in self._ages if self._live(*item)]
            heapq.heapify(self._ages)

    def oldest(self):
        """The received time of the oldest message in the spool, or None."""
        ages = self._ages
        while ages and not self._live(*ages[0]):
            heapq.heappop(ages)
        return ages[0][0] if ages else None

    def snapshot(self, now):
        oldest = self.oldest()
        return {"messages": self.messages, "held": self.held, "deferred": self.deferred,
                "oldest_age": 0.0 if oldest is None else max(0.0, now - oldest)}

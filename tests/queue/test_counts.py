"""The queue's counts for ``status`` (appliance.queue.counts): kept by the
spool as entries are accepted, deferred, held, released, delivered and
removed; equal at every step to a recount of the whole spool; counted once
on the writer's thread after a restart."""

import threading

from twisted.internet import defer, task

from appliance.durable.commit import GroupCommitWriter
from appliance.envelope import DEFERRED, DELIVERED, FAILED, Envelope
from appliance.queue import counts as countsmod
from appliance.queue.store import Spool
from appliance.testing import thread_recorder, value_of
from appliance.threads import synchronous_runner

MESSAGE = b"Subject: hi\r\n\r\nbody\r\n"


def make_spool(directory, clock, runner=synchronous_runner):
    return Spool(str(directory), GroupCommitWriter(runner, None), synchronous_runner, clock)


def qid(n):
    return f"0005f1e2d3c4b5a6{n:08x}"


def accept(spool, n, received_at, recipients=("bob@example.test", "x@remote.example"),
           held=False):
    envelope = Envelope(queue_id=qid(n), sender="alice@example.org",
                        recipients=list(recipients), received_at=received_at)
    return value_of(spool.accept(envelope, MESSAGE, held=held))


def recount(spool):
    """What the old ``status`` did: every entry looked at."""
    entries = [spool.get(q) for q in spool.queue_ids()]
    oldest = min((e.envelope.received_at for e in entries), default=None)
    return {"messages": len(entries),
            "held": sum(1 for e in entries if e.flags.get("held")),
            "deferred": sum(1 for e in entries
                            if any(st["state"] == DEFERRED for st in e.recipients.values())),
            "oldest_age": 0.0 if oldest is None else max(0.0, spool.clock.seconds() - oldest)}


def test_counts_follow_every_change_and_equal_a_recount(tmp_path):
    clock = task.Clock()
    clock.advance(5000)
    spool = make_spool(tmp_path / "queue", clock)
    steps = []

    def check():
        assert spool.totals() == recount(spool)
        steps.append(spool.totals())
    check()
    accept(spool, 1, 4000.0)
    accept(spool, 2, 3000.0)
    accept(spool, 3, 4500.0, held=True)
    check()
    value_of(spool.update(qid(1), {"x@remote.example": {"state": DEFERRED}}))
    value_of(spool.update(qid(1), {"bob@example.test": {"state": DEFERRED}}))   # still one
    check()
    value_of(spool.update(qid(2), {}, flags={"held": True}))
    value_of(spool.update(qid(3), {}, flags={"held": False}))
    check()
    value_of(spool.update(qid(1), {"x@remote.example": {"state": DELIVERED},
                                   "bob@example.test": {"state": FAILED}}))     # bounced
    check()
    value_of(spool.remove(qid(2)))          # the oldest leaves
    check()
    spool.forget(qid(3))                    # retired by its commit
    value_of(spool.remove(qid(1)))
    check()
    assert [s["messages"] for s in steps] == [0, 3, 3, 3, 3, 2, 0]
    assert [s["held"] for s in steps] == [0, 1, 1, 1, 1, 0, 0]
    assert [s["deferred"] for s in steps] == [0, 0, 1, 1, 0, 0, 0]
    assert [s["oldest_age"] for s in steps] == [0.0, 2000.0, 2000.0, 2000.0, 2000.0,
                                                1000.0, 0.0]


def test_a_restart_counts_once_on_the_writers_thread(tmp_path, monkeypatch):
    clock = task.Clock()
    clock.advance(10000)
    first = make_spool(tmp_path / "queue", clock)
    for n in range(20):
        accept(first, n, 1000.0 + n, held=n % 5 == 0)
        if n % 3 == 0:
            value_of(first.update(qid(n), {"x@remote.example": {"state": DEFERRED}}))
    expected = recount(first)

    recording, threads = thread_recorder(countsmod.kind_of)
    monkeypatch.setattr(countsmod, "kind_of", recording)

    def in_a_thread(f, *args):
        """The writer's pool: the plan runs on another thread."""
        box = []
        worker = threading.Thread(target=lambda: box.append(defer.maybeDeferred(f, *args)))
        worker.start()
        worker.join(30)
        return box[0]
    second = make_spool(tmp_path / "queue", clock, runner=in_a_thread)
    assert len(value_of(second.recover())) == 20
    assert second.totals() == expected
    assert expected["messages"] == 20 and expected["held"] == 4 and expected["deferred"] == 7
    assert len(threads) == 20 and threading.current_thread() not in threads
    assert value_of(second.recover()) == []     # a second scan adds nothing
    assert second.totals() == expected


def test_the_oldest_time_heap_stays_bounded(tmp_path):
    clock = task.Clock()
    clock.advance(100000)
    spool = make_spool(tmp_path / "queue", clock)
    accept(spool, 0, 1.0)                   # stays all along: the oldest
    for n in range(1, 1200):
        accept(spool, n, 1.0 + n)
        value_of(spool.remove(qid(n)))
        assert len(spool.counts._ages) <= 2 * spool.counts.messages + \
            countsmod.REBUILD_SLACK + 1
    assert spool.totals() == recount(spool) == {
        "messages": 1, "held": 0, "deferred": 0, "oldest_age": 99999.0}

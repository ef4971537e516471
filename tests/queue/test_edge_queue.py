"""The queue runner on an edge (SPEC §7): the local domains take the MAILBOX
route through the remote delivery (one transaction per kind and domain),
nothing goes to a Maildir, aliases travel unexpanded to the mailbox host, and
a mailbox host that is down means retries with backoff, never a loss."""

import os

from appliance.config import HostPort
from appliance.deliver.routes import MAILBOX, REMOTE, Routing
from appliance.envelope import DEFERRED
from appliance.testing import capture_events

from test_queue_manager import Env

MAILBOX_HOST = HostPort("mailbox.example.test", 25)


def edge_env(tmp_path):
    env = Env(tmp_path)
    env.runner.routing = Routing(env.directory, MAILBOX_HOST)
    return env.start()


def test_local_domains_go_to_the_mailbox_host_other_domains_by_mx(tmp_path):
    env = edge_env(tmp_path)
    qid = env.accept(["bob@example.test", "alice@example.test", "x@remote.example"])
    calls = {(c.kind, c.domain): sorted(c.recipients) for c in env.remote.calls}
    assert calls == {(MAILBOX, "example.test"): ["alice@example.test", "bob@example.test"],
                     (REMOTE, "remote.example"): ["x@remote.example"]}
    assert not (tmp_path / "mail").exists()       # no Maildir on an edge
    env.remote.answer_all()
    assert env.spool.get(qid) is None and os.listdir(tmp_path / "queue") == []
    assert not (tmp_path / "mail").exists()


def test_an_alias_is_relayed_as_given_the_mailbox_host_expands_it(tmp_path):
    env = edge_env(tmp_path)
    env.accept(["fwd@example.test"])
    [call] = env.remote.calls
    assert (call.kind, call.recipients) == (MAILBOX, ["fwd@example.test"])
    assert env.directory.lookups == []          # not resolved here at all


def test_mailbox_host_down_is_retried_with_backoff_then_delivered(tmp_path):
    env = edge_env(tmp_path)
    with capture_events() as seen:
        qid = env.accept(["bob@example.test"])
        [first] = env.remote.calls
        first.answer(451, "4.4.1 connect to mailbox.example.test[192.0.2.10]:25: refused")
        state = env.state(qid, "bob@example.test")
        assert state["state"] == DEFERRED and state["attempts"] == 1
        assert state["next_attempt"] == env.clock.seconds() + 60.0
        env.clock.advance(59)
        assert len(env.remote.calls) == 1          # not before its time
        env.clock.advance(1)
        [_, second] = env.remote.calls
        assert second.kind == MAILBOX
        second.answer(451, "4.4.1 still down")
        assert env.state(qid, "bob@example.test")["next_attempt"] == \
            env.clock.seconds() + 300.0            # the schedule's next step
        env.clock.advance(300)
        env.remote.calls[-1].answer()
    assert env.spool.get(qid) is None
    assert [e["recipient"] for e in seen.named("queue.deferred")] == ["bob@example.test"] * 2
    assert not seen.named("delivery.failed")


def test_a_dsn_to_a_local_sender_goes_to_the_mailbox_host_too(tmp_path):
    env = edge_env(tmp_path)
    env.accept(["x@remote.example"], sender="alice@example.test")
    [outward] = env.remote.calls
    outward.answer(550, "5.1.1 no such user")
    [bounce] = [c for c in env.remote.calls if c is not outward]
    assert (bounce.kind, bounce.recipients) == (MAILBOX, ["alice@example.test"])
    assert b"multipart/report" in bounce.message

"""The admin command set, run directly (no door): words, roles, audit,
bulk safety, output safety, completion, suspension."""

import json

import pytest
from twisted.internet import defer, task

from appliance import events
from appliance.admin import commands
from appliance.admin.commands import Context, Identity, Sink, complete, dispatch, resolve
from appliance.admin.output import dumps, safe
from appliance.admin.suspend import SuspendableAccounts, Suspensions
from appliance.auth.accounts import BadCredentials, FileAccounts
from appliance.directory import Directory
from appliance.queue.admin import QueueError
from appliance.testing import capture_events, error_of, make_config, value_of


class FakeEntry:
    def __init__(self, qid, sender, rcpts, held=False, auth_user=""):
        self.queue_id, self.held = qid, held
        self.sender, self.rcpts, self.auth_user = sender, rcpts, auth_user

    def summary(self, now):
        return {"queue_id": self.queue_id, "sender": self.sender, "size": 100, "age": 60,
                "held": self.held, "last_error": "",
                "recipients": [{"address": r, "state": "deferred", "last_error": "",
                                "next_attempt": None, "attempts": 1, "remote_host": ""}
                               for r in self.rcpts]}


class FakeQueue:
    """QueueAdmin's interface over a dict (appliance.queue.admin is tested
    with the real spool in tests/queue)."""

    def __init__(self, *entries):
        self.entries = {e.queue_id: e for e in entries}
        self.fail = set()

    def entry(self, qid):
        if qid not in self.entries:
            raise QueueError(f"no message {qid!r} in the queue")
        return self.entries[qid]

    def ids(self):
        return sorted(self.entries)

    def iter_list(self):
        return (self.entries[q].summary(0) for q in self.ids())

    def select(self, sender=None, domain=None, held=None, auth_user=None):
        return [q for q, e in sorted(self.entries.items())
                if (sender is None or e.sender == sender)
                and (domain is None or any(r.endswith("@" + domain) for r in e.rcpts))
                and (held is None or e.held == held)
                and (auth_user is None or e.auth_user == auth_user)]

    def _change(self, qid, f):
        if qid in self.fail:
            return defer.fail(QueueError(f"no message {qid!r} in the queue"))
        self.entry(qid)
        f(self.entries[qid])
        return defer.succeed(qid)

    def hold(self, qid):
        return self._change(qid, lambda e: setattr(e, "held", True))

    def release(self, qid):
        return self._change(qid, lambda e: setattr(e, "held", False))

    def delete(self, qid):
        return self._change(qid, lambda e: self.entries.pop(qid))


class FakeState:
    def status(self):
        return {"hello": "\x1b[31m"}


class Run:
    def __init__(self, tmp_path, queue=None, role="admin", answers=(), interactive=False):
        self.cfg = make_config(str(tmp_path), server={"domains": "example.test"})
        self.directory = Directory.from_config(self.cfg)
        self.suspensions = Suspensions(str(tmp_path / "suspended"))
        self.queue = queue
        self.role = role
        self.answers = list(answers)
        self.interactive = interactive
        self.asked = []
        self.clock = task.Clock()

    def __call__(self, *argv, secret="pw"):
        out, err = [], []
        ctx = Context(self.cfg, Sink(out.append, err.append, 100),
                      users=self.directory.users, aliases=self.directory.aliases,
                      directory=self.directory, suspensions=self.suspensions,
                      queue=self.queue, state=FakeState() if self.queue else None,
                      identity=Identity("root", "SHA256:abc", self.role, "127.0.0.9", "exec"),
                      read_secret=lambda prompt: secret, confirm=self._confirm,
                      interactive=self.interactive, audit=True, clock=self.clock)
        rc = value_of(dispatch(list(argv), ctx))
        return rc, out, err

    def _confirm(self, question):
        self.asked.append(question)
        return self.answers.pop(0)


def test_words_prefixes_and_destructive_verbs():
    assert resolve(["q", "l"])[0].name == "queue list"
    assert resolve(["check-config"])[0].name == "config check"
    assert resolve(["dns", "records", "--check"]) == (commands.COMMANDS[("dns-records",)],
                                                      ["--check"])
    with pytest.raises(commands.UsageError, match="spell out"):
        resolve(["queue", "del", "ALL"])
    with pytest.raises(LookupError):
        resolve(["frob"])


def test_a_read_only_role_runs_reads_only_and_every_run_is_audited(tmp_path):
    run = Run(tmp_path, role="read")
    with capture_events() as seen:
        assert run("user", "list")[0] == 0
        rc, out, err = run("user", "add", "x@example.test")
        assert (rc, out) == (77, []) and "read-only" in err[0]
        assert run("frob", "s3cret")[0] == 127
        assert run("user", "add", "s3cret", "more", "words")[0] == 77
    audited = seen.named("admin.command")
    assert [(e["command"], e["rc"]) for e in audited] == [
        ("user list", 0), ("user add …", 77), ("frob", 127),
        ("user add …", 77)]
    assert audited[0]["key_fingerprint"] == "SHA256:abc" and audited[0]["role"] == "read"
    assert audited[0]["peer_ip"] == "127.0.0.9" and audited[0]["mode"] == "exec"


def test_a_usage_error_keeps_argument_words_out_of_the_audit(tmp_path):
    run = Run(tmp_path)
    with capture_events() as seen:
        assert run("user", "passwd", "a@example.test", "hunter2")[0] == 2
    assert seen.named("admin.command")[0]["command"] == "user passwd …"


def test_user_add_suspend_and_resume(tmp_path):
    queue = FakeQueue(FakeEntry("aa01", "bob@example.test", ["x@remote.example"]),
                      FakeEntry("aa02", "carol@example.test", ["y@remote.example"]),
                      FakeEntry("aa03", "other@example.net", ["z@remote.example"],
                                auth_user="bob@example.test"))
    run = Run(tmp_path, queue)
    assert run("user", "add", "bob@example.test", secret="pw1")[0] == 0
    accounts = SuspendableAccounts(FileAccounts(run.directory.users, run.directory),
                                   run.suspensions)
    rc, out, _ = run("user", "suspend", "bob@example.test")
    assert rc == 0 and "2 queued messages held" in out[0]
    assert [q for q, e in queue.entries.items() if e.held] == ["aa01", "aa03"]
    with capture_events() as seen:
        assert isinstance(error_of(accounts.authenticate("bob@example.test", "pw1")),
                          BadCredentials)
    assert seen.named("auth.suspended")
    listed = json.loads(run("user", "list", "--json")[1][0])
    assert listed == [{"address": "bob@example.test", "suspended": True}]
    rc, out, _ = run("user", "resume", "bob@example.test")
    assert rc == 0 and "2 messages released" in out[0]
    assert not any(e.held for e in queue.entries.values())
    assert run("user", "resume", "bob@example.test")[0] == 1


def test_bulk_delete_needs_yes_or_a_y(tmp_path):
    def queue():
        return FakeQueue(*[FakeEntry(f"bb0{n}", "spam@bad.example", ["a@example.test"])
                           for n in range(3)],
                         FakeEntry("cc01", "friend@example.net", ["a@example.test"]))
    run = Run(tmp_path, queue())
    rc, out, err = run("queue", "delete", "--sender", "spam@bad.example")
    assert rc == 1 and out[0] == "3 messages match:" and "--yes" in err[0]
    assert len(run.queue.entries) == 4
    rc, out, _ = run("queue", "delete", "--sender", "spam@bad.example", "--dry-run")
    assert rc == 0 and "dry run" in out[-1] and len(run.queue.entries) == 4
    rc, out, _ = run("queue", "delete", "--sender", "spam@bad.example", "--yes")
    assert rc == 0 and out[-1] == "deleted: 3 messages"
    assert list(run.queue.entries) == ["cc01"]

    asked = Run(tmp_path, queue(), answers=[False, True], interactive=True)
    assert asked("queue", "delete", "ALL")[0] == 0 and len(asked.queue.entries) == 4
    assert asked("queue", "delete", "ALL")[0] == 0 and asked.queue.entries == {}
    assert asked.asked == ["delete 4 messages? [y/N] "] * 2


def test_bulk_partial_failure_is_exit_3_and_ids_are_checked_first(tmp_path):
    run = Run(tmp_path, FakeQueue(FakeEntry("dd01", "a@x.example", ["b@example.test"]),
                                  FakeEntry("dd02", "a@x.example", ["b@example.test"])))
    assert run("queue", "hold", "dd01", "nope")[0] == 1      # nothing held
    assert not run.queue.entries["dd01"].held
    run.queue.fail.add("dd02")
    rc, out, err = run("queue", "hold", "--all")
    assert rc == 3 and out[-1] == "held: 1 messages, 1 failed" and len(err) == 1
    assert run("queue", "hold", "dd01", "--all")[0] == 2


def test_mail_data_is_shown_without_control_characters(tmp_path):
    hostile = "\x1b]0;owned\x07evil\x9b31m\u202e"
    run = Run(tmp_path, FakeQueue(FakeEntry("ee01", hostile + "@x.example",
                                            ["b@example.test"])))
    rc, out, _ = run("queue", "list")
    assert rc == 0 and all(ch not in "".join(out) for ch in "\x1b\x07\x9b\u202e")
    assert "\\x1b]0;owned\\x07evil\\x9b31m\\u202e" in out[1]
    rc, out, _ = run("queue", "list", "--json")
    assert all(ch not in "".join(out) for ch in "\x1b\x07\x9b\u202e")
    assert json.loads("".join(out))[0]["sender"].startswith(hostile)
    assert "\x1b" not in run("status", "--json")[1][0]
    assert safe("a\tb\nc") == "a\tb\\x0ac" and json.loads(dumps("\x85")) == "\x85"


def test_completion_of_words_and_live_values(tmp_path):
    run = Run(tmp_path, FakeQueue(FakeEntry("ab01", "a@x.example", ["b@example.test"]),
                                  FakeEntry("ab02", "a@x.example", ["b@example.test"]),
                                  FakeEntry("cd03", "a@x.example", ["b@example.test"])))
    run("user", "add", "bob@example.test")
    ctx = Context(run.cfg, Sink(print, print), users=run.directory.users,
                  aliases=run.directory.aliases, queue=run.queue, state=FakeState())
    assert complete(ctx, [], "qu") == ["queue"]
    assert complete(ctx, ["queue"], "") == ["delete", "hold", "list", "release", "retry",
                                            "show"]
    assert complete(ctx, ["queue", "show"], "ab") == ["ab01", "ab02"]
    assert complete(ctx, ["queue", "delete", "ab01"], "") == ["ab01", "ab02", "cd03"]
    assert complete(ctx, ["queue", "list"], "--s") == ["--sender"]
    assert complete(ctx, ["user", "passwd"], "b") == ["bob@example.test"]
    assert complete(ctx, ["dkim", "rotate"], "") == ["example.test"]
    assert complete(ctx, ["help"], "qu") == ["queue"]


def test_log_tail_reads_the_end_of_the_event_file_and_follows(tmp_path):
    run = Run(tmp_path, FakeQueue())
    path = run.cfg.log.events
    import os
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as handle:
        for n in range(50):
            handle.write(json.dumps({"ts": n, "event": "smtp.connect" if n % 2 else
                                     "queue.held", "n": n}) + "\n")
    rc, out, _ = run("log", "tail", "3", "queue.", "--json")
    assert rc == 0 and [json.loads(line)["n"] for line in out] == [44, 46, 48]
    out, err = [], []
    ctx = Context(run.cfg, Sink(out.append, err.append), queue=run.queue, state=FakeState(),
                  identity=Identity(role="read"))
    d = dispatch(["log", "tail", "0", "queue.", "--follow"], ctx)
    events.emit("queue.held", queue_id="ff01")
    events.emit("queue.released", queue_id="ff01")
    assert not d.called and len(out) == 2 and "queue.held" in out[0]
    ctx.cancelled.callback(None)
    assert value_of(d) == 0
    events.emit("queue.held", queue_id="ff02")
    assert len(out) == 2


def test_offline_context_refuses_online_commands(tmp_path):
    cfg = make_config(str(tmp_path), server={"domains": "example.test"})
    out, err = [], []
    rc = value_of(dispatch(["queue", "list"], Context(cfg, Sink(out.append, err.append))))
    assert rc == 1 and "needs the running server" in err[0]

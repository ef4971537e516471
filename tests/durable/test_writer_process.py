"""The group commit's file work in a child process (appliance.durable.writer_process).

Real child processes, real files in a temp dir: the same run_batch contract
as in-process (tests/test_group_commit.py), across the pipe.
"""

import errno
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from twisted.internet import defer, reactor
from twisted.trial import unittest

from appliance.durable import writer_process
from appliance.durable.commit import Durable, GroupCommitWriter, run_batch
from appliance.durable.writer_process import ChildProcessFileSystem, WriterDied
from appliance.testing import capture_events


@pytest.fixture
def files(tmp_path):
    fs = ChildProcessFileSystem(str(tmp_path / "data" / "queue.lock"), threads=4)
    yield fs
    fs.shutdown()


def store(directory, name, data=b"data\n"):
    """A plan: write ``name`` via a temp file and rename it into place."""
    def plan(fs):
        temp = os.path.join(directory, name + ".tmp")
        final = os.path.join(directory, name)
        return Durable(writes=[(temp, data)], renames=[(temp, final)],
                       sync_dirs=[directory], rollback=[final], result=final)
    return plan


def test_a_batch_is_written_by_the_child_and_each_result_comes_back(files, tmp_path):
    box = tmp_path / "box"
    box.mkdir()
    outcomes = run_batch(files, [store(str(tmp_path), "a"), store(str(tmp_path), "b", b"bee")])
    assert outcomes == [(True, str(tmp_path / "a")), (True, str(tmp_path / "b"))]
    assert (tmp_path / "b").read_bytes() == b"bee"
    assert files._child.pid != os.getpid() and files._child.poll() is None


def test_one_failing_item_fails_alone_with_its_os_error(files, tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    outcomes = run_batch(files, [store(missing, "x"), store(str(tmp_path), "kept")])
    ok, error = outcomes[0]
    assert not ok and isinstance(error, OSError) and error.errno == errno.ENOENT
    assert outcomes[1] == (True, str(tmp_path / "kept"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "kept"]


def test_links_and_their_failures_are_reported_per_destination(files, tmp_path):
    (tmp_path / "new").mkdir()
    src = str(tmp_path / "m.msg")
    good, bad = str(tmp_path / "new" / "m"), str(tmp_path / "gone" / "m")

    def plan(fs):
        return Durable(writes=[(src, b"message\n")], links=[(src, good), (src, bad)],
                       sync_dirs=[str(tmp_path)], result="m")

    [(ok, (result, failed))] = run_batch(files, [plan])
    assert ok and result == "m" and list(failed) == [bad]
    assert isinstance(failed[bad], FileNotFoundError)
    assert os.path.samefile(src, good)


def test_a_plan_that_raises_fails_its_item_without_reaching_the_child(files, tmp_path):
    def broken(fs):
        raise ValueError("bad plan")

    outcomes = run_batch(files, [broken, store(str(tmp_path), "ok")])
    assert not outcomes[0][0] and isinstance(outcomes[0][1], ValueError)
    assert outcomes[1][0]


def test_a_dead_child_fails_its_batch_and_the_next_batch_gets_a_new_one(files, tmp_path):
    run_batch(files, [store(str(tmp_path), "first")])
    first = files._child
    first.kill()
    first.wait()
    # Dead before the batch was sent (the pipe is broken): nothing of it ran,
    # so a new child takes it.
    [(ok, _)] = run_batch(files, [store(str(tmp_path), "next")])
    assert ok and files._child is not first and (tmp_path / "next").exists()


def test_the_childs_start_and_loss_are_events(files, tmp_path):
    with capture_events() as seen:
        run_batch(files, [store(str(tmp_path), "first")])
        first = files._child
        first.kill()
        first.wait()
        run_batch(files, [store(str(tmp_path), "next")])
    started = seen.named("spool.writer.started")
    assert [e["pid"] for e in started] == [first.pid, files._child.pid]
    [lost] = seen.named("spool.writer.lost")
    assert lost["pid"] == first.pid and lost["status"] == -9


def test_a_child_dying_during_a_batch_fails_that_batch_only(files, tmp_path, monkeypatch):
    run_batch(files, [store(str(tmp_path), "first")])
    child = files._child

    def dies_before_replying(fd):
        child.kill()
        child.wait()
        return real_read(fd)

    real_read = writer_process._read_message
    monkeypatch.setattr(writer_process, "_read_message", dies_before_replying)
    [(ok, error)] = run_batch(files, [store(str(tmp_path), "lost")])
    assert not ok and isinstance(error, WriterDied)
    monkeypatch.setattr(writer_process, "_read_message", real_read)
    [(ok, _)] = run_batch(files, [store(str(tmp_path), "again")])
    assert ok and files._child is not child and (tmp_path / "again").exists()


def test_the_child_ends_at_shutdown(files, tmp_path):
    run_batch(files, [store(str(tmp_path), "a")])
    child = files._child
    files.shutdown()
    assert child.wait(timeout=10) == 0


def test_a_second_writer_on_the_same_data_dir_waits_for_the_lock(files, tmp_path, monkeypatch):
    run_batch(files, [store(str(tmp_path), "a")])
    monkeypatch.setattr(writer_process, "LOCK_WAIT", 0.2)
    other = ChildProcessFileSystem(files.lock_path)
    try:
        [(ok, error)] = run_batch(other, [store(str(tmp_path), "b")])
        assert not ok and "another server uses this data_dir" in str(error)
        assert other._child is None
    finally:
        other.shutdown()
    files.shutdown()
    [(ok, _)] = run_batch(other, [store(str(tmp_path), "b")])     # free now
    assert ok
    other.shutdown()


def _gone(pid):
    """Exited: no such process, or a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" in f.read()
    except FileNotFoundError:
        return True


def test_the_lock_outlives_the_server_while_its_child_lives(tmp_path, monkeypatch):
    """A server killed mid-batch: its child still holds the lock it inherited,
    so a new server's recovery cannot scan the queue under it."""
    lock = str(tmp_path / "queue.lock")
    script = (
        "import sys, os, time\n"
        "from appliance.durable.writer_process import ChildProcessFileSystem\n"
        "from appliance.durable.commit import Durable, GroupCommitWriter, run_batch\n"
        f"fs = ChildProcessFileSystem({lock!r})\n"
        f"run_batch(fs, [lambda fs: Durable(writes=[({str(tmp_path / 'f')!r}, b'x')])])\n"
        "print(fs._child.pid, flush=True)\n"
        "time.sleep(60)\n")
    server = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(server.stdout.readline())
        monkeypatch.setattr(writer_process, "LOCK_WAIT", 0.2)
        with pytest.raises(OSError, match="another server"):
            writer_process._acquire(lock)
        server.kill()
        server.wait()
        # PR_SET_PDEATHSIG: the child dies with its server; then the lock is free.
        monkeypatch.setattr(writer_process, "LOCK_WAIT", 10)
        os.close(writer_process._acquire(lock))
        assert _gone(child_pid)
    finally:
        server.kill()
        server.wait()


# -- light batches from the reactor, no thread -----------------------------------

class FromTheReactor(unittest.TestCase):
    """run_batch_here with the real reactor watching the child's pipe."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="writer-here-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.files = ChildProcessFileSystem(os.path.join(self.dir, "queue.lock"), threads=2,
                                            reactor=reactor)
        self.addCleanup(self.files.shutdown)

    def test_no_child_yet_means_the_thread_path(self):
        self.assertFalse(self.files.ready_here())

    @defer.inlineCallbacks
    def test_a_light_batch_runs_without_a_thread(self):
        run_batch(self.files, [store(self.dir, "first")])     # spawns the child
        self.assertTrue(self.files.ready_here())
        d = self.files.run_batch_here([store(self.dir, "a"), store(self.dir, "b", b"bee")])
        self.assertIsInstance(d, defer.Deferred)
        outcomes = yield d
        self.assertEqual(outcomes, [(True, os.path.join(self.dir, "a")),
                                    (True, os.path.join(self.dir, "b"))])
        with open(os.path.join(self.dir, "b"), "rb") as f:
            self.assertEqual(f.read(), b"bee")

    @defer.inlineCallbacks
    def test_a_group_commit_writer_sends_light_batches_past_its_thread(self):
        run_batch(self.files, [store(self.dir, "first")])
        threaded = []

        def runner(f, *args):
            threaded.append(f)
            return defer.maybeDeferred(f, *args)

        writer = GroupCommitWriter(runner, self.files)
        light = yield writer.submit(store(self.dir, "light"), "test", light=True)
        heavy = yield writer.submit(store(self.dir, "heavy"), "test")
        self.assertEqual((light, heavy), (os.path.join(self.dir, "light"),
                                          os.path.join(self.dir, "heavy")))
        self.assertEqual(len(threaded), 1)          # only the heavy one

    @defer.inlineCallbacks
    def test_batches_sent_before_the_first_is_answered_are_answered_in_order(self):
        run_batch(self.files, [store(self.dir, "first")])
        order = []
        ds = [self.files.run_batch_here([store(self.dir, f"m{n}")]) for n in range(3)]
        for n, d in enumerate(ds):
            d.addCallback(lambda outcomes, n=n: order.append((n, outcomes)))
        yield defer.gatherResults(ds)
        self.assertEqual([n for n, _ in order], [0, 1, 2])
        self.assertEqual([outcomes for _, outcomes in order],
                         [[(True, os.path.join(self.dir, f"m{n}"))] for n in range(3)])
        self.assertIsNone(self.files._reader)       # no reply awaited: not watching

    @defer.inlineCallbacks
    def test_a_group_commit_writer_keeps_two_light_batches_in_the_child(self):
        run_batch(self.files, [store(self.dir, "first")])
        writer = GroupCommitWriter(lambda f, *a: defer.maybeDeferred(f, *a), self.files)
        first = writer.submit(store(self.dir, "a"), "test", light=True)
        second = writer.submit(store(self.dir, "b"), "test", light=True)
        third = writer.submit(store(self.dir, "c"), "test", light=True)
        self.assertEqual((writer._in_flight, len(writer._pending)), (2, 1))
        results = yield defer.gatherResults([first, second, third])
        self.assertEqual(results, [os.path.join(self.dir, n) for n in "abc"])
        yield writer.drain()
        self.assertEqual((writer._in_flight, writer.batches), (0, 3))

    def test_a_child_found_dead_sends_the_batch_to_the_thread_path(self):
        run_batch(self.files, [store(self.dir, "first")])
        first = self.files._child
        first.kill()
        first.wait()
        self.assertFalse(self.files.ready_here())
        [(ok, _)] = run_batch(self.files, [store(self.dir, "again")])
        self.assertTrue(ok)
        self.assertIsNot(self.files._child, first)

    @defer.inlineCallbacks
    def test_a_child_dying_mid_batch_fails_that_batch(self):
        run_batch(self.files, [store(self.dir, "first")])
        child = self.files._child

        def died_before_replying(fd):
            child.kill()
            child.wait()
            raise EOFError("end of input")      # what a read of its closed pipe meets

        self.patch(writer_process, "_read_message", died_before_replying)
        outcomes = yield self.files.run_batch_here([store(self.dir, "lost")])
        self.assertFalse(outcomes[0][0])
        self.assertIsInstance(outcomes[0][1], WriterDied)
        self.assertIsNone(self.files._child)

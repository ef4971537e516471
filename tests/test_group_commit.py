"""The group-commit writer: batching, durability before callbacks, fault isolation."""

import errno
import os
import shutil
import tempfile

import pytest
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from appliance.queue.commit import (Durable, FileSystem, GroupCommitWriter, StorageError,
                                    ThreadPoolService, makedirs, pool_runner, run_batch,
                                    synchronous_runner)


class ManualRunner:
    """A writer 'thread' the test steps by hand: each call waits for step()."""

    def __init__(self):
        self.calls = []

    def __call__(self, f, *args):
        d = defer.Deferred()
        self.calls.append((f, args, d))
        return d

    def step(self):
        f, args, d = self.calls.pop(0)
        try:
            result = f(*args)
        except BaseException as e:  # noqa: BLE001 - hand the failure to the Deferred
            d.errback(e)
        else:
            d.callback(result)


class RecordingFS(FileSystem):
    """Logs every call; ``fail`` maps (method, path) to the errno to raise."""

    def __init__(self):
        self.log = []
        self.fail = {}
        self._paths = {}

    def _check(self, method, path):
        self.log.append((method, path))
        code = self.fail.get((method, path))
        if code is not None:
            raise OSError(code, os.strerror(code), path)

    def open_new(self, path):
        self._check("open", path)
        fd = super().open_new(path)
        self._paths[fd] = path
        return fd

    def write_all(self, fd, data):
        self._check("write", self._paths[fd])
        super().write_all(fd, data)

    def fsync(self, fd):
        self._check("fsync", self._paths[fd])
        super().fsync(fd)

    def close(self, fd):
        self._check("close", self._paths.pop(fd))
        super().close(fd)

    def rename(self, src, dst):
        self._check("rename", dst)
        super().rename(src, dst)

    def unlink(self, path):
        self._check("unlink", path)
        super().unlink(path)

    def fsync_dir(self, path):
        self._check("fsync_dir", path)
        super().fsync_dir(path)

    def calls(self, method):
        return [path for m, path in self.log if m == method]


def file_plan(directory, name, data=b"data\n"):
    """The usual shape: write a temp file, rename it into place, sync the directory."""
    temp, final = os.path.join(directory, name + ".tmp"), os.path.join(directory, name)

    def plan(fs):
        return Durable(writes=[(temp, data)], renames=[(temp, final)],
                       sync_dirs=[directory], result=final)
    return plan


def results_of(ds):
    out = []
    for d in ds:
        d.addBoth(out.append)
    return out


def test_requests_made_while_a_batch_runs_form_the_next_batch(tmp_path):
    runner, fs = ManualRunner(), RecordingFS()
    writer = GroupCommitWriter(runner, fs)
    first = writer.submit(file_plan(str(tmp_path), "first"), "test")
    later = [writer.submit(file_plan(str(tmp_path), f"m{i}"), "test") for i in range(10)]
    assert len(runner.calls) == 1          # the ten wait on the reactor side
    runner.step()
    assert first.called and not any(d.called for d in later)
    assert len(runner.calls) == 1          # ...and now go together
    fs.log.clear()
    runner.step()
    assert all(d.called for d in later)
    assert fs.calls("fsync_dir") == [str(tmp_path)]    # ten files, one directory fsync
    assert len(fs.calls("fsync")) == 10
    assert (writer.batches, writer.items) == (2, 11)


def test_phases_run_across_the_whole_batch_in_order(tmp_path):
    fs = RecordingFS()
    run_batch(fs, [file_plan(str(tmp_path), "a"), file_plan(str(tmp_path), "b")])
    order = [method for method, _ in fs.log]
    assert order == ["open", "write", "open", "write", "fsync", "fsync", "close", "close",
                     "rename", "rename", "fsync_dir"]


def test_no_deferred_fires_before_its_file_and_directory_are_fsynced(tmp_path):
    runner, fs = ManualRunner(), RecordingFS()
    writer = GroupCommitWriter(runner, fs)
    seen = []

    def check(final):
        temp = final + ".tmp"
        assert temp in fs.calls("fsync")
        assert final in fs.calls("rename")
        assert str(tmp_path) in fs.calls("fsync_dir")
        seen.append(final)

    ds = [writer.submit(file_plan(str(tmp_path), f"f{i}"), "test").addCallback(check)
          for i in range(3)]
    assert not any(d.called for d in ds)
    while runner.calls:
        runner.step()
    assert len(seen) == 3


def test_one_failing_item_fails_only_itself(tmp_path):
    fs = RecordingFS()
    fs.fail[("write", str(tmp_path / "bad.tmp"))] = errno.ENOSPC
    runner = ManualRunner()
    writer = GroupCommitWriter(runner, fs)
    writer.submit(file_plan(str(tmp_path), "first"), "test.op")   # holds the others back
    ds = [writer.submit(file_plan(str(tmp_path), name), "test.op")
          for name in ("good1", "bad", "good2")]
    runner.step()
    os.unlink(tmp_path / "first")
    runner.step()
    good1, bad, good2 = results_of(ds)
    assert good1 == str(tmp_path / "good1") and good2 == str(tmp_path / "good2")
    assert isinstance(bad.value, StorageError)
    assert bad.value.operation == "test.op" and "No space left" in bad.value.error
    assert sorted(os.listdir(tmp_path)) == ["good1", "good2"]   # bad.tmp cleaned up
    assert writer.batches == 2


def test_failed_plan_fails_only_its_item(tmp_path):
    def broken(fs):
        raise ValueError("bad plan")

    outcomes = run_batch(RecordingFS(), [broken, file_plan(str(tmp_path), "ok")])
    assert outcomes[0][0] is False and isinstance(outcomes[0][1], ValueError)
    assert outcomes[1] == (True, str(tmp_path / "ok"))


def test_directory_fsync_failure_fails_its_items_and_rolls_back(tmp_path):
    bad_dir, good_dir = tmp_path / "bad", tmp_path / "good"
    bad_dir.mkdir()
    good_dir.mkdir()
    fs = RecordingFS()
    fs.fail[("fsync_dir", str(bad_dir))] = errno.EIO
    committed = str(bad_dir / "state")

    def plan(fs):
        return Durable(writes=[(committed + ".tmp", b"x")], renames=[(committed + ".tmp",
                                                                      committed)],
                       sync_dirs=[str(bad_dir)], rollback=[committed])

    outcomes = run_batch(fs, [plan, file_plan(str(good_dir), "kept")])
    assert outcomes[0][0] is False and outcomes[0][1].errno == errno.EIO
    assert outcomes[1][0] is True
    assert os.listdir(bad_dir) == []            # the rename was undone
    assert os.listdir(good_dir) == ["kept"]


def test_unlinks_tolerate_missing_files(tmp_path):
    (tmp_path / "present").write_bytes(b"x")

    def plan(fs):
        return Durable(unlinks=[str(tmp_path / "present"), str(tmp_path / "absent")],
                       sync_dirs=[str(tmp_path)], result="gone")

    assert run_batch(FileSystem(), [plan]) == [(True, "gone")]
    assert os.listdir(tmp_path) == []


def test_a_crash_in_a_batch_fails_that_batch_and_the_writer_goes_on(tmp_path):
    class Crash(BaseException):
        pass

    def crash(fs):
        raise Crash()

    runner = ManualRunner()
    writer = GroupCommitWriter(runner, RecordingFS())
    first = writer.submit(crash, "test")
    second = writer.submit(file_plan(str(tmp_path), "after"), "test")
    results = results_of([first, second])
    runner.step()
    runner.step()
    first_result, second_result = results
    assert first_result.check(Crash)
    assert second_result == str(tmp_path / "after")


def test_max_batch_bounds_a_batch(tmp_path):
    runner = ManualRunner()
    writer = GroupCommitWriter(runner, RecordingFS(), max_batch=4)
    writer.submit(file_plan(str(tmp_path), "first"), "test")
    for i in range(6):
        writer.submit(file_plan(str(tmp_path), f"m{i}"), "test")
    runner.step()
    assert len(runner.calls[0][1][1]) == 4
    runner.step()
    assert len(runner.calls[0][1][1]) == 2


def test_callbacks_that_submit_join_the_next_batch_together(tmp_path):
    runner = ManualRunner()
    writer = GroupCommitWriter(runner, RecordingFS())
    follow_ups = []

    def chain(_, name):
        follow_ups.append(writer.submit(file_plan(str(tmp_path), name), "test"))

    for i in range(3):
        writer.submit(file_plan(str(tmp_path), f"m{i}"), "test").addCallback(chain, f"n{i}")
    runner.step()            # batch 1: m0; its follow-up n0 queues behind m1, m2
    assert len(runner.calls[0][1][1]) == 3
    runner.step()            # batch 2: m1, m2, n0; n1 and n2 are submitted while firing
    assert len(runner.calls) == 1
    assert len(runner.calls[0][1][1]) == 2      # ...and go out together, not one by one


def test_drain_fires_when_idle(tmp_path):
    runner = ManualRunner()
    writer = GroupCommitWriter(runner, RecordingFS())
    assert writer.drain().called
    writer.submit(file_plan(str(tmp_path), "a"), "test")
    drained = writer.drain()
    assert not drained.called
    runner.step()
    assert drained.called


def test_makedirs_reports_what_it_created(tmp_path):
    fs = FileSystem()
    target = str(tmp_path / "a" / "b" / "c")
    assert makedirs(fs, target) == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), target]
    assert makedirs(fs, target) == []
    assert (os.stat(target).st_mode & 0o777) == 0o700 & ~_umask()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("method", ["open", "fsync", "rename"])
def test_os_errors_in_each_phase_become_storage_errors(tmp_path, method):
    fs = RecordingFS()
    path = str(tmp_path / "x") + (".tmp" if method != "rename" else "")
    fs.fail[(method, path)] = errno.EIO
    writer = GroupCommitWriter(synchronous_runner, fs)
    [result] = results_of([writer.submit(file_plan(str(tmp_path), "x"), "op")])
    assert result.check(StorageError)
    assert os.listdir(tmp_path) == []


class RealThreadTests(trial.TestCase):
    """The same writer over a real one-thread pool and the real reactor."""

    @defer.inlineCallbacks
    def test_real_thread_pool(self):
        from twisted.internet import reactor
        pool = ThreadPool(1, 1, "test-writer")
        writer = GroupCommitWriter(pool_runner(reactor, pool))
        service = ThreadPoolService(pool, writer.drain)
        service.startService()
        directory = tempfile.mkdtemp()      # not mktemp(): that lands in the cwd under pytest
        self.addCleanup(shutil.rmtree, directory)
        names = [f"m{i}" for i in range(20)]
        results = yield defer.gatherResults(
            [writer.submit(file_plan(directory, name, name.encode()), "test")
             for name in names])
        yield service.stopService()
        self.assertEqual(sorted(os.listdir(directory)), sorted(names))
        self.assertEqual(results, [os.path.join(directory, n) for n in names])
        self.assertLessEqual(writer.batches, 20)
        self.assertFalse(pool.started)

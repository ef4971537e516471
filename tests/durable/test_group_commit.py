"""The group-commit writer: batching, durability before callbacks, fault isolation."""

import errno
import os
import shutil
import tempfile
import threading
from concurrent import futures

import pytest
from twisted.internet import defer
from twisted.python.threadpool import ThreadPool
from twisted.trial import unittest as trial

from appliance.testing import HandRunner as ManualRunner
from appliance.durable.commit import Durable, FileSystem, GroupCommitWriter, ParallelFileSystem, StorageError, makedirs, run_batch
from appliance.threads import ThreadPoolService, pool_runner, synchronous_runner


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

    def link(self, src, dst):
        self._check("link", dst)
        super().link(src, dst)

    def open_existing(self, path):
        self._check("open_existing", path)
        fd = super().open_existing(path)
        self._paths[fd] = path
        return fd

    def truncate(self, fd, length):
        self._check("truncate", self._paths[fd])
        super().truncate(fd, length)

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


def link_plan(directory, name, links, data=b"message\n"):
    """Commit ``name`` (temp + rename), then link it as each of ``links``."""
    temp, final = os.path.join(directory, name + ".tmp"), os.path.join(directory, name)

    def plan(fs):
        return Durable(writes=[(temp, data)], renames=[(temp, final)],
                       links=[(final, dst) for dst in links], sync_dirs=[directory],
                       rollback=[final], result=final)
    return plan


@pytest.fixture
def box(tmp_path):
    """A mailbox folder beside the commit directory (``tmp_path``), for the links."""
    path = tmp_path / "box"
    path.mkdir()
    return path


def test_links_come_after_every_rename_and_their_directories_are_fsynced(tmp_path, box):
    fs = RecordingFS()
    outcomes = run_batch(fs, [link_plan(str(tmp_path), "a", [str(box / "a")]),
                              file_plan(str(tmp_path), "b")])
    assert outcomes == [(True, (str(tmp_path / "a"), {})), (True, str(tmp_path / "b"))]
    order = [method for method, _ in fs.log]
    assert order.index("link") > max(i for i, m in enumerate(order) if m == "rename")
    assert sorted(fs.calls("fsync_dir")) == sorted([str(tmp_path), str(box)])
    assert os.stat(box / "a").st_ino == os.stat(tmp_path / "a").st_ino


def test_a_failed_link_is_reported_and_does_not_fail_its_item(tmp_path, box):
    fs = RecordingFS()
    fs.fail[("link", str(box / "x"))] = errno.EXDEV
    [(ok, (result, failed))] = run_batch(fs, [link_plan(str(tmp_path), "m",
                                                        [str(box / "x"), str(box / "y")])])
    assert ok and result == str(tmp_path / "m")
    assert list(failed) == [str(box / "x")] and failed[str(box / "x")].errno == errno.EXDEV
    assert os.listdir(box) == ["y"]


def test_an_existing_link_counts_as_made_and_survives_a_rollback(tmp_path, box):
    (box / "old").write_bytes(b"an earlier attempt")
    fs = RecordingFS()
    fs.fail[("fsync_dir", str(tmp_path))] = errno.EIO      # fails the item after its links
    [(ok, error)] = run_batch(fs, [link_plan(str(tmp_path), "m",
                                             [str(box / "old"), str(box / "new")])])
    assert not ok and error.errno == errno.EIO
    assert os.listdir(box) == ["old"]           # the link it made is gone, not the old one
    assert "m" not in os.listdir(tmp_path)      # nor its commit


def test_a_failed_fsync_of_a_link_directory_reports_its_links(tmp_path, box):
    fs = RecordingFS()
    fs.fail[("fsync_dir", str(box))] = errno.EIO
    [(ok, (_, failed))] = run_batch(fs, [link_plan(str(tmp_path), "m", [str(box / "m")])])
    assert ok and failed[str(box / "m")].errno == errno.EIO


def retiring_plan(directory, box, links):
    """Commit m, link it, then retire it (state to a spare, the name unlinked)."""
    plan = link_plan(directory, "m", links)

    def retiring(fs):
        durable = plan(fs)
        durable.retire = [("rename", os.path.join(directory, "m"),
                           os.path.join(directory, "spare")),
                          ("unlink", os.path.join(directory, "gone"))]
        return durable
    return retiring


def test_retire_steps_come_after_the_directory_fsyncs(tmp_path, box):
    (tmp_path / "gone").write_bytes(b"x")
    fs = RecordingFS()
    [(ok, (_, failed))] = run_batch(fs, [retiring_plan(str(tmp_path), box, [str(box / "m")])])
    assert ok and failed == {}
    order = [method for method, _ in fs.log]
    assert order[-2:] == ["rename", "unlink"]
    assert order.index("fsync_dir") < len(order) - 2
    assert sorted(os.listdir(tmp_path)) == ["box", "spare"]
    assert os.listdir(box) == ["m"]


def test_no_retiring_while_a_link_is_missing(tmp_path, box):
    (tmp_path / "gone").write_bytes(b"x")
    fs = RecordingFS()
    fs.fail[("link", str(box / "n"))] = errno.EXDEV
    [(ok, (_, failed))] = run_batch(fs, [retiring_plan(str(tmp_path), box,
                                                       [str(box / "m"), str(box / "n")])])
    assert ok and list(failed) == [str(box / "n")]
    assert sorted(os.listdir(tmp_path)) == ["box", "gone", "m"]     # nothing retired


def test_rewrites_write_over_an_existing_file_and_cut_it_to_length(tmp_path):
    spare = tmp_path / "spare"
    spare.write_bytes(b"a much longer state file from an earlier message")
    inode = os.stat(spare).st_ino
    final = tmp_path / "state"
    fs = RecordingFS()

    def plan(fs):
        return Durable(rewrites=[(str(spare), b"short")], renames=[(str(spare), str(final))],
                       sync_dirs=[str(tmp_path)], result="ok")

    assert run_batch(fs, [plan]) == [(True, "ok")]
    assert final.read_bytes() == b"short" and os.stat(final).st_ino == inode
    assert fs.calls("fsync") == [str(spare)] and fs.calls("open") == []


class BarrierFS(FileSystem):
    """fsync waits until ``parties`` fsyncs are in progress at once (bounded)."""

    def __init__(self, parties):
        self.barrier = threading.Barrier(parties, timeout=10)
        self.synced = []

    def fsync(self, fd):
        self.barrier.wait()
        self.synced.append(fd)

    def fsync_dir(self, path):
        self.barrier.wait()
        self.synced.append(path)


def test_parallel_file_system_issues_a_batch_of_fsyncs_together(tmp_path):
    plans = [file_plan(str(tmp_path), f"m{i}") for i in range(4)]
    barrier_fs = BarrierFS(4)
    with futures.ThreadPoolExecutor(4) as executor:
        fs = ParallelFileSystem(executor, inline=0)
        fs.fsync = barrier_fs.fsync             # would time out if run one by one
        outcomes = run_batch(fs, plans)
    assert [ok for ok, _ in outcomes] == [True] * 4 and len(barrier_fs.synced) == 4
    assert sorted(os.listdir(tmp_path)) == [f"m{i}" for i in range(4)]


def test_parallel_file_system_reports_each_directory_failure_on_its_own(tmp_path):
    with futures.ThreadPoolExecutor(4) as executor:
        errors = ParallelFileSystem(executor, inline=0).fsync_dirs(
            [str(tmp_path), str(tmp_path / "missing"), str(tmp_path)])
    assert errors[0] is None and isinstance(errors[1], FileNotFoundError) and errors[2] is None


def test_parallel_file_system_stores_each_file_as_one_task(tmp_path):
    class Failing(ParallelFileSystem):
        def write_all(self, fd, data):
            if data == b"bad":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            super().write_all(fd, data)

    spare = tmp_path / "spare"
    spare.write_bytes(b"old content, longer than the new")
    final = tmp_path / "reused"

    def reuse(fs):
        return Durable(rewrites=[(str(spare), b"new")], renames=[(str(spare), str(final))],
                       sync_dirs=[str(tmp_path)], result="reused")

    plans = [file_plan(str(tmp_path), "good"), file_plan(str(tmp_path), "bad", b"bad"), reuse]
    with futures.ThreadPoolExecutor(4) as executor:
        outcomes = run_batch(Failing(executor, inline=0), plans)
    assert outcomes[0] == (True, str(tmp_path / "good")) and outcomes[2] == (True, "reused")
    assert outcomes[1][0] is False and outcomes[1][1].errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["good", "reused"]      # bad.tmp cleaned up
    assert final.read_bytes() == b"new" and (tmp_path / "good").read_bytes() == b"data\n"


def test_thread_pool_service_shuts_the_helpers_down_after_the_pool(tmp_path):
    class Helpers:
        shut = False

        def shutdown(self, wait):
            self.shut = wait

    class Pool:
        name = "test"

        def start(self):
            pass

        def stop(self):
            assert not helpers.shut

    helpers = Helpers()
    service = ThreadPoolService(Pool(), helpers=helpers)
    service.startService()
    assert service.stopService().called and helpers.shut


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

    @defer.inlineCallbacks
    def test_real_thread_pool_with_parallel_files(self):
        """The production set-up: writer pool, fsync executor shut down after it."""
        from twisted.internet import reactor
        pool = ThreadPool(1, 1, "test-writer")
        executor = futures.ThreadPoolExecutor(4)
        writer = GroupCommitWriter(pool_runner(reactor, pool), ParallelFileSystem(executor))
        service = ThreadPoolService(pool, writer.drain, helpers=executor)
        service.startService()
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        order = []
        ds = [writer.submit(file_plan(directory, f"m{i}", b"x"), "test").addCallback(
            lambda path: order.append(os.path.basename(path))) for i in range(30)]
        yield defer.gatherResults(ds)
        yield service.stopService()
        self.assertEqual(order, [f"m{i}" for i in range(30)])     # fired in submission order
        self.assertEqual(len(os.listdir(directory)), 30)
        self.assertFalse(pool.started)


def test_parallel_file_system_runs_a_small_batch_inline(tmp_path):
    class NoThreads:
        def map(self, *args):
            raise AssertionError("a batch of two files needs no hand-over")

    plans = [file_plan(str(tmp_path), "a"), file_plan(str(tmp_path), "b")]
    outcomes = run_batch(ParallelFileSystem(NoThreads(), inline=4), plans)
    assert [ok for ok, _ in outcomes] == [True, True]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]

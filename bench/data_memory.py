"""Memory of one DATA transaction: peaks for 1, 20 and 50 MiB bodies (issue 17).

Two measures, each for every size:

- ``inproc``: the SMTP protocol over a StringTransport, the policy pipeline
  (MX, checks off) and a real Spool whose batches run in the writer child
  (as the server runs them), in this process under ``tracemalloc``: the
  peak of traced Python allocations from DATA to the 250, once with DATA
  streamed to the spool and once with the body kept in memory (the spool
  given no thread for body files: the path every message took before).
- ``server`` (``--server``): the real server (``twistd mailappliance``, MX
  only, checks off) fed with smtplib over loopback; the growth of its peak
  RSS (VmHWM) over the transaction. ``--source DIR`` runs the server from
  another source tree (e.g. ``git archive main | tar -x -C DIR``): the
  figures before.

  .venv/bin/python bench/data_memory.py [--sizes 1,20,50] [--server [--source DIR]]

It prints figures; it is not a test.
"""

import argparse
import os
import shutil
import smtplib
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

MiB = 1024 * 1024
PIECE = 64 * 1024       # what one socket read hands the protocol
LINE = b"0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?\r\n"
HEAD = b"From: a@remote.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n"


def body(size):
    return LINE * (size // len(LINE))


def inproc(size, streamed, workdir):
    from twisted.internet import task

    from appliance.durable.commit import GroupCommitWriter
    from appliance.durable.writer_process import ChildProcessFileSystem
    from appliance.queue.store import Spool
    from appliance.testing import FakeDirectory, SMTPHarness, make_config, outcome
    from appliance.threads import synchronous_runner

    queue = os.path.join(workdir, f"queue-{size}-{streamed}")
    files = ChildProcessFileSystem(os.path.join(workdir, "queue.lock"), threads=2)
    try:
        spool = Spool(queue, GroupCommitWriter(synchronous_runner, files), synchronous_runner,
                      task.Clock(), incoming=synchronous_runner if streamed else None)
        outcome(spool.recover())
        config = make_config(server={"max_message_size": "60M"})
        h = SMTPHarness(config=config, spool=spool,
                        directory=FakeDirectory({"alice@example.test": ["alice@example.test"]},
                                                ("example.test",)))
        h.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\n"
               b"RCPT TO:<alice@example.test>\r\nDATA\r\n")
        data = HEAD + body(size) + b".\r\n"
        h.output()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        for start in range(0, len(data), PIECE):
            h.send(data[start:start + PIECE])
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        reply = h.replies()[-1]
        assert reply.startswith("250 "), reply
        return peak
    finally:
        files.shutdown()


def server(sizes, source):
    import harness
    if source:      # the server runs in its tree (its cwd is first on sys.path)
        harness.REPO_ROOT = str(Path(source).resolve())
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (harness.REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    workdir = Path(tempfile.mkdtemp(prefix="data-memory-"))
    results = []
    try:
        mail = harness.MailServer(workdir / "server", listeners=("mx",),
                          overrides={"server": {"max_message_size": "60M"}})
        mail.add_user("alice@example.test", "password", bcrypt_cost=4)
        mail.start()
        try:
            for size in sizes:
                message = HEAD + body(size * MiB)
                before = mail.rss_kib("VmHWM")
                with smtplib.SMTP(mail.host, mail.mx_port, timeout=120) as client:
                    client.sendmail("a@remote.test", ["alice@example.test"], message)
                time.sleep(0.5)
                results.append((size, before, mail.rss_kib("VmHWM") - before))
        finally:
            mail.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,20,50", help="body sizes in MiB")
    parser.add_argument("--server", action="store_true", help="measure the real server")
    parser.add_argument("--source", help="with --server: the source tree to run")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    if args.server:
        label = args.source or "this tree"
        print(f"server ({label}): growth of peak RSS (VmHWM) over each DATA; one server, "
              f"the sizes in turn")
        for size, before, grown in server(sizes, args.source):
            print(f"  {size:3d} MiB body: peak RSS {before / 1024:6.1f} MiB before, "
                  f"+{grown / 1024:6.1f} MiB")
        return
    workdir = tempfile.mkdtemp(prefix="data-memory-")
    try:
        print("in process (tracemalloc peak, DATA to 250; protocol + pipeline + spool "
              "with the writer child; checks off)")
        for size in sizes:
            kept = inproc(size * MiB, False, workdir)
            streamed = inproc(size * MiB, True, workdir)
            print(f"  {size:3d} MiB body: in memory (before) {kept / MiB:7.1f} MiB, "
                  f"streamed {streamed / MiB:5.2f} MiB")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

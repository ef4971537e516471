"""Acceptance and end-to-end throughput: mailappliance against a stock Postfix.

Both servers run on loopback ports from one temp directory, each with one
Maildir user (alice@example.test), and are driven by Postfix's own load
generator, smtp-source (one message per connection, 4 KiB bodies):

  acceptance msgs/s  = messages / time until smtp-source exits (every message
                       answered 250 after DATA: on disk and fsynced, for both);
  end-to-end msgs/s  = messages / time until the last one is in the Maildir.

Concurrencies 1, 10, 50; runs are interleaved rep by rep (ours, then Postfix,
for each concurrency) so drift on the machine hits both alike. The figure that
matters is the median of the per-rep ratios appliance / Postfix.

Run as root (Postfix starts as root):  .venv/bin/python bench/accept.py [--reps 5]
It prints figures; it is not a test.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from harness import MailServer, ServerError, free_ports, raise_fd_limit  # noqa: E402
from postfix_peer import PostfixError, PostfixInstance, postfix_available  # noqa: E402

LOCAL = "alice"
DOMAIN = "example.test"
ADDRESS = f"{LOCAL}@{DOMAIN}"
SENDER = "from@bench.example.org"
CLIENT_NAME = "client.bench.example.org"
SMTP_SOURCE = "/usr/sbin/smtp-source"

# Limits that would throttle a load from one IP are off for the benchmark:
# it measures the mail path, not the rate limiter.
BENCH_OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per run at concurrency > 1 (default 2000)")
    parser.add_argument("--messages-c1", type=int, default=2000,
                        help="messages per run at concurrency 1 (default 2000; lower it "
                             "if a slow disk makes c=1 take too long)")
    parser.add_argument("--concurrency", default="1,10,50")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (smtp-source -l)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="bound on one run's end-to-end wait, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    return parser.parse_args(argv)


def count_files(directory):
    try:
        with os.scandir(directory) as entries:
            return sum(1 for entry in entries if entry.is_file())
    except FileNotFoundError:
        return 0


def clear_maildir(maildir):
    for folder in ("new", "cur", "tmp"):
        path = Path(maildir) / folder
        if path.is_dir():
            for entry in path.iterdir():
                entry.unlink()


class Target:
    """One server under test: where to connect and which Maildir fills."""

    def __init__(self, name, port, maildir):
        self.name = name
        self.port = port
        self.maildir = Path(maildir)


def run_once(target, concurrency, messages, size, timeout):
    """One smtp-source run; returns (accept msgs/s, end-to-end msgs/s)."""
    clear_maildir(target.maildir)
    new = target.maildir / "new"
    argv = [SMTP_SOURCE, "-s", str(concurrency), "-m", str(messages), "-l", str(size),
            "-M", CLIENT_NAME, "-f", SENDER, "-t", ADDRESS, f"127.0.0.1:{target.port}"]
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    accepted = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source against {target.name} exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    deadline = start + timeout
    while count_files(new) < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: only {count_files(new)} of {messages} "
                               f"messages in the Maildir after {timeout:g}s")
        time.sleep(0.01)
    delivered = time.monotonic() - start
    return messages / accepted, messages / delivered


def start_ours(workdir):
    ours = MailServer(workdir / "appliance", listeners=("mx",), overrides=BENCH_OVERRIDES,
                      fd_limit=8192)
    ours.add_user(ADDRESS, "bench password")
    return ours.start()


def start_postfix(workdir):
    port, = free_ports(1)
    return PostfixInstance(workdir / "postfix", port, DOMAIN, [LOCAL]).start()


def warm_up(targets, size, timeout):
    for target in targets:
        run_once(target, 10, 100, size, timeout)


def report(results, concurrencies, reps):
    """results[(c, name)] = list of (accept, e2e) per rep, in rep order."""
    print()
    print(f"{'c':>3} {'server':<14} {'accept msg/s (median)':>22} {'end-to-end msg/s (median)':>26}")
    for c in concurrencies:
        for name in ("mailappliance", "postfix"):
            runs = results[(c, name)]
            print(f"{c:>3} {name:<14} {statistics.median(r[0] for r in runs):>22.1f} "
                  f"{statistics.median(r[1] for r in runs):>26.1f}")
    print()
    print(f"median over {reps} reps of the per-rep ratio mailappliance / postfix:")
    print(f"{'c':>3} {'accept':>8} {'end-to-end':>11}")
    for c in concurrencies:
        pairs = list(zip(results[(c, "mailappliance")], results[(c, "postfix")]))
        accept = statistics.median(ours[0] / theirs[0] for ours, theirs in pairs)
        e2e = statistics.median(ours[1] / theirs[1] for ours, theirs in pairs)
        print(f"{c:>3} {accept:>8.2f} {e2e:>11.2f}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why_not = postfix_available()
    if why_not is None and not os.path.exists(SMTP_SOURCE):
        why_not = f"{SMTP_SOURCE} is missing (package postfix)"
    if why_not:
        print(f"bench/accept.py: cannot run: {why_not}", file=sys.stderr)
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    raise_fd_limit(8192)
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-"))
    os.chmod(workdir, 0o755)
    ours = postfix = None
    try:
        ours = start_ours(workdir)
        postfix = start_postfix(workdir)
        targets = [Target("mailappliance", ours.mx_port, ours.maildir(ADDRESS)),
                   Target("postfix", postfix.port, postfix.maildir(LOCAL))]
        fewer = (f", {args.messages_c1} at concurrency 1 (fewer, to bound the run time)"
                 if args.messages_c1 < args.messages else "")
        print(f"mailappliance on :{ours.mx_port}, postfix on :{postfix.port}, "
              f"{args.size}-byte bodies, one message per connection; "
              f"{args.messages} messages per run{fewer}; warm-up of 100 each, not counted")
        warm_up(targets, args.size, args.timeout)
        results = {(c, t.name): [] for c in concurrencies for t in targets}
        for rep in range(1, args.reps + 1):
            for c in concurrencies:
                messages = args.messages_c1 if c == 1 else args.messages
                for target in targets:
                    accept, e2e = run_once(target, c, messages, args.size, args.timeout)
                    results[(c, target.name)].append((accept, e2e))
                    print(f"rep {rep} c={c:<3} {target.name:<14} {messages:>5} msgs  "
                          f"accept {accept:8.1f} msg/s  end-to-end {e2e:8.1f} msg/s",
                          flush=True)
        report(results, concurrencies, args.reps)
        return 0
    except (RuntimeError, ServerError, PostfixError, subprocess.TimeoutExpired) as error:
        print(f"bench/accept.py: {error}", file=sys.stderr)
        if ours is not None:
            print(ours.output()[-3000:], file=sys.stderr)
        return 1
    finally:
        if ours is not None:
            ours.stop()
        if postfix is not None:
            postfix.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

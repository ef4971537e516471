"""Acceptance and end-to-end throughput: mailappliance against a stock Postfix.

Both servers run on loopback ports from one temp directory, each with one
Maildir user (alice@example.test), and are driven by Postfix's own load
generator, smtp-source (one message per connection, 4 KiB bodies):

  acceptance msgs/s  = messages / time until smtp-source exits (every message
                       answered 250 after DATA: on disk and fsynced, for both);
  end-to-end msgs/s  = messages / time until the last one is in the Maildir.

Concurrencies 1, 10, 50; runs are interleaved rep by rep (each server in turn,
for each concurrency) so drift on the machine hits all alike. The figure that
matters is the median of the per-rep ratios appliance / Postfix.

``--checks`` chooses the appliance's mode(s) (issue 16):

  off       ``[checks]`` all off (the test harness default), against a stock
            Postfix (no checks);
  defaults  the SPEC §3 defaults (spf = on, dkim = on, dmarc = enforce, the
            events log on) with ``[dns]`` at a DNS server on loopback port 53
            (bench/checks_peer.py) serving the senders' SPF and DMARC records
            with 300 s TTLs, ``_dmarc`` missing for some senders (NXDOMAIN with
            an SOA: cacheable, RFC 2308). Compared with the stock Postfix and
            with the fair peer, Postfix + postfix-policyd-spf-python + OpenDKIM
            + OpenDMARC checking the same (Debian packages; ``--no-peer`` skips it);
  both      both of the above in one run (the default).

Mail comes from ``SENDERS`` senders (their own domains): one smtp-source per
sender, the sessions split between them (at concurrency 1, one sender a rep).

Run as root (Postfix starts as root):  .venv/bin/python bench/accept.py [--reps 5]
It prints figures; it is not a test.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from harness import MailServer, ServerError, free_ports, raise_fd_limit  # noqa: E402
from postfix_peer import PostfixError, PostfixInstance, postfix_available  # noqa: E402
from checks_peer import (BenchDNS, CheckingPostfix, free_loopback_53, peer_missing,  # noqa: E402
                         sender_zones)
from workdirs import leave  # noqa: E402

LOCAL = "alice"
DOMAIN = "example.test"
ADDRESS = f"{LOCAL}@{DOMAIN}"
SENDERS = [f"from@sender{n}.test" for n in range(1, 6)]
MISSING_DMARC = SENDERS[3:]          # no _dmarc record: a negative answer, cached
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
    parser.add_argument("--checks", choices=("off", "defaults", "both"), default="both",
                        help="the appliance's [checks] mode(s); see the module docstring")
    parser.add_argument("--no-peer", action="store_true",
                        help="without the checking Postfix (policyd-spf, OpenDKIM, OpenDMARC)")
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

    def __init__(self, name, port, maildir, pid=None):
        self.name = name
        self.port = port
        self.maildir = Path(maildir)
        self.pid = pid          # ours: one process, whose CPU time the runs report

    def cpu_seconds(self):
        """``(on a CPU, runnable but waiting for one)`` in seconds, summed over the
        server process's threads (/proc schedstat); None when not known."""
        if self.pid is None:
            return None
        running = waiting = 0
        try:
            for task in os.listdir(f"/proc/{self.pid}/task"):
                with open(f"/proc/{self.pid}/task/{task}/schedstat") as stat:
                    on_cpu, queued, _slices = stat.read().split()
                running, waiting = running + int(on_cpu), waiting + int(queued)
        except (OSError, ValueError):
            return None
        return running / 1e9, waiting / 1e9


def split(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_once(target, concurrency, messages, size, timeout, rep=0):
    """One run: an smtp-source per sender, together; returns (accept msgs/s,
    end-to-end msgs/s)."""
    clear_maildir(target.maildir)
    new = target.maildir / "new"
    senders = SENDERS[:min(concurrency, len(SENDERS))]
    if len(senders) == 1:
        senders = [SENDERS[rep % len(SENDERS)]]
    argvs = [[SMTP_SOURCE, "-s", str(sessions), "-m", str(count), "-l", str(size),
              "-M", CLIENT_NAME, "-f", sender, "-t", ADDRESS, f"127.0.0.1:{target.port}"]
             for sender, sessions, count in zip(senders, split(concurrency, len(senders)),
                                                split(messages, len(senders)))]
    start = time.monotonic()
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for argv in argvs]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    accepted = time.monotonic() - start
    for process, output in zip(processes, outputs):
        if process.returncode != 0:
            raise RuntimeError(f"smtp-source against {target.name} exited "
                               f"{process.returncode}: {output.strip()[-500:]}")
    deadline = start + timeout
    while count_files(new) < messages:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: only {count_files(new)} of {messages} "
                               f"messages in the Maildir after {timeout:g}s")
        time.sleep(0.01)
    delivered = time.monotonic() - start
    return messages / accepted, messages / delivered


def start_ours(workdir, name="appliance", dns_address=None):
    overrides = dict(BENCH_OVERRIDES)
    if dns_address is not None:         # the SPEC §3 defaults; the events log is on
        overrides["checks"] = {"spf": "on", "dkim": "on", "dmarc": "enforce",
                               "greylist": "off"}
        overrides["dns"] = {"nameservers": dns_address, "timeout": "2s"}
    ours = MailServer(workdir / name, listeners=("mx",), overrides=overrides,
                      fd_limit=8192)
    ours.add_user(ADDRESS, "bench password")
    return ours.start()


def start_postfix(workdir):
    port, = free_ports(1)
    return PostfixInstance(workdir / "postfix", port, DOMAIN, [LOCAL]).start()


def start_checking_postfix(workdir, dns_host):
    port, = free_ports(1)
    return CheckingPostfix(workdir / "postfix-checks", port, DOMAIN, [LOCAL], dns_host).start()


def checks_ran(server):
    """The DMARC results the 'defaults' server recorded (a sanity check)."""
    results = {}
    for event in server.events("check.dmarc"):
        results[event["result"]] = results.get(event["result"], 0) + 1
    return results


def warm_up(targets, size, timeout):
    for target in targets:
        run_once(target, 10, 100, size, timeout)


def report(results, concurrencies, reps, names, comparisons):
    """results[(c, name)] = list of (accept, e2e) per rep, in rep order."""
    print()
    print(f"{'c':>3} {'server':<20} {'accept msg/s (median)':>22} "
          f"{'end-to-end msg/s (median)':>26}")
    for c in concurrencies:
        for name in names:
            runs = results[(c, name)]
            print(f"{c:>3} {name:<20} {statistics.median(r[0] for r in runs):>22.1f} "
                  f"{statistics.median(r[1] for r in runs):>26.1f}")
    for ours_name, theirs_name in comparisons:
        print()
        print(f"median over {reps} reps of the per-rep ratio {ours_name} / {theirs_name}:")
        print(f"{'c':>3} {'accept':>8} {'end-to-end':>11}")
        for c in concurrencies:
            pairs = list(zip(results[(c, ours_name)], results[(c, theirs_name)]))
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
    modes = ("off", "defaults") if args.checks == "both" else (args.checks,)
    peer = "defaults" in modes and not args.no_peer
    if peer and peer_missing():
        print(f"bench/accept.py: cannot run the checking peer: {peer_missing()} "
              f"(or use --no-peer)", file=sys.stderr)
        return 2
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    raise_fd_limit(8192)
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-"))
    os.chmod(workdir, 0o755)
    servers, postfixes, dns_server = {}, [], None
    try:
        targets = []
        if "off" in modes:
            ours = servers["appliance-off"] = start_ours(workdir, "appliance-off")
            targets.append(Target("appliance-off", ours.mx_port, ours.maildir(ADDRESS),
                                  ours.process.pid))
        if "defaults" in modes:
            dns_host = free_loopback_53()
            dns_server = BenchDNS(sender_zones(SENDERS, CLIENT_NAME, MISSING_DMARC),
                                  dns_host).start()
            ours = servers["appliance-defaults"] = start_ours(
                workdir, "appliance-defaults", f"{dns_host}:53")
            targets.append(Target("appliance-defaults", ours.mx_port, ours.maildir(ADDRESS),
                                  ours.process.pid))
        postfix = start_postfix(workdir)
        postfixes.append(postfix)
        targets.append(Target("postfix", postfix.port, postfix.maildir(LOCAL)))
        if peer:
            checking = start_checking_postfix(workdir, dns_host)
            postfixes.append(checking)
            targets.append(Target("postfix-checks", checking.port, checking.maildir(LOCAL)))
        fewer = (f", {args.messages_c1} at concurrency 1 (fewer, to bound the run time)"
                 if args.messages_c1 < args.messages else "")
        print(", ".join(f"{t.name} on :{t.port}" for t in targets) +
              f"; {args.size}-byte bodies, one message per connection; "
              f"{args.messages} messages per run{fewer}; senders {', '.join(SENDERS)} "
              f"(no _dmarc: {', '.join(MISSING_DMARC)}); warm-up of 100 each, not counted")
        if dns_server is not None:
            print(f"loopback DNS on {dns_server.address}: TTL {dns_server.ttl} s, "
                  f"negative TTL (SOA minimum) {dns_server.negative_ttl} s")
        warm_up(targets, args.size, args.timeout)
        results = {(c, t.name): [] for c in concurrencies for t in targets}
        for rep in range(1, args.reps + 1):
            for c in concurrencies:
                messages = args.messages_c1 if c == 1 else args.messages
                for target in targets:
                    cpu_before, started = target.cpu_seconds(), time.monotonic()
                    accept, e2e = run_once(target, c, messages, args.size, args.timeout, rep)
                    cpu_after, wall = target.cpu_seconds(), time.monotonic() - started
                    results[(c, target.name)].append((accept, e2e))
                    # Is the server bound by one core, or by a busy machine? (issue 16, target 6)
                    cpu = ("" if cpu_before is None or cpu_after is None else
                           f"  server on a CPU {100 * (cpu_after[0] - cpu_before[0]) / wall:3.0f}%"
                           f", waiting for one {100 * (cpu_after[1] - cpu_before[1]) / wall:3.0f}%"
                           f" of the time")
                    print(f"rep {rep} c={c:<3} {target.name:<20} {messages:>5} msgs  "
                          f"accept {accept:8.1f} msg/s  end-to-end {e2e:8.1f} msg/s{cpu}",
                          flush=True)
        names = [t.name for t in targets]
        comparisons = [(name, "postfix") for name in names if name.startswith("appliance")]
        if peer:
            comparisons.append(("appliance-defaults", "postfix-checks"))
        report(results, concurrencies, args.reps, names, comparisons)
        if "appliance-defaults" in servers:
            print(f"\nappliance-defaults DMARC results (events): "
                  f"{checks_ran(servers['appliance-defaults'])}")
        if dns_server is not None:
            print(f"queries the loopback DNS answered: {len(dns_server.queries)}")
        return 0
    except (RuntimeError, ServerError, PostfixError, OSError,
            subprocess.TimeoutExpired) as error:
        print(f"bench/accept.py: {error}", file=sys.stderr)
        for server in servers.values():
            print(server.output()[-3000:], file=sys.stderr)
        return 1
    finally:
        for server in servers.values():
            server.stop()
        for postfix in postfixes:
            postfix.stop()
        if dns_server is not None:
            dns_server.stop()
        leave(workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

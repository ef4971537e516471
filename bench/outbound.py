"""Outbound queue throughput: mailappliance against a stock Postfix.

2,000 messages of 4 KiB are relayed to 20 remote domains (100 each), d1.bench.test
... d20.bench.test, and delivered to loopback sinks: one Postfix smtp-sink per
domain, on 127.0.0.2 ... 127.0.0.21, all on one port.

  mailappliance  finds each domain's MX through a test DNS server on loopback
                 ([dns] nameservers; mx.dN.bench.test -> 127.0.0.(N+1)), and
                 connects on [outbound] port = the sinks' port, tls = off,
                 [queue] concurrency and per_domain at their defaults.
  postfix        a private, stock instance; transport_maps sends dN.bench.test
                 to smtp:[127.0.0.(N+1)]:PORT (its own resolver cannot be pointed
                 at a test DNS port), so it too has one destination per domain
                 with its default concurrency; smtp_tls_security_level = none.

Both are fed the same way: 20 smtp-source processes at once, one per domain,
from 127.0.0.1 on the MX port (trusted_networks / mynetworks = 127.0.0.0/8, so
relaying needs no AUTH), one message per connection. A run's time is from the
start of the first smtp-source to the moment every sink has counted its 100th
message (smtp-sink -c prints running counters; its -M would exit before
answering the last message, so it is not used). After each run the queue must
be empty (our spool directory / ``postqueue -p``) and each sink must have
received exactly its share: no loss, no duplicates.

Before the runs, smtp-source sends the same load straight to the sinks: that
is the ceiling of this rig (loader + sinks), to show the sinks are not the
bottleneck. Reps interleave (ours, then Postfix); the figure that matters is
the median of the per-rep ratios mailappliance / Postfix (target >= 1.0).

Run as root (Postfix starts as root):  python bench/outbound.py [--reps 3]
It prints figures; it is not a test.
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))

from dns_server import DNSServer  # noqa: E402
from harness import MailServer, ServerError, free_ports, raise_fd_limit  # noqa: E402
from postfix_peer import PostfixError, PostfixInstance, postfix_available  # noqa: E402
from workdirs import leave  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = "from@bench.example.org"
CLIENT_NAME = "client.bench.example.org"
RECIPIENT = "user"
SINK_USER = "nobody"           # smtp-sink refuses to run as root without -u
COUNTER = re.compile(rb"mesg=(\d+)")

# The benchmark measures the mail path, not the per-IP rate limiter.
BENCH_OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000"},
    "relay": {"trusted_networks": "127.0.0.0/8"},
    "outbound": {"tls": "off"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=2000,
                        help="messages per run, split evenly over the domains (default 2000)")
    parser.add_argument("--domains", type=int, default=20, help="remote domains (max 200)")
    parser.add_argument("--size", type=int, default=4096, help="body bytes (smtp-source -l)")
    parser.add_argument("--sessions", type=int, default=1,
                        help="parallel sessions of each domain's smtp-source (default 1, "
                             "i.e. 20 connections in all)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="bound on one run (injection and delivery), seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    args = parser.parse_args(argv)
    if not 1 <= args.domains <= 200 or args.messages % args.domains:
        parser.error("--domains must be 1..200 and divide --messages")
    return args


# -- the remote side ---------------------------------------------------------------

class Domain:
    """One remote domain: its name, its MX address and the recipient used."""

    def __init__(self, index):
        self.name = f"d{index + 1}.bench.test"
        self.mx_host = f"mx.{self.name}"
        self.ip = f"127.0.0.{index + 2}"
        self.recipient = f"{RECIPIENT}@{self.name}"


def dns_zones(domains):
    zones = {}
    for domain in domains:
        zones[domain.name] = {"MX": [(10, domain.mx_host)]}
        zones[domain.mx_host] = {"A": [domain.ip]}
    return zones


class Sink:
    """An smtp-sink on ``ip:port`` whose running message counter is read in a thread."""

    def __init__(self, ip, port):
        self.ip = ip
        self.port = port
        self.count = 0
        self.errors = b""
        self.process = None
        self._thread = None

    def start(self):
        self.process = subprocess.Popen(
            [SMTP_SINK, "-u", SINK_USER, "-c", f"{self.ip}:{self.port}", "256"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name=f"sink-{self.ip}")
        self._thread.start()
        return self

    def _read(self):
        # Counters come as "sess=N quit=N mesg=N\r"; a fatal error is a plain line.
        pending = b""
        while True:
            chunk = self.process.stdout.read1(65536)
            if not chunk:
                return
            pending += chunk
            *records, pending = re.split(rb"[\r\n]", pending)
            for record in records:
                match = COUNTER.search(record)
                if match:
                    self.count = int(match.group(1))
                elif record.strip():
                    self.errors = (self.errors + record + b"\n")[-2000:]

    def alive(self):
        return self.process is not None and self.process.poll() is None

    def stop(self):
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self._thread is not None:
            self._thread.join(5)


def start_sinks(domains, port, timeout=10.0):
    sinks = [Sink(domain.ip, port).start() for domain in domains]
    deadline = time.monotonic() + timeout
    while not all(_listening(sink) for sink in sinks):
        dead = [sink for sink in sinks if not sink.alive()]
        if dead or time.monotonic() > deadline:
            for sink in sinks:
                sink.stop()
            detail = b"".join(s.errors for s in dead).decode(errors="replace")
            raise RuntimeError(f"smtp-sink did not start on port {port}: {detail.strip()}")
        time.sleep(0.05)
    return sinks


def _listening(sink):
    try:
        with socket.create_connection((sink.ip, sink.port), timeout=1) as sock:
            return sock.recv(64).startswith(b"220")
    except OSError:
        return False


# -- the servers under test --------------------------------------------------------

class Target:
    """One server under test: its MX port, how to tell its queue is empty, and
    (for our one-process server) the pid whose CPU time a run is charged."""

    def __init__(self, name, port, queue_empty, describe_queue, pid=None):
        self.name = name
        self.port = port
        self.queue_empty = queue_empty
        self.describe_queue = describe_queue
        self.pid = pid

    def cpu_seconds(self):
        """User + system CPU of ``pid`` (all its threads), or None without one."""
        if self.pid is None:
            return None
        with open(f"/proc/{self.pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_ours(workdir, dns, sink_port):
    overrides = {section: dict(keys) for section, keys in BENCH_OVERRIDES.items()}
    overrides["dns"] = {"nameservers": dns.address, "timeout": "2s"}
    overrides["outbound"]["port"] = str(sink_port)
    ours = MailServer(workdir / "appliance", listeners=("mx",), overrides=overrides,
                      fd_limit=8192)
    return ours.start()


def ours_target(ours):
    def describe():
        files = ours.spool_files()
        return f"{len(files)} file(s) left in the spool, e.g. {[str(p) for p in files[:3]]}"
    return Target("mailappliance", ours.mx_port, lambda: not ours.spool_files(), describe,
                  pid=ours.pid)


def start_postfix(workdir, domains, sink_port):
    port, = free_ports(1)
    directory = workdir / "postfix"
    config_dir = directory / "etc"
    config_dir.mkdir(parents=True)
    transport = config_dir / "transport"
    transport.write_text("".join(f"{d.name} smtp:[{d.ip}]:{sink_port}\n" for d in domains))
    extra = {"transport_maps": f"texthash:{transport}",
             "relay_domains": ", ".join(d.name for d in domains),
             "smtp_tls_security_level": "none"}
    return PostfixInstance(directory, port, "example.test", [], extra_main=extra).start()


def postfix_target(postfix):
    def listing():
        result = subprocess.run(["postqueue", "-c", str(postfix.config_dir), "-p"],
                                capture_output=True, text=True, timeout=60)
        return (result.stdout + result.stderr).strip()
    return Target("postfix", postfix.port, lambda: "Mail queue is empty" in listing(),
                  lambda: listing()[-1500:])


# -- one run -----------------------------------------------------------------------

def inject(port, domains, per_domain, size, sessions, timeout):
    """One smtp-source per domain, all at once; waits (bounded) for all to finish."""
    processes = []
    for domain in domains:
        argv = [SMTP_SOURCE, "-s", str(sessions), "-m", str(per_domain), "-l", str(size),
                "-M", CLIENT_NAME, "-f", SENDER, "-t", domain.recipient, f"127.0.0.1:{port}"]
        processes.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    failures = []
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
            failures.append(f"timed out: {output.decode(errors='replace').strip()[-300:]}")
            continue
        if process.returncode != 0:
            failures.append(f"exit {process.returncode}: "
                            f"{output.decode(errors='replace').strip()[-300:]}")
    if failures:
        raise RuntimeError(f"smtp-source to :{port}: {len(failures)} failed; {failures[0]}")


def run_once(target, sinks, domains, args, per_domain=None):
    """(injection msgs/s, end-to-end msgs/s, CPU share or None) for one run."""
    per_domain = per_domain or args.messages // len(domains)
    total = per_domain * len(domains)
    goals = [sink.count + per_domain for sink in sinks]
    cpu_before = target.cpu_seconds()
    start = time.monotonic()
    inject(target.port, domains, per_domain, args.size, args.sessions, args.timeout)
    injected = time.monotonic() - start
    deadline = start + args.timeout
    while any(sink.count < goal for sink, goal in zip(sinks, goals)):
        if time.monotonic() > deadline:
            got = sum(s.count for s in sinks) - sum(goals) + total
            raise RuntimeError(f"{target.name}: only {got} of {total} messages at the sinks "
                               f"after {args.timeout:g}s; {target.describe_queue()}")
        if not all(sink.alive() for sink in sinks):
            raise RuntimeError("an smtp-sink died during the run")
        time.sleep(0.005)
    delivered = time.monotonic() - start
    cpu = None if cpu_before is None else (target.cpu_seconds() - cpu_before) / delivered
    check_drained(target, sinks, goals)
    return total / injected, total / delivered, cpu


def check_drained(target, sinks, goals, timeout=30.0):
    """The queue empties and no sink got more than its share (no double delivery)."""
    deadline = time.monotonic() + timeout
    while not target.queue_empty():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: queue not empty {timeout:g}s after the last "
                               f"delivery: {target.describe_queue()}")
        time.sleep(0.1)
    extra = [(sink.ip, sink.count - goal) for sink, goal in zip(sinks, goals)
             if sink.count != goal]
    if extra:
        raise RuntimeError(f"{target.name}: sinks got more than their share: {extra}")


def sink_ceiling(sinks, domains, args):
    """The same load from smtp-source straight to the sinks: what the rig can do."""
    per_domain = args.messages // len(domains)
    goals = [sink.count + per_domain for sink in sinks]
    start = time.monotonic()
    processes = [subprocess.Popen(
        [SMTP_SOURCE, "-s", str(args.sessions), "-m", str(per_domain), "-l", str(args.size),
         "-M", CLIENT_NAME, "-f", SENDER, "-t", domain.recipient, f"{sink.ip}:{sink.port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for domain, sink in zip(domains, sinks)]
    for process in processes:
        process.wait(args.timeout)
    elapsed = time.monotonic() - start
    if any(sink.count != goal for sink, goal in zip(sinks, goals)):
        raise RuntimeError("the sinks did not count the direct load exactly")
    return per_domain * len(domains) / elapsed


# -- report ------------------------------------------------------------------------

def report(results, reps, ceiling):
    print()
    print(f"{'server':<14} {'inject msg/s (median)':>22} {'end-to-end msg/s (median)':>26}")
    for name in ("mailappliance", "postfix"):
        runs = results[name]
        print(f"{name:<14} {statistics.median(r[0] for r in runs):>22.1f} "
              f"{statistics.median(r[1] for r in runs):>26.1f}")
    print(f"{'(rig ceiling)':<14} {'':>22} {ceiling:>26.1f}")
    pairs = list(zip(results["mailappliance"], results["postfix"]))
    inject_ratio = statistics.median(o[0] / p[0] for o, p in pairs)
    e2e_ratio = statistics.median(o[1] / p[1] for o, p in pairs)
    print()
    print(f"median over {reps} reps of the per-rep ratio mailappliance / postfix:")
    print(f"  injection {inject_ratio:.2f}   end-to-end (the figure; target >= 1.0) "
          f"{e2e_ratio:.2f}")


def why_not_runnable():
    why_not = postfix_available()
    for tool in (SMTP_SOURCE, SMTP_SINK):
        if why_not is None and not os.path.exists(tool):
            why_not = f"{tool} is missing (package postfix)"
    return why_not


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    why_not = why_not_runnable()
    if why_not:
        print(f"bench/outbound.py: cannot run: {why_not}", file=sys.stderr)
        return 2
    raise_fd_limit(8192)
    domains = [Domain(i) for i in range(args.domains)]
    per_domain = args.messages // args.domains
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-queue-"))
    os.chmod(workdir, 0o755)
    dns = ours = postfix = None
    sinks = []
    try:
        sink_port, = free_ports(1)
        sinks = start_sinks(domains, sink_port)
        dns = DNSServer(dns_zones(domains)).start()
        ours = start_ours(workdir, dns, sink_port)
        postfix = start_postfix(workdir, domains, sink_port)
        targets = [ours_target(ours), postfix_target(postfix)]
        print(f"{args.messages} messages of {args.size} bytes per run, {per_domain} to each of "
              f"{args.domains} domains; sinks on 127.0.0.2-{domains[-1].ip}:{sink_port}; "
              f"{args.domains} smtp-source x {args.sessions} session(s), one message per "
              f"connection; mailappliance MX :{ours.mx_port}, postfix :{postfix.port}")
        ceiling = sink_ceiling(sinks, domains, args)
        print(f"rig ceiling (smtp-source straight to the sinks): {ceiling:.1f} msg/s")
        for target in targets:                  # warm-up, not counted
            run_once(target, sinks, domains, args, per_domain=max(1, per_domain // 20))
        results = {t.name: [] for t in targets}
        for rep in range(1, args.reps + 1):
            for target in targets:
                inject_rate, e2e, cpu = run_once(target, sinks, domains, args)
                results[target.name].append((inject_rate, e2e))
                load = "" if cpu is None else f"  server CPU {cpu:4.0%} of one core"
                print(f"rep {rep} {target.name:<14} {args.messages:>5} msgs  "
                      f"inject {inject_rate:8.1f} msg/s  end-to-end {e2e:8.1f} msg/s "
                      f"({args.messages / e2e:6.2f} s){load}", flush=True)
        report(results, args.reps, ceiling)
        return 0
    except (RuntimeError, ServerError, PostfixError, OSError,
            subprocess.TimeoutExpired) as error:
        print(f"bench/outbound.py: {error}", file=sys.stderr)
        if ours is not None:
            print(ours.output()[-3000:], file=sys.stderr)
        return 1
    finally:
        if ours is not None:
            ours.stop()
        if postfix is not None:
            postfix.stop()
        if dns is not None:
            dns.stop()
        for sink in sinks:
            sink.stop()
        leave(workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

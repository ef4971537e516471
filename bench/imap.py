"""IMAP over a big Maildir: mailappliance against Dovecot (dovecot-imapd).

One Maildir of N messages (3-4 KiB each, as delivery writes them: LF lines,
in new/) is generated once per size and copied for each server, so both start
from the same files with no index or UID list of their own. Each server is
then driven by imaplib over implicit TLS on loopback, in this order:

  select     SELECT INBOX (the first: new/ -> cur/, UIDs assigned, lists written)
  envelopes  UID FETCH 1:* (FLAGS ENVELOPE)
  body       FETCH n BODY[] (median of 20 different n)
  search     SEARCH FROM "sender-17" (a header search over every message)

Sizes default to 10,000 and 100,000 messages, so the growth of each step
shows: ``growth`` is log(t_big / t_small) / log(big / small), 1.0 being
linear. Each size runs ``--reps`` times on fresh copies (appliance and Dovecot
in turn, so drift on the machine hits both alike); the figures are medians,
and the ratio is the median of the per-rep ratios appliance / Dovecot (issue
16's target: at most 1.0 on select, envelopes and search).

While the steps run, a second client (its own process, logged in, nothing
selected) sends NOOP every 20 ms and records each reply time: ``lag`` is the
worst reply time seen during a step, worst over the reps. A server whose
reactor blocks for 300 ms shows a NOOP answered after about 300 ms (target:
under 100 ms). The appliance's own watchdog (``server.stall`` events, at
250 ms) is counted too.

Needs the Debian package dovecot-imapd. Run:
  python bench/imap.py [--sizes 10000,100000] [--reps 3]
It prints figures; it is not a test.
"""

import argparse
import imaplib
import math
import multiprocessing
import os
import pwd
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from harness import MailServer, free_ports, wait_until  # noqa: E402

ADDRESS = "alice@example.test"
PASSWORD = "bench password"
DOVECOT = "/usr/sbin/dovecot"
STEPS = ("select", "envelopes", "body", "search")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000",
                        help="mailbox sizes, comma-separated (default 10000,100000)")
    parser.add_argument("--reps", type=int, default=3, help="runs per size (default 3)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    return parser.parse_args(argv)


# -- the mailbox -------------------------------------------------------------------

def message_bytes(number):
    """A plausible delivered message (LF lines, Return-Path first), 3-4 KiB."""
    sender = f"sender-{number % 50}"
    words = " ".join(WORDS[(number + i) % len(WORDS)] for i in range(12))
    body = "".join(f"Line {i} of message {number}: {words}\n" for i in range(40))
    head = (f"Return-Path: <{sender}@example.org>\n"
            f"Received: from client.example.org ([192.0.2.{number % 250 + 1}])\n"
            f"\tby mail.example.test (mailappliance) with ESMTP id {number:016x}\n"
            f"\tfor <{ADDRESS}>; Mon, 1 Jan 2024 10:00:00 +0000\n"
            f"From: Sender {number % 50} <{sender}@example.org>\n"
            f"To: Alice <{ADDRESS}>\n"
            f"Cc: team-{number % 7}@example.org\n"
            f"Subject: Report {number}: {WORDS[number % len(WORDS)]} status\n"
            f"Date: Mon, 1 Jan 2024 10:{number % 60:02d}:00 +0000\n"
            f"Message-ID: <{number}.bench@example.org>\n"
            "MIME-Version: 1.0\n"
            "Content-Type: text/plain; charset=utf-8\n\n")
    return (head + body).encode()


def make_maildir(path, count):
    """``count`` messages in ``path``/new, named like delivery names them."""
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    start = 1_700_000_000
    for number in range(1, count + 1):
        name = f"{start + number}.Q{number:018x}.mail.example.test"
        target = path / "new" / name
        target.write_bytes(message_bytes(number))
        os.utime(target, (start + number, start + number))


# -- the servers --------------------------------------------------------------------

def tls_context():
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE     # both use the same self-signed certificate
    return context


class Appliance:
    name = "mailappliance"

    def __init__(self, workdir, source):
        self.server = MailServer(workdir, listeners=("imap", "imaps"),   # imap: the readiness probe
                                 overrides={"limits": {"allow": "127.0.0.0/8"}})
        self.server.add_user(ADDRESS, PASSWORD)
        shutil.copytree(source, self.server.maildir(ADDRESS))
        self.server.start()
        self.port = self.server.port("imaps")
        self.cert = self.server.data_dir / "tls" / "cert.pem"
        self.key = self.server.data_dir / "tls" / "key.pem"

    def stop(self):
        self.server.stop()


class Dovecot:
    name = "dovecot"

    def __init__(self, workdir, source, cert, key):
        self.workdir = workdir
        workdir.mkdir(parents=True)
        self.port, = free_ports(1)
        mail = workdir / "mail"
        shutil.copytree(source, mail)
        user = pwd.getpwnam("nobody") if os.getuid() == 0 else pwd.getpwuid(os.getuid())
        login_user = "dovenull" if os.getuid() == 0 else user.pw_name
        for root, dirs, files in os.walk(workdir):
            for item in dirs + files:
                os.chown(os.path.join(root, item), user.pw_uid, user.pw_gid)
        os.chown(workdir, user.pw_uid, user.pw_gid)
        (workdir / "passwd").write_text(f"{ADDRESS}:{{PLAIN}}{PASSWORD}\n")
        config = workdir / "dovecot.conf"
        config.write_text(f"""
base_dir = {workdir}/run
state_dir = {workdir}/state
log_path = {workdir}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
default_internal_user = {user.pw_name}
default_login_user = {login_user}
first_valid_uid = {min(user.pw_uid, 500)}
mail_location = maildir:{mail}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {workdir}/passwd
}}
userdb {{
  driver = static
  args = uid={user.pw_uid} gid={user.pw_gid} home={workdir}/home
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {self.port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0666
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
""")
        self.config = config
        self.process = subprocess.Popen([DOVECOT, "-F", "-c", str(config)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_until(self._listening, 20, what="dovecot listening")

    def _listening(self):
        if self.process.poll() is not None:
            raise RuntimeError("dovecot exited: " + self.log())
        try:
            client = imaplib.IMAP4_SSL("127.0.0.1", self.port, ssl_context=tls_context(),
                                       timeout=5)
            client.logout()
            return True
        except OSError:
            return False

    def log(self):
        path = self.workdir / "dovecot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# -- the reactor-lag probe ----------------------------------------------------------

PROBE_INTERVAL = 0.02


def _probe(port, stop, results):
    """In its own process (no GIL shared with the client under test): NOOP
    every 20 ms; ``results`` gets [(monotonic send time, reply seconds)]."""
    samples, error = [], None
    try:
        client = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=tls_context(), timeout=600)
        client.login(ADDRESS, PASSWORD)
        while not stop.is_set():
            sent = time.monotonic()
            client.noop()
            samples.append((sent, time.monotonic() - sent))
            time.sleep(max(0.0, PROBE_INTERVAL - (time.monotonic() - sent)))
        client.logout()
    except Exception as exc:        # reported by the parent, with what was measured
        error = repr(exc)
    results.put((samples, error))


class LagProbe:
    def __init__(self, port):
        context = multiprocessing.get_context("fork")
        self._stop = context.Event()
        self._results = context.Queue()
        self._process = context.Process(target=_probe, args=(port, self._stop, self._results),
                                        daemon=True)
        self._process.start()
        self.samples = None

    def finish(self):
        self._stop.set()
        self.samples, error = self._results.get(timeout=600)
        self._process.join(30)
        if error is not None:
            raise RuntimeError(f"the NOOP probe failed: {error}")
        return self.samples

    def worst(self, start, end):
        """The worst NOOP reply time of probes in flight during [start, end]."""
        return max((lag for sent, lag in self.samples if sent <= end and sent + lag >= start),
                   default=0.0)


# -- the steps ----------------------------------------------------------------------

def check(response):
    typ, data = response
    if typ != "OK":
        raise RuntimeError(f"IMAP answered {typ}: {data!r}")
    return data


def run_steps(server, count):
    """{step: seconds} and {step: worst NOOP reply seconds during the step}."""
    probe = LagProbe(server.port)
    try:
        times, windows = _steps(server, count)
    finally:
        probe.finish()
    lags = {step: probe.worst(*windows[step]) for step in STEPS}
    return times, lags


def _steps(server, count):
    client = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=tls_context(),
                               timeout=600)
    client.login(ADDRESS, PASSWORD)
    time.sleep(0.2)                     # the probe is logged in and ticking
    times, windows = {}, {}

    def timed(f):
        start = time.monotonic()
        result = f()
        windows[step] = (start, time.monotonic())
        return windows[step][1] - start, result

    step = "select"
    times["select"], data = timed(lambda: check(client.select("INBOX")))
    if int(data[0]) != count:
        raise RuntimeError(f"{server.name}: SELECT says {data[0]!r}, expected {count}")
    step = "envelopes"
    times["envelopes"], data = timed(
        lambda: check(client.uid("FETCH", "1:*", "(FLAGS ENVELOPE)")))
    fetched = sum(1 for item in data if isinstance(item, tuple) or b"ENVELOPE" in item)
    if fetched != count:
        raise RuntimeError(f"{server.name}: {fetched} envelopes for {count} messages")
    step = "body"
    samples = []
    body_start = time.monotonic()
    for i in range(20):
        n = 1 + (i * 7919) % count
        elapsed, data = timed(lambda: check(client.fetch(str(n), "(BODY[])")))
        if f"message {n}:".encode() not in data[0][1]:
            raise RuntimeError(f"{server.name}: wrong body for message {n}")
        samples.append(elapsed)
    times["body"] = statistics.median(samples)
    windows["body"] = (body_start, time.monotonic())
    step = "search"
    times["search"], data = timed(lambda: check(client.search(None, 'FROM "sender-17"')))
    expected = sum(1 for n in range(1, count + 1) if n % 50 == 17)
    if len(data[0].split()) != expected:
        raise RuntimeError(f"{server.name}: SEARCH found {len(data[0].split())}, "
                           f"expected {expected}")
    client.logout()
    return times, windows


def bench_once(base, source, count, rep):
    """One run of each server on fresh copies of ``source``:
    {name: ({step: s}, {step: worst lag s})}, and the appliance's server.stall count."""
    results = {}
    appliance = Appliance(base / f"appliance-{count}-{rep}", source)
    try:
        results["mailappliance"] = run_steps(appliance, count)
        stalls = appliance.server.events("server.stall")
        dovecot = Dovecot(base / f"dovecot-{count}-{rep}", source, appliance.cert, appliance.key)
    finally:
        appliance.stop()
    try:
        results["dovecot"] = run_steps(dovecot, count)
    finally:
        dovecot.stop()
    shutil.rmtree(base / f"appliance-{count}-{rep}", ignore_errors=True)
    shutil.rmtree(base / f"dovecot-{count}-{rep}", ignore_errors=True)
    return results, stalls


def bench_size(base, count, reps):
    """Medians over ``reps`` runs: {name: {step: s}}, {step: median ratio},
    {name: {step: worst lag s}} and the appliance's server.stall events."""
    source = base / f"source-{count}"
    make_maildir(source, count)
    runs, stalls = [], []
    for rep in range(reps):
        run, stalled = bench_once(base, source, count, rep)
        runs.append(run)
        stalls.extend(stalled)
    shutil.rmtree(source, ignore_errors=True)
    names = ("mailappliance", "dovecot")
    medians = {name: {step: statistics.median(run[name][0][step] for run in runs)
                      for step in STEPS} for name in names}
    ratios = {step: statistics.median(run["mailappliance"][0][step] / run["dovecot"][0][step]
                                      for run in runs) for step in STEPS}
    lags = {name: {step: max(run[name][1][step] for run in runs) for step in STEPS}
            for name in names}
    return medians, ratios, lags, stalls


def report(all_results, sizes, reps):
    print(f"median of {reps} reps; lag = worst NOOP reply during the step over the reps")
    print(f"{'messages':>9} {'step':<10} {'appliance':>11} {'dovecot':>11} {'ratio':>7} "
          f"{'lag ours':>9} {'lag dovecot':>11}")
    for count in sizes:
        medians, ratios, lags, stalls = all_results[count]
        ours, theirs = medians["mailappliance"], medians["dovecot"]
        for step in STEPS:
            print(f"{count:>9} {step:<10} {ours[step] * 1000:>9.1f}ms "
                  f"{theirs[step] * 1000:>9.1f}ms {ratios[step]:>7.2f} "
                  f"{lags['mailappliance'][step] * 1000:>7.1f}ms "
                  f"{lags['dovecot'][step] * 1000:>9.1f}ms")
        worst = max((s.get("late_ms", 0) for s in stalls), default=0)
        print(f"{count:>9} server.stall events (appliance, all reps): {len(stalls)}"
              + (f", worst {worst} ms" if stalls else ""))
    if len(sizes) >= 2:
        small, big = sizes[0], sizes[-1]
        print(f"\ngrowth from {small} to {big} messages (1.0 = linear):")
        for name in ("mailappliance", "dovecot"):
            parts = []
            for step in STEPS:
                t_small = all_results[small][0][name][step]
                t_big = all_results[big][0][name][step]
                growth = math.log(t_big / t_small) / math.log(big / small) if t_small else 0
                parts.append(f"{step} {growth:.2f}")
            print(f"  {name:<14} " + ", ".join(parts))


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(DOVECOT):
        sys.exit("bench/imap.py needs Dovecot: apt-get install -y dovecot-imapd")
    sizes = sorted(int(s) for s in args.sizes.split(","))
    base = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    os.chmod(base, 0o755)
    try:
        results = {count: bench_size(base, count, args.reps) for count in sizes}
        report(results, sizes, args.reps)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""IMAP over a big Maildir: mailappliance against Dovecot (dovecot-imapd).

One Maildir of N messages (3-4 KiB each, as delivery writes them: LF lines,
in new/) is generated once per size and copied for each server, so both start
from the same files with no index or UID list of their own. Each server is
then driven by imaplib over implicit TLS on loopback, in this order:

  select     SELECT INBOX (the first: new/ -> cur/, UIDs assigned, lists written)
  envelopes  UID FETCH 1:* (FLAGS ENVELOPE)
  body       FETCH n BODY[] (median of 20 different n)
  search     SEARCH FROM "sender-17" (a header search over every message)

Sizes default to 2500 and 10000 messages, so the growth of each step shows:
``growth`` is log(t_big / t_small) / log(big / small), 1.0 being linear.
Each size runs ``--reps`` times on fresh copies (appliance and Dovecot in
turn, so drift on the machine hits both alike); the figures are medians, and
the ratio is the median of the per-rep ratios appliance / Dovecot (target: at
most 2 on every step).

Needs the Debian package dovecot-imapd. Run:  python bench/imap.py [--sizes 2500,10000] [--reps 3]
It prints figures; it is not a test.
"""

import argparse
import imaplib
import math
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
    parser.add_argument("--sizes", default="2500,10000",
                        help="mailbox sizes, comma-separated (default 2500,10000)")
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


# -- the steps ----------------------------------------------------------------------

def timed(f):
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def check(response):
    typ, data = response
    if typ != "OK":
        raise RuntimeError(f"IMAP answered {typ}: {data!r}")
    return data


def run_steps(server, count):
    client = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=tls_context(),
                               timeout=600)
    client.login(ADDRESS, PASSWORD)
    times = {}
    times["select"], data = timed(lambda: check(client.select("INBOX")))
    if int(data[0]) != count:
        raise RuntimeError(f"{server.name}: SELECT says {data[0]!r}, expected {count}")
    times["envelopes"], data = timed(
        lambda: check(client.uid("FETCH", "1:*", "(FLAGS ENVELOPE)")))
    fetched = sum(1 for item in data if isinstance(item, tuple) or b"ENVELOPE" in item)
    if fetched != count:
        raise RuntimeError(f"{server.name}: {fetched} envelopes for {count} messages")
    samples = []
    for i in range(20):
        n = 1 + (i * 7919) % count
        elapsed, data = timed(lambda: check(client.fetch(str(n), "(BODY[])")))
        if f"message {n}:".encode() not in data[0][1]:
            raise RuntimeError(f"{server.name}: wrong body for message {n}")
        samples.append(elapsed)
    times["body"] = statistics.median(samples)
    times["search"], data = timed(lambda: check(client.search(None, 'FROM "sender-17"')))
    expected = sum(1 for n in range(1, count + 1) if n % 50 == 17)
    if len(data[0].split()) != expected:
        raise RuntimeError(f"{server.name}: SEARCH found {len(data[0].split())}, "
                           f"expected {expected}")
    client.logout()
    return times


def bench_once(base, source, count, rep):
    """One run of each server on fresh copies of ``source``: {name: {step: s}}."""
    results = {}
    appliance = Appliance(base / f"appliance-{count}-{rep}", source)
    try:
        results["mailappliance"] = run_steps(appliance, count)
        dovecot = Dovecot(base / f"dovecot-{count}-{rep}", source, appliance.cert, appliance.key)
    finally:
        appliance.stop()
    try:
        results["dovecot"] = run_steps(dovecot, count)
    finally:
        dovecot.stop()
    shutil.rmtree(base / f"appliance-{count}-{rep}", ignore_errors=True)
    shutil.rmtree(base / f"dovecot-{count}-{rep}", ignore_errors=True)
    return results


def bench_size(base, count, reps):
    """Medians over ``reps`` runs: {name: {step: s}}, and {step: median ratio}."""
    source = base / f"source-{count}"
    make_maildir(source, count)
    runs = [bench_once(base, source, count, rep) for rep in range(reps)]
    medians = {name: {step: statistics.median(run[name][step] for run in runs)
                      for step in STEPS} for name in ("mailappliance", "dovecot")}
    ratios = {step: statistics.median(run["mailappliance"][step] / run["dovecot"][step]
                                      for run in runs) for step in STEPS}
    return medians, ratios


def report(all_results, sizes):
    print(f"{'messages':>9} {'step':<10} {'appliance':>11} {'dovecot':>11} {'ratio':>7}")
    for count in sizes:
        medians, ratios = all_results[count]
        ours, theirs = medians["mailappliance"], medians["dovecot"]
        for step in STEPS:
            print(f"{count:>9} {step:<10} {ours[step] * 1000:>9.1f}ms "
                  f"{theirs[step] * 1000:>9.1f}ms {ratios[step]:>7.2f}")
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
        report(results, sizes)
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

"""The auditor offline: replay speed and exact findings on a planted log; fail2ban beside it.

1. Generates a schema-valid event log (every record an event of the catalogue
   with exactly its fields, written the way ``[log] events`` is) of
   ``--events`` records (default 1,000,000) over about two days: ordinary MX,
   submission, IMAP traffic from a large pool of addresses (with some wrong
   passwords, unknown recipients and protocol errors, all well under any
   threshold) and planted attackers: brute force (IPv4 and an IPv6 /64),
   spraying, one account attacked from 20 networks, recipient harvesting,
   relay probing, protocol abuse, an admin SSH failure, a send spike and
   server trouble.
2. Replays it with the auditor's own code (``appliance.audit.replay``, the
   default [audit] and [limits] thresholds), plain and gzip, ``--reps`` times
   each: events/s (best and median), and checks that the findings are exactly
   the planted ones (rule and network/account, as a multiset).
3. Writes the same traffic as Postfix syslog lines (one per event: connect,
   SASL failures, RCPT rejects ...) and runs ``fail2ban-regex`` with the stock
   ``postfix-sasl`` filter (``postfix[mode=auth]``, Debian package fail2ban) on
   it: lines/s and matched lines (it only matches SASL failures, so its job is
   a small part of ours).
4. With ``--live``: the live cost. MX acceptance (Postfix's smtp-source, one
   message per connection, as bench/accept.py) of two real servers, one with
   ``[audit] enabled = off``, one with it on, interleaved rep by rep; the
   figure is the median of the per-rep ratios on / off.

Run:  .venv/bin/python bench/audit.py [--events 1000000] [--reps 3] [--no-fail2ban]
                                      [--live [--live-messages 1000] [--live-concurrency 10]]
It prints figures; it is not a test. The machine may be shared: say so with them.
"""

import argparse
import collections
import gzip
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "bench"))

import appliance.tap  # noqa: E402,F401  (registers every event)
from appliance import events  # noqa: E402
from appliance.audit import replay  # noqa: E402
from appliance.audit.rules import ADMIN_LOGIN_FAILED, Settings  # noqa: E402
from appliance.testing import make_config  # noqa: E402

START = 1_790_000_000.0
SPAN = 2 * 86400.0                # the log covers about two days
INSTANCES = 5                     # of each planted attack
ADMIN_FIELDS = ("peer_ip", "user", "key_fingerprint")    # the admin shell's event, if not registered
USERS = [f"user{n}@example.test" for n in range(2000)]
FAIL2BAN_FILTER = "postfix[mode=auth]"     # jail.conf [postfix-sasl]


def schema(name):
    if name == ADMIN_LOGIN_FAILED and name not in events.EVENTS:
        return ADMIN_FIELDS
    return events.EVENTS[name][1]


class Log:
    """Records (ts, seq, name, fields) gathered, then written in time order."""

    def __init__(self):
        self.records = []
        self.seq = 0

    def add(self, ts, name, **fields):
        wanted = set(schema(name))
        if set(fields) != wanted:
            raise AssertionError(f"{name}: fields {sorted(fields)} != {sorted(wanted)}")
        self.seq += 1
        self.records.append((ts, self.seq, name, fields))


class Traffic:
    def __init__(self, log, rng):
        self.log, self.rng = log, rng
        self.sessions = 0

    def ip(self):
        r = self.rng.getrandbits(22)            # 100.64.0.0/10: a big pool, no attacker in it
        return f"100.{64 + (r >> 16)}.{(r >> 8) & 255}.{r & 255}"

    def session_id(self):
        self.sessions += 1
        return f"{self.sessions:012x}"

    def qid(self, ts):
        return f"{int(ts * 1_000_000):014x}{self.rng.getrandbits(32):08x}"

    def mx(self, ts, unknown=False, protocol_error=False):
        add, ip, s = self.log.add, self.ip(), self.session_id()
        add(ts, "smtp.connect", session=s, peer_ip=ip, peer_port=40000, listener="mx")
        add(ts + 0.01, "smtp.helo", session=s, peer_ip=ip, helo="mta.example.net", esmtp=True)
        if protocol_error:
            add(ts + 0.02, "smtp.protocol_error", session=s, peer_ip=ip, kind="bad_command",
                detail="XYZZY")
        add(ts + 0.02, "smtp.mail", session=s, peer_ip=ip, sender="news@example.net", size=0)
        rcpt = self.rng.choice(USERS)
        if unknown:
            add(ts + 0.03, "smtp.rcpt.rejected", session=s, peer_ip=ip,
                recipient="nobody@example.test", code=550, reason="User unknown",
                status="5.1.1")
        add(ts + 0.03, "smtp.rcpt.accepted", session=s, peer_ip=ip, recipient=rcpt)
        q = self.qid(ts)
        add(ts + 0.05, "smtp.message.accepted", session=s, peer_ip=ip, queue_id=q,
            sender="news@example.net", recipients=[rcpt], size=4321, account="")
        add(ts + 0.06, "delivery.local", queue_id=q, recipient=rcpt,
            mailbox=f"example.test/{rcpt.split('@')[0]}", size=4321, delay=0.01)
        add(ts + 0.07, "smtp.disconnect", session=s, peer_ip=ip, duration=0.07, messages=1)

    def submission(self, ts, fail=False):
        add, ip, s = self.log.add, self.ip(), self.session_id()
        user = self.rng.choice(USERS)
        add(ts, "smtp.connect", session=s, peer_ip=ip, peer_port=40001, listener="submission")
        add(ts + 0.01, "smtp.starttls", session=s, peer_ip=ip, listener="submission",
            version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", implicit=False)
        if fail:
            add(ts + 0.02, "auth.failure", session=s, peer_ip=ip, listener="submission",
                mechanism="PLAIN", account=user, reason="wrong password or unknown user")
            add(ts + 0.03, "smtp.disconnect", session=s, peer_ip=ip, duration=0.03, messages=0)
            return
        add(ts + 0.02, "auth.success", session=s, peer_ip=ip, listener="submission",
            mechanism="PLAIN", account=user)
        self.send(ts + 0.03, s, ip, user)
        add(ts + 0.08, "smtp.disconnect", session=s, peer_ip=ip, duration=0.08, messages=1)

    def send(self, ts, s, ip, user):
        add, q = self.log.add, self.qid(ts)
        add(ts, "smtp.mail", session=s, peer_ip=ip, sender=user, size=0)
        add(ts + 0.005, "smtp.rcpt.accepted", session=s, peer_ip=ip,
            recipient="friend@example.net")
        add(ts + 0.01, "dkim.signed", session=s, peer_ip=ip, queue_id=q, domain="example.test",
            selector="mail", algorithm="rsa-sha256")
        add(ts + 0.02, "smtp.message.accepted", session=s, peer_ip=ip, queue_id=q, sender=user,
            recipients=["friend@example.net"], size=2048, account=user)
        add(ts + 0.04, "delivery.remote", queue_id=q, recipient="friend@example.net",
            remote_host="mx.example.net", remote_ip="192.0.2.250", tls=True, code=250,
            response="2.0.0 Ok")

    def imap(self, ts):
        add, ip, s = self.log.add, self.ip(), self.session_id()
        user = self.rng.choice(USERS)
        add(ts, "imap.connect", session=s, peer_ip=ip, listener="imaps")
        add(ts + 0.01, "imap.starttls", session=s, peer_ip=ip, listener="imaps",
            version="TLSv1.3", cipher="TLS_AES_256_GCM_SHA384", implicit=True)
        add(ts + 0.02, "auth.success", session=s, peer_ip=ip, listener="imaps",
            mechanism="LOGIN", account=user)
        add(ts + 0.02, "imap.login", session=s, peer_ip=ip, listener="imaps",
            mechanism="LOGIN", account=user)
        add(ts + 5.0, "imap.disconnect", session=s, peer_ip=ip, duration=5.0, account=user)

    def background(self, total):
        """Ordinary traffic over SPAN until the log holds exactly ``total`` records."""
        count = total - len(self.log.records)
        kinds = [(self.mx, 0.55), (self.imap, 0.25), (self.submission, 0.14),
                 (lambda ts: self.mx(ts, unknown=True), 0.02),
                 (lambda ts: self.submission(ts, fail=True), 0.03),
                 (lambda ts: self.mx(ts, protocol_error=True), 0.01)]
        funcs, weights = zip(*kinds)
        sessions = count // 6
        ts = START
        step = SPAN / sessions
        while len(self.log.records) < total:
            ts += self.rng.expovariate(1.0 / step)
            self.rng.choices(funcs, weights)[0](ts)
        del self.log.records[total:]        # the end of the last session


def plant(log, traffic, rng):
    """The attacks; returns the expected findings as a Counter of (rule, key)."""
    expected = collections.Counter()
    add = log.add
    slots = list(range(1, 7 * INSTANCES * 2 + 1))
    rng.shuffle(slots)
    when = iter(START + slot * SPAN / (len(slots) + 2) for slot in slots)   # hours apart

    def fail(ts, ip, account, listener="submission"):
        add(ts, "auth.failure", session=traffic.session_id(), peer_ip=ip, listener=listener,
            mechanism="PLAIN", account=account, reason="wrong password or unknown user")

    for i in range(INSTANCES):
        ts, ip = next(when), f"198.51.100.{i + 1}"
        for k in range(8):
            fail(ts + 3 * k, ip, "admin@example.test", listener="imap")
        expected["brute_force", ip] += 1

        ts, net = next(when), f"2001:db8:{i + 1}::"
        for k in range(6):
            fail(ts + 2 * k, f"2001:db8:{i + 1}::{k + 1:x}", "info@example.test")
        expected["brute_force", f"{net}/64"] += 1

        ts, ip = next(when), f"198.51.101.{i + 1}"
        for k in range(12):
            fail(ts + 3 * k, ip, USERS[k * 7])
        expected["brute_force", ip] += 1
        expected["spraying", ip] += 1

        ts, account = next(when), f"ceo{i}@example.test"
        for k in range(20):
            fail(ts + 10 * k, f"203.0.113.{20 * i + k + 1}", account)
        expected["account_attack", account] += 1

        ts, ip = next(when), f"192.0.2.{i + 1}"
        s = traffic.session_id()
        add(ts, "smtp.connect", session=s, peer_ip=ip, peer_port=5000, listener="mx")
        for k in range(25):
            add(ts + 1 + k, "smtp.rcpt.rejected", session=s, peer_ip=ip,
                recipient=f"guess{k}@example.test", code=550, reason="User unknown",
                status="5.1.1")
        expected["harvesting", ip] += 1

        ts, ip = next(when), f"192.0.2.{100 + i}"
        s = traffic.session_id()
        for k, domain in enumerate(("example.org", "example.com", "example.net")):
            add(ts + k, "smtp.rcpt.rejected", session=s, peer_ip=ip,
                recipient=f"victim@{domain}", code=554, reason="Relay access denied",
                status="5.7.1")
        expected["relay_probe", ip] += 1

        ts, ip = next(when), f"192.0.2.{150 + i}"
        for k in range(30):
            kind = ("bad_command", "bare_cr_lf", "long_line")[k % 3]
            add(ts + k, "smtp.protocol_error", session=traffic.session_id(), peer_ip=ip,
                kind=kind, detail="smuggling?")
        expected["protocol_abuse", ip] += 1

        ts, ip = next(when), f"198.51.102.{i + 1}"
        admin = dict(peer_ip=ip, user="root", key_fingerprint="SHA256:x", reason="unknown key",
                     attempts=1)
        add(ts, ADMIN_LOGIN_FAILED, **{k: v for k, v in admin.items()
                                       if k in schema(ADMIN_LOGIN_FAILED)})
        expected["admin_ssh", ip] += 1

        ts, user = next(when), f"spammer{i}@example.test"
        s, ip = traffic.session_id(), f"198.51.103.{i + 1}"
        for k in range(210):
            traffic.send(ts + 2 * k, s, ip, user)
        expected["send_spike", user] += 1

        ts = next(when)
        trouble = [("spool.writer.lost", dict(pid=4242, status="killed by signal 9")),
                   ("ldap.unavailable", dict(url="ldap://127.0.0.1:389", error="timeout")),
                   ("dkim.sign_failed", dict(session="s", peer_ip="100.64.0.1", queue_id="q",
                                             domain="example.test", reason="no key"))]
        name, fields = trouble[i % len(trouble)]
        add(ts, name, **fields)
        expected["server_trouble", ""] += 1
    return expected


def write_log(log, path):
    encoder = json.JSONEncoder(default=str, ensure_ascii=False)
    log.records.sort(key=lambda r: (r[0], r[1]))
    with open(path, "w", encoding="utf-8") as out:
        for ts, _, name, fields in log.records:
            record = {"ts": round(ts, 6), "event": name}
            record.update(fields)
            out.write(encoder.encode(record) + "\n")


# -- Postfix syslog lines for the same traffic


def _stamp(ts):
    return time.strftime("%b %e %H:%M:%S", time.gmtime(ts))


def postfix_line(ts, name, f):
    ip = f.get("peer_ip", "")
    who = f"unknown[{ip}]"
    head = f"{_stamp(ts)} mail "
    if name == "auth.failure":
        return (f"{head}postfix/submission/smtpd[2101]: warning: {who}: SASL "
                f"{f['mechanism']} authentication failed: authentication failure")
    if name == "smtp.connect":
        return f"{head}postfix/smtpd[2100]: connect from {who}"
    if name == "smtp.disconnect":
        return f"{head}postfix/smtpd[2100]: disconnect from {who} ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"
    if name == "smtp.rcpt.rejected":
        return (f"{head}postfix/smtpd[2100]: NOQUEUE: reject: RCPT from {who}: "
                f"{f['code']} {f['status']} <{f['recipient']}>: Recipient address rejected: "
                f"{f['reason']}; from=<x@example.net> to=<{f['recipient']}> proto=ESMTP "
                "helo=<client>")
    if name == "smtp.message.accepted":
        return f"{head}postfix/cleanup[2102]: {f['queue_id']}: message-id=<{f['queue_id']}@example.net>"
    if name == "smtp.protocol_error":
        return f"{head}postfix/smtpd[2100]: warning: non-SMTP command from {who}: {f['detail']}"
    if name.startswith("delivery."):
        return (f"{head}postfix/local[2103]: {f.get('queue_id', '')}: to=<{f.get('recipient', '')}>, "
                "relay=local, delay=0.01, dsn=2.0.0, status=sent (delivered to maildir)")
    if name == ADMIN_LOGIN_FAILED:
        return f"{head}sshd[2200]: Failed publickey for root from {ip} port 5000 ssh2"
    if ip:
        return f"{head}postfix/smtpd[2100]: {name.replace('.', ' ')} from {who}"
    return f"{head}postfix/master[1]: {name.replace('.', ' ')}"


def write_postfix(log, path):
    with open(path, "w", encoding="utf-8") as out:
        for ts, _, name, fields in log.records:
            out.write(postfix_line(ts, name, fields) + "\n")


def run_fail2ban(path):
    if not shutil.which("fail2ban-regex"):
        return None
    started = time.perf_counter()
    result = subprocess.run(["fail2ban-regex", str(path), FAIL2BAN_FILTER],
                            capture_output=True, text=True)
    seconds = time.perf_counter() - started
    matched = None
    for line in result.stdout.splitlines():
        if line.startswith("Lines:") and "matched" in line:
            # "Lines: 1000000 lines, 0 ignored, 3512 matched, 996488 missed"
            matched = int(line.split(",")[2].split()[0])
    return seconds, matched, result


def detection_latency(findings=2000):
    """Seconds from the emit of the event that crosses brute force's threshold
    to the ban call (median, and whether it ran inside that emit)."""
    from appliance.audit.actions import Actions
    from appliance.audit.service import AuditService

    class Bans:
        def __init__(self):
            self.at = None

        def ban(self, network, reason="", rule=None):
            self.at = time.perf_counter()

    bans = Bans()
    settings = Settings(auth_failures=5)
    auditor = AuditService(settings, Actions(bans=bans))
    auditor.startService()
    delays, inside = [], 0
    try:
        for n in range(findings):
            ip = f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
            for k in range(5):
                bans.at = None
                before = time.perf_counter()
                events.emit("auth.failure", session="s", peer_ip=ip, listener="submission",
                            mechanism="PLAIN", account="a@example.test", reason="bad")
                after = time.perf_counter()
            if bans.at is not None:
                delays.append(bans.at - before)
                inside += before <= bans.at <= after
    finally:
        auditor.stopService()
    return statistics.median(delays), inside, findings


def observer_cost(rounds=200_000):
    """CPU seconds the live auditor adds to one emit, for the events of one MX
    message (connect, helo, mail, rcpt, accepted, disconnect): with / without."""
    from appliance.audit.actions import Actions
    from appliance.audit.service import AuditService

    def message(n):
        ip = "100.64.0.1"
        events.emit("smtp.connect", session="s", peer_ip=ip, peer_port=1, listener="mx")
        events.emit("smtp.helo", session="s", peer_ip=ip, helo="x", esmtp=True)
        events.emit("smtp.mail", session="s", peer_ip=ip, sender="a@b.test", size=0)
        events.emit("smtp.rcpt.accepted", session="s", peer_ip=ip, recipient="c@d.test")
        events.emit("smtp.message.accepted", session="s", peer_ip=ip, queue_id="q",
                    sender="a@b.test", recipients=["c@d.test"], size=10, account="")
        events.emit("smtp.disconnect", session="s", peer_ip=ip, duration=0.1, messages=1)

    def timed():
        t0 = time.process_time()
        for n in range(rounds // 6):
            message(n)
        return (time.process_time() - t0) / (rounds // 6)

    without = min(timed() for _ in range(3))
    auditor = AuditService(Settings(), Actions())
    auditor.startService()
    try:
        with_ = min(timed() for _ in range(3))
    finally:
        auditor.stopService()
    return without, with_


def live_cost(workdir, reps, messages, concurrency):
    """Median of the per-rep ratios of MX acceptance msgs/s, auditor on / off."""
    import accept as accept_bench
    from harness import MailServer
    servers = {}
    try:
        for label, enabled in (("off", "off"), ("on", "on")):
            overrides = {k: dict(v) for k, v in accept_bench.BENCH_OVERRIDES.items()}
            overrides["audit"] = {"enabled": enabled}
            server = MailServer(workdir / f"audit-{label}", listeners=("mx",),
                                overrides=overrides, fd_limit=8192)
            server.add_user(accept_bench.ADDRESS, "bench password")
            servers[label] = server.start()
        targets = {label: accept_bench.Target(label, s.mx_port, s.maildir(accept_bench.ADDRESS))
                   for label, s in servers.items()}
        for target in targets.values():
            accept_bench.run_once(target, concurrency, 100, 4096, 600)      # warm-up
        ratios = []
        for rep in range(1, reps + 1):
            rates = {}
            for label, target in targets.items():
                rates[label] = accept_bench.run_once(target, concurrency, messages, 4096, 600)[0]
            ratios.append(rates["on"] / rates["off"])
            print(f"  live rep {rep}: accept auditor off {rates['off']:7.1f} msg/s, "
                  f"on {rates['on']:7.1f} msg/s, ratio {ratios[-1]:.3f}", flush=True)
        return statistics.median(ratios)
    finally:
        for server in servers.values():
            server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--no-fail2ban", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    parser.add_argument("--live", action="store_true",
                        help="also measure MX acceptance with the auditor on vs off")
    parser.add_argument("--live-messages", type=int, default=1000)
    parser.add_argument("--live-concurrency", type=int, default=10)
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    try:
        rng = random.Random(args.seed)
        log = Log()
        traffic = Traffic(log, rng)
        started = time.perf_counter()
        expected = plant(log, traffic, rng)
        traffic.background(args.events)
        plain, gz, syslog = workdir / "events.json", workdir / "events.json.gz", \
            workdir / "mail.log"
        write_log(log, plain)
        with open(plain, "rb") as src, gzip.open(gz, "wb", compresslevel=6) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        write_postfix(log, syslog)
        total = len(log.records)
        auth_failures = sum(1 for r in log.records if r[2] == "auth.failure")
        print(f"log: {total} events ({plain.stat().st_size / 1e6:.0f} MB plain, "
              f"{gz.stat().st_size / 1e6:.0f} MB gzip), {auth_failures} auth failures, "
              f"{sum(expected.values())} planted findings; made in "
              f"{time.perf_counter() - started:.0f}s")

        settings = Settings.from_config(make_config())
        for label, path in (("plain", plain), ("gzip", gz)):
            rates = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                report = replay.replay([str(path)], settings)
                rates.append(total / (time.perf_counter() - t0))
                found = collections.Counter((f.rule, f.peer_ip or f.account)
                                            for f in report.findings)
                if found != expected or report.unreadable or report.lines != total:
                    print(f"  {label}: FINDINGS DIFFER: missing {expected - found}, "
                          f"extra {found - expected}, unreadable {report.unreadable}")
                    return 1
            print(f"replay {label:5}: {max(rates):>9,.0f} events/s best, "
                  f"{statistics.median(rates):>9,.0f} median of {args.reps}; findings exactly "
                  f"the {sum(expected.values())} planted ones")
        ours = statistics.median(rates)
        latency, inside, count = detection_latency()
        print(f"detection latency (threshold-crossing emit -> ban call): median "
              f"{latency * 1e6:.0f} us; {inside} of {count} bans inside that emit's call, "
              "i.e. the same reactor turn")

        if not args.no_fail2ban:
            done = run_fail2ban(syslog)
            if done is None:
                print("fail2ban-regex: not installed (apt-get install fail2ban)")
            else:
                seconds, matched, result = done
                if result.returncode != 0 or matched is None:
                    print(f"fail2ban-regex failed ({result.returncode}): "
                          f"{(result.stderr or result.stdout)[-500:]}")
                else:
                    print(f"fail2ban-regex {FAIL2BAN_FILTER} (postfix-sasl): "
                          f"{total / seconds:,.0f} lines/s; {matched} lines matched "
                          f"(the log has {auth_failures} SASL failures)")
                    print(f"ratio: ours gzip median / fail2ban = {ours * seconds / total:.1f}x")
        without, with_ = observer_cost()
        print(f"live observer cost: the 6 events of one MX message take {without * 1e6:.1f} us "
              f"of CPU to emit without the auditor, {with_ * 1e6:.1f} us with it "
              f"(+{(with_ - without) * 1e6:.1f} us per message)")
        if args.live:
            print(f"live cost: {args.reps} reps of {args.live_messages} messages at "
                  f"concurrency {args.live_concurrency}")
            ratio = live_cost(workdir, args.reps, args.live_messages, args.live_concurrency)
            print(f"MX acceptance, auditor on / off: {ratio:.3f} (median of per-rep ratios)")
        return 0
    finally:
        if args.keep:
            print(f"kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

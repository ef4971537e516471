"""Admin command latency while the MX port is under load.

One server on loopback with an admin key; Postfix's smtp-source keeps
``--sessions`` SMTP sessions busy on the MX port (messages to a local user),
while ``status`` and ``queue list`` are run again and again:

  socket  the control socket (``mailappliance COMMAND``'s path), timed in-process:
          the command's own latency, request to last byte;
  ssh     ``ssh -p PORT admin@127.0.0.1 COMMAND`` one-shot, wall clock of the
          whole ssh process (key exchange and login included).

Then, with ``--queue N`` (default 0: skipped), N messages for an unreachable
remote domain are queued (the MX relays for 127.0.0.1) and the time to the
first line of ``queue list`` over the control socket is measured.

With ``--no-load`` only the queue part runs (``--queue N`` then times
``status`` ``--runs`` times on that queue, p50/p95, and once more after a
restart of the server with the queue on disk).

Run:  .venv/bin/python bench/admin.py [--sessions 50] [--runs 40] [--queue 100000] [--no-load]
It prints figures; it is not a test. The machine may be shared: say so with them.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from harness import MailServer, raise_fd_limit, wait_until  # noqa: E402

from appliance.admin import control  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
USER = "alice@example.test"
OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000"},
    "relay": {"trusted_networks": "127.0.0.0/8"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--runs", type=int, default=40, help="per command and door")
    parser.add_argument("--queue", type=int, default=0,
                        help="also fill the queue with N messages and time queue list's "
                             "first line")
    parser.add_argument("--no-load", action="store_true",
                        help="skip the latency under load; with --queue: status on the "
                             "full queue, before and after a restart")
    return parser.parse_args(argv)


def p95(values):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]


def time_socket(path, argv):
    start = time.monotonic()
    lines = []
    rc = control.call(path, argv, lines.append, lines.append, timeout=60)
    if rc != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {rc}: {lines[-1:]}")
    return time.monotonic() - start


def time_ssh(server, key, argv):
    start = time.monotonic()
    result = subprocess.run(
        ["ssh", "-p", str(server.port("admin_ssh")), "-i", str(key), "-o", "IdentitiesOnly=yes",
         "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
         "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "admin@127.0.0.1", *argv],
        capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"ssh {' '.join(argv)} exited {result.returncode}: {result.stderr}")
    return time.monotonic() - start


def first_line(path, argv):
    start = time.monotonic()
    seen = {}
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    import json
    sock.sendall(json.dumps({"argv": argv}).encode() + b"\n")
    reader = sock.makefile("rb")
    count = 0
    for raw in reader:
        message = json.loads(raw)
        if "out" in message:
            count += 1
            if count == 2 and "first" not in seen:     # line 1 is the heading
                seen["first"] = time.monotonic() - start
        if "rc" in message:
            break
    sock.close()
    return seen.get("first"), time.monotonic() - start, count


class Load:
    """smtp-source in a loop until stopped."""

    def __init__(self, server, sessions):
        self.server, self.sessions = server, sessions
        self.stop = threading.Event()
        self.messages = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            subprocess.run([SMTP_SOURCE, "-s", str(self.sessions), "-m", str(self.sessions * 20),
                            "-l", "4096", "-f", "load@bench.example.org", "-t", USER,
                            f"127.0.0.1:{self.server.mx_port}"],
                           capture_output=True, timeout=600)
            self.messages += self.sessions * 20

    def __enter__(self):
        self.thread.start()
        time.sleep(1.0)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(700)


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(SMTP_SOURCE):
        print(f"bench/admin.py: {SMTP_SOURCE} is missing (package postfix)")
        return 1
    raise_fd_limit()
    with tempfile.TemporaryDirectory(prefix="bench-admin-") as tmp:
        tmp = Path(tmp)
        key = tmp / "admin"
        subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "ed25519", "-f", str(key)],
                       check=True)
        server = MailServer(tmp / "server", overrides=OVERRIDES)
        (server.data_dir / "admin_authorized_keys").write_text((tmp / "admin.pub").read_text())
        server.add_user(USER, "bench password")
        server.start()
        path = str(server.data_dir / "control.sock")
        try:
            if not args.no_load:
                latency_under_load(server, key, path, args)
            if args.queue:
                fill(server, args.queue)
                first, total, lines = first_line(path, ["queue", "list"])
                print(f"queue list on {args.queue} queued messages: first line after "
                      f"{first * 1000:.0f} ms, all {lines - 2} lines after {total:.2f} s")
                times = [time_socket(path, ["status"]) for _ in range(args.runs)]
                print(f"status with that queue, {args.runs} runs: p50 "
                      f"{statistics.median(times) * 1000:.1f} ms, p95 "
                      f"{p95(times) * 1000:.1f} ms")
                if args.no_load:
                    server.stop(timeout=120)
                    started = time.monotonic()
                    server.start(timeout=300)
                    wait_until(lambda: queued_count(path) >= args.queue, 600, interval=0.2,
                               what="the queue counted after the restart")
                    print(f"restart with {args.queue} queued: status counts them all "
                          f"{time.monotonic() - started:.1f} s after the start")
                    times = [time_socket(path, ["status"]) for _ in range(args.runs)]
                    print(f"status after the restart, {args.runs} runs: p50 "
                          f"{statistics.median(times) * 1000:.1f} ms, p95 "
                          f"{p95(times) * 1000:.1f} ms")
        finally:
            server.stop()
    return 0


def latency_under_load(server, key, path, args):
    idle = {("socket", c): [time_socket(path, c.split()) for _ in range(args.runs)]
            for c in ("status", "queue list")}
    idle.update({("ssh", c): [time_ssh(server, key, c.split()) for _ in range(args.runs)]
                 for c in ("status", "queue list")})
    with Load(server, args.sessions) as load:
        loaded = {}
        for c in ("status", "queue list"):
            loaded[("socket", c)] = [time_socket(path, c.split()) for _ in range(args.runs)]
            loaded[("ssh", c)] = [time_ssh(server, key, c.split()) for _ in range(args.runs)]
    print(f"admin latency, {args.runs} runs each; load: smtp-source -s "
          f"{args.sessions} on the MX port ({load.messages} messages sent)")
    print(f"{'door':<7} {'command':<11} {'idle p95':>9} {'load p50':>9} {'load p95':>9}")
    for (door, c), values in loaded.items():
        idle_p95 = f"{p95(idle[(door, c)]) * 1000:.1f}"
        print(f"{door:<7} {c:<11} {idle_p95:>9} {statistics.median(values) * 1000:>9.1f} "
              f"{p95(values) * 1000:>9.1f}   (ms)")


def queued_count(path):
    import json
    lines = []
    try:
        control.call(path, ["status", "--json"], lines.append, lines.append, timeout=60)
        return json.loads(lines[0])["queue"]["messages"]
    except (control.NotRunning, OSError, ValueError, IndexError):
        return 0


def fill(server, count):
    """``count`` messages for an unreachable remote domain (they stay queued)."""
    done = 0
    while done < count:
        batch = min(5000, count - done)
        subprocess.run([SMTP_SOURCE, "-s", "50", "-m", str(batch), "-l", "1024",
                        "-f", "load@bench.example.org", "-t", "someone@remote.example",
                        f"127.0.0.1:{server.mx_port}"], capture_output=True, timeout=3600)
        done += batch
    path = str(server.data_dir / "control.sock")
    wait_until(lambda: queued_count(path) >= count, 600, interval=1.0,
               what=f"{count} queued messages")


if __name__ == "__main__":
    sys.exit(main())

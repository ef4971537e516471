"""Defences: what a refusal costs, what the limits and greylisting cost, how
fast 20,000 bans load.

1. Ban load: the server starts with 20,000 bans already in
   ``data_dir/defence/bans.json``; the figure is the ``seconds`` of its
   ``defence.state.loaded`` event (read, parse, index, before any listener).
2. Refusal cost: one process floods the MX port with connections from a
   banned addresses (127.0.9.x, among the 20,000) as fast as it can open
   them, while an allowed client (127.0.0.1) runs EHLO/NOOP round trips on
   one connection: refused connections/s, and that client's p50/p99 latency.
   Goal: >= 3,000 refusals/s with p99 < 50 ms.
3. MX acceptance, ``--clients`` concurrent smtplib clients from 127.0.0.5 (not
   in ``allow``, so every limit is asked) sending ``--messages`` messages in
   all, with limits and greylisting on (the client network passed once before
   the run) against the same run with greylisting off and the client
   allowed: the ratio of the two rates. Goal: >= 0.95.

Run:  .venv/bin/python bench/defences.py [--messages 2000] [--flood-seconds 10]
It prints figures; it is not a test. The machine may be shared: say so with
the figures.
"""

import argparse
import json
import multiprocessing
import smtplib
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from harness import MailServer, raise_fd_limit, wait_until  # noqa: E402

BANNED = [f"127.0.9.{n}" for n in range(1, 255)]   # the flood's sources, all banned
ALLOWED = "127.0.0.1"
SENDER_IP = "127.0.0.5"
USER = "alice@example.test"
BANS = 20000
PROBE_INTERVAL = 0.005      # seconds between the allowed client's round trips


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--flood-seconds", type=float, default=10.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def seed_bans(data_dir, count):
    """``count`` bans, BANNED among them, written as the server writes them."""
    now = time.time()
    entries = {}
    for n in range(count - len(BANNED)):
        field = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}/32"
        entries[field] = [{"reason": "bench", "rule": None, "since": now,
                           "until": now + 86400, "duration": 86400, "offence": 1},
                          now + 86400]
    for address in BANNED:
        entries[f"{address}/32"] = [{"reason": "bench", "rule": None, "since": now,
                                     "until": now + 86400, "duration": 86400, "offence": 1},
                                    now + 86400]
    directory = Path(data_dir) / "defence"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bans.json").write_text(json.dumps({"version": 1, "entries": entries}))


def flood(host, port, seconds, result):
    """Open connections from the BANNED addresses in turn until ``seconds``
    pass; count refusals. Closed with RST (linger 0): no TIME_WAIT piles up
    on the client's ports."""
    deadline = time.monotonic() + seconds
    refused = n = 0
    linger = struct.pack("ii", 1, 0)
    while time.monotonic() < deadline:
        n += 1
        sock = socket.socket()
        sock.settimeout(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        try:
            sock.bind((BANNED[n % len(BANNED)], 0))
            sock.connect((host, port))
            sock.recv(512)      # 421 4.7.0, then the close
            refused += 1
        except OSError:
            pass
        finally:
            sock.close()
    result.put(refused)


def latency_probe(host, port, stop, samples):
    with smtplib.SMTP(host, port, timeout=30, source_address=(ALLOWED, 0)) as client:
        client.ehlo("probe.example")
        while not stop.wait(PROBE_INTERVAL):
            started = time.perf_counter()
            client.ehlo("probe.example")
            client.noop()
            samples.append((time.perf_counter() - started) * 1000)


def refusal_run(server, seconds):
    result = multiprocessing.Queue()
    flooder = multiprocessing.Process(target=flood,
                                      args=(server.host, server.mx_port, seconds, result))
    samples, stop = [], threading.Event()
    probe = threading.Thread(target=latency_probe,
                             args=(server.host, server.mx_port, stop, samples))
    probe.start()
    started = time.monotonic()
    flooder.start()
    refused = result.get(timeout=seconds + 60)
    elapsed = time.monotonic() - started
    flooder.join()
    stop.set()
    probe.join()
    samples.sort()
    p99 = samples[int(len(samples) * 0.99) - 1] if samples else float("nan")
    return refused / elapsed, statistics.median(samples), p99, len(samples)


MESSAGE = (b"From: bench@sender.example\r\nTo: " + USER.encode() + b"\r\n"
           b"Subject: bench\r\n\r\n" + (b"x" * 78 + b"\r\n") * 50)


def send_many(host, port, count, errors):
    for _ in range(count):
        try:
            with smtplib.SMTP(host, port, timeout=60, source_address=(SENDER_IP, 0)) as c:
                c.sendmail("bench@sender.example", [USER], MESSAGE)
        except (smtplib.SMTPException, OSError) as exc:
            errors.append(repr(exc))


def acceptance(server, messages, clients):
    errors = []
    threads = [threading.Thread(target=send_many,
                                args=(server.host, server.mx_port, messages // clients, errors))
               for _ in range(clients)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - started
    if errors:
        raise SystemExit(f"{len(errors)} refused in the acceptance run, e.g. {errors[0]}")
    return (messages // clients) * clients / elapsed


def pass_greylist(server):
    """One message greylisted, then passed after the delay: the network is known."""
    def attempt():
        with smtplib.SMTP(server.host, server.mx_port, timeout=30,
                          source_address=(SENDER_IP, 0)) as c:
            c.ehlo("sender.example")
            c.mail("bench@sender.example")
            return c.rcpt(USER)[0]
    wait_until(lambda: attempt() == 250, 30, interval=0.5, what="the greylist to pass")


def main(argv=None):
    args = parse_args(argv if argv is not None else sys.argv[1:])
    raise_fd_limit()
    top = Path(tempfile.mkdtemp(prefix="bench-defences-"))
    limits = {"connections_per_ip": "1000", "connections_per_minute_per_ip": "1000000",
              "messages_per_hour_per_ip": "100000000", "allow": ALLOWED}
    print("machine: shared (other sessions were running); figures are indicative")

    # 1 + 2: 20,000 bans loaded, then the flood.
    server = MailServer(top / "refusals", listeners=("mx",), overrides={"limits": limits})
    server.add_user(USER, "bench password")
    seed_bans(server.data_dir, BANS)
    server.start()
    loaded = server.events("defence.state.loaded")[0]
    print(f"ban load: {loaded['counts'].get('bans')} bans in {loaded['seconds']:.3f} s "
          f"(goal < 1 s)")
    for rep in range(args.reps):
        rate, p50, p99, n = refusal_run(server, args.flood_seconds)
        print(f"refusals rep {rep + 1}: {rate:,.0f} refused/s; allowed client EHLO+NOOP "
              f"p50 {p50:.2f} ms, p99 {p99:.2f} ms over {n} round trips "
              f"(goal >= 3,000/s, p99 < 50 ms)")
    server.stop()

    # 3: acceptance with limits + greylisting vs without.
    ratios = []
    for rep in range(args.reps):
        rates = {}
        for mode in ("off", "on"):
            overrides = {"limits": dict(limits, allow=ALLOWED if mode == "on"
                                        else f"{ALLOWED}, {SENDER_IP}"),
                         "checks": {"greylist": mode, "greylist_delay": "1s",
                                    "greylist_window": "1h"}}
            server = MailServer(top / f"accept-{mode}-{rep}", listeners=("mx",),
                                overrides=overrides)
            server.add_user(USER, "bench password")
            server.start()
            if mode == "on":
                pass_greylist(server)
            rates[mode] = acceptance(server, args.messages, args.clients)
            server.stop()
        ratios.append(rates["on"] / rates["off"])
        print(f"acceptance rep {rep + 1}: limits+greylist on {rates['on']:.0f} msg/s, "
              f"off (client allowed, greylist off) {rates['off']:.0f} msg/s, "
              f"ratio {ratios[-1]:.3f}")
    print(f"acceptance ratio (median of {len(ratios)}): {statistics.median(ratios):.3f} "
          f"(goal >= 0.95)")
    if not args.keep:
        import shutil
        shutil.rmtree(top, ignore_errors=True)
    else:
        print(f"kept {top}")


if __name__ == "__main__":
    main()

"""The shared defence state (``[state] backend = redis``, SPEC §7): what it
costs on the MX path, and how fast a ban reaches another appliance.

1. MX acceptance, ``[state] backend = redis`` against ``local``: one server
   each (same config otherwise), driven by Postfix's smtp-source (one message
   per connection, 4 KiB bodies) from 127.0.0.1, which is NOT in ``allow``
   here, so every connection and every MAIL is counted in the shared windows
   (``connections_per_minute_per_ip``, ``messages_per_hour_per_ip``: an
   increment, a Lua script and a publication each) with limits high enough
   never to refuse. Runs are interleaved rep by rep; the figure is the median
   of the per-rep ratios redis / local at each concurrency. Goal: >= 0.9.
2. Ban propagation: two appliances A and B on one Redis. ``--bans`` times, a
   client from a fresh 127.0.x.y fails AUTH once on A's submission port
   (``auth_failures_before_ban = 1``: A bans it before answering), then
   connects to B's MX port every 2 ms until B refuses it. Reported, p50/p99:
   ``event`` = B's ``defence.ban.remote`` time - A's ``defence.ban`` time (the
   event log stamps, one clock), and ``refused`` = from A's 535 reply to B's
   first 421 seen by the client (includes the client's polling).

Run:  flock /work/wt/notes/bench.lock .venv/bin/python bench/state_redis.py
It prints figures; it is not a test. The machine may be shared: say so.
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
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "e2e")]

from harness import MailServer, ServerError, raise_fd_limit, wait_until  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from test_defences_e2e import greeting, plain, submission_session  # noqa: E402
from workdirs import leave  # noqa: E402

ADDRESS = "alice@example.test"
PASSWORD = "bench password"
SMTP_SOURCE = "/usr/sbin/smtp-source"
SENDER = "from@bench.example.org"

# 127.0.0.1 is counted (not in allow) but never refused.
COUNTED = {"limits": {"allow": "::1", "connections_per_ip": "10000",
                      "connections_per_minute_per_ip": "100000000",
                      "messages_per_hour_per_ip": "100000000"}}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--concurrency", default="10,50")
    parser.add_argument("--bans", type=int, default=200)
    parser.add_argument("--skip-accept", action="store_true")
    parser.add_argument("--keep", action="store_true")
    return parser.parse_args(argv)


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def accept_run(server, concurrency, messages):
    argv = [SMTP_SOURCE, "-s", str(concurrency), "-m", str(messages), "-l", "4096",
            "-M", "client.bench.example.org", "-f", SENDER, "-t", ADDRESS,
            f"127.0.0.1:{server.mx_port}"]
    start = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-300:]}")
    return messages / seconds


def bench_accept(workdir, redis, args):
    local = MailServer(workdir / "local", listeners=("mx",), overrides=COUNTED,
                       fd_limit=8192)
    shared = MailServer(workdir / "redis", listeners=("mx",), fd_limit=8192, overrides=dict(
        COUNTED, state={"backend": "redis", "redis_url": redis.url}))
    servers = {"local": local, "redis": shared}
    try:
        for server in servers.values():
            server.add_user(ADDRESS, PASSWORD)
            server.start()
        wait_until(lambda: shared.events("state.redis_up"), 10, what="redis state up")
        for server in servers.values():
            accept_run(server, 10, 100)          # warm-up, not counted
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        results = {(c, name): [] for c in concurrencies for name in servers}
        for rep in range(1, args.reps + 1):
            for c in concurrencies:
                for name, server in servers.items():
                    rate = accept_run(server, c, args.messages)
                    results[(c, name)].append(rate)
                    print(f"rep {rep} c={c:<3} {name:<6} {args.messages} msgs  "
                          f"accept {rate:8.1f} msg/s", flush=True)
        print()
        print(f"{'c':>3} {'local msg/s':>12} {'redis msg/s':>12} {'ratio (median of reps)':>24}")
        for c in concurrencies:
            ratio = statistics.median(r / l for r, l in zip(results[(c, "redis")],
                                                            results[(c, "local")]))
            print(f"{c:>3} {statistics.median(results[(c, 'local')]):>12.1f} "
                  f"{statistics.median(results[(c, 'redis')]):>12.1f} {ratio:>24.2f}")
        counted = [e for e in shared.events("defence.limit")]
        print(f"(refusals by a limit during the runs: {len(counted)}; "
              f"state.redis_down: {len(shared.events('state.redis_down'))})")
    finally:
        for server in servers.values():
            server.stop()


def fail_auth(server, source):
    """One failed AUTH PLAIN on submission from ``source``; the time of the 535."""
    client = submission_session(server, source)
    client.send(f"AUTH PLAIN {plain('wrong', ADDRESS)}")
    reply = client.reply()[0]
    at = time.monotonic()
    client.close()
    if not reply.startswith(b"535"):
        raise RuntimeError(f"AUTH answered {reply!r}")
    return at


def refused(server, source):
    first = greeting(server, "mx", source)      # b"" when the server closed
    return not first or first.startswith(b"421")


def bench_propagation(workdir, redis, args):
    overrides = {"state": {"backend": "redis", "redis_url": redis.url},
                 "limits": {"auth_failures_before_ban": "1", "allow": "127.0.0.1"}}
    a = MailServer(workdir / "a", listeners=("mx", "submission"), overrides=overrides)
    b = MailServer(workdir / "b", listeners=("mx", "submission"), overrides=overrides)
    try:
        for server in (a, b):
            server.add_user(ADDRESS, PASSWORD)
            server.start()
            wait_until(lambda s=server: s.events("state.redis_up"), 10, what="redis up")
        seen = []
        for n in range(args.bans):
            source = f"127.0.{20 + n // 250}.{1 + n % 250}"
            if refused(b, source):
                raise RuntimeError(f"{source} refused by B before any ban")
            at = fail_auth(a, source)
            while not refused(b, source):
                if time.monotonic() - at > 5:
                    raise RuntimeError(f"B did not refuse {source} within 5 s")
                time.sleep(0.002)
            seen.append(time.monotonic() - at)
        time.sleep(0.5)
        placed = {e["network"]: e["ts"] for e in a.events("defence.ban")}
        arrived = {e["network"]: e["ts"] for e in b.events("defence.ban.remote")}
        delays = [arrived[n] - placed[n] for n in placed if n in arrived]
        print(f"ban propagation A -> B over {args.bans} bans "
              f"({len(delays)} with both events):")
        for name, values in (("event", delays), ("refused", seen)):
            print(f"  {name:<8} p50 {percentile(values, 50) * 1000:7.2f} ms   "
                  f"p99 {percentile(values, 99) * 1000:7.2f} ms   "
                  f"max {max(values) * 1000:7.2f} ms")
    finally:
        for server in (a, b):
            server.stop()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not os.path.exists(SMTP_SOURCE) and not args.skip_accept:
        print(f"bench/state_redis.py: {SMTP_SOURCE} is missing (package postfix)",
              file=sys.stderr)
        return 2
    raise_fd_limit(8192)
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-redis-"))
    try:
        with RedisServer(workdir / "redis") as redis:
            print(f"redis-server on :{redis.port} (--save '', loopback)", flush=True)
            if not args.skip_accept:
                bench_accept(workdir, redis, args)
            bench_propagation(workdir, redis, args)
        return 0
    except (RuntimeError, ServerError, subprocess.TimeoutExpired) as error:
        print(f"bench/state_redis.py: {error}", file=sys.stderr)
        return 1
    finally:
        leave(workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

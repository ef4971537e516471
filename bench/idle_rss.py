"""Memory per idle connection: server RSS before and after N connections that sent EHLO.

Starts mailappliance (MX listener only, temp data_dir, a raised fd limit),
opens N connections from this process, each reads the banner, sends EHLO and
reads the reply, then stays open and idle. Prints the RSS (VmRSS) of the
server process before and after, and KiB per connection (target: < 20).

  .venv/bin/python bench/idle_rss.py [--connections 1000]

It prints figures; it is not a test.
"""

import argparse
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "e2e"))

from harness import MailServer, ServerError, raise_fd_limit  # noqa: E402

TARGET_KIB = 20
OVERRIDES = {"limits": {"allow": "127.0.0.0/8", "connections_per_ip": "100000"}}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    return parser.parse_args(argv)


def read_reply(sock):
    """Read one complete (possibly multi-line) SMTP reply; return its code."""
    data = b""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
        lines = data.split(b"\r\n")
        complete = [line for line in lines[:-1] if line]
        if complete and complete[-1][3:4] == b" ":
            return int(complete[-1][:3])
    raise TimeoutError("no complete reply")


def open_idle(server, count):
    socks = []
    for number in range(count):
        sock = socket.create_connection((server.host, server.mx_port), timeout=15)
        socks.append(sock)
        if read_reply(sock) != 220:
            raise ServerError(f"connection {number}: no 220 banner")
        sock.sendall(b"EHLO idle.bench.example.org\r\n")
        if read_reply(sock) != 250:
            raise ServerError(f"connection {number}: EHLO not answered 250")
    return socks


def settled_rss(server, samples=5, interval=0.2):
    """RSS once the server has gone quiet: the last of a few spaced samples."""
    value = server.rss_kib()
    for _ in range(samples):
        time.sleep(interval)
        value = server.rss_kib()
    return value


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    need = args.connections + 256
    mine = raise_fd_limit(need)
    if mine < need:
        print(f"bench/idle_rss.py: this process may open only {mine} files; need {need} "
              f"(raise the hard limit: ulimit -Hn)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-idle-"))
    server = MailServer(workdir, listeners=("mx",), overrides=OVERRIDES, fd_limit=need)
    socks = []
    try:
        server.start()
        limit = server.fd_limit_of_server()
        print(f"server pid {server.pid}, its open-files limit {limit}")
        if limit < need:
            print(f"bench/idle_rss.py: the server may open only {limit} files; need {need}",
                  file=sys.stderr)
            return 2
        for sock in open_idle(server, 10):      # warm up lazily built state, not counted
            sock.close()
        before = settled_rss(server)
        socks = open_idle(server, args.connections)
        after = settled_rss(server)
        per = (after - before) / args.connections
        print(f"RSS before: {before} KiB")
        print(f"RSS after {args.connections} idle connections (EHLO sent): {after} KiB")
        verdict = "ok" if per < TARGET_KIB else "OVER TARGET"
        print(f"per connection: {per:.1f} KiB (target < {TARGET_KIB}: {verdict})")
        return 0
    except (ServerError, OSError) as error:
        print(f"bench/idle_rss.py: {error}", file=sys.stderr)
        return 1
    finally:
        for sock in socks:
            sock.close()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

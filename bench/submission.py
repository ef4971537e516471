"""Authenticated submissions per second on 587: STARTTLS + AUTH PLAIN + one message.

The real server runs on loopback from a temp directory; 10 client processes
(smtplib, so the clients' own TLS work does not share one GIL) each loop
for ``--seconds``:

  per-connection  connect, EHLO, STARTTLS (a full handshake), EHLO, AUTH PLAIN,
                  MAIL, RCPT, DATA (1 KiB), QUIT: what a phone or a script does;
  per-session     one connection, STARTTLS and AUTH per client, then messages
                  back to back: the cost of the mail path without handshake and
                  password check.

Backends: the users file (bcrypt, the cost ``mailappliance user add`` uses)
and, when slapd is installed, LDAP (tests/ldap_server.py: a real slapd with
StartTLS to it). Every message goes to another domain, so the figures are the
submission path (accept + fsync), not local delivery.

Run:  .venv/bin/python bench/submission.py [--seconds 10] [--clients 10] [--backend file,ldap]
It prints figures; it is not a test.
"""

import argparse
import multiprocessing
import shutil
import smtplib
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))

from harness import MailServer, ServerError, raise_fd_limit  # noqa: E402

SENDER = "alice@example.test"
FILE_PASSWORD = "bench password"
RECIPIENT = "friend@example.net"
BODY = ("From: alice@example.test\r\nTo: friend@example.net\r\nSubject: bench\r\n\r\n"
        + ("x" * 78 + "\r\n") * 12)

BENCH_OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000",
               "messages_per_hour_per_user": "100000000",
               "auth_failures_before_ban": "1000000"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="per run (default 10)")
    parser.add_argument("--clients", type=int, default=10, help="parallel clients (default 10)")
    parser.add_argument("--backend", default="file,ldap", help="file, ldap or both")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory")
    return parser.parse_args(argv)


# -- the clients (separate processes) ----------------------------------------------

def _context(cafile):
    context = ssl.create_default_context(cafile=cafile)
    context.check_hostname = False          # 127.0.0.1; the certificate names the host
    return context


def _open(port, cafile, password):
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="bench.example.test", timeout=60)
    client.ehlo()
    client.starttls(context=_context(cafile))
    client.ehlo()
    client.user, client.password = SENDER, password
    client.auth("PLAIN", client.auth_plain)
    return client


def per_connection(port, cafile, password, seconds):
    """(messages, latencies): a new connection, handshake and AUTH per message."""
    latencies = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        client = _open(port, cafile, password)
        client.sendmail(SENDER, [RECIPIENT], BODY)
        client.quit()
        latencies.append(time.monotonic() - start)
    return len(latencies), latencies


def per_session(port, cafile, password, seconds):
    """(messages, latencies): one connection and AUTH, then messages back to back."""
    latencies = []
    client = _open(port, cafile, password)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.monotonic()
        client.sendmail(SENDER, [RECIPIENT], BODY)
        latencies.append(time.monotonic() - start)
    client.quit()
    return len(latencies), latencies


def run(mode, clients, port, cafile, password, seconds):
    """Messages per second over ``clients`` processes, and the latency median/p95."""
    with multiprocessing.get_context("spawn").Pool(clients) as pool:
        start = time.monotonic()
        results = pool.starmap(mode, [(port, cafile, password, seconds)] * clients)
        elapsed = time.monotonic() - start
    count = sum(n for n, _ in results)
    latencies = sorted(x for _, lat in results for x in lat)
    p95 = latencies[int(len(latencies) * 0.95) - 1] if latencies else float("nan")
    return count / elapsed, statistics.median(latencies) if latencies else float("nan"), p95


# -- the servers ----------------------------------------------------------------------

def file_server(workdir):
    server = MailServer(workdir / "file", listeners=("mx", "submission"),
                        overrides=BENCH_OVERRIDES, fd_limit=8192)
    server.add_user(SENDER, FILE_PASSWORD)
    return server.start(), FILE_PASSWORD, None


def ldap_server_and_mail(workdir):
    import ldap_server
    directory = ldap_server.SlapdServer(workdir / "slapd")
    directory.start()
    overrides = dict(BENCH_OVERRIDES, auth=directory.auth_section("starttls"))
    server = MailServer(workdir / "ldap", listeners=("mx", "submission"),
                        overrides=overrides, fd_limit=8192)
    try:
        server.start()
    except ServerError:
        directory.stop()
        raise
    return server, directory.password("alice"), directory


def bench_backend(name, start, workdir, args):
    server, password, directory = start(workdir)
    try:
        cafile = str(server.data_dir / "tls" / "cert.pem")
        port = server.port("submission")
        run(per_connection, 2, port, cafile, password, 1.0)          # warm-up, not counted
        figures = {}
        for mode in (per_connection, per_session):
            rate, median, p95 = run(mode, args.clients, port, cafile, password, args.seconds)
            figures[mode.__name__] = (rate, median, p95)
            print(f"{name:<5} {mode.__name__:<15} {rate:8.1f} msg/s   "
                  f"latency median {median * 1000:7.1f} ms  p95 {p95 * 1000:7.1f} ms",
                  flush=True)
        return figures
    finally:
        server.stop()
        if directory is not None:
            directory.stop()


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    raise_fd_limit(8192)
    backends = [b.strip() for b in args.backend.split(",") if b.strip()]
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-submission-"))
    print(f"{args.clients} parallel smtplib clients, {args.seconds:g} s per run, "
          f"STARTTLS + AUTH PLAIN on the submission port, {len(BODY)}-byte messages")
    try:
        for backend in backends:
            if backend == "file":
                bench_backend("file", file_server, workdir, args)
            elif backend == "ldap":
                if not shutil.which("slapd") and not Path("/usr/sbin/slapd").exists():
                    print("ldap  skipped: slapd is not installed (package slapd)")
                    continue
                bench_backend("ldap", ldap_server_and_mail, workdir, args)
            else:
                print(f"bench/submission.py: unknown backend {backend!r}", file=sys.stderr)
                return 2
        return 0
    except (ServerError, smtplib.SMTPException, OSError) as error:
        print(f"bench/submission.py: {error}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

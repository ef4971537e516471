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
submission path (accept + DKIM signature + fsync), not local delivery. The
messages are From: a local domain: every one is DKIM-signed (RSA 2048).

With the users file, and when run as root with postfix, dovecot-core and
opendkim installed, the same clients also drive the peer (bench/submission_peer.py:
Postfix + OpenDKIM + Dovecot SASL, with the appliance's certificate, DKIM
key and bcrypt hash), runs interleaved rep by rep (ours, then the peer);
the figure that matters is the median of the per-rep ratios ours / peer.

Run:  .venv/bin/python bench/submission.py [--seconds 10] [--clients 10]
          [--backend file,ldap] [--reps 5] [--no-peer]
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

from harness import MailServer, ServerError, free_ports, raise_fd_limit  # noqa: E402
from submission_peer import PeerError, SubmissionPeer, peer_missing  # noqa: E402
from workdirs import leave  # noqa: E402

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
    parser.add_argument("--reps", type=int, default=5,
                        help="interleaved reps against the peer (default 5)")
    parser.add_argument("--bcrypt-cost", type=int, default=None,
                        help="the user's bcrypt cost (default: what `mailappliance user "
                             "add` makes); the peer checks the same hash")
    parser.add_argument("--modes", default="per_connection,per_session",
                        help="per_connection, per_session or both (default both)")
    parser.add_argument("--no-peer", action="store_true",
                        help="no Postfix + OpenDKIM + Dovecot peer")
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

def file_server(workdir, bcrypt_cost=None):
    server = MailServer(workdir / "file", listeners=("mx", "submission"),
                        overrides=BENCH_OVERRIDES, fd_limit=8192)
    server.add_user(SENDER, FILE_PASSWORD, bcrypt_cost=bcrypt_cost)
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
        for mode in chosen_modes(args):
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


def start_peer(server, workdir):
    """The peer with ``server``'s certificate, DKIM key and users' hashes."""
    import json
    dkim_dir = server.data_dir / "dkim"
    [key] = [k for k in json.loads((dkim_dir / "keys.json").read_text())["keys"]
             if k["domain"] == "example.test" and k["algorithm"] == "rsa-sha256"
             and k["state"] == "active"]
    users = dict(line.strip().rsplit(":", 1) for line in
                 Path(server.sections["auth"]["users_file"]).read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    port, milter_port, dead_port = free_ports(3, "127.0.0.1")
    peer = SubmissionPeer(workdir / "peer", port, "example.test", key["selector"],
                          str(server.data_dir / "tls" / "cert.pem"),
                          str(server.data_dir / "tls" / "key.pem"),
                          str(dkim_dir / key["file"]), users, milter_port, dead_port)
    peer.start()
    try:
        peer.check_signing(SENDER, FILE_PASSWORD,
                           _context(str(server.data_dir / "tls" / "cert.pem")),
                           lambda message: _verifies(message, key))
    except PeerError:
        peer.stop()
        raise
    return peer


def _verifies(message, key):
    import dkim
    record = f"v=DKIM1; k=rsa; p={key['public']}".encode()
    signed = dkim.DKIM(message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    return signed.verify(dnsfunc=lambda name, timeout=5: record)


def chosen_modes(args):
    known = {mode.__name__: mode for mode in (per_connection, per_session)}
    names = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise SystemExit(f"bench/submission.py: --modes: unknown {', '.join(unknown)}")
    return [known[name] for name in names]


def server_hash_cost(server):
    """The bcrypt cost of the bench user's hash (``$2b$NN$...``)."""
    text = Path(server.sections["auth"]["users_file"]).read_text()
    return text.split("$2b$", 1)[1][:2] if "$2b$" in text else "?"


def bench_against_peer(workdir, args):
    """Ours and the peer, interleaved rep by rep; the median per-rep ratio."""
    server, password, _ = file_server(workdir, args.bcrypt_cost)
    peer = None
    try:
        peer = start_peer(server, workdir)
        cafile = str(server.data_dir / "tls" / "cert.pem")
        targets = (("mailappliance", server.port("submission")), ("peer", peer.port))
        for _, port in targets:
            run(per_connection, 2, port, cafile, password, 1.0)      # warm-up, not counted
        figures = {}
        modes = chosen_modes(args)
        for mode in modes:
            for rep in range(args.reps):
                for name, port in targets:
                    rate, median, p95 = run(mode, args.clients, port, cafile, password,
                                            args.seconds)
                    figures.setdefault((mode.__name__, name), []).append(rate)
                    print(f"rep {rep + 1} {name:<13} {mode.__name__:<15} {rate:8.1f} msg/s"
                          f"   latency median {median * 1000:7.1f} ms  p95 "
                          f"{p95 * 1000:7.1f} ms", flush=True)
        cost = server_hash_cost(server)
        print(f"median over {args.reps} reps (file backend, bcrypt cost {cost}, "
              f"{args.clients} clients; peer: Postfix + OpenDKIM + Dovecot SASL):")
        for mode in modes:
            ours = figures[(mode.__name__, "mailappliance")]
            theirs = figures[(mode.__name__, "peer")]
            ratios = [a / b for a, b in zip(ours, theirs)]
            print(f"  {mode.__name__:<15} mailappliance {statistics.median(ours):8.1f} msg/s"
                  f"   peer {statistics.median(theirs):8.1f} msg/s   ratio "
                  f"{statistics.median(ratios):5.2f}x  (per rep: "
                  f"{', '.join(f'{r:.2f}' for r in ratios)})", flush=True)
    finally:
        if peer is not None:
            peer.stop()
        server.stop()


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
                missing = "--no-peer" if args.no_peer else peer_missing()
                if missing:
                    print(f"peer  skipped: {missing}")
                    bench_backend("file", file_server, workdir, args)
                else:
                    bench_against_peer(workdir, args)
            elif backend == "ldap":
                if not shutil.which("slapd") and not Path("/usr/sbin/slapd").exists():
                    print("ldap  skipped: slapd is not installed (package slapd)")
                    continue
                bench_backend("ldap", ldap_server_and_mail, workdir, args)
            else:
                print(f"bench/submission.py: unknown backend {backend!r}", file=sys.stderr)
                return 2
        return 0
    except (ServerError, PeerError, smtplib.SMTPException, OSError) as error:
        print(f"bench/submission.py: {error}", file=sys.stderr)
        return 1
    finally:
        leave(workdir, args.keep)


if __name__ == "__main__":
    sys.exit(main())

"""Certificate swap under load: an ACME renewal while 50 SMTP sessions run.

The appliance gets its certificate from Debian's pebble (on loopback, the
tests' DNS server resolving every web name to 127.0.0.1) with a short
validity, so the renewal (at two thirds of it) comes during the run. Load
from the first certificate until a few seconds after the renewal:

- smtp-source, 50 sessions (-s 50), batches of --batch messages of 4 KiB
  to alice@example.test on the MX port: a batch exiting non-zero is counted
  with the sessions it lost (messages sent minus messages in the Maildir);
- --tls-clients threads making new STARTTLS sessions in a loop, verifying
  the certificate against pebble's root for the hostname: failures, and the
  certificate serials they saw (both must appear);
- one TLS session opened on the old certificate, used after the swap;
- a probe session sending NOOP every 10 ms: the worst reply time within a
  second of the swap (acme.ordered .. acme.renewed) against the rest of the
  run approximates the reactor's worst delay the swap caused.

Run:  .venv/bin/python bench/cert_swap.py [--validity 60] [--batch 1000]
It prints figures; it is not a test.
"""

import argparse
import os
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))
sys.path.insert(0, str(ROOT / "tests"))

import dns_server  # noqa: E402
from harness import HOSTNAME, MailServer, raise_fd_limit, render_config, wait_until  # noqa: E402
from pebble import PEBBLE, Pebble  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
ADDRESS = "alice@example.test"
NAMES = (HOSTNAME, "mta-sts.example.test", "autoconfig.example.test",
         "autodiscover.example.test")
BENCH_OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--validity", type=int, default=60,
                        help="certificate lifetime in seconds (renewal at 2/3)")
    parser.add_argument("--batch", type=int, default=1000, help="messages per smtp-source run")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--tls-clients", type=int, default=4)
    parser.add_argument("--after", type=float, default=5.0,
                        help="seconds of load after the renewal")
    return parser.parse_args(argv)


class Load:
    def __init__(self, server, root_file, args):
        self.server, self.root_file, self.args = server, root_file, args
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.batches = self.sent = self.lost_batches = 0
        self.tls_ok = self.tls_failed = 0
        self.tls_errors = []
        self.serials = []              # (time, serial) as new sessions saw them
        self.noops = []                # (time, seconds)

    def smtp_source(self):
        new = Path(self.server.maildir(ADDRESS)) / "new"
        while not self.stop.is_set():
            argv = [SMTP_SOURCE, "-s", str(self.args.sessions), "-m", str(self.args.batch),
                    "-l", "4096", "-M", "client.bench.example.org", "-f",
                    "from@bench.example.org", "-t", ADDRESS,
                    f"127.0.0.1:{self.server.mx_port}"]
            result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
            with self.lock:
                self.batches += 1
                self.sent += self.args.batch
                if result.returncode != 0:
                    self.lost_batches += 1
                    print(f"  smtp-source exited {result.returncode}: "
                          f"{result.stderr.strip()[-300:]}")
        self.delivered = len(os.listdir(new)) if new.exists() else 0

    def tls_client(self):
        context = ssl.create_default_context(cafile=self.root_file)
        while not self.stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.server.mx_port, timeout=10,
                                  local_hostname="client.bench.example.org") as smtp:
                    smtp._host = HOSTNAME
                    smtp.starttls(context=context)
                    serial = ssl.DER_cert_to_PEM_cert(smtp.sock.getpeercert(True))
                    smtp.noop()
                with self.lock:
                    self.tls_ok += 1
                    if not self.serials or self.serials[-1][1] != serial:
                        self.serials.append((time.time(), serial))
            except Exception as exc:     # noqa: BLE001 - every failure counts
                with self.lock:
                    self.tls_failed += 1
                    self.tls_errors.append(f"{type(exc).__name__}: {exc}")

    def probe(self):
        with socket.create_connection(("127.0.0.1", self.server.mx_port), timeout=10) as sock:
            stream = sock.makefile("rb")
            stream.readline()
            while not self.stop.is_set():
                start = time.monotonic()
                sock.sendall(b"NOOP\r\n")
                stream.readline()
                self.noops.append((time.time(), time.monotonic() - start))
                time.sleep(0.01)


def imaps_session(port, root_file):
    import imaplib

    class Client(imaplib.IMAP4_SSL):
        def _create_socket(self, timeout):
            raw = socket.create_connection(("127.0.0.1", self.port), timeout)
            return self.ssl_context.wrap_socket(raw, server_hostname=HOSTNAME)
    return Client("127.0.0.1", port, ssl_context=ssl.create_default_context(cafile=root_file),
                  timeout=10)


def main(argv=None):
    args = parse_args(argv)
    for needed in (PEBBLE, SMTP_SOURCE):
        if not os.path.exists(needed):
            print(f"bench/cert_swap.py: cannot run: {needed} is missing", file=sys.stderr)
            return 2
    raise_fd_limit(8192)
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-certswap-"))
    server = pebble = None
    try:
        with dns_server.DNSServer({n: {"A": ["127.0.0.1"]} for n in NAMES}) as dns:
            server = MailServer(workdir / "server", listeners=("mx", "imaps", "http", "https"),
                                overrides=BENCH_OVERRIDES)
            server.add_user(ADDRESS, "bench password")
            pebble = Pebble(workdir / "pebble", dns.address, http_port=server.port("http"),
                            tls_port=server.port("https"), validity=args.validity).start()
            server.sections["tls"] = {"acme": "on", "acme_directory": pebble.directory,
                                      "acme_ca_file": pebble.ca_file}
            server.config_path.write_text(render_config(server.sections), encoding="utf-8")
            server.start()
            wait_until(lambda: server.events("acme.issued"), 60, what="acme.issued")
            root_file = str(workdir / "pebble-root.pem")
            Path(root_file).write_bytes(pebble.root_pem())
            print(f"first certificate issued; renewal due about "
                  f"{args.validity * 2 / 3:.0f} s after it")
            load = Load(server, root_file, args)
            old_session = imaps_session(server.port("imaps"), root_file)
            threads = [threading.Thread(target=load.smtp_source, name="smtp-source"),
                       threading.Thread(target=load.probe, name="probe")]
            threads += [threading.Thread(target=load.tls_client, name=f"tls-{n}")
                        for n in range(args.tls_clients)]
            for thread in threads:
                thread.start()
            wait_until(lambda: server.events("acme.renewed"), args.validity * 2,
                       interval=0.2, what="acme.renewed")
            time.sleep(args.after)
            load.stop.set()
            for thread in threads:
                thread.join(660)
            old_ok = old_session.noop()[0] == "OK"
            old_session.logout()
            report(server, load, old_ok)
    finally:
        if server is not None:
            server.stop()
        if pebble is not None:
            pebble.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def report(server, load, old_ok):
    ordered = [e["ts"] for e in server.events("acme.ordered")]
    renewed = server.events("acme.renewed")[0]["ts"]
    swap_from = (ordered[1] if len(ordered) > 1 else renewed) - 1.0
    swap_to = renewed + 1.0
    during = [rtt for t, rtt in load.noops if swap_from <= t <= swap_to]
    outside = [rtt for t, rtt in load.noops if not swap_from <= t <= swap_to]
    print(f"smtp-source: {load.batches} batches of {load.args.batch} messages at "
          f"-s {load.args.sessions}, {load.sent} sent, {load.delivered} in the Maildir, "
          f"batches with errors: {load.lost_batches}, "
          f"failed sessions: {max(0, load.sent - load.delivered)}")
    print(f"STARTTLS sessions: {load.tls_ok} ok, {load.tls_failed} failed; "
          f"certificates seen by new sessions: {len(load.serials)}")
    for error in load.tls_errors[:5]:
        print(f"  {error}")
    print(f"IMAPS session opened on the old certificate still answers: {old_ok}")
    print(f"NOOP probe: {len(load.noops)} replies; worst within the swap window "
          f"({swap_to - swap_from:.1f} s): {max(during, default=0) * 1000:.1f} ms; "
          f"worst outside: {max(outside, default=0) * 1000:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())

"""Inbound SPF + DKIM + DMARC: checks per second, and MX accept throughput on vs off.

1. checks/s: ``InboundChecks.evaluate`` (what the MX runs on a worker thread
   per message) on a message DKIM-signed with an RSA 2048 key, its SPF, DKIM
   and DMARC records served by the test DNS server (tests/dns_server.py) on
   loopback. Two figures: with the server's shared resolver and its cache
   (the steady state for a sender seen before), and with no cache (every
   record from the DNS server: a first-time sender).
2. MX accept msgs/s: the real server twice, ``[checks]`` off, then spf = on,
   dkim = on, dmarc = enforce with ``[dns]`` at the test DNS server, driven
   by Postfix's smtp-source (one message per connection, as bench/accept.py)
   with that signed message (``-F``), interleaved rep by rep; the figure is
   the median of the per-rep ratios on / off.

Run:  .venv/bin/python bench/checks.py [--reps 3] [--messages 1000] [--concurrency 10]
It prints figures; it is not a test.
"""

import argparse
import base64
import os
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
sys.path.insert(0, str(ROOT / "tests"))

import dkim  # noqa: E402
import dns.resolver  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from appliance.deliver.mx import build_resolver  # noqa: E402
from appliance.policy.checks import Facts, InboundChecks  # noqa: E402
from appliance.threads import synchronous_runner  # noqa: E402
from appliance.testing import make_config  # noqa: E402
from dns_server import DNSServer  # noqa: E402
from harness import MailServer, ServerError, raise_fd_limit  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"
ADDRESS = "alice@example.test"
SENDER = "bench@good.test"
CLIENT_NAME = "client.good.test"
BENCH_OVERRIDES = {
    "limits": {"allow": "127.0.0.0/8", "connections_per_ip": "10000",
               "messages_per_hour_per_ip": "100000000"},
}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=500, help="evaluations per figure")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000, help="messages per MX run")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="bound on one run, s")
    return parser.parse_args(argv)


def signed_message(key):
    """A 4 KiB message from bench@good.test, DKIM-signed, LF line ends (for -F)."""
    body = "".join(f"line {n:04d} " + "x" * 60 + "\r\n" for n in range(56))
    text = (f"From: Bench <{SENDER}>\r\nTo: {ADDRESS}\r\nSubject: bench\r\n"
            f"Message-ID: <bench@good.test>\r\n\r\n{body}").encode()
    pem = key.private_bytes(serialization.Encoding.PEM,
                            serialization.PrivateFormat.TraditionalOpenSSL,
                            serialization.NoEncryption())
    return dkim.sign(text, b"sel", b"good.test", pem, canonicalize=(b"relaxed", b"relaxed"),
                     include_headers=[b"from", b"to", b"subject", b"message-id"]) + text


def zones(key):
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")
    split = " ".join(f'"{record[i:i + 250]}"' for i in range(0, len(record), 250))
    return {
        "good.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
        CLIENT_NAME: {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
        "sel._domainkey.good.test": {"TXT": [split]},
        "_dmarc.good.test": {"TXT": ["v=DMARC1; p=reject"]},
    }


def checks_per_second(dns_address, message, count, cached):
    config = make_config(dns={"nameservers": dns_address, "timeout": "2s"})
    resolver = build_resolver(config)
    if not cached:
        resolver.cache = None
    checks = InboundChecks(config, resolver, synchronous_runner)
    facts = Facts("127.0.0.1", CLIENT_NAME, SENDER)
    verdict = checks.evaluate(facts, message)        # warm-up, and a sanity check
    results = ([r.result for r in verdict.spf] + [r.result for r in verdict.dkim]
               + [r.result for r in verdict.dmarc])
    if results != ["pass"] * 4:
        raise RuntimeError(f"the bench message does not pass: {results}")
    started = time.perf_counter()
    for _ in range(count):
        checks.evaluate(facts, message)
    return count / (time.perf_counter() - started)


def start_server(workdir, name, dns_address):
    overrides = dict(BENCH_OVERRIDES)
    if dns_address is not None:
        overrides["checks"] = {"spf": "on", "dkim": "on", "dmarc": "enforce"}
        overrides["dns"] = {"nameservers": dns_address, "timeout": "2s"}
    server = MailServer(workdir / name, listeners=("mx",), overrides=overrides,
                        fd_limit=8192)
    server.add_user(ADDRESS, "bench password")
    return server.start()


def count_new(server):
    new = server.maildir(ADDRESS) / "new"
    return sum(1 for _ in new.iterdir()) if new.is_dir() else 0


def accept_rate(server, message_file, concurrency, messages, timeout):
    """msgs/s until smtp-source exits (every message answered 250 after DATA)."""
    argv = [SMTP_SOURCE, "-s", str(concurrency), "-m", str(messages), "-F", str(message_file),
            "-M", CLIENT_NAME, "-f", SENDER, "-t", ADDRESS, f"127.0.0.1:{server.mx_port}"]
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise RuntimeError(f"smtp-source exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()[-500:]}")
    return messages / elapsed


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    key = rsa.generate_private_key(65537, 2048)
    message = signed_message(key)
    workdir = Path(tempfile.mkdtemp(prefix="mailappliance-bench-checks-"))
    servers = []
    with DNSServer(zones(key)) as dns_server:
        try:
            cached = checks_per_second(dns_server.address, message, args.checks, True)
            uncached = checks_per_second(dns_server.address, message, args.checks, False)
            print("inbound checks (SPF mailfrom + HELO, DKIM RSA 2048, DMARC), one thread:")
            print(f"  shared resolver, cached: {cached:8.1f} checks/s")
            print(f"  no cache (all from DNS): {uncached:8.1f} checks/s")
            if not os.path.exists(SMTP_SOURCE):
                print(f"MX on/off: skipped, {SMTP_SOURCE} is missing (package postfix)")
                return 0
            raise_fd_limit(8192)
            message_file = workdir / "message.eml"
            message_file.write_bytes(message.replace(b"\r\n", b"\n"))
            off = start_server(workdir, "off", None)
            servers.append(off)
            on = start_server(workdir, "on", dns_server.address)
            servers.append(on)
            for server in (off, on):         # warm-up, not counted
                accept_rate(server, message_file, args.concurrency, 100, args.timeout)
            rates = {"off": [], "on": []}
            for rep in range(1, args.reps + 1):
                for name, server in (("off", off), ("on", on)):
                    rate = accept_rate(server, message_file, args.concurrency,
                                       args.messages, args.timeout)
                    rates[name].append(rate)
                    print(f"rep {rep} checks {name:<3} {args.messages} msgs "
                          f"c={args.concurrency}: {rate:8.1f} msg/s", flush=True)
            passed = [e for e in on.events("check.dmarc") if e["result"] == "pass"]
            if not passed:
                raise RuntimeError("the checks did not run on the 'on' server")
            ratio = statistics.median(a / b for a, b in zip(rates["on"], rates["off"]))
            print(f"MX accept, median msg/s: off {statistics.median(rates['off']):.1f}, "
                  f"on {statistics.median(rates['on']):.1f}; "
                  f"median per-rep ratio on/off: {ratio:.2f}")
            return 0
        except (RuntimeError, ServerError, subprocess.TimeoutExpired,
                dns.resolver.NoNameservers) as error:
            print(f"bench/checks.py: {error}", file=sys.stderr)
            for server in servers:
                print(server.output()[-3000:], file=sys.stderr)
            return 1
        finally:
            for server in servers:
                server.stop()
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

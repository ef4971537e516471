"""DKIM signs per second: RSA 2048, Ed25519, and both (dual signing).

Signs a 4 KiB message with the appliance's own path (``sign_message``: the
header list, relaxed/relaxed, dkimpy) and keys from a ``KeyStore`` made in a
temp directory, one thread, for ``--seconds`` per algorithm (and at most
``--max`` signatures). Every signature of the first message is checked with
dkimpy, so the figures are for signatures that verify.

  .venv/bin/python bench/dkim_sign.py [--seconds 3]

It prints figures; it is not a test.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dkim  # noqa: E402

from appliance.policy.dkim_sign import sign_message  # noqa: E402
from appliance.policy.keys import KeyStore  # noqa: E402

DOMAIN = "example.test"


def message(size=4096):
    head = (b"From: Alice <alice@example.test>\r\nTo: Bob <bob@remote.test>\r\n"
            b"Subject: benchmark\r\nDate: Thu, 15 Jan 2026 12:00:00 +0000\r\n"
            b"Message-ID: <bench@example.test>\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=us-ascii\r\n\r\n")
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    return head + line * (size // len(line))


def check(signed, keys):
    records = {f"{k.key.dns_name}.": k.key.txt.encode() for k in keys}

    def dnsfunc(name, timeout=5):
        return records.get(name.decode() if isinstance(name, bytes) else name)
    for index in range(len(keys)):
        if not dkim.DKIM(signed).verify(idx=index, dnsfunc=dnsfunc):
            raise SystemExit(f"signature {index} does not verify")


def rate(keys, body, seconds, limit):
    check(sign_message(body, keys), keys)
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while count < limit and time.perf_counter() < deadline:
        sign_message(body, keys)
        count += 1
    return count / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per figure")
    parser.add_argument("--max", type=int, default=100_000, help="signatures per figure, at most")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="bench-dkim-")
    try:
        store = KeyStore(workdir, "ed25519-sha256")
        store.ensure([DOMAIN])
        keys = store.signing_keys(DOMAIN)
        by_type = {k.key.key_type: [k] for k in keys}
        body = message()
        print(f"DKIM signing, {len(body)}-octet message, one thread, dkimpy {dkim_version()}")
        for label, chosen in (("RSA 2048", by_type["rsa"]), ("Ed25519", by_type["ed25519"]),
                              ("RSA 2048 + Ed25519 (dual)", keys)):
            print(f"  {label:<28} {rate(chosen, body, args.seconds, args.max):8.1f} "
                  "messages signed/s")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def dkim_version():
    from importlib import metadata
    try:
        return metadata.version("dkimpy")
    except metadata.PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()

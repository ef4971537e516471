"""What the ACME client keeps in ``<data_dir>/acme/`` (directory 0700, files 0600).

- ``account.key``: the account's RSA key (PEM), made on the first order;
- ``cert-STAMP.pem`` / ``key-STAMP.pem``: each issued certificate chain and
  its key, under new names (a handshake never sees a half-replaced pair);
- ``state.json``: which STAMP is current, and the failures since the last
  success (``failures``, ``retry_at`` Unix time, ``error``, and the
  ``names``/``directory`` they were for: a changed config starts afresh).

Everything here blocks (files, fsync, key generation): it runs in the ACME
thread, except ``load`` at build time, before the reactor runs.
"""

import dataclasses
import datetime
import json
import os
import time

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

ACCOUNT_KEY_BITS = 2048


@dataclasses.dataclass(frozen=True)
class Issued:
    """One issued certificate on disk."""

    stamp: str
    cert_path: str
    key_path: str
    names: frozenset
    not_before: float           # Unix times
    not_after: float

    @property
    def renew_at(self):
        """Two thirds into the lifetime (SPEC §8)."""
        return self.not_before + (self.not_after - self.not_before) * 2 / 3

    @property
    def not_after_text(self):
        return datetime.datetime.fromtimestamp(self.not_after, datetime.timezone.utc
                                               ).strftime("%Y-%m-%dT%H:%M:%SZ")

    def covers(self, names):
        return set(names) <= self.names


def describe(stamp, cert_path, key_path):
    """The Issued for the files, or None when the certificate cannot be read."""
    try:
        with open(cert_path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError):
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = frozenset(n.lower() for n in san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = frozenset()
    # not_valid_*_utc are cryptography 42+; Debian 12 has 38 (naive UTC datetimes).
    before = getattr(cert, "not_valid_before_utc", None) or cert.not_valid_before.replace(
        tzinfo=datetime.timezone.utc)
    after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after.replace(
        tzinfo=datetime.timezone.utc)
    return Issued(stamp, cert_path, key_path, names, before.timestamp(), after.timestamp())


class AcmeStore:
    """The files of ``<data_dir>/acme``; ``state`` is the parsed state.json."""

    def __init__(self, directory):
        self.directory = directory
        self.state = {}
        self.current = None         # an Issued, or None

    @classmethod
    def from_config(cls, cfg):
        return cls(os.path.join(cfg.server.data_dir, "acme"))

    def _path(self, name):
        return os.path.join(self.directory, name)

    def load(self):
        """Read state.json and the current certificate (missing: nothing yet)."""
        try:
            with open(self._path("state.json"), encoding="utf-8") as handle:
                state = json.load(handle)
        except (OSError, ValueError):
            state = {}
        self.state = state if isinstance(state, dict) else {}
        stamp = self.state.get("current")
        self.current = None
        if isinstance(stamp, str) and stamp.isdigit():
            self.current = describe(stamp, self._path(f"cert-{stamp}.pem"),
                                    self._path(f"key-{stamp}.pem"))
            if self.current is not None and not os.path.exists(self.current.key_path):
                self.current = None
        return self.current

    def _ensure_directory(self):
        os.makedirs(self.directory, mode=0o700, exist_ok=True)

    def account_key(self):
        """The account's private key, made (RSA 2048, 0600) if missing."""
        self._ensure_directory()
        path = self._path("account.key")
        try:
            with open(path, "rb") as handle:
                return serialization.load_pem_private_key(handle.read(), password=None)
        except FileNotFoundError:
            pass
        key = rsa.generate_private_key(public_exponent=65537, key_size=ACCOUNT_KEY_BITS)
        write_private(path, key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
        return key

    def install(self, key_pem, chain_pem, names, directory):
        """Write a new certificate and key, make them current, forget failures;
        returns their Issued (ValueError if the chain cannot be read)."""
        self._ensure_directory()
        stamp = str(time.time_ns())
        cert_path, key_path = self._path(f"cert-{stamp}.pem"), self._path(f"key-{stamp}.pem")
        write_private(key_path, key_pem)
        write_private(cert_path, chain_pem)
        issued = describe(stamp, cert_path, key_path)
        if issued is None:
            raise ValueError("the issued certificate chain cannot be read")
        previous = self.state.get("current")
        self._save({"current": stamp, "previous": previous, "failures": 0,
                    "names": sorted(names), "directory": directory})
        self.current = issued
        self._prune(keep={stamp, previous})
        return issued

    def record_failure(self, error, names, directory, delay, now):
        """Count a failure (for these names and directory) and when to retry."""
        failures = self.failures(names, directory) + 1
        state = dict(self.state, failures=failures, retry_at=now + delay, error=error,
                     names=sorted(names), directory=directory)
        self._ensure_directory()
        self._save(state)
        return failures

    def failures(self, names, directory):
        """Failures so far for exactly these names and directory (else 0)."""
        if (self.state.get("names") != sorted(names)
                or self.state.get("directory") != directory):
            return 0
        failures = self.state.get("failures", 0)
        return failures if isinstance(failures, int) and failures > 0 else 0

    def retry_at(self, names, directory):
        if not self.failures(names, directory):
            return None
        retry_at = self.state.get("retry_at")
        return float(retry_at) if isinstance(retry_at, (int, float)) else None

    def _save(self, state):
        write_private(self._path("state.json"),
                      json.dumps(state, indent=1, sort_keys=True).encode("utf-8") + b"\n")
        self.state = state

    def _prune(self, keep):
        for name in os.listdir(self.directory):
            for prefix in ("cert-", "key-"):
                if name.startswith(prefix) and name.endswith(".pem"):
                    if name[len(prefix):-4] not in keep:
                        try:
                            os.unlink(self._path(name))
                        except OSError:
                            pass


def write_private(path, data):
    """Write ``data`` to ``path`` (mode 0600 from the start), fsynced, renamed into place."""
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise

"""DKIM keys: one per signing domain, selector and algorithm, under ``[dkim] key_dir``.

Layout of key_dir (the directory 0700, every file 0600)::

    keys.json                                  the index: every key, active or retired
    example.test.mail.rsa.pem                  RSA 2048, PKCS#1 PEM (openssl reads it)
    example.test.mail-ed25519.ed25519.pem      Ed25519, PKCS#8 PEM

The index is JSON a person can read; ``public`` is the ``p=`` value of the
DNS record, so ``dns-records`` needs no private key::

    {"version": 1, "keys": [{"domain": "example.test", "selector": "mail",
      "algorithm": "rsa-sha256", "file": "example.test.mail.rsa.pem",
      "public": "MIIBIjAN...", "created": 1767225600.0, "state": "active"}]}

- ``ensure(domains)`` makes what is missing (at start-up, and for
  ``dns-records``): every domain gets an active RSA 2048 key under
  ``[dkim] selector``; with ``algorithm = ed25519-sha256`` also an Ed25519 key
  under ``<selector>-ed25519``. Mail is then signed with both (RFC 8463 §3
  advises dual signing while receivers without Ed25519 remain).
- ``rotate(domain)`` makes, for each active key, a new one of the same
  algorithm under a new, dated selector (``mail-20260115``, then
  ``mail-20260115b`` ...). The old keys are retired: no longer used to sign,
  still listed by ``dns-records`` (mail signed with them may still be on its
  way) until ``remove(domain, selector)``.
- ``signing_keys(domain)`` are the active keys with their private parts. It
  rereads the index when another process (the CLI, a second server) changed
  it, so a rotation applies without a restart.

Changes take an flock on ``key_dir/.lock`` and replace files by temp file,
fsync and rename. Run as root, new files get the owner of key_dir (and a new
key_dir that of its parent): a server that drops privileges can still read
keys that ``mailappliance dns-records`` made as root.

Everything here blocks (file I/O, key generation): the server calls it at
start-up, before the reactor runs, and from threads afterwards (T24). The
functions that emit events (``announce``, ``rotate_in_thread``) run on the
reactor thread.
"""

import base64
import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import asdict, dataclass

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.application import service

from appliance import events
from appliance.clock import default_clock
from appliance.durable.files import adopt_owner, write_atomic

events.register("dkim.key_created", "a DKIM key was made (first start, or a rotation)",
                ("domain", "selector", "algorithm"))
events.register("dkim.key_retired", "a DKIM key was replaced by a rotation; its DNS record "
                "stays until the key is removed", ("domain", "selector", "algorithm"))

INDEX = "keys.json"
LOCK = ".lock"
RSA_BITS = 2048
MIN_RSA_BITS = 1024             # RFC 8301 §3.2
MAX_RSA_BITS = 4096             # T24: a huge key costs seconds of CPU per signature
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
ACTIVE, RETIRED = "active", "retired"
_SUFFIX = {"rsa-sha256": "", "ed25519-sha256": "-ed25519"}
_FILE_TYPE = {"rsa-sha256": "rsa", "ed25519-sha256": "ed25519"}
_MAX_SAME_DAY = 26              # rotations of one domain on one day: mail-DATE, b ... z


class KeyStoreError(Exception):
    """The key store cannot be used: one line saying what and where."""


@dataclass(frozen=True)
class DKIMKey:
    """One key as the index lists it (no private part)."""

    domain: str                 # ASCII (A-labels), lower-case: the d= tag
    selector: str               # the s= tag
    algorithm: str              # rsa-sha256 | ed25519-sha256
    file: str                   # its PEM file, inside key_dir
    public: str                 # base64: the p= tag of the DNS record
    created: float
    state: str = ACTIVE

    @property
    def key_type(self):
        """The k= tag: rsa or ed25519."""
        return _FILE_TYPE[self.algorithm]

    @property
    def dns_name(self):
        return f"{self.selector}._domainkey.{self.domain}"

    @property
    def txt(self):
        """The DNS TXT record text (RFC 6376 §3.6.1), not yet split into strings."""
        return f"v=DKIM1; k={self.key_type}; p={self.public}"

    def to_json(self):
        return asdict(self)


@dataclass(frozen=True)
class SigningKey:
    """An active key with what dkimpy signs with: PKCS#1 PEM for RSA, the
    base64 seed for Ed25519."""

    key: DKIMKey
    private: bytes


def ascii_domain(domain):
    """``domain`` as DNS and the d= tag spell it: A-labels, lower-case, no dot."""
    name = domain.strip().rstrip(".").lower()
    try:
        return name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        raise KeyStoreError(f"{domain!r} is not a valid domain name") from None


# -- key material ---------------------------------------------------------------

def generate(algorithm):
    """A new key: (private PEM bytes for the file, public base64 for p=)."""
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
        private_format = serialization.PrivateFormat.TraditionalOpenSSL
    elif algorithm == "ed25519-sha256":
        key = ed25519.Ed25519PrivateKey.generate()
        private_format = serialization.PrivateFormat.PKCS8
    else:
        raise KeyStoreError(f"unknown DKIM algorithm {algorithm!r}")
    pem = key.private_bytes(serialization.Encoding.PEM, private_format,
                            serialization.NoEncryption())
    return pem, public_base64(key.public_key())


def public_base64(public_key):
    """The p= value: DER SubjectPublicKeyInfo for RSA (RFC 6376), the raw
    32 octets for Ed25519 (RFC 8463 §4)."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw,
                                      serialization.PublicFormat.Raw)
    else:
        raw = public_key.public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def check_rsa_size(bits):
    """T24: keys outside 1024..4096 bits are refused (weak, or a CPU sink)."""
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise ValueError(f"an RSA key of {bits} bits (allowed: "
                         f"{MIN_RSA_BITS}..{MAX_RSA_BITS})")


def signing_form(key, pem):
    """What dkimpy signs with, from the PEM file of ``key``; checks that the
    file is the key the index (and so DNS) publishes."""
    try:
        private = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError(f"not a readable unencrypted PEM private key ({exc})") from None
    if key.algorithm == "rsa-sha256":
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError("not an RSA key")
        check_rsa_size(private.key_size)
        form = private.private_bytes(serialization.Encoding.PEM,
                                     serialization.PrivateFormat.TraditionalOpenSSL,
                                     serialization.NoEncryption())
    else:
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise ValueError("not an Ed25519 key")
        seed = private.private_bytes(serialization.Encoding.Raw,
                                     serialization.PrivateFormat.Raw,
                                     serialization.NoEncryption())
        form = base64.b64encode(seed)
    if public_base64(private.public_key()) != key.public:
        raise ValueError("does not match the public key in the index (and in DNS)")
    return form


# -- the store ---------------------------------------------------------------------

class KeyStore:
    """The keys under ``key_dir``; see the module docstring.

    ``algorithm`` and ``selector`` are ``[dkim] algorithm`` and ``selector``;
    ``clock`` (an IReactorTime) gives the time for ``created`` and for dated selectors;
    ``make_key(algorithm)`` is ``generate`` (tests may pass a faster one).
    """

    def __init__(self, key_dir, algorithm="rsa-sha256", selector="mail", clock=None,
                 make_key=generate):
        if algorithm not in ALGORITHMS:
            raise KeyStoreError(f"[dkim] algorithm: unknown {algorithm!r}")
        self.key_dir = key_dir
        self.algorithm = algorithm
        self.selector = selector
        self.clock = default_clock(clock)
        self.make_key = make_key
        self._lock = threading.Lock()
        self._keys = []
        self._stamp = None          # (inode, mtime_ns, size) of the index read
        self._private = {}          # (file name, public key) -> signing form

    @classmethod
    def from_config(cls, cfg, **kwargs):
        return cls(cfg.dkim.key_dir, cfg.dkim.algorithm, cfg.dkim.selector, **kwargs)

    @property
    def algorithms(self):
        """The algorithms every domain has an active key for: RSA always
        (every receiver verifies it), Ed25519 on top when configured."""
        return ALGORITHMS if self.algorithm == "ed25519-sha256" else ("rsa-sha256",)

    # -- reading ----------------------------------------------------------------

    def keys(self, domain=None):
        """Every key in the index (active and retired), oldest first."""
        with self._lock:
            self._refresh()
            found = list(self._keys)
        if domain is None:
            return found
        name = ascii_domain(domain)
        return [k for k in found if k.domain == name]

    def active(self, domain):
        return [k for k in self.keys(domain) if k.state == ACTIVE]

    def signing_keys(self, domain):
        """The active keys of ``domain`` with their private parts ([] if none)."""
        return [SigningKey(key, self._private_of(key)) for key in self.active(domain)]

    def _private_of(self, key):
        with self._lock:
            cached = self._private.get((key.file, key.public))
        if cached is not None:
            return cached
        path = os.path.join(self.key_dir, key.file)
        try:
            with open(path, "rb") as handle:
                pem = handle.read()
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot read {path}: "
                                f"{exc.strerror or exc}") from None
        try:
            form = signing_form(key, pem)
        except ValueError as exc:
            raise KeyStoreError(f"[dkim] key_dir: {path}: {exc}") from None
        with self._lock:
            self._private[(key.file, key.public)] = form
        return form

    def _refresh(self):
        """Reread the index if it changed on disk (the lock is held)."""
        path = self._path(INDEX)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._keys, self._stamp = [], None
            return
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot read {path}: "
                                f"{exc.strerror or exc}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            self._keys = self._read_index()
            self._stamp = stamp

    def _read_index(self):
        path = self._path(INDEX)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
            keys = [DKIMKey(**entry) for entry in data["keys"]]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot read {path}: "
                                f"{exc.strerror or exc}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyStoreError(f"[dkim] key_dir: {path} is not a key index "
                                f"({type(exc).__name__}: {exc})") from None
        for key in keys:
            if key.algorithm not in ALGORITHMS or key.state not in (ACTIVE, RETIRED):
                raise KeyStoreError(f"[dkim] key_dir: {path}: bad entry for "
                                    f"{key.selector}._domainkey.{key.domain}")
        return keys

    # -- changing ---------------------------------------------------------------

    def ensure(self, domains):
        """Make the missing active keys of ``domains``; returns the new DKIMKeys."""
        names = [ascii_domain(d) for d in domains]

        def change(keys):
            made = []
            for domain in names:
                for algorithm in self.algorithms:
                    if not any(k.domain == domain and k.algorithm == algorithm
                               and k.state == ACTIVE for k in keys):
                        made.append(self._new_key(keys + made, domain, algorithm,
                                                  dated=False))
            return keys + made, made

        return self._modify(change)

    def rotate(self, domain):
        """New keys under new selectors for ``domain``; the old ones retired.

        Returns ``(new keys, retired keys)``; KeyStoreError if the domain
        has no active key (it is not one of ours, or was never started).
        """
        name = ascii_domain(domain)

        def change(keys):
            old = [k for k in keys if k.domain == name and k.state == ACTIVE]
            if not old:
                raise KeyStoreError(f"no DKIM key for {name} to rotate")
            made = []
            for algorithm in sorted({k.algorithm for k in old} | set(self.algorithms)):
                made.append(self._new_key(keys + made, name, algorithm, dated=True))
            retired = [_replace_state(k, RETIRED) for k in old]
            kept = [(_replace_state(k, RETIRED) if k in old else k) for k in keys]
            return kept + made, (made, retired)

        return self._modify(change)

    def remove(self, domain, selector):
        """Delete a retired key (its file and its index entry); returns it."""
        name, selector = ascii_domain(domain), selector.strip().lower()

        def change(keys):
            matches = [k for k in keys if k.domain == name and k.selector == selector]
            if not matches:
                raise KeyStoreError(f"no DKIM key {selector}._domainkey.{name}")
            key = matches[0]
            if key.state == ACTIVE:
                raise KeyStoreError(f"{selector}._domainkey.{name} is the active key: "
                                    "rotate first, remove the old one later")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path(key.file))
            return [k for k in keys if k is not key], key

        return self._modify(change)

    def _modify(self, change):
        """Run ``change(keys) -> (new keys, result)`` under the lock file and
        write the index if the keys changed; returns ``result``."""
        self._make_dir()
        with self._file_lock(), self._lock:
            keys = self._read_index()
            updated, result = change(list(keys))
            if updated != keys:
                self._write(INDEX, _index_json(updated))
            self._keys, self._stamp = updated, None
            self._refresh()
            return result

    def _new_key(self, keys, domain, algorithm, dated):
        selector = self._free_selector(keys, domain, algorithm, dated)
        file = f"{domain}.{selector}.{_FILE_TYPE[algorithm]}.pem"
        pem, public = self.make_key(algorithm)
        self._write(file, pem)
        return DKIMKey(domain=domain, selector=selector, algorithm=algorithm, file=file,
                       public=public, created=round(self.clock.seconds(), 3))

    def _free_selector(self, keys, domain, algorithm, dated):
        """The first unused selector: ``<selector>`` (if not ``dated``), then
        ``<selector>-YYYYMMDD``, ``...b`` to ``...z``; ``-ed25519`` for Ed25519."""
        taken = {k.selector for k in keys if k.domain == domain}
        taken |= {f[len(domain) + 1:].rsplit(".", 2)[0]
                  for f in self._files() if f.startswith(domain + ".")}
        day = time.strftime("%Y%m%d", time.gmtime(self.clock.seconds()))
        letters = [""] + [chr(c) for c in range(ord("b"), ord("a") + _MAX_SAME_DAY)]
        candidates = ([] if dated else [self.selector]) + \
            [f"{self.selector}-{day}{letter}" for letter in letters]
        for candidate in candidates:
            selector = candidate + _SUFFIX[algorithm]
            if selector not in taken and len(selector) <= 63:
                return selector
        raise KeyStoreError(f"no free DKIM selector for {domain} today "
                            f"(too many rotations, or [dkim] selector too long)")

    # -- files ---------------------------------------------------------------------

    def _path(self, name):
        return os.path.join(self.key_dir, name)

    def _files(self):
        try:
            return os.listdir(self.key_dir)
        except FileNotFoundError:
            return []

    def _make_dir(self):
        try:
            os.makedirs(self.key_dir, mode=0o700)
        except FileExistsError:
            return
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot create {self.key_dir}: "
                                f"{exc.strerror or exc}") from None
        adopt_owner(self.key_dir, os.path.dirname(os.path.abspath(self.key_dir)))

    @contextlib.contextmanager
    def _file_lock(self):
        """One writer at a time across processes (server, CLI, admin shell)."""
        try:
            fd = os.open(self._path(LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot write in {self.key_dir}: "
                                f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, name, data):
        """Replace ``name`` durably: temp file (0600), fsync, rename, fsync the dir."""
        path = self._path(name)
        try:
            write_atomic(path, data, owner_like=self.key_dir)
        except OSError as exc:
            raise KeyStoreError(f"[dkim] key_dir: cannot write {path}: "
                                f"{exc.strerror or exc}") from None


def _replace_state(key, state):
    return DKIMKey(**dict(key.to_json(), state=state))


def _index_json(keys):
    data = {"version": 1, "keys": [k.to_json() for k in keys]}
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


# -- on the reactor thread -------------------------------------------------------------

def announce(made=(), retired=()):
    """Emit the events for keys made and retired (on the reactor thread)."""
    for key in made:
        events.emit("dkim.key_created", domain=key.domain, selector=key.selector,
                    algorithm=key.algorithm)
    for key in retired:
        events.emit("dkim.key_retired", domain=key.domain, selector=key.selector,
                    algorithm=key.algorithm)


def rotate_in_thread(store, domain, run_in_thread):
    """``dkim rotate DOMAIN`` for the admin shell: rotate off the reactor
    thread, announce on it. Fires with the new keys (their DNS records must
    be published), or fails with KeyStoreError."""
    d = run_in_thread(store.rotate, domain)

    def done(result):
        made, retired = result
        announce(made, retired)
        return made

    return d.addCallback(done)


class KeyService(service.Service):
    """At start-up, before the listeners: make the missing keys of every
    local domain and load the active ones (a key that cannot be used stops
    start-up with one line, through ``fail(message)``)."""

    name = "dkim-keys"

    def __init__(self, store, domains, fail):
        self.store = store
        self.domains = tuple(domains)
        self.fail = fail
        self._made = []

    def privilegedStartService(self):
        # Before privileges are dropped, as the TLS key: key_dir may be root's.
        try:
            self._made = self.store.ensure(self.domains)
            for domain in self.domains:
                self.store.signing_keys(domain)
        except KeyStoreError as exc:
            self.fail(str(exc))
        super().privilegedStartService()

    def startService(self):
        super().startService()
        made, self._made = self._made, []
        announce(made)

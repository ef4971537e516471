"""Server-side TLS: the certificate, a modern context, reloads on renewal.

``ServerTLS`` is what every TLS listener and every STARTTLS uses. It is a
Twisted ``IOpenSSLServerConnectionCreator``: each handshake asks it for a
connection, and at most once every ``check_interval`` seconds it stats the
certificate and key files first, so a renewed certificate (certbot,
acme.sh) is served from the next handshake on. ``reload()`` forces the
check (SIGHUP). A renewal caught half-written keeps the previous context
until both files fit together again.

Without ``[tls] certificate/private_key`` a self-signed certificate for the
hostname is made once into ``<data_dir>/tls/`` (key mode 0600) and reused.

The context: TLS 1.2 and 1.3 only, ECDHE with AES-GCM or ChaCha20-Poly1305
(TLS 1.3 suites are all of that kind), no compression, no renegotiation,
server cipher preference.
"""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from appliance import events
from appliance.clock import default_clock
from appliance.durable.files import FileWatch, write_atomic

_log = Logger(namespace="mailappliance.net.tls")

events.register("tls.loaded", "the TLS certificate was (re)loaded",
                ("certificate", "subject", "not_after", "reason"), text_log=True)
events.register("tls.reload_failed",
                "a changed TLS certificate could not be loaded; the previous one stays",
                ("certificate", "error"), text_log=True)
events.register("tls.generated", "a self-signed certificate was made for the hostname",
                ("certificate", "hostname"), text_log=True)

CIPHERS = b"ECDHE+AESGCM:ECDHE+CHACHA20"
SELF_SIGNED_DAYS = 825          # the longest validity clients still accept
# OpenSSL 1.1.0h+; pyOpenSSL 23 names it, the raw value keeps older ones working.
OP_NO_RENEGOTIATION = getattr(SSL, "OP_NO_RENEGOTIATION", 0x40000000)


class TLSError(Exception):
    """The certificate or key cannot be used (message is one line)."""


def self_signed_paths(data_dir):
    directory = os.path.join(data_dir, "tls")
    return os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")


def ensure_self_signed(data_dir, hostname):
    """The paths of the self-signed certificate and key, made if missing."""
    cert_path, key_path = self_signed_paths(data_dir)
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return cert_path, key_path
    os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
    cert_pem, key_pem = make_self_signed(hostname)
    write_atomic(key_path, key_pem)
    write_atomic(cert_path, cert_pem, mode=0o644)
    events.emit("tls.generated", certificate=cert_path, hostname=hostname)
    return cert_path, key_path


def make_self_signed(hostname):
    """(certificate PEM, key PEM): ECDSA P-256, ``hostname`` as CN and SAN; a
    leaf (CA:FALSE, digitalSignature, serverAuth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        self_signed_builder(hostname, key, SELF_SIGNED_DAYS)
        # A leaf, not a CA: a client told to trust it (Python's cafile,
        # nodemailer's tls.ca, OpenSSL 1.1.1+) takes a self-signed end-entity
        # certificate as its own anchor, and whoever holds this key must not
        # be able to issue certificates for other names to such a client.
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=False, crl_sign=False,
            content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def self_signed_builder(hostname, key, days):
    """A CertificateBuilder for ``key``'s self-signed certificate: ``hostname``
    as CN and SAN, valid from five minutes ago for ``days``; the caller adds
    its extensions and signs."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_san(hostname)), critical=False)
    )


def _san(hostname):
    try:
        return [x509.IPAddress(ipaddress.ip_address(hostname))]
    except ValueError:
        return [x509.DNSName(hostname)]


def make_context(cert_path, key_path):
    """A server ``SSL.Context`` for the PEM files; TLSError if unusable."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION | OP_NO_RENEGOTIATION
                        | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE)
    context.set_cipher_list(CIPHERS)
    context.set_session_id(b"mailappliance")
    try:
        context.use_certificate_chain_file(os.fsencode(cert_path))
    except SSL.Error as exc:
        raise TLSError(f"cannot use the certificate {cert_path}: {_ssl_reason(exc)}") from None
    try:
        context.use_privatekey_file(os.fsencode(key_path))
        context.check_privatekey()
    except SSL.Error as exc:
        raise TLSError(f"cannot use the private key {key_path}: {_ssl_reason(exc)}") from None
    return context


def _ssl_reason(exc):
    """The last OpenSSL reason string ("no such file", "key values mismatch")."""
    try:
        return exc.args[0][-1][2] or str(exc)
    except (IndexError, TypeError):
        return str(exc) or type(exc).__name__


def _describe(cert_path):
    """(subject CN, notAfter ISO date) of the first certificate, for the event."""
    try:
        with open(cert_path, "rb") as handle:
            cert = x509.load_pem_x509_certificate(handle.read())
    except (OSError, ValueError):
        return "", ""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    subject = names[0].value if names else cert.subject.rfc4514_string()
    # not_valid_after_utc is cryptography 42+; Debian 12 has 38.
    not_after = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
    return subject, not_after.strftime("%Y-%m-%dT%H:%M:%SZ")


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The server's TLS context, kept in step with the files on disk.

    ``clock`` is an IReactorTime (a ``task.Clock`` in tests); ``check_interval``
    bounds how often a handshake pays for two ``os.stat`` calls. With
    ``self_signed=(data_dir, hostname)`` the files are the self-signed pair,
    made by ``load()`` when missing.
    """

    def __init__(self, cert_path, key_path, clock=None, check_interval=5.0,
                 self_signed=None):
        self._self_signed = self_signed
        self.clock = default_clock(clock)
        self._watch = FileWatch([cert_path, key_path], self.clock, check_interval)
        self._context = None

    # The files in use; the ACME client points them at a new pair (then reload()).
    cert_path = property(lambda self: self._watch.paths[0],
                         lambda self, path: self._watch.watch(path, self.key_path))
    key_path = property(lambda self: self._watch.paths[1],
                        lambda self, path: self._watch.watch(self.cert_path, path))

    @classmethod
    def from_config(cls, cfg, clock=None):
        """The configured files, or the self-signed ones (nothing is read or
        written before ``load()``)."""
        if cfg.tls.certificate:
            return cls(cfg.tls.certificate, cfg.tls.private_key, clock=clock)
        data_dir, hostname = cfg.server.data_dir, cfg.server.hostname
        return cls(*self_signed_paths(data_dir), clock=clock, self_signed=(data_dir, hostname))

    def load(self):
        """Load the files now (making the self-signed pair if it is ours and
        missing); TLSError if they cannot be used (start-up)."""
        if self._self_signed is not None:
            data_dir, hostname = self._self_signed
            try:
                ensure_self_signed(data_dir, hostname)
            except OSError as exc:
                raise TLSError(f"cannot write a self-signed certificate under "
                               f"{data_dir}/tls: {exc.strerror or exc}") from None
        self._load("start")
        self._watch.looked()

    @property
    def context(self):
        """The current ``SSL.Context`` (loaded on first use)."""
        self._maybe_reload()
        return self._context

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context, None)

    def reload(self):
        """Re-read the files if they changed (SIGHUP); keep the old context if
        the new files are not usable. True when a new context is in use."""
        self._watch.looked()
        if self._context is not None and self._watch.current() == self._watch.loaded:
            return False
        try:
            self._load("changed" if self._context is not None else "start")
        except TLSError as exc:
            if self._context is None:
                raise
            _log.warn("TLS reload failed, keeping the previous certificate: {error}",
                      error=str(exc))
            events.emit("tls.reload_failed", certificate=self.cert_path, error=str(exc))
            return False
        return True

    def _maybe_reload(self):
        if self._watch.due() or self._context is None:
            self.reload()

    def _load(self, reason):
        signature = self._watch.current()
        if signature is None:
            raise TLSError(f"cannot read {self.cert_path} or {self.key_path}")
        self._context = make_context(self.cert_path, self.key_path)
        self._watch.loaded = signature
        subject, not_after = _describe(self.cert_path)
        events.emit("tls.loaded", certificate=self.cert_path, subject=subject,
                    not_after=not_after, reason=reason)


def connection_info(transport):
    """(protocol version, cipher name) of the TLS connection under
    ``transport``, or ("", "") when none can be found.

    Implicit TLS: the transport is Twisted's TLS protocol, whose
    ``getHandle()`` is the ``SSL.Connection``. After STARTTLS on TCP: the
    TCP transport's ``protocol`` is.
    """
    for candidate in (transport, getattr(transport, "protocol", None)):
        get_handle = getattr(candidate, "getHandle", None)
        handle = get_handle() if get_handle else None
        if isinstance(handle, SSL.Connection):
            return handle.get_protocol_version_name(), handle.get_cipher_name() or ""
    return "", ""

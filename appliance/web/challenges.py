"""The ACME challenges being answered right now, and the TLS side of the https listener.

``Challenges`` is filled by the ACME client (in its worker thread) and read
by the listeners (on the reactor thread), hence the lock:

- http-01 (RFC 8555 §8.3): token -> key authorization, served by the http
  listener at ``/.well-known/acme-challenge/TOKEN``;
- tls-alpn-01 (RFC 8737): name -> an ``SSL.Context`` holding a self-signed
  certificate for that name with the critical acmeIdentifier extension.

``WebTLS`` is the https listener's connection creator: the server's normal
certificate (``ServerTLS``'s files, followed when they change) and ALPN
(``http/1.1``). A handshake naming (SNI) a name with a pending challenge is
switched to that challenge's context in the servername callback, as
certbot's standalone server does: OpenSSL asks for the certificate before
it asks about ALPN, and pyOpenSSL cannot read the ALPN offer earlier. So
for the seconds a validation of a name lasts, an ordinary https client of
that very name (mta-sts./autoconfig./autodiscover.) is refused; mail
listeners are never affected.
"""

import hashlib
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ObjectIdentifier
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from appliance.net.tls import make_context, self_signed_builder

ACME_TLS_1 = b"acme-tls/1"
HTTP_1_1 = b"http/1.1"
ACME_IDENTIFIER = ObjectIdentifier("1.3.6.1.5.5.7.1.31")     # id-pe-acmeIdentifier
# pyOpenSSL 20+ names it; the value is its sentinel object, so fall back to "ignore ALPN".
NO_OVERLAP = getattr(SSL, "NO_OVERLAPPING_PROTOCOLS", b"")


class Challenges:
    """Pending challenges, shared between the ACME thread and the reactor."""

    def __init__(self):
        self._lock = threading.Lock()
        self._http = {}
        self._alpn = {}

    def add_http01(self, token, key_authorization):
        with self._lock:
            self._http[token] = key_authorization

    def add_tls_alpn01(self, name, key_authorization):
        """Make the challenge certificate for ``name`` (runs in the ACME thread)."""
        context = alpn_challenge_context(name, key_authorization)
        with self._lock:
            self._alpn[name.lower()] = context

    def http01(self, token):
        with self._lock:
            return self._http.get(token)

    def tls_alpn01(self, name):
        with self._lock:
            return self._alpn.get(name.lower())

    def clear(self):
        with self._lock:
            self._http.clear()
            self._alpn.clear()


def alpn_challenge_certificate(name, key_authorization):
    """(certificate, key) for tls-alpn-01 (RFC 8737 §3): SAN ``name`` and the
    critical acmeIdentifier extension = OCTET STRING(SHA-256(key authorization))."""
    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    cert = (
        self_signed_builder(name, key, days=7)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER, b"\x04\x20" + digest),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def alpn_challenge_context(name, key_authorization):
    cert, key = alpn_challenge_certificate(name, key_authorization)
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(crypto.X509.from_cryptography(cert))
    context.use_privatekey(crypto.PKey.from_cryptography_key(key))
    context.set_alpn_select_callback(_select_acme)
    return context


def _select_acme(connection, offered):
    # RFC 8737 §3: only acme-tls/1; anything else is refused (a normal client
    # asking for this name during the seconds of a validation).
    return ACME_TLS_1 if ACME_TLS_1 in offered else NO_OVERLAP


@implementer(IOpenSSLServerConnectionCreator)
class WebTLS:
    """The https listener's TLS: ``server_tls``'s certificate plus ALPN and tls-alpn-01."""

    def __init__(self, server_tls, challenges):
        self._server_tls = server_tls
        self._challenges = challenges
        self._base = None           # the ServerTLS context ours was made alongside
        self._context = None

    @property
    def context(self):
        base = self._server_tls.context         # follows renewals (and SIGHUP)
        if base is not self._base:
            context = make_context(self._server_tls.cert_path, self._server_tls.key_path)
            context.set_alpn_select_callback(_select_http)
            context.set_tlsext_servername_callback(self._servername)
            self._context, self._base = context, base
        return self._context

    def serverConnectionForTLS(self, tlsProtocol):
        return SSL.Connection(self.context, None)

    def _servername(self, connection):
        """A name with a pending tls-alpn-01 challenge gets the challenge context
        (the ALPN offer is not known yet; see alpn_challenge_context)."""
        name = connection.get_servername()
        challenge = self._challenges.tls_alpn01(name.decode("ascii", "replace")) if name else None
        if challenge is not None:
            connection.set_context(challenge)


def _select_http(connection, offered):
    return HTTP_1_1 if HTTP_1_1 in offered else NO_OVERLAP

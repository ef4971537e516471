"""DKIM signing of the mail our users send (RFC 6376, RFC 8463, with dkimpy).

Signed: every message from an authenticated user (the submission listeners)
or from a ``[relay] trusted_networks`` peer, when its From: header names one
local domain (``[server] domains``). It is signed once, between the end of
DATA and the spool, so a retried delivery carries the same signature.

- relaxed/relaxed canonicalisation; no ``l=`` (T24: a body length lets
  anyone append content under our signature);
- the header fields of ``SIGNED_HEADERS`` that the message has, each as many
  times as it occurs, and From: once more (over-signing: a second From:
  added on the way breaks the signature);
- one signature per active key of the domain: RSA 2048, and Ed25519 as well
  with ``[dkim] algorithm = ed25519-sha256``.

dkimpy's header logic and canonicalisation, with the RSA step in OpenSSL
(``appliance.policy.dkim_crypto``: under a millisecond, GIL released) and
the keys loaded once per selector by the key store. It still blocks (the
signature, a key file read after a rotation): ``sign`` runs it through
``run_in_thread`` and answers with a Deferred (T24).

The body hash (bh=) is ours (``appliance.policy.dkim_body.BodyDigests``: a
body in memory, or in the spool's file when it never was in memory, issue
17); dkimpy builds, hashes and signs the header field from it
(``DKIM.gen_header``, the rest of its ``sign``), with the same tags in the
same order as its own ``sign``.
"""

import base64
import re
import time

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_pem_private_key

try:
    import nacl.encoding
    import nacl.exceptions
    import nacl.signing
except ImportError:         # dkimpy's own condition: no Ed25519 without PyNaCl
    nacl = None
from twisted.internet import defer
from twisted.logger import Logger

from appliance import events
from appliance.address import canonical_domain
from appliance.policy import dkim_crypto
from appliance.policy.dkim_body import BodyDigests, hash_name, header_object
from appliance.policy.keys import KeyStoreError
from appliance import replies
from appliance.message import (MAX_FROM_FIELDS, AmbiguousFrom, from_addresses, header_block,
                               header_safe)

events.register("dkim.signed", "an outgoing message was DKIM-signed before it was queued",
                ("session", "peer_ip", "queue_id", "domain", "selector", "algorithm"))
events.register("dkim.sign_failed", "a message to sign could not be signed: refused "
                "with 451, nothing queued", ("session", "peer_ip", "queue_id", "domain",
                                             "reason"))

# RFC 6376 §5.4.1's list, less the fields that change on the way.
SIGNED_HEADERS = (b"from", b"to", b"cc", b"subject", b"date", b"message-id",
                  b"mime-version", b"content-type", b"reply-to", b"in-reply-to",
                  b"references")
CANONICALIZE = (b"relaxed", b"relaxed")

_log = Logger()


class SigningFailed(Exception):
    """A message that must be signed could not be; ``domain`` is its From domain.

    The SMTP server answers ``smtp_reply``: temporary by default (a key store
    can be fixed, and unsigned mail from our domains would fail DMARC),
    permanent for a header section dkimpy cannot parse (sending it again
    would not help).
    """

    def __init__(self, domain, reason, smtp_reply=replies.LOCAL_ERROR):
        super().__init__(reason)
        self.domain = domain
        self.smtp_reply = smtp_reply


def header_section(message):
    """The header lines of ``message`` (bytes, CRLF), without the blank line."""
    head = header_block(message)
    return head.split(b"\r\n")[:-1] if head.endswith(b"\r\n") else head.split(b"\r\n")


_FROM_FIELD = re.compile(rb"^from[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)",
                         re.IGNORECASE | re.MULTILINE)


def ascii_forms(domains):
    """The domains as they can appear in a plain-ASCII header: A-labels."""
    forms = set()
    for domain in domains:
        try:
            forms.add(domain.lower().encode("idna"))
        except UnicodeError:
            continue            # not a name a header could hold in ASCII either
    return frozenset(forms)


def cannot_be_local(message, local_forms):
    """True when no From: field of ``message`` could name a local domain
    (``local_forms``: from ``ascii_forms``), by a look at the raw bytes: on
    the reactor, with no thread needed to find out.

    Only a plain-ASCII From: without encoded words, in which no local domain
    appears at all, says True; anything else (non-ASCII, ``=?``, a domain
    seen) is left to ``signing_domain``'s full parse.
    """
    found = False
    for count, match in enumerate(_FROM_FIELD.finditer(header_block(message))):
        if count >= MAX_FROM_FIELDS:
            return False        # more than the parse reads: it refuses them (bounded)
        value = match.group(1).lower()
        if not value.isascii() or b"=?" in value:
            return False
        if any(form in value for form in local_forms):
            return False
        found = True
    return found


def headers_to_sign(message):
    """The h= list: each field of SIGNED_HEADERS as often as it occurs, then
    From once more."""
    counts = {}
    for line in header_section(message):
        if line[:1] in (b" ", b"\t") or b":" not in line:
            continue            # a continuation line, or not a field at all
        name = line.split(b":", 1)[0].strip().lower()
        if name in SIGNED_HEADERS:
            counts[name] = counts.get(name, 0) + 1
    names = [name for name in SIGNED_HEADERS for _ in range(counts.get(name, 0))]
    return names + [b"from"]


def signing_domain(message, local_domains):
    """The local domain to sign for: the one domain of the From: addresses,
    if it is local; None otherwise (no From:, several domains, a foreign or
    an ambiguous one)."""
    try:
        addresses = from_addresses(message)
    except AmbiguousFrom:
        return None
    domains = set()
    for address in addresses:
        try:
            domains.add(canonical_domain(address.rpartition("@")[2]))
        except ValueError:
            return None
    if len(domains) != 1:
        return None
    [domain] = domains
    return domain if domain in local_domains else None


def sign_message(message, signing_keys, body=None, canonicalize=CANONICALIZE):
    """``message`` with one DKIM-Signature per key on top; dkim.DKIMException
    if dkimpy refuses the message or a key. The body is canonicalised in
    linear time, in slices (``appliance.policy.dkim_body``). ``body``: the
    ``BodyDigests`` of the body when ``message`` holds only its header
    section (the body in the spool's file); by default the rest of
    ``message``. RSA is signed by OpenSSL (``appliance.policy.dkim_crypto``);
    ``canonicalize``: relaxed/relaxed unless a test asks otherwise."""
    dkim_crypto.install()       # a no-op once done (at import)
    include = headers_to_sign(message)
    if body is None:
        body = BodyDigests.of_message(message)
    signatures = []
    for signing_key in signing_keys:
        key = signing_key.key
        algorithm = key.algorithm.encode("ascii")
        signer = header_object(message, signature_algorithm=algorithm)
        signatures.append(sign_header(
            signer, key.selector.encode("ascii"), key.domain.encode("ascii"),
            signing_key.private, include, body, canonicalize))
    return b"".join(signatures) + message


def _private_key(algorithm, private):
    """The private key as dkimpy's ``sign`` parses it; an RSA key the key
    store loaded into OpenSSL as it is (``dkim_crypto.OpenSSLKey``)."""
    if isinstance(private, dkim_crypto.OpenSSLKey):
        return private
    if algorithm == b"ed25519-sha256":
        if nacl is None:
            raise dkim.NaClNotFoundError("pynacl module required for ed25519 signing")
        try:
            return nacl.signing.SigningKey(private, encoder=nacl.encoding.Base64Encoder)
        except nacl.exceptions.ValueError:
            raise dkim.KeyFormatError("invalid ed25519 private key or format") from None
    try:
        return parse_pem_private_key(private)
    except UnparsableKeyError as exc:
        raise dkim.KeyFormatError(str(exc)) from None


def sign_header(signer, selector, domain, private, include, body,
                canonicalize=CANONICALIZE):
    """The DKIM-Signature field (``canonicalize``, no l=) that dkimpy's
    ``signer.sign`` would make, with the body hash from ``body`` (a
    ``BodyDigests``) instead of dkimpy's own pass over a body in memory."""
    algorithm = signer.signature_algorithm
    pk = _private_key(algorithm, private)
    policy = CanonicalizationPolicy.from_c_value(b"/".join(canonicalize))
    include = tuple(name.lower() for name in include)
    if b"from" not in include:
        raise dkim.ParameterError("The From header field MUST be signed")
    signer.include_headers = include
    signer.hasher = dkim.HASH_ALGORITHMS[algorithm]
    bodyhash = base64.b64encode(body.digest(policy.body_algorithm.name,
                                            hash_name(algorithm)))
    fields = [
        (b"v", b"1"), (b"a", algorithm), (b"c", policy.to_c_value()), (b"d", domain),
        (b"i", b"@" + domain), (b"q", b"dns/txt"), (b"s", selector),
        (b"t", str(int(time.time())).encode("ascii")), (b"h", b" : ".join(include)),
        (b"bh", bodyhash),
        (b"b", b"0" * 60),      # dkimpy's placeholder: b= folds onto a line of its own
    ]
    value = signer.gen_header(fields, include, policy, b"DKIM-Signature", pk)
    signer.domain, signer.selector = domain, selector
    signer.signature_fields = dict(fields)
    return b"DKIM-Signature: " + value


class Signer:
    """Signs what ``wants`` says should be signed; see the module docstring.

    ``keystore`` is an ``appliance.policy.keys.KeyStore``;
    ``run_in_thread(f, *args) -> Deferred`` runs the blocking part
    (``deferToThread`` in the server).
    """

    def __init__(self, config, keystore, run_in_thread):
        self.config = config
        self.keystore = keystore
        self.run_in_thread = run_in_thread
        self.local_domains = frozenset(config.server.domains)
        self._local_forms = ascii_forms(self.local_domains)

    def sign(self, message, context, body=None):
        """A Deferred firing with the message to queue (mail from our users:
        the policy pipeline decides that): signed, or unchanged when its From:
        names no local domain; SigningFailed if it cannot be signed.
        ``context`` (session, peer_ip, queue_id) goes into the events."""
        if cannot_be_local(message, self._local_forms):
            return defer.succeed(message)
        d = self.run_in_thread(self.sign_blocking, message, body)
        d.addCallbacks(self._signed, self._failed, callbackArgs=(context,),
                       errbackArgs=(context,))
        return d

    def sign_blocking(self, message, body=None):
        """(message to queue, [DKIMKey used]); runs in a thread. ``body``:
        see ``sign_message``."""
        domain = signing_domain(message, self.local_domains)
        if domain is None:
            return message, []
        try:
            keys = self.keystore.signing_keys(domain)
        except KeyStoreError as exc:
            raise SigningFailed(domain, str(exc)) from None
        if not keys:
            raise SigningFailed(domain, f"no active DKIM key for {domain}")
        try:
            return sign_message(message, keys, body), [k.key for k in keys]
        except dkim.MessageFormatError as exc:
            raise SigningFailed(domain, f"dkimpy: {exc}", replies.HEADER_MALFORMED) from None
        except dkim.DKIMException as exc:
            raise SigningFailed(domain, f"dkimpy: {exc}") from None

    @staticmethod
    def _signed(result, context):
        message, keys = result
        for key in keys:
            events.emit("dkim.signed", domain=key.domain, selector=key.selector,
                        algorithm=key.algorithm, **context)
        return message

    @staticmethod
    def _failed(failure, context):
        error = failure.value
        events.emit("dkim.sign_failed", domain=getattr(error, "domain", ""),
                    reason=header_safe(str(error))[:200] or type(error).__name__,
                    **context)
        if not failure.check(SigningFailed):      # a bug: keep the traceback in the log
            _log.failure("DKIM signing failed unexpectedly", failure)
            raise SigningFailed("", str(error))
        return failure

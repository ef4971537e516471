"""DKIM signatures through OpenSSL (``cryptography``), with dkimpy's header logic.

dkimpy (1.1.4 to 1.1.8) signs RSA in pure Python: ``DKIM.sign`` parses the
PEM with ``dkim.parse_pem_private_key`` and ``DKIM.gen_header`` calls
``dkim.RSASSA_PKCS1_v1_5_sign(hash, key)``, which is ``pow()`` on Python
integers: about 10 ms per RSA-2048 signature, all of it holding the GIL, so
the reactor thread waits while a pool thread signs (TWISTED-TRAPS T24).

``install()`` puts a dispatcher in front of both names in the ``dkim``
module: given an ``OpenSSLKey`` (what ``appliance.policy.keys`` hands out
for RSA keys), the PEM parse is skipped (the key was loaded once, when the
key store first read it) and the signature is OpenSSL's ``RSA_sign``
through ``cryptography`` (well under a millisecond, with the GIL released);
given anything else (a PEM, as every other caller in the process passes),
dkimpy's own functions run, unchanged. Everything else (the h= selection,
canonicalisation, the tag list, folding, the b= hash input) stays dkimpy's.

Ed25519 needs no hook: dkimpy signs it with PyNaCl (libsodium, through
cffi, which releases the GIL), some 0.1 ms per signature.
"""

import dkim
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_PREHASHED = {"sha256": utils.Prehashed(hashes.SHA256()),
              "sha1": utils.Prehashed(hashes.SHA1())}


class OpenSSLKey:
    """An RSA private key loaded once (a ``cryptography`` RSAPrivateKey);
    what ``DKIM.sign`` gets instead of the PEM."""

    __slots__ = ("private",)

    def __init__(self, private):
        if not isinstance(private, rsa.RSAPrivateKey):
            raise TypeError("OpenSSLKey holds an RSA private key")
        self.private = private

    @property
    def key_size(self):
        return self.private.key_size

    def sign_digest(self, name, digest):
        """RSASSA-PKCS1-v1_5 over a finished ``name`` digest (sha256, sha1)."""
        try:
            algorithm = _PREHASHED[name.lower()]
        except KeyError:
            raise dkim.ParameterError(f"unsupported hash {name!r} for RSA") from None
        return self.private.sign(digest, padding.PKCS1v15(), algorithm)

    def __repr__(self):
        return f"<OpenSSLKey RSA {self.key_size} bits>"


def _dispatchers(parse, sign):
    def parse_pem_private_key(data):
        if isinstance(data, OpenSSLKey):
            return data
        return parse(data)

    def rsassa_pkcs1_v1_5_sign(hasher, private_key):
        if isinstance(private_key, OpenSSLKey):
            return private_key.sign_digest(hasher.name, hasher.digest())
        return sign(hasher, private_key)

    parse_pem_private_key.dkim_original = parse
    rsassa_pkcs1_v1_5_sign.dkim_original = sign
    return parse_pem_private_key, rsassa_pkcs1_v1_5_sign


def installed():
    """True when dkimpy's RSA signing goes through ``OpenSSLKey``s."""
    return (hasattr(dkim.parse_pem_private_key, "dkim_original")
            and hasattr(dkim.RSASSA_PKCS1_v1_5_sign, "dkim_original"))


def install():
    """Put the dispatchers in front of dkimpy's PEM parse and RSA signature
    (once; a second call changes nothing). ``dkim.DKIM.sign`` and
    ``gen_header`` look both names up in the ``dkim`` module at each call."""
    if installed():
        return
    for name in ("parse_pem_private_key", "RSASSA_PKCS1_v1_5_sign"):
        if not callable(getattr(dkim, name, None)):     # a dkimpy that signs differently
            raise ImportError(f"dkimpy {getattr(dkim, '__version__', '')} has no "
                              f"dkim.{name}: cannot sign RSA through OpenSSL")
    dkim.parse_pem_private_key, dkim.RSASSA_PKCS1_v1_5_sign = _dispatchers(
        dkim.parse_pem_private_key, dkim.RSASSA_PKCS1_v1_5_sign)


install()

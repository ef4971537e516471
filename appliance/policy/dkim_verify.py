"""DKIM verification (RFC 6376) with dkimpy, bounded (TWISTED-TRAPS T24).

Every DKIM-Signature of a message is checked, up to ``MAX_SIGNATURES`` (the
rest are not looked at: a pile of signatures must not buy a sender our CPU).
Stock dkimpy accepts what we refuse here:

- ``rsa-sha1`` signatures: fail (RFC 8301 §3.1), without a DNS query;
- ``l=`` signatures: fail (anyone may append to the signed body, T24);
- a signature over ``MAX_SIGNATURE_OCTETS``, with a run of whitespace over
  ``MAX_WSP_RUN`` (dkimpy's b= and bh= patterns backtrack on long runs, in
  one C call that holds the GIL), or with over ``MAX_SIGNED_FIELDS`` names
  in h=, and every signature of a header section of over
  ``MAX_HEADER_FIELDS`` fields: permerror (the work is bounded per message);
- RSA keys over ``MAX_KEY_BITS`` or with a public exponent over
  ``MAX_EXPONENT_BITS``: fail, refused before any arithmetic. dkimpy does
  RSA in pure Python and holds the GIL through one ``pow()``: a 16384-bit
  key with a huge exponent stops the whole process, reactor included, for
  about eight seconds. Keys under 1024 bits fail too (dkimpy's minkey).

The body is canonicalised in linear time, in slices that let the reactor
have the GIL (``appliance.policy.dkim_body``: dkimpy's own regular
expressions are quadratic on some bodies and hold the GIL throughout), and
hashed by us (``BodyDigests``: from memory, or from the spool file of a body
that never was in memory, issue 17). dkimpy gets the header section only:
it checks the header signature (b=) as ever; the body hash (bh=) is ours to
compare, and dkimpy sees the outcome at the point where it would have
compared it itself (the tag removed when it matched, a body that cannot
match when it did not), so every other check keeps dkimpy's order.

Keys come from our ``Lookups`` (shared resolver, the message's time budget);
a signature whose key cannot be fetched now is ``temperror``, one whose key
does not exist or does not parse ``permerror``; a signature left when the
budget is spent is ``temperror`` without a query.
"""

import base64
import binascii
import logging
import re
from collections import namedtuple

import dkim
from dkim.canonicalization import CanonicalizationPolicy
from dkim.crypto import UnparsableKeyError, parse_public_key
from dkim.util import parse_tag_value

from appliance.policy.dkim_body import BodyDigests, hash_name, header_object, split_message
from appliance.policy.lookup import TempDNSError

MAX_SIGNATURES = 5
MAX_HEADER_FIELDS = 1000        # fields in a header section whose signatures we check
MAX_SIGNED_FIELDS = 100         # names in one h= list
MAX_SIGNATURE_OCTETS = 8192     # one DKIM-Signature field (RSA 4096's b= is 684 octets)
MAX_WSP_RUN = 64                # whitespace in a row in a DKIM-Signature field
MAX_KEY_BITS = 4096             # RFC 8301 §3.2: verifiers must handle 1024 to 4096
MAX_EXPONENT_BITS = 256         # FIPS 186-4 B.3.1; real keys use 65537

_WSP_RUN = re.compile(rb"\s{%d}" % (MAX_WSP_RUN + 1))
# A header section dkimpy splits without complaint (every line a field
# "name:" or a continuation of one; the colon is the first one, so the
# pattern never backtracks): with no "dkim-signature" in it, it has none.
_PLAIN_HEAD = re.compile(rb"(?:[!-9;-~]+:[^\n]*\n(?:[\t ][^\n]*\n)*)*")

DKIMResult = namedtuple("DKIMResult", "result domain selector algorithm reason")
DKIMResult.__doc__ = """One signature's outcome: result (pass, fail, temperror, permerror),
its d=, s= and a= as text (client data: sanitise before use), and our reason."""

# dkimpy logs every failure at ERROR; with no handler, Python would print them.
_quiet = logging.getLogger("mailappliance.dkim-verify")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


def _text(value):
    return value.decode("ascii", "replace") if isinstance(value, bytes) else ""


def key_refusal(record):
    """Why we refuse the key ``record`` (bytes) before using it, or None.

    Only what dkimpy would accept but we must not: an RSA key too big or with
    a huge exponent. A record that does not parse is left to dkimpy.
    """
    try:
        tags = parse_tag_value(record)
        if tags.get(b"k", b"rsa").strip() != b"rsa" or not tags.get(b"p"):
            return None
        key = parse_public_key(base64.b64decode(tags[b"p"]))
    except (dkim.DKIMException, UnparsableKeyError, binascii.Error, ValueError,
            TypeError, IndexError, KeyError):
        return None
    if key["modulus"].bit_length() > MAX_KEY_BITS:
        return f"key over {MAX_KEY_BITS} bits"
    if key["publicExponent"].bit_length() > MAX_EXPONENT_BITS:
        return f"public exponent over {MAX_EXPONENT_BITS} bits"
    return None


class _KeyFetch:
    """dkimpy's ``dnsfunc`` for one signature: our DNS, our key caps, and
    the reason it gave dkimpy nothing (``problem``: (result, reason))."""

    def __init__(self, lookups):
        self.lookups = lookups
        self.problem = None

    def __call__(self, name, timeout=5):
        try:
            qname = name.decode("ascii")
        except (UnicodeDecodeError, AttributeError):
            self.problem = ("permerror", "key name is not ASCII")
            return None
        try:
            records = self.lookups.txt(qname)
        except TempDNSError:
            self.problem = ("temperror", "key lookup failed")
            raise dkim.DnsTimeoutError("key lookup failed") from None
        if not records:
            self.problem = ("permerror", "no key for signature")
            return None
        record = records[0]
        refusal = key_refusal(record)
        if refusal is not None:
            self.problem = ("fail", refusal)
            return None         # dkimpy: "missing public key", no arithmetic
        return record


def verify_signatures(message, lookups, max_signatures=MAX_SIGNATURES, body=None):
    """``([DKIMResult], skipped)`` for the DKIM-Signature fields of
    ``message`` (bytes), top first; ``skipped`` counts those past the cap.

    ``body``: the ``BodyDigests`` of the message body when ``message``
    holds only its header section (a body in the spool's file); by default
    the body is the rest of ``message``."""
    if _surely_unsigned(message):
        return [], 0            # the usual message: no dkimpy parse, no body pass
    try:
        verifier = header_object(message, logger=_quiet, minkey=1024)
    except Exception:               # dkimpy on a header block it cannot split
        return [DKIMResult("permerror", "", "", "", "message not parsable")], 0
    signatures = [value for name, value in verifier.headers
                  if name.lower() == b"dkim-signature"]
    if len(verifier.headers) > MAX_HEADER_FIELDS:
        checked = min(len(signatures), max_signatures)
        return ([DKIMResult("permerror", "", "", "", "header section too large")] * checked,
                len(signatures) - checked)
    if body is None:
        body = BodyDigests.of_message(message)
    checked = signatures[:max_signatures]
    body.digests(set(filter(None, map(_body_hash_wanted, checked))))    # one pass
    results = [_verify_one(verifier, index, value, lookups, body)
               for index, value in enumerate(checked)]
    return results, len(signatures) - len(results)


def _surely_unsigned(message):
    """True when dkimpy would split the header section of ``message`` and
    find no DKIM-Signature field (``verify_signatures`` would answer
    ``([], 0)``); False when it cannot tell so cheaply."""
    head = split_message(message)[0]
    return b"dkim-signature" not in head.lower() and _PLAIN_HEAD.fullmatch(head) is not None


def _body_hash_wanted(value):
    """The (canonicalisation, hash name) the signature ``value`` hashes its
    body with, or None when it is not one we would check."""
    try:
        tags = parse_tag_value(value)
        if b"l" in tags or signature_refusal(value, tags) is not None:
            return None
        name = hash_name(tags.get(b"a", b"").strip().lower())
        if name is None or name == "sha1":
            return None
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        return policy.body_algorithm.name, name
    except Exception:               # a malformed signature: dkimpy reports it
        return None


def _body_matches(sig, body):
    """True or False: does the body hash of the parsed signature ``sig``
    match the body? None when dkimpy fails this signature before it would
    compare (a bad c= or bh=): it then needs no body at all."""
    try:
        policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        name = hash_name(sig[b"a"])
        expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    except Exception:
        return None
    if name is None:
        return None
    return body.digest(policy.body_algorithm.name, name) == expected


def _unmatched_body(sig):
    """A body whose hash is not the signature's bh= (dkimpy then reports
    the body hash mismatch itself, after the key, as ever)."""
    policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
    expected = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
    for body in (b"", b"x\r\n"):
        canonical = policy.canonicalize_body(body)
        if dkim.HASH_ALGORITHMS[sig[b"a"]](canonical).digest() != expected:
            return body
    raise AssertionError("two bodies with one hash")


def signature_refusal(value, tags):
    """Why the DKIM-Signature ``value`` (bytes) with ``tags`` is not checked
    at all (bounded work, see the module docstring), or None."""
    if len(value) > MAX_SIGNATURE_OCTETS:
        return "signature field too long"
    if _WSP_RUN.search(value) is not None:
        return "too much whitespace in the signature"
    if len(tags.get(b"h", b"").split(b":")) > MAX_SIGNED_FIELDS:
        return "too many signed header fields"
    return None


def _verify_one(verifier, index, value, lookups, body):
    try:
        tags = parse_tag_value(value)
    except Exception:
        return DKIMResult("permerror", "", "", "", "malformed signature")
    domain, selector = _text(tags.get(b"d")), _text(tags.get(b"s"))
    algorithm = _text(tags.get(b"a")).lower()

    def result(outcome, reason):
        return DKIMResult(outcome, domain, selector, algorithm, reason)

    refusal = signature_refusal(value, tags)
    if refusal is not None:
        return result("permerror", refusal)
    if algorithm == "rsa-sha1":
        return result("fail", "rsa-sha1 is not accepted (RFC 8301)")
    if b"l" in tags:
        return result("fail", "l= (a partly signed body) is not accepted")
    if lookups.remaining() <= 0:
        return result("temperror", "time budget for the checks spent")
    fetch = _KeyFetch(lookups)
    try:
        sig, include_headers, sig_fields = verifier.verify_headerprep(index)
        matches = _body_matches(sig, body)
        verifier.body = b""
        if matches:
            sig = {tag: tag_value for tag, tag_value in sig.items() if tag != b"bh"}
        elif matches is not None:
            verifier.body = _unmatched_body(sig)
        verified = verifier.verify_sig(sig, include_headers, sig_fields[index], fetch)
    except dkim.ValidationError as exc:
        if "body hash mismatch" in str(exc):
            return result("fail", "body hash did not verify")
        return result("permerror", "invalid signature")
    except dkim.NaClNotFoundError:
        return result("permerror", "ed25519 is not supported here")
    except dkim.KeyFormatError as exc:       # raised after the arithmetic: a small key
        if "too small" in str(exc):
            return result("fail", "key under 1024 bits (RFC 8301)")
        return result("permerror", "key not usable")
    except Exception:           # DKIMException, or dkimpy on hostile input
        return result("permerror", "signature could not be verified")
    if verified:
        return result("pass", "")
    if fetch.problem is not None:
        return result(*fetch.problem)
    return result("fail", "signature did not verify")

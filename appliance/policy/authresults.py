"""The Authentication-Results field (RFC 8601) that the inbound checks add:
one result a line, every value checked to be a plain token first (the
values come from the message and from DNS), written with ``authres``."""

import re

import authres
import authres.dmarc

from appliance.address import dns_name

_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}\Z")
_SELECTOR = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,62})\Z")
_ALGORITHM = re.compile(r"[a-z0-9-]{1,20}\Z")
_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9 .,:=/-]")
_NOT_IN_ID = re.compile(r"[^a-z0-9.-]")


def _comment(text):
    return _COMMENT_UNSAFE.sub("", text)[:80] or None


def _address_value(sender):
    """An SPF smtp.mailfrom value: the address if it is a plain token, else its domain."""
    local, _, domain = sender.rpartition("@")
    domain = dns_name(domain)
    if domain is None:
        return None
    return f"{local}@{domain}" if _LOCAL.match(local) else domain


def _spf_result(result, sender):
    if result.identity == "helo":
        helo = dns_name(result.domain)
        return authres.SPFAuthenticationResult(result=result.result, smtp_helo=helo)
    mailfrom = _address_value(sender) if sender else None
    if mailfrom is None:
        return authres.SPFAuthenticationResult(
            result=result.result, smtp_helo=dns_name(result.domain),
            result_comment="null sender" if not sender else None)
    return authres.SPFAuthenticationResult(result=result.result, smtp_mailfrom=mailfrom)


def _dkim_result(result):
    selector = result.selector if _SELECTOR.match(result.selector) else None
    algorithm = result.algorithm if _ALGORITHM.match(result.algorithm) else None
    return authres.DKIMAuthenticationResult(
        result=result.result, result_comment=_comment(result.reason),
        header_d=dns_name(result.domain), header_s=selector,
        header_a=algorithm)


def _dmarc_result(result):
    comment = f"p={result.policy or 'none'} dis={result.disposition}" \
        if result.policy else _comment(result.reason)
    return authres.dmarc.DMARCAuthenticationResult(
        result=result.result, result_comment=comment,
        header_from=dns_name(result.domain))


def authentication_results(hostname, verdict, sender):
    """The Authentication-Results field (bytes, CRLF, folded one result a line)."""
    results = [_spf_result(r, sender) for r in verdict.spf]
    if verdict.dkim is not None:
        results += [_dkim_result(r) for r in verdict.dkim] or [
            authres.DKIMAuthenticationResult(result="none")]
    results += [_dmarc_result(r) for r in verdict.dmarc]
    authserv_id = _NOT_IN_ID.sub("", hostname.lower()) or "localhost"
    text = "".join(";\r\n\t" + str(result) for result in results) or "; none"
    field = f"Authentication-Results: {authserv_id}{text}\r\n"
    # Every value passed the token checks above; this keeps it a promise.
    return field.encode("ascii", "replace")

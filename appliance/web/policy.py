"""The MTA-STS policy we publish (RFC 8461 §3.2) and the names the web listener serves.

The policy file says which MX hosts senders may deliver to over verified TLS
(``mx: hostname``) and what to do when that fails (``mode`` from ``[tls]
mta_sts``). Its ``_mta-sts`` TXT record carries an ``id`` that must change
whenever the policy does, so senders fetch it again: the id is a digest of
the policy text, which changes exactly when the policy does.
"""

import hashlib

from appliance.policy.keys import ascii_domain

MAX_AGE = 604800            # one week (RFC 8461 §3.2 suggests weeks)
TLSRPT_LOCAL_PART = "postmaster"


def policy_text(cfg):
    """The body of ``/.well-known/mta-sts.txt`` (CRLF lines, RFC 8461 §3.2)."""
    lines = ["version: STSv1", f"mode: {cfg.tls.mta_sts}",
             f"mx: {cfg.server.hostname}", f"max_age: {MAX_AGE}"]
    return "".join(line + "\r\n" for line in lines)


def policy_id(cfg):
    """1..32 letters and digits, different for every different policy text."""
    return hashlib.sha256(policy_text(cfg).encode("ascii")).hexdigest()[:20]


def sts_record(cfg):
    """The TXT text at ``_mta-sts.DOMAIN``."""
    return f"v=STSv1; id={policy_id(cfg)}"


def tlsrpt_record(domain):
    """The TXT text at ``_smtp._tls.DOMAIN`` (RFC 8460 §3): reports to the postmaster."""
    return f"v=TLSRPTv1; rua=mailto:{TLSRPT_LOCAL_PART}@{domain}"


WEB_PREFIXES = ("mta-sts", "autoconfig", "autodiscover")


def web_names(cfg):
    """Every name the web listener answers for and ACME certifies, A-labels:
    the hostname, then mta-sts., autoconfig., autodiscover. of each domain."""
    names = [cfg.server.hostname]
    for domain in cfg.server.domains:
        for prefix in WEB_PREFIXES:
            name = f"{prefix}.{ascii_domain(domain)}"
            if name not in names:
                names.append(name)
    return names

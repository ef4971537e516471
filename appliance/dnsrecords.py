"""The DNS records the operator publishes for the appliance, and a check of them.

``records(cfg, store)`` lists, for every local domain (A-labels):

- MX: ``10 <hostname>.``;
- SPF: ``v=spf1 ip4:... ip6:... -all`` from ``[server] public_addresses``,
  else ``v=spf1 mx -all``;
- DKIM: one TXT per key of the key store, active and retired (mail signed
  with a retired key may still be on its way), at
  ``<selector>._domainkey.<domain>``;
- DMARC: ``v=DMARC1; p=quarantine; rua=mailto:postmaster@<domain>`` at
  ``_dmarc.<domain>``, a safe start before ``p=reject``;
- with the https listener: ``mta-sts.``, ``autoconfig.`` and ``autodiscover.``
  CNAMEs to the hostname (SPEC §8), and when our MTA-STS policy is published
  (``[tls] mta_sts``) the ``_mta-sts`` TXT (its id changes with the policy)
  and the ``_smtp._tls`` TLS-RPT TXT (RFC 8460) reporting to the postmaster;

and for the host itself: its A/AAAA (a hint, from ``public_addresses``) and
an SPF record for its name, which receivers check for the HELO identity and
for bounces (empty MAIL FROM).

``render`` writes them in zone-file syntax (TXT text split into strings of
at most 255 octets, RFC 1035 §3.3.14 / RFC 6376 §3.6.2.2); ``check`` looks
each one up through a dnspython resolver (``[dns]``) and says present,
missing, different (with what was found) or error (the lookup failed).
Everything here blocks: the admin shell calls ``report`` in a thread.
"""

import re
from dataclasses import dataclass

import dns.exception
import dns.resolver

from appliance.deliver.mx import build_resolver
from appliance.policy.keys import ascii_domain
from appliance.web.policy import WEB_PREFIXES, sts_record, tlsrpt_record

TTL = 3600
TXT_CHUNK = 255
PRESENT, MISSING, DIFFERENT, ERROR = "present", "missing", "different", "error"
_NAME_COLUMN = 40


@dataclass(frozen=True)
class Record:
    """One resource record to publish."""

    name: str               # absolute, with the final dot
    rtype: str              # MX, A, AAAA, TXT
    value: str              # MX "10 host."; an address; TXT text, unsplit
    kind: str               # mx, address, spf, dkim, dmarc, helo-spf

    def strings(self):
        """The TXT value as quoted strings of <= 255 octets each."""
        return [f'"{_escape(chunk)}"' for chunk in txt_strings(self.value)]

    def zone_line(self):
        head = f"{self.name:<{_NAME_COLUMN}} {TTL} IN {self.rtype:<5} "
        if self.rtype != "TXT":
            return head + self.value
        strings = self.strings()
        if len(strings) == 1:
            return head + strings[0]
        # A long TXT: one string a line inside parentheses (RFC 1035 §5.1).
        pad = "\n" + " " * (len(head) + 2)
        return head + "( " + pad.join(strings) + " )"


@dataclass(frozen=True)
class Finding:
    """What ``check`` found for one record."""

    record: Record
    status: str             # present | missing | different | error
    found: tuple = ()       # the values seen (for different), or the error text


def txt_strings(text):
    """``text`` cut into character-strings of at most 255 octets."""
    data = text.encode("utf-8")
    chunks = [data[i:i + TXT_CHUNK] for i in range(0, len(data), TXT_CHUNK)] or [b""]
    return [chunk.decode("utf-8") for chunk in chunks]


def _escape(text):
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _absolute(name):
    return name.rstrip(".") + "."


# -- what to publish ---------------------------------------------------------------

def spf_text(addresses, mechanism="mx"):
    """``v=spf1`` with the host's addresses, or ``mechanism`` without them."""
    if not addresses:
        return f"v=spf1 {mechanism} -all"
    terms = [f"ip{address.version}:{address}" for address in addresses]
    return "v=spf1 " + " ".join(terms) + " -all"


def dmarc_text(domain):
    return f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}"


def records(cfg, store):
    """Every record for ``cfg``'s domains and host (the config guarantees
    both); DKIM from ``store`` (a KeyStore: ``store.ensure`` first)."""
    host = _absolute(cfg.server.hostname)
    addresses = cfg.server.public_addresses
    found = []
    for domain in (ascii_domain(d) for d in cfg.server.domains):
        name = _absolute(domain)
        found.append(Record(name, "MX", f"10 {host}", "mx"))
        found.append(Record(name, "TXT", spf_text(addresses), "spf"))
        for key in store.keys(domain):
            found.append(Record(_absolute(key.dns_name), "TXT", key.txt, "dkim"))
        found.append(Record(f"_dmarc.{name}", "TXT", dmarc_text(domain), "dmarc"))
        found.extend(_web_records(cfg, name, host))
    for address in addresses:
        found.append(Record(host, "A" if address.version == 4 else "AAAA", str(address),
                            "address"))
    if host.rstrip(".") not in {ascii_domain(d) for d in cfg.server.domains}:
        found.append(Record(host, "TXT", spf_text(addresses, mechanism="a"), "helo-spf"))
    return found


def _web_records(cfg, name, host):
    """The names the web listener answers for, and MTA-STS / TLS-RPT."""
    found = []
    if cfg.listen.https is not None:
        found += [Record(f"{prefix}.{name}", "CNAME", host, "web") for prefix in WEB_PREFIXES
                  if f"{prefix}.{name}" != host]
    if cfg.mta_sts_published:
        found.append(Record(f"_mta-sts.{name}", "TXT", sts_record(cfg), "mta-sts"))
        found.append(Record(f"_smtp._tls.{name}", "TXT", tlsrpt_record(name.rstrip(".")),
                            "tls-rpt"))
    return found


def render(cfg, found, notes=()):
    """The zone-file text: a comment header, ``notes`` as comments, the records."""
    lines = [f"; DNS records for mailappliance on {cfg.server.hostname} "
             "(mailappliance dns-records)"]
    lines += [f"; {note}" for note in notes]
    domain = None
    for record in found:
        if record.kind in ("address", "helo-spf"):
            section = f"the mail host {cfg.server.hostname}"
        else:
            section = record.name if record.kind == "mx" else domain
        if section != domain:
            domain = section
            lines += ["", f"; {section.rstrip('.')}"]
        lines.append(record.zone_line())
    if not cfg.server.public_addresses:
        lines += ["", f"; A/AAAA for {cfg.server.hostname}: its public addresses "
                  "(set [server] public_addresses to have them here and in SPF)"]
    return "\n".join(lines) + "\n"


# -- what is published -------------------------------------------------------------------

def check(found, resolver):
    """A Finding per record, looking each name and type up once."""
    answers = {}
    findings = []
    for record in found:
        key = (record.name, record.rtype)
        if key not in answers:
            answers[key] = _lookup(resolver, record.name, record.rtype)
        values, error = answers[key]
        if error is not None:
            findings.append(Finding(record, ERROR, (error,)))
        else:
            findings.append(_compare(record, values))
    return findings


def _lookup(resolver, name, rtype):
    """([values as text], None) or (None, error text); NXDOMAIN and NODATA are []."""
    try:
        answer = resolver.resolve(name, rtype, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return [], None
    except dns.exception.Timeout:
        return None, "DNS timeout"
    except dns.resolver.NoNameservers:
        return None, "no name server answered (SERVFAIL or REFUSED)"
    except dns.exception.DNSException as exc:
        return None, f"DNS error: {exc}"
    if answer.rrset is None:
        return [], None
    if rtype == "TXT":
        return [b"".join(r.strings).decode("utf-8", "replace") for r in answer.rrset], None
    if rtype == "MX":
        return [f"{r.preference} {r.exchange.to_text().lower()}" for r in answer.rrset], None
    return [r.to_text() for r in answer.rrset], None


def _compare(record, values):
    if record.kind == "spf" or record.kind == "helo-spf":
        relevant = [v for v in values if re.match(r"v=spf1(\s|$)", v, re.I)]
        same = [v for v in relevant if _words(v) == _words(record.value)]
    elif record.kind == "dmarc":
        relevant = [v for v in values if re.match(r"v=DMARC1\s*(;|$)", v, re.I)]
        same = [v for v in relevant if _tags(v) == _tags(record.value)]
    elif record.kind in ("mta-sts", "tls-rpt"):
        version = record.value.split(";")[0].strip().lower()
        relevant = [v for v in values if v.split(";")[0].strip().lower() == version]
        same = [v for v in relevant if _tags(v) == _tags(record.value)]
    elif record.kind == "dkim":
        relevant = values
        want = _tags(record.value)
        same = [v for v in values if _dkim_key(_tags(v)) == _dkim_key(want)]
    elif record.kind == "mx":
        relevant = values
        host = record.value.split()[1]
        same = [v for v in values if v.split()[1] == host]
    else:
        relevant = values
        same = [v for v in values if v == record.value]
    if same:
        return Finding(record, PRESENT)
    return Finding(record, DIFFERENT if relevant else MISSING, tuple(relevant))


def _words(text):
    return text.lower().split()


def _tags(text):
    """A tag=value list (RFC 6376 §3.2) as a dict; whitespace removed."""
    tags = {}
    for part in text.split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = re.sub(r"\s+", "", value)
    return tags


def _dkim_key(tags):
    return tags.get("k", "rsa").lower(), tags.get("p")


# -- for the CLI and the admin shell --------------------------------------------------

def report(cfg, store, check_dns=False, resolver=None, notes=()):
    """``(text, ok)``: the zone text, or with ``check_dns`` one line per
    record with its status; ``ok`` is False when a record is not present."""
    found = records(cfg, store)
    if not check_dns:
        return render(cfg, found, notes), True
    findings = check(found, resolver if resolver is not None else build_resolver(cfg))
    lines = [f"; {note}" for note in notes]
    for finding in findings:
        record = finding.record
        lines.append(f"{finding.status:<9} {record.rtype:<4} {record.name} {record.value}")
        if finding.status == DIFFERENT:
            lines += [f"          found: {value}" for value in finding.found]
        elif finding.status == ERROR:
            lines.append(f"          ({finding.found[0]})")
    counts = {s: sum(f.status == s for f in findings)
              for s in (PRESENT, MISSING, DIFFERENT, ERROR)}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines) + "\n", counts[PRESENT] == len(findings)

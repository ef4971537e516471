"""Mail client autoconfiguration: Thunderbird's config-v1.1.xml and Outlook's autodiscover.

Both describe the same endpoints: the configured IMAP, POP3 and submission
listeners at ``[server] hostname`` with their ports (implicit TLS first, then
STARTTLS), user name = the whole address, password authentication (only
ever offered over TLS by the listeners themselves).
"""

import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from appliance.policy.keys import ascii_domain

# (listener, protocol, socket type) in the order clients should try them.
INCOMING = (("imaps", "imap", "SSL"), ("imap", "imap", "STARTTLS"),
            ("pop3s", "pop3", "SSL"), ("pop3", "pop3", "STARTTLS"))
OUTGOING = (("submissions", "SSL"), ("submission", "STARTTLS"),
            ("submission_alt", "STARTTLS"))

AUTODISCOVER_REQUEST_NS = ("http://schemas.microsoft.com/exchange/autodiscover/"
                           "outlook/requestschema/2006")
AUTODISCOVER_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = ("http://schemas.microsoft.com/exchange/autodiscover/outlook/"
              "responseschema/2006a")


class BadRequest(Exception):
    """The autodiscover request cannot be answered (message: why, one line)."""


def _port(cfg, listener):
    address = getattr(cfg.listen, listener)
    return None if address is None else address.port


def thunderbird_xml(cfg, domain):
    """``config-v1.1.xml`` for ``domain`` (one of ours)."""
    host = escape(cfg.server.hostname)
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<clientConfig version="1.1">',
           f'  <emailProvider id="{escape(domain)}">']
    for local in cfg.server.domains:
        out.append(f"    <domain>{escape(local)}</domain>")
    out += [f"    <displayName>{escape(domain)}</displayName>",
            f"    <displayShortName>{escape(domain)}</displayShortName>"]

    def server(tag, kind, port, socket_type):
        return [f'    <{tag} type="{kind}">', f"      <hostname>{host}</hostname>",
                f"      <port>{port}</port>", f"      <socketType>{socket_type}</socketType>",
                "      <authentication>password-cleartext</authentication>",
                "      <username>%EMAILADDRESS%</username>", f"    </{tag}>"]
    for listener, kind, socket_type in INCOMING:
        port = _port(cfg, listener)
        if port is not None:
            out += server("incomingServer", kind, port, socket_type)
    for listener, socket_type in OUTGOING:
        port = _port(cfg, listener)
        if port is not None:
            out += server("outgoingServer", "smtp", port, socket_type)
    out += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(out).encode("utf-8")


def autodiscover_address(body):
    """The EMailAddress of an Outlook autodiscover POST body (bytes)."""
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise BadRequest("document type declarations are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BadRequest(f"not XML: {exc}") from None
    for element in root.iter():
        if element.tag.rpartition("}")[2] == "EMailAddress":
            address = (element.text or "").strip()
            if address.count("@") == 1 and all(address.split("@")):
                return address
            break
    raise BadRequest("no EMailAddress in the request")


def local_domain_of(cfg, address):
    """The local domain of ``address`` as configured, or None when it is not ours."""
    domain = address.rpartition("@")[2].strip().rstrip(".").lower()
    try:
        wanted = ascii_domain(domain)
    except ValueError:
        return None
    for local in cfg.server.domains:
        if ascii_domain(local) == wanted:
            return local
    return None


def outlook_xml(cfg, address):
    """The autodiscover response (Outlook "POX" schema) for ``address``."""
    host = escape(cfg.server.hostname)
    login = escape(address)
    out = ['<?xml version="1.0" encoding="utf-8"?>', f'<Autodiscover xmlns="{AUTODISCOVER_NS}">',
           f'  <Response xmlns="{OUTLOOK_NS}">',
           "    <Account>", "      <AccountType>email</AccountType>",
           "      <Action>settings</Action>"]

    def protocol(kind, port, implicit):
        lines = ["      <Protocol>", f"        <Type>{kind}</Type>",
                 f"        <Server>{host}</Server>", f"        <Port>{port}</Port>",
                 f"        <LoginName>{login}</LoginName>",
                 "        <DomainRequired>off</DomainRequired>", "        <SPA>off</SPA>"]
        if implicit:
            lines.append("        <SSL>on</SSL>")
        else:
            lines += ["        <SSL>on</SSL>", "        <Encryption>TLS</Encryption>"]
        lines += ["        <AuthRequired>on</AuthRequired>", "      </Protocol>"]
        return lines
    for kind, implicit_name, starttls_name in (("IMAP", "imaps", "imap"),
                                               ("POP3", "pop3s", "pop3"),
                                               ("SMTP", "submissions", "submission")):
        if _port(cfg, implicit_name) is not None:
            out += protocol(kind, _port(cfg, implicit_name), True)
        elif _port(cfg, starttls_name) is not None:
            out += protocol(kind, _port(cfg, starttls_name), False)
    out += ["    </Account>", "  </Response>", "</Autodiscover>", ""]
    return "\n".join(out).encode("utf-8")

"""The web listener pair (SPEC §8) of a running server, asked with curl.

Names are pinned to 127.0.0.1 with ``curl --resolve``; the https certificate
is the server's self-signed one, trusted with ``--cacert`` where the name
matters not (it names the hostname only), else ``-k``.
"""

import socket
import subprocess
import xml.etree.ElementTree as ET

import pytest

from harness import wait_until

LISTENERS = ("mx", "submission", "submissions", "imap", "imaps", "pop3s", "http", "https")
AUTODISCOVER_BODY = b"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>alice@example.test</EMailAddress>
    <AcceptableResponseSchema>http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a</AcceptableResponseSchema>
  </Request>
</Autodiscover>
"""


@pytest.fixture
def server(mailserver_factory):
    return mailserver_factory(listeners=LISTENERS, overrides={"tls": {"mta_sts": "enforce"}})


def curl(server, listener, name, path, *options, data=None):
    """(status, headers text, body bytes) of one request to ``name`` on ``listener``."""
    port = server.port(listener)
    scheme = "https" if listener == "https" else "http"
    command = ["curl", "-sS", "-k", "--max-time", "10", "-D", "-",
               "--resolve", f"{name}:{port}:127.0.0.1", *options,
               f"{scheme}://{name}:{port}{path}"]
    if data is not None:
        command[1:1] = ["--data-binary", "@-", "-H", "Content-Type: text/xml"]
    result = subprocess.run(command, input=data, capture_output=True, timeout=20)
    assert result.returncode == 0, result.stderr.decode()
    head, _, body = result.stdout.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, head.decode("latin-1").lower(), body


def test_thunderbird_autoconfig_describes_the_configured_listeners(server):
    status, head, body = curl(server, "https", "autoconfig.example.test",
                              "/mail/config-v1.1.xml?emailaddress=alice%40example.test")
    assert status == 200 and "content-type: application/xml" in head
    provider = ET.fromstring(body).find("emailProvider")
    assert provider.get("id") == "example.test"
    incoming = [(s.get("type"), s.findtext("hostname"), int(s.findtext("port")),
                 s.findtext("socketType")) for s in provider.findall("incomingServer")]
    assert incoming == [("imap", "mail.example.test", server.port("imaps"), "SSL"),
                        ("imap", "mail.example.test", server.port("imap"), "STARTTLS"),
                        ("pop3", "mail.example.test", server.port("pop3s"), "SSL")]
    outgoing = [(int(s.findtext("port")), s.findtext("socketType"))
                for s in provider.findall("outgoingServer")]
    assert outgoing == [(server.port("submissions"), "SSL"),
                        (server.port("submission"), "STARTTLS")]
    assert {s.findtext("username") for s in provider.iter()
            if s.findtext("username")} == {"%EMAILADDRESS%"}


def test_outlook_autodiscover_answers_a_post_for_a_local_address(server):
    status, head, body = curl(server, "https", "autodiscover.example.test",
                              "/autodiscover/autodiscover.xml", data=AUTODISCOVER_BODY)
    assert status == 200
    ns = {"a": "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"}
    root = ET.fromstring(body)
    protocols = {p.findtext("a:Type", namespaces=ns): (p.findtext("a:Server", namespaces=ns),
                                                       int(p.findtext("a:Port", namespaces=ns)),
                                                       p.findtext("a:LoginName", namespaces=ns))
                 for p in root.iter(f"{{{ns['a']}}}Protocol")}
    assert protocols == {
        "IMAP": ("mail.example.test", server.port("imaps"), "alice@example.test"),
        "POP3": ("mail.example.test", server.port("pop3s"), "alice@example.test"),
        "SMTP": ("mail.example.test", server.port("submissions"), "alice@example.test"),
    }
    # A GET is not what Outlook does; a foreign address and a bad body are refused.
    assert curl(server, "https", "autodiscover.example.test",
                "/autodiscover/autodiscover.xml")[0] == 405
    foreign = AUTODISCOVER_BODY.replace(b"example.test", b"example.net")
    assert curl(server, "https", "mail.example.test", "/Autodiscover/Autodiscover.xml",
                data=foreign)[0] == 404
    assert curl(server, "https", "mail.example.test", "/autodiscover/autodiscover.xml",
                data=b"<not xml")[0] == 400
    bomb = b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>'
    assert curl(server, "https", "mail.example.test", "/autodiscover/autodiscover.xml",
                data=bomb)[0] == 400


def test_the_mta_sts_policy_is_served_on_mta_sts_names_only(server):
    status, head, body = curl(server, "https", "mta-sts.example.test",
                              "/.well-known/mta-sts.txt")
    assert status == 200 and "content-type: text/plain" in head
    assert body == (b"version: STSv1\r\nmode: enforce\r\nmx: mail.example.test\r\n"
                    b"max_age: 604800\r\n")
    assert curl(server, "https", "mail.example.test", "/.well-known/mta-sts.txt")[0] == 404
    assert curl(server, "https", "mta-sts.example.net", "/.well-known/mta-sts.txt")[0] == 404
    assert curl(server, "https", "mta-sts.example.test", "/anything/else")[0] == 404
    # What dns-records prints is the policy's id.
    records = server.cli("dns-records")
    assert records.returncode == 0, records.stderr
    assert "_mta-sts.example.test." in records.stdout
    assert "v=TLSRPTv1; rua=mailto:postmaster@example.test" in records.stdout


def test_http_redirects_to_https_except_acme_challenges(server):
    status, head, _ = curl(server, "http", "autoconfig.example.test",
                           "/mail/config-v1.1.xml?emailaddress=a%40example.test")
    https = server.port("https")
    assert status == 301
    assert (f"location: https://autoconfig.example.test:{https}"
            f"/mail/config-v1.1.xml?emailaddress=a%40example.test") in head
    # Unknown challenge tokens are 404, never a redirect.
    assert curl(server, "http", "mail.example.test",
                "/.well-known/acme-challenge/unknown-token")[0] == 404
    wait_until(lambda: {(r["listener"], r["code"]) for r in server.events("web.request")}
               >= {("http", 301), ("http", 404)}, 5, what="web.request events")


def test_requests_are_bounded(server):
    too_big = b"<x>" + b"a" * (70 * 1024) + b"</x>"
    with socket.create_connection(("127.0.0.1", server.port("http")), timeout=10) as sock:
        sock.sendall(b"POST /x HTTP/1.1\r\nHost: mail.example.test\r\nContent-Length: %d\r\n\r\n"
                     % len(too_big) + too_big)
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 413 ")
    with socket.create_connection(("127.0.0.1", server.port("http")), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: mail.example.test\r\nX-Big: "
                     + b"b" * (17 * 1024) + b"\r\n\r\n")
        answer = _read_all(sock)
    # Twisted answers 400 or just closes (a line over its limit), by version.
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 ")
    wait_until(lambda: [r["reason"] for r in server.events("web.refused")]
               == ["body_too_large"], 5, what="a web.refused event")


def _read_all(sock):
    chunks = []
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    except ConnectionResetError:
        pass
    return b"".join(chunks)


def test_the_web_listeners_pass_the_gate(mailserver_factory):
    server = mailserver_factory(listeners=("mx", "http", "https"),
                                overrides={"limits": {"deny": "127.0.0.0/8"}})
    with socket.create_connection(("127.0.0.1", server.port("http")), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_all(sock) == b""
    wait_until(lambda: [(r["listener"], r["reason"]) for r in server.events("web.refused")]
               == [("http", "denied")], 5, what="a web.refused event")

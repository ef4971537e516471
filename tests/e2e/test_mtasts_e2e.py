"""MTA-STS honoured outbound, end to end (RFC 8461, SPEC §8).

Everything is real and on loopback:

- the tests' DNS server is the sender's ``[dns]``: MX records, the
  ``_mta-sts`` TXT records and the ``mta-sts.`` names;
- a policy server speaks HTTPS on port 443 of a loopback address of its own
  (the port RFC 8461 fixes; binding it needs root, as CI runs), with a
  certificate from a test CA that the sender trusts as its system store
  (SSL_CERT_FILE);
- the receiving MX is a second appliance whose certificate, from the same
  CA, names mx1.example.net only.

enforce: a listed MX with a valid certificate gets the mail; an MX the policy
does not list is never tried (deferred 4.7.5); a listed MX whose certificate
does not name it is deferred too.
"""

import http.server
import ipaddress
import random
import smtplib
import ssl
import threading
from email.message import EmailMessage

import pytest
from cryptography.hazmat.primitives import serialization


import dns_server  # noqa: E402
import ldap_server  # noqa: E402
from harness import MailServer, wait_until  # noqa: E402

SENDER = "alice@example.test"
POLICIES = {
    "mta-sts.example.net": "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmax_age: 86400\n",
    "mta-sts.example.org": "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmax_age: 86400\n",
    "mta-sts.example.com": "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n",
}


def make_leaf(ca, names, directory, stem):
    """(cert path, key path) of a certificate from ``ca`` for the DNS ``names``."""
    key, cert = ldap_server.issue_server_cert(*ca, dns_names=names, ips=())
    paths = directory / f"{stem}.pem", directory / f"{stem}.key"
    ldap_server.write_cert_and_key(cert, key, *paths)
    return tuple(str(path) for path in paths)


class PolicyHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        host = (self.headers.get("Host") or "").partition(":")[0]
        body = POLICIES.get(host)
        if body is None or self.path != "/.well-known/mta-sts.txt":
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def policy_server(tmp_path):
    """(ip, ca): the HTTPS policy server on ip:443 and the CA it (and the MX) use."""
    ca = ldap_server.make_ca("MTA-STS test CA")      # (key, certificate)
    cert, key = make_leaf(ca, sorted(POLICIES), tmp_path, "policy")
    ip = str(ipaddress.ip_address("127.0.0.0") + random.randrange(2 << 16, 1 << 23))
    try:
        server = http.server.ThreadingHTTPServer((ip, 443), PolicyHandler)
    except OSError as exc:
        pytest.skip(f"cannot listen on {ip}:443 for the policy server: {exc}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield ip, ca
    server.shutdown()
    server.server_close()


def test_enforce_delivers_only_to_listed_mx_hosts_with_verified_tls(
        tmp_path, policy_server, mailserver_factory, monkeypatch):
    policy_ip, ca = policy_server
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca[1].public_bytes(serialization.Encoding.PEM))
    mx_cert, mx_key = make_leaf(ca, ["mx1.example.net"], tmp_path, "mx")
    receiver_ip = str(ipaddress.ip_address(policy_ip) + 1)
    receiver = MailServer(tmp_path / "receiver", listeners=("mx",), host=receiver_ip, overrides={
        "server": {"hostname": "mx1.example.net", "domains": "example.net, example.org, "
                   "example.com"},
        "tls": {"certificate": mx_cert, "private_key": mx_key, "mta_sts": "none"}})
    for address in ("bob@example.net", "carol@example.org", "dave@example.com"):
        receiver.add_user(address, "secret password")
    zones = {
        "example.net": {"MX": [(10, "mx1.example.net")]},
        "mx1.example.net": {"A": [receiver_ip]},
        "example.org": {"MX": [(10, "rogue.example.org")]},
        "rogue.example.org": {"A": [receiver_ip]},
        "example.com": {"MX": [(10, "mx1.example.com")]},
        "mx1.example.com": {"A": [receiver_ip]},
    }
    for domain in ("example.net", "example.org", "example.com"):
        zones[f"_mta-sts.{domain}"] = {"TXT": ["v=STSv1; id=20261207"]}
        zones[f"mta-sts.{domain}"] = {"A": [policy_ip]}
    with dns_server.DNSServer(zones) as dns:
        receiver.start()
        try:
            monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))     # the sender's "system store"
            sender = mailserver_factory(listeners=("mx",), overrides={
                "relay": {"trusted_networks": "127.0.0.0/8"},
                "dns": {"nameservers": dns.address},
                "outbound": {"port": str(receiver.mx_port)},
                "queue": {"retry": "1h"}})
            for recipient in ("bob@example.net", "carol@example.org", "dave@example.com"):
                message = EmailMessage()
                message["From"], message["To"] = SENDER, recipient
                message["Subject"] = f"MTA-STS to {recipient}"
                message.set_content("hello\n")
                with smtplib.SMTP("127.0.0.1", sender.mx_port, timeout=30) as client:
                    client.send_message(message)

            receiver.wait_for_messages("bob@example.net", 1, timeout=30)

            def outcome(recipient):
                found = [e for e in sender.events("delivery.remote")
                         if e["recipient"] == recipient]
                return found[-1] if found else None
            # bob's event may come after his message is in the receiver's Maildir
            wait_until(lambda: all(outcome(r) for r in ("bob@example.net", "carol@example.org",
                                                        "dave@example.com")),
                       30, what="the outcomes of the three deliveries")
            assert outcome("bob@example.net")["code"] == 250
            assert outcome("bob@example.net")["tls"] is True
            carol = outcome("carol@example.org")
            assert carol["response"] == ("451 no MX host of example.org is listed in its "
                                         "MTA-STS policy")
            dave = outcome("dave@example.com")
            assert dave["code"] == 451 and "TLS" in dave["response"], dave
            assert receiver.messages("carol@example.org") == []
            assert receiver.messages("dave@example.com") == []
            failures = sender.events("mta_sts.failure")
            assert [(f["domain"], f["host"]) for f in failures] == [
                ("example.org", "rogue.example.org")]
            fetched = {e["domain"]: e["mode"] for e in sender.events("mta_sts.policy")}
            assert fetched == {"example.net": "enforce", "example.org": "enforce",
                               "example.com": "enforce"}
        finally:
            receiver.stop()

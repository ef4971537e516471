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

import datetime
import http.server
import ipaddress
import random
import smtplib
import ssl
import threading
from email.message import EmailMessage

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


import dns_server  # noqa: E402
from harness import MailServer, wait_until  # noqa: E402

SENDER = "alice@example.test"
POLICIES = {
    "mta-sts.example.net": "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmax_age: 86400\n",
    "mta-sts.example.org": "version: STSv1\nmode: enforce\nmx: mx1.example.net\nmax_age: 86400\n",
    "mta-sts.example.com": "version: STSv1\nmode: enforce\nmx: mx1.example.com\nmax_age: 86400\n",
}


def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("MTA-STS test CA"))
            .issuer_name(_name("MTA-STS test CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_leaf(ca, names, directory, stem):
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(names[0]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


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
    ca = make_ca()
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
    ca_file.write_bytes(ca[0].public_bytes(serialization.Encoding.PEM))
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
            wait_until(lambda: outcome("carol@example.org") and outcome("dave@example.com"),
                       30, what="the two deferred deliveries")
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

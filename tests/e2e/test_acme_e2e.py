"""ACME against a real CA: Debian's pebble on loopback (SPEC §8).

Pebble resolves the names through the tests' DNS server (every web name ->
127.0.0.1) and validates on the server's https (tls-alpn-01) or http
(http-01) port. The issued certificate must then be what SMTP STARTTLS,
IMAPS and HTTPS present, verified against pebble's root for the hostname;
with a short validity, it is renewed at two thirds of its lifetime without
a restart and without dropping a session opened before.
"""

import imaplib
import json
import os
import smtplib
import ssl
import stat
import subprocess

import pytest
from cryptography import x509


import dns_server  # noqa: E402
from harness import HOSTNAME, wait_until  # noqa: E402
from pebble import PEBBLE, Pebble  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.exists(PEBBLE), reason="pebble is not installed")

LISTENERS = ("mx", "imaps", "http", "https")
NAMES = (HOSTNAME, "mta-sts.example.test", "autoconfig.example.test",
         "autodiscover.example.test")


@pytest.fixture
def dns():
    with dns_server.DNSServer({name: {"A": ["127.0.0.1"]} for name in NAMES}) as server:
        yield server


def start_with_pebble(factory, tmp_path, dns, challenge="tls-alpn-01", validity=None):
    server = factory(listeners=LISTENERS, start=False)
    pebble = Pebble(tmp_path / "pebble", dns.address, http_port=server.port("http"),
                    tls_port=server.port("https"), validity=validity).start()
    server.sections["tls"] = {"acme": "on", "acme_directory": pebble.directory,
                              "acme_ca_file": pebble.ca_file, "acme_challenge": challenge,
                              "acme_email": "hostmaster@example.test"}
    from harness import render_config
    server.config_path.write_text(render_config(server.sections), encoding="utf-8")
    server.start()
    return server, pebble


def served_certificate(port, root_file, starttls=None):
    """The certificate on ``port`` (implicit TLS, or after SMTP STARTTLS),
    verified against ``root_file`` for the hostname."""
    context = ssl.create_default_context(cafile=root_file)
    if starttls == "smtp":
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as smtp:
            smtp._host = HOSTNAME       # the name checked against the certificate
            smtp.starttls(context=context)
            der = smtp.sock.getpeercert(binary_form=True)
    else:
        import socket
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=HOSTNAME) as sock:
                der = sock.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der)


def test_tls_alpn_01_issues_renews_and_swaps_without_dropping_sessions(
        mailserver_factory, tmp_path, dns):
    server, pebble = start_with_pebble(mailserver_factory, tmp_path, dns, validity=45)
    try:
        wait_until(lambda: server.events("acme.issued"), 60, what="acme.issued")
        [issued] = server.events("acme.issued")
        assert sorted(issued["names"]) == sorted(NAMES)
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        first = served_certificate(server.port("imaps"), str(root))
        assert served_certificate(server.mx_port, str(root), starttls="smtp") == first
        # HTTPS on a web name, checked by curl against pebble's root.
        port = server.port("https")
        result = subprocess.run(
            ["curl", "-sS", "--cacert", str(root), "--resolve",
             f"mta-sts.example.test:{port}:127.0.0.1",
             f"https://mta-sts.example.test:{port}/.well-known/mta-sts.txt"],
            capture_output=True, timeout=20)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"version: STSv1\r\n")
        # Files: account key and certificates 0600 in data_dir/acme.
        acme_dir = server.data_dir / "acme"
        for path in acme_dir.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert stat.S_IMODE(acme_dir.stat().st_mode) == 0o700
        assert json.loads((acme_dir / "state.json").read_text())["failures"] == 0

        # A session opened on the first certificate lives through the renewal.
        context = ssl.create_default_context(cafile=str(root))
        session = _imaps(server, context)
        wait_until(lambda: server.events("acme.renewed"), 60, interval=0.5,
                   what="acme.renewed (two thirds of 45 s)")
        second = served_certificate(server.port("imaps"), str(root))
        assert second.serial_number != first.serial_number
        assert session.noop()[0] == "OK"            # not dropped
        session.logout()
        ordered = [e["reason"] for e in server.events("acme.ordered")]
        assert ordered[:2] == ["first", "renewal"]
        assert not server.events("acme.failed")
    finally:
        server.stop()
        pebble.stop()


def _imaps(server, context):
    class Client(imaplib.IMAP4_SSL):
        def _create_socket(self, timeout):
            import socket
            raw = socket.create_connection(("127.0.0.1", self.port), timeout)
            return self.ssl_context.wrap_socket(raw, server_hostname=HOSTNAME)
    return Client("127.0.0.1", server.port("imaps"), ssl_context=context, timeout=10)


def test_http_01_issues_and_a_restart_reuses_the_certificate(mailserver_factory, tmp_path,
                                                             dns):
    server, pebble = start_with_pebble(mailserver_factory, tmp_path, dns, challenge="http-01")
    try:
        wait_until(lambda: server.events("acme.issued"), 60, what="acme.issued")
        root = tmp_path / "pebble-root.pem"
        root.write_bytes(pebble.root_pem())
        first = served_certificate(server.port("imaps"), str(root))
        server.restart()
        # The stored certificate serves at once; no new order.
        assert served_certificate(server.port("imaps"), str(root)) == first
        assert len(server.events("acme.ordered")) == 1
    finally:
        server.stop()
        pebble.stop()


def test_a_failed_order_is_an_event_retried_within_a_minute_and_remembered(
        mailserver_factory, tmp_path, dns):
    dns.zones.pop("autodiscover.example.test")          # pebble cannot validate this one
    server, pebble = start_with_pebble(mailserver_factory, tmp_path, dns)
    try:
        wait_until(lambda: server.events("acme.failed"), 60, what="acme.failed")
        [failed] = server.events("acme.failed")
        assert failed["failures"] == 1 and 0 < failed["retry_in"] < 60
        assert "autodiscover.example.test" in failed["error"]
        state = json.loads((server.data_dir / "acme" / "state.json").read_text())
        assert state["failures"] == 1 and "autodiscover" in state["error"]
        # Still serving (the self-signed certificate), and a restart waits for the retry time.
        server.restart()
        assert len(server.events("acme.ordered")) == 1
        dns.zones["autodiscover.example.test"] = {"A": ["127.0.0.1"]}
        wait_until(lambda: server.events("acme.issued"), 90, interval=0.5,
                   what="acme.issued on the retry")
    finally:
        server.stop()
        pebble.stop()

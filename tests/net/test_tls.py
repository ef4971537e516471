"""Server TLS: the certificate, the context, reloads, and real handshakes on loopback."""

import os
import shutil
import smtplib
import socket
import ssl
import tempfile
import warnings

import pytest
from OpenSSL import SSL
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, reactor, task, threads
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest

from appliance.auth.sasl import Mechanisms
from appliance.receive.smtp import SMTPFactory
from appliance.receive.submission import SubmissionFactory
from appliance.testing import FakeAccounts, FakeDirectory, FakeSpool, capture_events, make_config
from appliance.net.tls import (
    ServerTLS, TLSError, connection_info, ensure_self_signed, make_context, make_self_signed)

HOST = "mail.example.test"
ALICE, PASSWORD = "alice@example.test", "correct horse"


def write_pair(directory, hostname=HOST, name="server"):
    cert, key = make_self_signed(hostname)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert)
    key_path.write_bytes(key)
    return str(cert_path), str(key_path)


# -- the self-signed certificate ---------------------------------------------------

def test_self_signed_is_made_once_with_the_hostname_and_a_private_key(tmp_path):
    with capture_events() as events:
        cert_path, key_path = ensure_self_signed(str(tmp_path), HOST)
    assert os.stat(key_path).st_mode & 0o777 == 0o600
    assert os.stat(os.path.dirname(key_path)).st_mode & 0o777 == 0o700
    with open(cert_path, "rb") as handle:
        cert = x509.load_pem_x509_certificate(handle.read())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    assert events.named("tls.generated")
    before = open(cert_path, "rb").read()
    assert ensure_self_signed(str(tmp_path), HOST) == (cert_path, key_path)
    assert open(cert_path, "rb").read() == before        # reused, not remade


def test_self_signed_for_an_ip_hostname(tmp_path):
    cert, _ = make_self_signed("192.0.2.1")
    san = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.1"]


def test_from_config_writes_nothing_until_load(tmp_path):
    cfg = make_config(base_dir=str(tmp_path), server={"data_dir": str(tmp_path / "data")})
    tls = ServerTLS.from_config(cfg)
    assert not (tmp_path / "data").exists()
    tls.load()
    assert tls.cert_path == str(tmp_path / "data" / "tls" / "cert.pem")
    assert isinstance(tls.context, SSL.Context)


def test_from_config_uses_the_configured_files(tmp_path):
    cert_path, key_path = write_pair(tmp_path)
    cfg = make_config(base_dir=str(tmp_path),
                      tls={"certificate": cert_path, "private_key": key_path})
    tls = ServerTLS.from_config(cfg)
    tls.load()
    assert (tls.cert_path, tls.key_path) == (cert_path, key_path)


# -- unusable files ------------------------------------------------------------------

def test_missing_files_are_one_line(tmp_path):
    tls = ServerTLS(str(tmp_path / "no.pem"), str(tmp_path / "no.key"))
    with pytest.raises(TLSError) as info:
        tls.load()
    assert "\n" not in str(info.value) and "no.pem" in str(info.value)


def test_garbage_certificate(tmp_path):
    cert_path, key_path = write_pair(tmp_path)
    with open(cert_path, "w") as handle:
        handle.write("not a certificate\n")
    with pytest.raises(TLSError, match="cannot use the certificate"):
        make_context(cert_path, key_path)


def test_key_of_another_certificate(tmp_path):
    cert_path, _ = write_pair(tmp_path, name="one")
    _, other_key = write_pair(tmp_path, name="two")
    with pytest.raises(TLSError, match="cannot use the private key"):
        make_context(cert_path, other_key)


# -- reloads ---------------------------------------------------------------------------


def replace_pair(cert_path, key_path, hostname):
    """What a renewal does: new files renamed over the old ones."""
    cert, key = make_self_signed(hostname)
    for path, data in ((cert_path, cert), (key_path, key)):
        with open(path + ".new", "wb") as handle:
            handle.write(data)
        os.replace(path + ".new", path)


def test_a_renewed_certificate_is_used_at_the_next_check(tmp_path):
    cert_path, key_path = write_pair(tmp_path)
    clock = task.Clock()
    tls = ServerTLS(cert_path, key_path, clock=clock, check_interval=5.0)
    tls.load()
    first = tls.context
    replace_pair(cert_path, key_path, "renewed.example.test")
    clock.advance(4.0)
    assert tls.context is first                  # not yet: stat at most every 5 s
    clock.advance(1.0)
    with capture_events() as events:
        assert tls.context is not first
    [loaded] = events.named("tls.loaded")
    assert (loaded["subject"], loaded["reason"]) == ("renewed.example.test", "changed")


def test_unchanged_files_are_not_reloaded(tmp_path):
    clock = task.Clock()
    tls = ServerTLS(*write_pair(tmp_path), clock=clock)
    tls.load()
    first = tls.context
    clock.advance(100.0)
    assert tls.context is first
    assert tls.reload() is False


def test_reload_on_demand_sighup(tmp_path):
    cert_path, key_path = write_pair(tmp_path)
    tls = ServerTLS(cert_path, key_path, clock=task.Clock())
    tls.load()
    first = tls.context
    replace_pair(cert_path, key_path, "renewed.example.test")
    assert tls.reload() is True
    assert tls.context is not first


def test_a_half_written_renewal_keeps_the_previous_context(tmp_path):
    cert_path, key_path = write_pair(tmp_path)
    tls = ServerTLS(cert_path, key_path, clock=task.Clock())
    tls.load()
    first = tls.context
    _, other_key = write_pair(tmp_path, name="other")
    os.replace(other_key, key_path)              # the key is new, the certificate not yet
    with capture_events() as events:
        assert tls.reload() is False
    assert tls.context is first
    assert "private key" in events.named("tls.reload_failed")[0]["error"]


def test_connection_info_without_tls():
    assert connection_info(object()) == ("", "")


# -- real handshakes on loopback -----------------------------------------------------------

def client_context(cafile, **settings):
    """Verifies the chain against ``cafile``; ``check_hostname=False`` for
    smtplib, which checks the name it connected to (127.0.0.1)."""
    context = ssl.create_default_context(cafile=cafile)
    with warnings.catch_warnings():             # TLSv1 / TLSv1_1 are deprecated names
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, value in settings.items():
            setattr(context, name, value)
    return context


class LoopbackTLSTests(unittest.TestCase):
    """Real sockets, the real reactor; clients (smtplib, ssl) run in threads."""

    def setUp(self):
        tmp = tempfile.mkdtemp(prefix="mailappliance-tls-")   # not trial's cwd-relative mktemp
        self.addCleanup(shutil.rmtree, tmp, True)
        self.cert_path, self.key_path = ensure_self_signed(tmp, HOST)
        self.clock = task.Clock()
        self.tls = ServerTLS(self.cert_path, self.key_path, clock=self.clock)
        self.tls.load()
        self.spool = FakeSpool()
        self.config = make_config(server={"hostname": HOST, "domains": "example.test"})
        self.directory = FakeDirectory([ALICE], ("example.test",))
        self.accounts = FakeAccounts({ALICE: PASSWORD})
        self.factories = []

    def listen(self, listener="submission", implicit=False, mx=False):
        if mx:
            factory = SMTPFactory(self.config, self.directory, self.spool, reactor, "mx",
                                  tls=self.tls)
        else:
            factory = SubmissionFactory(self.config, self.directory, self.spool, reactor,
                                        listener, Mechanisms(self.accounts), self.tls,
                                        implicit_tls=implicit)
        self.factories.append(factory)
        wrapped = TLSMemoryBIOFactory(self.tls, False, factory) if implicit else factory
        port = reactor.listenTCP(0, wrapped, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def tearDown(self):
        # Let the server side of every connection finish before the reactor is checked.
        for _ in range(200):
            if all(f.connections == 0 for f in self.factories):
                break
            yield task.deferLater(reactor, 0.02, lambda: None)

    def in_thread(self, f, *args):
        return threads.deferToThread(f, *args)

    # -- STARTTLS and implicit TLS with smtplib ---------------------------------------

    def submit_over_starttls(self, port):
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as c:
            c.ehlo()
            assert c.has_extn("starttls") and not c.has_extn("auth")
            c.starttls(context=client_context(self.cert_path, check_hostname=False))
            c.ehlo()
            assert c.has_extn("auth") and not c.has_extn("starttls")
            version = c.sock.version()
            c.login(ALICE, PASSWORD)
            c.sendmail(ALICE, ["someone@remote.test"],
                       f"From: {ALICE}\r\nSubject: t\r\n\r\nhi\r\n")
            return version

    @defer.inlineCallbacks
    def test_starttls_login_and_submit_with_smtplib(self):
        port = self.listen()
        with capture_events() as events:
            version = yield self.in_thread(self.submit_over_starttls, port)
        self.assertIn(version, ("TLSv1.2", "TLSv1.3"))
        [(envelope, _message)] = self.spool.accepted
        self.assertEqual(envelope.auth_user, ALICE)
        [started] = events.named("smtp.starttls")
        self.assertEqual(started["version"], version)
        self.assertTrue(started["cipher"])
        self.assertFalse(started["implicit"])

    def submit_over_implicit_tls(self, port):
        context = client_context(self.cert_path, check_hostname=False)
        with smtplib.SMTP_SSL("127.0.0.1", port, local_hostname="client.test",
                              context=context, timeout=10) as c:
            c.ehlo()
            assert c.has_extn("auth")
            c.login(ALICE, PASSWORD)
            c.sendmail(ALICE, ["someone@remote.test"],
                       f"From: {ALICE}\r\nSubject: t\r\n\r\nhi\r\n")

    @defer.inlineCallbacks
    def test_implicit_tls_with_smtplib(self):
        port = self.listen("submissions", implicit=True)
        with capture_events() as events:
            yield self.in_thread(self.submit_over_implicit_tls, port)
        self.assertEqual(len(self.spool.accepted), 1)
        self.assertTrue(events.named("smtp.starttls")[0]["implicit"])

    # -- T1 over a real socket -----------------------------------------------------------

    def inject_after_starttls(self, port):
        """Send STARTTLS and two more commands in one segment; then TLS, EHLO."""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"EHLO client.test\r\n")
            while reader.readline()[3:4] == b"-":
                pass
            raw.sendall(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<x@remote.test>\r\n")
            ready = reader.readline()
            context = client_context(self.cert_path)
            with context.wrap_socket(raw, server_hostname=HOST) as secure:
                secure.sendall(b"NOOP\r\n")
                after = secure.recv(4096)
                secure.sendall(b"QUIT\r\n")
                secure.recv(4096)
            return ready, after

    @defer.inlineCallbacks
    def test_t1_pipelined_commands_never_run_under_tls(self):
        """T1: stock ESMTP answers the NOOP and MAIL sent with STARTTLS after
        the handshake; here the first reply under TLS is our own NOOP's."""
        port = self.listen(mx=True)
        ready, after = yield self.in_thread(self.inject_after_starttls, port)
        self.assertEqual(ready, b"220 2.0.0 Ready to start TLS\r\n")
        self.assertEqual(after, b"250 2.0.0 Ok\r\n")

    # -- what the context allows ----------------------------------------------------------

    def handshake(self, port, context):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname=HOST) as secure:
                greeting = secure.recv(4096)
                der = secure.getpeercert(binary_form=True)
                secure.sendall(b"QUIT\r\n")
                secure.recv(4096)
                return greeting, secure.version(), secure.cipher()[0], der

    @defer.inlineCallbacks
    def test_tls12_needs_an_ecdhe_aead_cipher(self):
        port = self.listen("submissions", implicit=True)
        good = client_context(self.cert_path, maximum_version=ssl.TLSVersion.TLSv1_2)
        good.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
        greeting, version, cipher, _ = yield self.in_thread(self.handshake, port, good)
        self.assertTrue(greeting.startswith(b"220 "))
        self.assertEqual((version, cipher), ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))
        cbc = client_context(self.cert_path, maximum_version=ssl.TLSVersion.TLSv1_2)
        cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
        with self.assertRaises(ssl.SSLError):
            yield self.in_thread(self.handshake, port, cbc)

    @defer.inlineCallbacks
    def test_tls11_is_refused(self):
        port = self.listen("submissions", implicit=True)
        old = client_context(self.cert_path, minimum_version=ssl.TLSVersion.TLSv1,
                             maximum_version=ssl.TLSVersion.TLSv1_1)
        old.set_ciphers("ALL:@SECLEVEL=0")
        with capture_events() as events:
            with self.assertRaises(ssl.SSLError):
                yield self.in_thread(self.handshake, port, old)
            yield self.tearDown()
        self.assertTrue(events.named("smtp.tls.failed"))

    @defer.inlineCallbacks
    def test_a_renewed_certificate_is_served_at_the_next_handshake(self):
        port = self.listen("submissions", implicit=True)
        _, _, _, before = yield self.in_thread(
            self.handshake, port, client_context(self.cert_path))
        replace_pair(self.cert_path, self.key_path, HOST)
        self.clock.advance(60)
        _, _, _, after = yield self.in_thread(
            self.handshake, port, client_context(self.cert_path))
        self.assertNotEqual(before, after)
        with open(self.cert_path, "rb") as handle:
            served = x509.load_pem_x509_certificate(handle.read())
        self.assertEqual(after, served.public_bytes(serialization.Encoding.DER))


# -- the service tree (appliance.tap) ---------------------------------------------------------

def tap_config(tmp_path, **sections):
    sections.setdefault("server", {}).update(data_dir=str(tmp_path / "data"))
    sections.setdefault("auth", {}).update(users_file=str(tmp_path / "users"))
    sections.setdefault("log", {}).update(events=str(tmp_path / "events.json"))
    return make_config(base_dir=str(tmp_path), **sections)


class ImmediateReactor:
    """callFromThread runs the call at once (a signal handler's hand-off)."""

    def callFromThread(self, f, *args):
        f(*args)


def test_build_wires_tls_into_every_smtp_listener(tmp_path):
    from appliance import tap
    top = tap.build(tap_config(tmp_path), reactor)
    app = top.appliance
    listeners = app.listeners
    assert listeners["mx"].tls is app.tls and not listeners["mx"].implicit_tls
    for name in ("submission", "submission_alt"):
        assert listeners[name].tls is app.tls and not listeners[name].implicit_tls
    assert listeners["submissions"].implicit_tls
    listener = top.getServiceNamed("listener-submissions")
    assert listener.factory.gate is app.gate        # refuses before any TLS state
    assert isinstance(listener.factory.wrapped, TLSMemoryBIOFactory)
    assert listener.factory.wrapped.wrappedFactory is listeners["submissions"]
    assert top.getServiceNamed("listener-submission").factory.wrapped is \
        listeners["submission"]
    assert listeners["submission"].mechanisms.names() == ["PLAIN", "LOGIN"]


def test_tls_service_loads_before_listeners_and_reloads_on_sighup(tmp_path):
    from appliance import tap
    top = tap.build(tap_config(tmp_path), reactor)
    names = [s.name for s in top]
    assert names.index("tls") < names.index("listener-mx")
    service = top.getServiceNamed("tls")
    service._reactor = ImmediateReactor()
    service.privilegedStartService()
    tls = top.appliance.tls
    first = tls.context
    replace_pair(tls.cert_path, tls.key_path, HOST)
    service._hangup(1, None)
    assert tls.context is not first


def test_tls_service_installs_and_restores_the_sighup_handler(tmp_path):
    import signal
    from appliance import tap
    top = tap.build(tap_config(tmp_path), reactor)
    service = top.getServiceNamed("tls")
    before = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        assert signal.getsignal(signal.SIGHUP) == service._hangup
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before


@pytest.mark.parametrize("setting,message", [
    ("certificate", "[tls] certificate: cannot use the certificate"),
    ("jwks", "[auth] oauth2_jwks_file: "),
])
def test_unusable_certificate_or_jwks_stops_start_up_with_one_line(tmp_path, capfd, setting,
                                                                   message):
    from appliance import tap
    cert_path, key_path = write_pair(tmp_path)
    jwks = tmp_path / "jwks.json"
    jwks.write_text('{"keys": []}')
    if setting == "certificate":
        with open(cert_path, "w") as handle:
            handle.write("garbage\n")
    cfg = tap_config(tmp_path, tls={"certificate": cert_path, "private_key": key_path},
                     auth={"oauth2_issuer": "https://id.example.test",
                           "oauth2_audience": "mail", "oauth2_jwks_file": str(jwks)})
    service = tap.build(cfg, reactor).getServiceNamed("tls")
    with pytest.raises(SystemExit) as exit_info:
        service.privilegedStartService()
    assert exit_info.value.code != 0
    lines = capfd.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailappliance: " + message)

"""The ACME schedule (appliance.web.acme_client.AcmeService) on a task.Clock.

The order itself is a fake here (the e2e tests run the real one against
pebble): these tests hold the service to its timing rules: one order at
start, renewal at two thirds of the lifetime, backoff with jitter (the first
retry within a minute) remembered across restarts, one order in flight,
files 0600.
"""

import datetime
import json
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer

from appliance.testing import clock_at
from appliance.web import acme_client
from appliance.web.acme_client import AcmeFailure, AcmeService, retry_delay
from appliance.web.acme_store import AcmeStore

NAMES = ["mail.example.test", "mta-sts.example.test"]
START = 1_800_000_000.0
DIRECTORY = "https://acme.test/dir"


def certificate(names, not_before, lifetime):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    begin = datetime.datetime.fromtimestamp(not_before, datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(begin)
            .not_valid_after(begin + datetime.timedelta(seconds=lifetime))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


class FakeTLS:
    """What the service needs of ServerTLS: the paths and reload()."""

    def __init__(self):
        self.cert_path, self.key_path = "/self-signed/cert.pem", "/self-signed/key.pem"
        self.reloads = []

    def reload(self):
        self.reloads.append(self.cert_path)
        return True


class FakeCA:
    """issue(names): a certificate from the clock's now, or the next queued error."""

    def __init__(self, clock, lifetime=90 * 86400):
        self.clock = clock
        self.lifetime = lifetime
        self.orders = []
        self.errors = []

    def issue(self, names):
        self.orders.append((self.clock.seconds(), list(names)))
        if self.errors:
            raise AcmeFailure(self.errors.pop(0))
        return certificate(names, self.clock.seconds(), self.lifetime)


def make(tmp_path, clock, ca, tls=None, names=NAMES, rand=lambda: 0.5):
    store = AcmeStore(str(tmp_path / "acme"))
    service = AcmeService(names, DIRECTORY, store, ca.issue, tls or FakeTLS(),
                          lambda f, *args: defer.maybeDeferred(f, *args), clock, rand=rand)
    service.use_stored()
    return service


def started(tmp_path, clock, ca, *args, **kwargs):
    """A service made and started; its first turn taken."""
    service = make(tmp_path, clock, ca, *args, **kwargs)
    service.startService()
    clock.advance(0)
    return service


def started_clock():
    return clock_at(START)


def test_retry_delays_back_off_with_jitter_and_the_first_is_within_a_minute():
    assert retry_delay(1, lambda: 0.0) == pytest.approx(22.5)
    assert retry_delay(1, lambda: 0.999999) < 60
    assert retry_delay(2, lambda: 0.5) == 300
    assert retry_delay(50, lambda: 0.5) == acme_client.RETRY_DELAYS[-1]


def test_first_order_at_start_then_renewal_at_two_thirds(tmp_path, collected):
    clock = started_clock()
    ca = FakeCA(clock, lifetime=90 * 86400)
    tls = FakeTLS()
    service = started(tmp_path, clock, ca, tls)
    assert len(ca.orders) == 1
    [issued] = collected.named("acme.issued")
    assert issued["names"] == sorted(NAMES)
    assert tls.cert_path.startswith(str(tmp_path / "acme") + "/cert-")
    assert tls.reloads == [tls.cert_path]
    for path in (tmp_path / "acme").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # Nothing until two thirds of 90 days (checks re-armed hourly meanwhile).
    clock.advance(60 * 86400 - 10)
    assert len(ca.orders) == 1
    clock.advance(3600)
    assert len(ca.orders) == 2
    assert [e["reason"] for e in collected.named("acme.ordered")] == ["first", "renewal"]
    assert len(collected.named("acme.renewed")) == 1
    # Only the current and the previous certificate stay.
    assert len(list((tmp_path / "acme").glob("cert-*.pem"))) == 2
    service.stopService()


def test_failures_back_off_and_are_remembered_across_a_restart(tmp_path, collected):
    clock = started_clock()
    ca = FakeCA(clock)
    ca.errors = ["mail.example.test: connection refused", "rate limited"]
    service = started(tmp_path, clock, ca)
    [failed] = collected.named("acme.failed")
    assert failed["failures"] == 1 and failed["retry_in"] == 30.0
    assert failed["error"] == "mail.example.test: connection refused"
    state = json.loads((tmp_path / "acme" / "state.json").read_text())
    assert state["failures"] == 1 and state["retry_at"] == START + 30
    service.stopService()

    # A restart 10 s later waits for the remembered retry time.
    clock.advance(10)
    service = started(tmp_path, clock, ca)
    assert len(ca.orders) == 1
    clock.advance(20)
    assert len(ca.orders) == 2
    assert collected.named("acme.failed")[-1]["failures"] == 2
    assert collected.named("acme.failed")[-1]["retry_in"] == 300.0
    clock.advance(300)
    assert len(ca.orders) == 3 and collected.named("acme.issued")
    assert json.loads((tmp_path / "acme" / "state.json").read_text())["failures"] == 0
    service.stopService()


def test_changed_names_order_at_once_despite_old_failures(tmp_path, collected):
    clock = started_clock()
    ca = FakeCA(clock)
    service = started(tmp_path, clock, ca)
    service.stopService()
    ca.errors = ["boom"]
    # A stored certificate not covering a new domain's names: a new order.
    more = NAMES + ["mta-sts.example.org"]
    service = started(tmp_path, clock, ca, names=more)
    assert [e["reason"] for e in collected.named("acme.ordered")] == ["first", "names"]
    assert len(ca.orders) == 2
    service.stopService()
    # The failure was for these names; with the old names there is nothing to retry.
    service = started(tmp_path, clock, ca)
    assert len(ca.orders) == 2
    service.stopService()


def test_never_two_orders_in_flight(tmp_path, collected):
    clock = started_clock()
    pending = []
    store = AcmeStore(str(tmp_path / "acme"))

    def run(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d
    service = AcmeService(NAMES, DIRECTORY, store, FakeCA(clock).issue, FakeTLS(), run, clock)
    service.startService()
    clock.advance(0)
    service.check()
    clock.advance(3600)
    assert len(pending) == 1 and service.in_flight
    d, f, args = pending[0]
    d.callback(f(*args))
    assert not service.in_flight and collected.named("acme.issued")
    clock.advance(0)
    assert len(pending) == 1
    service.stopService()


def test_a_stored_certificate_serves_from_the_start(tmp_path):
    clock = started_clock()
    ca = FakeCA(clock)
    service = started(tmp_path, clock, ca)
    service.stopService()
    tls = FakeTLS()
    make(tmp_path, clock, ca, tls)
    assert tls.cert_path == service.store.current.cert_path
    assert os.path.exists(tls.key_path)
    # An expired one is not used: the self-signed one serves until a new one comes.
    clock.advance(91 * 86400)
    tls = FakeTLS()
    make(tmp_path, clock, ca, tls)
    assert tls.cert_path == "/self-signed/cert.pem"


def test_a_reload_that_fails_keeps_the_previous_certificate(tmp_path, collected):
    clock = started_clock()

    class Refusing(FakeTLS):
        def reload(self):
            return False
    tls = Refusing()
    service = make(tmp_path, clock, FakeCA(clock), tls)
    service.startService()
    clock.advance(0)
    assert tls.cert_path == "/self-signed/cert.pem"
    service.stopService()

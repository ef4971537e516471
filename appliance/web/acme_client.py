"""ACME (RFC 8555): one certificate for the hostname and every domain's web names.

The library is certbot's ``acme`` (Debian 12: python3-acme 2.1; PyPI
``acme``). It is synchronous (``requests``), so a whole order runs in the
one thread of the ``acme`` pool, never on the reactor; the reactor side
(``AcmeService``) only schedules, counts and switches certificates.
Twisted-native ``txacme`` 0.9.3 was the other candidate: unmaintained
since 2020, written for ACME v1's draft flow with its own ``txsni`` TLS
layer, and without tls-alpn-01; ``acme`` is what certbot runs against Let's
Encrypt every day and keeps up with the RFC.

Challenges: tls-alpn-01 (RFC 8737) answered by the https listener
(``appliance.web.challenges.WebTLS``) or http-01 on the http listener.
Newer ``acme`` releases dropped their tls-alpn-01 classes; the challenge
type is registered here when the library lacks it (it is only a token
challenge whose response is the key authorization).

``AcmeService`` (reactor thread):

- at start, and whenever a check is due: nothing to do while the current
  certificate covers every name and is younger than two thirds of its
  lifetime; else one order (never two in flight);
- success: the new certificate and key are written (0600) and made current
  in ``state.json``, then every TLS listener's ``ServerTLS`` is pointed at
  them and reloaded (the SIGHUP path): new handshakes use the new
  certificate, live sessions keep theirs. Events ``acme.issued`` (first)
  or ``acme.renewed``;
- failure: ``acme.failed``, retried after RETRY_DELAYS[n] with +-25 %
  jitter (the first within a minute); the count and the retry time are in
  ``state.json``, so a restart does not hammer the CA;
- checks are re-armed at most CHECK_INTERVAL apart (clock jumps, suspend).
"""

import datetime
import random
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.application import service
from twisted.internet import threads
from twisted.python import threadpool
from twisted.logger import Logger

import appliance
from appliance import events
from appliance.web.acme_store import AcmeStore
from appliance.web.policy import web_names
from appliance.clock import cancel

RETRY_DELAYS = (30.0, 300.0, 1800.0, 7200.0, 21600.0, 86400.0)     # the last repeats
JITTER = 0.25
CHECK_INTERVAL = 3600.0
ORDER_TIMEOUT = 120.0           # seconds for validation and finalization
HTTP_TIMEOUT = 30               # each request to the ACME server
USER_AGENT = f"mailappliance/{appliance.__version__}"

_log = Logger()

events.register("acme.ordered", "an ACME order was placed (reason: first, renewal, names)",
                ("names", "directory", "reason"), text_log=True)
events.register("acme.issued", "the first ACME certificate was issued and is in use",
                ("names", "not_after", "certificate"), text_log=True)
events.register("acme.renewed", "a renewed ACME certificate is in use; live sessions keep "
                "the previous one", ("names", "not_after", "certificate"), text_log=True)
events.register("acme.failed", "an ACME order failed; it is tried again after retry_in "
                "seconds", ("names", "error", "failures", "retry_in"), text_log=True)


def retry_delay(failures, rand=random.random):
    """Seconds before the next attempt after ``failures`` failures in a row."""
    base = RETRY_DELAYS[min(failures, len(RETRY_DELAYS)) - 1]
    return base * (1 - JITTER + 2 * JITTER * rand())


class AcmeFailure(Exception):
    """An order that failed (``str`` is the one-line reason)."""


# -- the protocol, in the ACME thread --------------------------------------------------

def _challenge_classes():
    """The acme library's challenge module, with tls-alpn-01 registered if missing."""
    from acme import challenges
    if "tls-alpn-01" not in challenges.Challenge.TYPES:
        @challenges.ChallengeResponse.register
        class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
            typ = "tls-alpn-01"

        @challenges.Challenge.register
        class TLSALPN01(challenges.KeyAuthorizationChallenge):
            response_cls = TLSALPN01Response
            typ = "tls-alpn-01"

            def validation(self, account_key, **unused):
                return self.key_authorization(account_key)
    return challenges


def make_csr(key, names):
    """A CSR (PEM) for ``names``: SAN all of them, CN the first if it fits."""
    subject = ([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]
               if len(names[0]) <= 64 else [])
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name(subject))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                          critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM)


class AcmeClient:
    """One order from start to certificate (blocking; the ACME thread only)."""

    def __init__(self, directory_url, email, challenge, ca_file, store, challenges):
        self.directory_url = directory_url
        self.email = email
        self.challenge = challenge          # "tls-alpn-01" | "http-01"
        self.ca_file = ca_file
        self.store = store
        self.challenges = challenges

    def issue(self, names):
        """(key PEM, full chain PEM) for ``names``; AcmeFailure if it cannot."""
        import josepy
        from acme import client, errors, messages
        kinds = _challenge_classes()
        try:
            account = josepy.JWKRSA(key=self.store.account_key())
            net = client.ClientNetwork(account, user_agent=USER_AGENT, timeout=HTTP_TIMEOUT,
                                       verify_ssl=self.ca_file or True)
            acme = client.ClientV2(client.ClientV2.get_directory(self.directory_url, net),
                                   net=net)
            registration = {"terms_of_service_agreed": True}
            if self.email:
                registration["email"] = self.email
            try:
                acme.new_account(messages.NewRegistration.from_data(**registration))
            except errors.ConflictError as exc:     # the key's account exists: use it
                net.account = messages.RegistrationResource(uri=exc.location,
                                                            body=messages.Registration())
            key = ec.generate_private_key(ec.SECP256R1())
            order = acme.new_order(make_csr(key, names))
            try:
                for authorization in order.authorizations:
                    if authorization.body.status == messages.STATUS_VALID:
                        continue
                    self._answer(acme, net.key, authorization, kinds)
                deadline = (datetime.datetime.now()
                            + datetime.timedelta(seconds=ORDER_TIMEOUT))
                order = acme.poll_and_finalize(order, deadline=deadline)
            finally:
                self.challenges.clear()
        except AcmeFailure:
            raise
        except errors.ValidationError as exc:
            raise AcmeFailure(_validation_reason(exc)) from None
        except Exception as exc:        # network, protocol, CA errors: one line each
            raise AcmeFailure(_reason(exc)) from None
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return key_pem, order.fullchain_pem.encode("ascii")

    def _answer(self, acme, account_key, authorization, kinds):
        name = authorization.body.identifier.value
        wanted = kinds.HTTP01.typ if self.challenge == "http-01" else "tls-alpn-01"
        for challenge in authorization.body.challenges:
            if challenge.chall.typ == wanted:
                break
        else:
            raise AcmeFailure(f"the CA offers no {wanted} challenge for {name}")
        key_authorization = challenge.chall.key_authorization(account_key)
        if wanted == "tls-alpn-01":
            self.challenges.add_tls_alpn01(name, key_authorization)
        else:
            self.challenges.add_http01(challenge.chall.encode("token"), key_authorization)
        acme.answer_challenge(challenge, challenge.chall.response(account_key))


def _reason(exc):
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


def _validation_reason(exc):
    """The first failed challenge's error, e.g. "mta-sts.example.test: connection refused"."""
    for authorization in getattr(exc, "failed_authzrs", ()):
        for challenge in authorization.body.challenges:
            if challenge.error is not None:
                detail = challenge.error.detail or challenge.error.typ
                return _reason(f"{authorization.body.identifier.value}: {detail}")
    return "validation failed"


# -- the schedule, on the reactor thread ---------------------------------------------------

class AcmeService(service.Service):
    """Keeps ``server_tls`` on a valid ACME certificate (see the module docstring).

    ``issue(names)`` runs the order (an AcmeClient's); ``run_in_thread(f,
    *args)`` returns a Deferred (the ``acme`` pool of one thread); ``clock``
    gives Unix time (the reactor); ``rand`` the jitter.
    """

    name = "acme"
    in_flight = False           # an order is running
    _call = None                # the next check

    def __init__(self, names, directory_url, store, issue, server_tls, run_in_thread, clock,
                 rand=random.random):
        self.names = list(names)
        self.directory_url = directory_url
        self.store = store
        self._issue = issue
        self.server_tls = server_tls
        self._run = run_in_thread
        self._clock = clock
        self._rand = rand

    @classmethod
    def from_config(cls, cfg, reactor, server_tls, challenges, run_in_thread):
        store = AcmeStore.from_config(cfg)
        acme = AcmeClient(cfg.tls.acme_directory, cfg.tls.acme_email, cfg.tls.acme_challenge,
                          cfg.tls.acme_ca_file, store, challenges)
        found = cls(web_names(cfg), cfg.tls.acme_directory, store, acme.issue, server_tls,
                    run_in_thread, reactor)
        found.use_stored()
        return found

    def use_stored(self):
        """Before start-up: serve the stored certificate if there is a usable one
        (else the self-signed one serves until the first is issued)."""
        current = self.store.load()
        if current is not None and current.not_after > self._clock.seconds():
            self.server_tls.cert_path = current.cert_path
            self.server_tls.key_path = current.key_path

    def startService(self):
        super().startService()
        self._schedule(0)

    def stopService(self):
        self._call = cancel(self._call)
        return super().stopService()

    def _schedule(self, delay):
        cancel(self._call)
        self._call = self._clock.callLater(max(0.0, min(delay, CHECK_INTERVAL)), self.check)

    def check(self):
        """Order now if due; else arm the next check."""
        self._call = None
        if self.in_flight or not self.running:
            return
        now = self._clock.seconds()
        current = self.store.current
        if current is not None and current.covers(self.names) and now < current.renew_at:
            self._schedule(current.renew_at - now)
            return
        retry_at = self.store.retry_at(self.names, self.directory_url)
        if retry_at is not None and now < retry_at:
            self._schedule(retry_at - now)
            return
        if current is None:
            reason = "first"
        elif not current.covers(self.names):
            reason = "names"
        else:
            reason = "renewal"
        self._order(reason)

    def _order(self, reason):
        self.in_flight = True
        events.emit("acme.ordered", names=self.names, directory=self.directory_url,
                    reason=reason)
        d = self._run(self._attempt, list(self.names))
        d.addCallbacks(self._issued, self._failed)
        d.addBoth(self._finished)

    def _attempt(self, names):
        """In the ACME thread: the order, then the files (success or failure)."""
        try:
            key_pem, chain_pem = self._issue(names)
            return self.store.install(key_pem, chain_pem, names, self.directory_url)
        except Exception as exc:
            error = str(exc) if isinstance(exc, AcmeFailure) else _reason(exc)
            failures = self.store.failures(names, self.directory_url) + 1
            delay = retry_delay(failures, self._rand)
            try:
                self.store.record_failure(error, names, self.directory_url, delay,
                                          self._clock.seconds())
            except OSError as write_error:
                error += f" (and the failure could not be recorded: {write_error})"
            raise AcmeFailure(error, failures, delay) from None

    def _issued(self, issued):
        first = not self._was_acme()
        self.switch(issued)
        events.emit("acme.issued" if first else "acme.renewed", names=sorted(issued.names),
                    not_after=issued.not_after_text, certificate=issued.cert_path)

    def _was_acme(self):
        """True while an ACME certificate (not the self-signed one) serves."""
        return self.server_tls.cert_path.startswith(self.store.directory + "/")

    def switch(self, issued):
        """Point every TLS listener at ``issued`` (new handshakes only)."""
        previous = self.server_tls.cert_path, self.server_tls.key_path
        self.server_tls.cert_path, self.server_tls.key_path = issued.cert_path, issued.key_path
        if not self.server_tls.reload():
            self.server_tls.cert_path, self.server_tls.key_path = previous

    def _failed(self, failure):
        failure.trap(AcmeFailure)
        error, failures, delay = failure.value.args
        _log.warn("ACME order failed ({failures} in a row), retry in {delay:.0f} s: {error}",
                  failures=failures, delay=delay, error=error)
        events.emit("acme.failed", names=self.names, error=error, failures=failures,
                    retry_in=round(delay, 1))

    def _finished(self, result):
        self.in_flight = False
        if self.running:
            self._schedule(0)           # check: the new certificate, or the retry time
        if hasattr(result, "check") and not result.check(AcmeFailure):
            _log.failure("ACME order handling failed", result)
        return None


def _daemon_thread(*args, **kwargs):
    thread = threading.Thread(*args, **kwargs)
    thread.daemon = True
    return thread


class AcmePool(service.Service):
    """The ``acme`` thread pool (one thread). Its thread is a daemon and is not
    joined at stop while an order is in flight: shutting down never waits for
    a CA that is slow to answer (the order is simply abandoned)."""

    name = "acme-pool"

    def __init__(self, reactor):
        self.reactor = reactor
        self.pool = threadpool.ThreadPool(minthreads=0, maxthreads=1, name="acme")
        self.pool.threadFactory = _daemon_thread
        self.busy = 0

    def run(self, f, *args):
        self.busy += 1
        d = threads.deferToThreadPool(self.reactor, self.pool, f, *args)

        def done(result):
            self.busy -= 1
            return result
        return d.addBoth(done)

    def startService(self):
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        if not self.busy:
            self.pool.stop()

"""Submission from outside: the real server, real TLS, real clients.

smtplib (STARTTLS + LOGIN on 587 and 2525, SMTP_SSL on 465, XOAUTH2), swaks
(``--tls --auth PLAIN``) and nodemailer (587 with STARTTLS, 465 with implicit
TLS), each verifying the server's certificate: a test CA's certificate for
mail.example.test and 127.0.0.1 configured in ``[tls]``, or the self-signed
one the server makes in data_dir. swaks and nodemailer run against both
backends (users file and a real slapd from tests/ldap_server.py).

The servers are shared by the tests of this module (a server start is most of
an end-to-end test's time): every test sends its own marker, and reads only
the events stamped after it began (``server.since``).
"""

import base64
import json
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
import uuid
from email import policy
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec


import ldap_server
from appliance.testing import make_jwks
from harness import HOSTNAME, email_message, header_values, wait_until  # noqa: E402

ALICE, ALICE_PW = "alice@example.test", "alice password"
BOB, BOB_PW = "bob@example.test", "bob password"
REMOTE = "friend@example.net"
NODE_DIR = Path(__file__).resolve().parent / "node"
SUBMISSION_PORTS = ("submission", "submissions", "submission_alt")
LISTENERS = ("mx",) + SUBMISSION_PORTS
ISSUER, AUDIENCE = "https://id.example.test", "mail.example.test"


# -- servers ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A test CA and a certificate it issued for mail.example.test and 127.0.0.1."""
    directory = tmp_path_factory.mktemp("pki")
    ldap_server.write_pki(directory, dns_names=(HOSTNAME,), ips=("127.0.0.1",))
    return directory


@pytest.fixture(scope="module")
def oauth_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("oauth") / "jwks.json"
    key = make_jwks(path, "test-1")
    return key, path


@pytest.fixture(scope="module")
def shared_server(module_mailserver_factory, pki, oauth_key):
    """File backend, the CA-issued certificate, OAuth2 configured, an alias."""
    srv = module_mailserver_factory(
        listeners=LISTENERS, users=((ALICE, ALICE_PW), (BOB, BOB_PW)), start=False,
        overrides={"tls": {"certificate": pki / "server.pem", "private_key": pki / "server.key"},
                   "auth": {"oauth2_issuer": ISSUER, "oauth2_audience": AUDIENCE,
                            "oauth2_jwks_file": oauth_key[1]}})
    result = srv.cli("alias", "add", "postmaster@example.test", ALICE)
    assert result.returncode == 0, result.stderr
    srv.ca_file = str(pki / "ca.pem")
    return srv.start()


@pytest.fixture
def server(shared_server):
    """The shared server; ``server.since``: when this test began."""
    shared_server.since = time.time()
    return shared_server


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    with ldap_server.SlapdServer(tmp_path_factory.mktemp("slapd")) as directory:
        yield directory


@pytest.fixture(scope="module", params=["file", "ldap"])
def shared_backend(request, module_mailserver_factory, pki):
    """A server on the users file or on LDAP; alice and bob exist in both.

    ``srv.recipient`` gets the test messages and ``srv.arrived(marker)``
    waits for one: with the users file bob is a local user (Maildir); LDAP
    accounts are not local mailboxes here, so the mail goes to another
    domain and waits in the queue."""
    tls = {"certificate": pki / "server.pem", "private_key": pki / "server.key"}
    if request.param == "file":
        srv = module_mailserver_factory(listeners=LISTENERS, overrides={"tls": tls},
                                 users=((ALICE, ALICE_PW), (BOB, BOB_PW)))
        srv.passwords = {ALICE: ALICE_PW, BOB: BOB_PW}
        srv.recipient = BOB
        srv.arrived = lambda marker: delivered(srv, BOB, marker)
    else:
        directory = request.getfixturevalue("slapd")
        srv = module_mailserver_factory(listeners=LISTENERS, users=(),
                                 overrides={"tls": tls, "auth": directory.auth_section()})
        srv.passwords = {ALICE: directory.password("alice"), BOB: directory.password("bob")}
        srv.recipient = REMOTE
        srv.arrived = lambda marker: wait_until(
            lambda: [p for p in srv.spool_files() if marker.encode() in p.read_bytes()],
            20, what=f"a queued message with {marker}")
    srv.ca_file = str(pki / "ca.pem")
    return srv


@pytest.fixture
def any_backend(shared_backend):
    shared_backend.since = time.time()
    return shared_backend


def context(srv):
    """Verify the chain and the name: the certificate names 127.0.0.1 too."""
    return ssl.create_default_context(cafile=srv.ca_file)


def message(sender, to, marker, subject="submitted"):
    msg = email_message(sender, to, subject, f"marker {marker}\n", marker, "client.example.test")
    return msg.as_bytes(policy=policy.SMTP)


def delivered(srv, address, marker):
    def found():
        return [p for p in srv.messages(address) if marker.encode() in p.read_bytes()]
    return wait_until(found, 20, what=f"a message with {marker} for {address}")


def events_soon(srv, name, where=lambda event: True, timeout=10):
    """The events ``name`` matching ``where``, waiting for the first one: the
    event log reaches the file within about a second."""
    return wait_until(lambda: [e for e in srv.events(name, since=srv.since) if where(e)],
                      timeout,
                      what=f"a {name} event")


def starttls_client(srv, listener="submission"):
    client = smtplib.SMTP(srv.host, srv.port(listener), local_hostname="client.example.test",
                          timeout=20)
    client.ehlo()
    client.starttls(context=context(srv))
    client.ehlo()
    return client


# -- smtplib ------------------------------------------------------------------------

def login(client, mechanism):
    client.user, client.password = ALICE, ALICE_PW
    if mechanism == "LOGIN":
        return client.auth("LOGIN", client.auth_login, initial_response_ok=False)
    return client.auth("PLAIN", client.auth_plain)


@pytest.mark.parametrize("listener,mechanism", [
    ("submission", "PLAIN"), ("submission", "LOGIN"), ("submission_alt", "LOGIN")])
def test_smtplib_starttls_login_delivers_locally(server, listener, mechanism):
    marker = uuid.uuid4().hex
    with smtplib.SMTP(server.host, server.port(listener), timeout=20) as client:
        client.ehlo("client.example.test")
        assert client.has_extn("starttls") and not client.has_extn("auth")
        client.starttls(context=context(server))
        client.ehlo("client.example.test")
        assert client.esmtp_features["auth"].split() == [
            "PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"]
        assert login(client, mechanism)[0] == 235
        assert client.sendmail(ALICE, [BOB], message(ALICE, BOB, marker)) == {}
    [path] = delivered(server, BOB, marker)
    received = header_values(path, "Received")[0]
    assert "with ESMTPSA" in received
    [success] = events_soon(server, "auth.success", lambda e: e["listener"] == listener)
    assert (success["account"], success["mechanism"]) == (ALICE, mechanism)


def test_smtp_ssl_on_465(server):
    marker = uuid.uuid4().hex
    with smtplib.SMTP_SSL(server.host, server.port("submissions"),
                          local_hostname="client.example.test", context=context(server),
                          timeout=20) as client:
        client.ehlo()
        assert client.has_extn("auth") and not client.has_extn("starttls")
        assert client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.login(ALICE, ALICE_PW)
        assert client.sendmail("postmaster@example.test", [BOB],
                               message("postmaster@example.test", BOB, marker)) == {}
    delivered(server, BOB, marker)
    assert events_soon(server, "smtp.starttls")[-1]["implicit"] is True


def test_mail_for_another_domain_is_queued_not_dropped(server):
    marker = uuid.uuid4().hex
    with starttls_client(server) as client:
        client.login(ALICE, ALICE_PW)
        client.sendmail(ALICE, [REMOTE], message(ALICE, REMOTE, marker))

    def waiting():
        return [e for e in server.events(since=server.since) if e.get("recipient") == REMOTE
                and e["event"] in ("queue.deferred", "delivery.deferred")]
    wait_until(waiting, 20, what="the remote recipient deferred")
    assert any(marker.encode() in p.read_bytes() for p in server.spool_files())


def test_auth_before_tls_is_538(server):
    with smtplib.SMTP(server.host, server.port("submission"), timeout=20) as client:
        client.ehlo("client.example.test")
        plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode()).decode()
        code, text = client.docmd("AUTH", "PLAIN " + plain)
        assert (code, text[:6]) == (538, b"5.7.11")
        code, _ = client.docmd("MAIL", f"FROM:<{ALICE}>")
        assert code == 530


@pytest.mark.parametrize("user,password", [
    (ALICE, "Tr0ub4dor&3"), ("nobody@example.test", ALICE_PW), (ALICE, "")])
def test_refused_logins_are_535(server, user, password):
    with starttls_client(server) as client:
        raw = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, text = client.docmd("AUTH", "PLAIN " + raw)
        assert (code, text[:5]) == (535, b"5.7.8")
    assert events_soon(server, "auth.failure")[-1]["account"] == user
    assert not any(password and password in json.dumps(e) for e in server.events())


def test_three_failures_close_the_connection(server):
    guess = base64.b64encode(f"\0{ALICE}\0guess".encode()).decode()
    with starttls_client(server) as client:
        for _ in range(2):
            assert client.docmd("AUTH", "PLAIN " + guess)[0] == 535
        assert client.docmd("AUTH", "PLAIN " + guess)[0] == 535
        assert client.getreply()[0] == 421
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()


def test_spoofed_mail_from_is_553(server):
    with starttls_client(server) as client:
        client.login(ALICE, ALICE_PW)
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail(BOB, [REMOTE], message(BOB, REMOTE, "x"))
        assert refused.value.smtp_code == 553


def test_spoofed_from_header_is_550_and_nothing_is_stored(server):
    marker = uuid.uuid4().hex
    with starttls_client(server) as client:
        client.login(ALICE, ALICE_PW)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail(ALICE, [BOB], message(BOB, BOB, marker))
        assert refused.value.smtp_code == 550
        assert b"5.7.1" in refused.value.smtp_error
        client.rset()                   # the session goes on
        assert client.sendmail(ALICE, [BOB], message(ALICE, BOB, marker + "ok")) == {}
    delivered(server, BOB, marker + "ok")
    assert not [p for p in server.messages(BOB)
                if f"marker {marker}\n".encode() in p.read_bytes()]


def test_starttls_injection_is_discarded(server):
    """Commands sent in the same segment as STARTTLS never run under TLS."""
    with socket.create_connection((server.host, server.port("submission")), 20) as raw:
        reader = raw.makefile("rb")
        reader.readline()
        raw.sendall(b"EHLO client.example.test\r\n")
        while reader.readline()[3:4] == b"-":
            pass
        plain = base64.b64encode(f"\0{ALICE}\0{ALICE_PW}".encode())
        raw.sendall(b"STARTTLS\r\nEHLO evil.test\r\nAUTH PLAIN " + plain + b"\r\n")
        assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        with context(server).wrap_socket(raw, server_hostname=HOSTNAME) as secure:
            secure.sendall(b"MAIL FROM:<alice@example.test>\r\n")
            reply = secure.recv(4096)
            secure.sendall(b"QUIT\r\n")
    assert reply == b"503 5.5.1 Send EHLO or HELO first\r\n"
    events_soon(server, "smtp.starttls.discarded")


def xoauth2(user, token):
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


def token(key, **claims):
    payload = {"iss": ISSUER, "aud": AUDIENCE, "exp": int(time.time()) + 600,
               "email": ALICE, "email_verified": True}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="ES256", headers={"kid": "test-1"})


def test_xoauth2_with_smtplib(server, oauth_key):
    key, _ = oauth_key
    marker = uuid.uuid4().hex
    with starttls_client(server) as client:
        code, _ = client.auth("XOAUTH2", lambda challenge=None: xoauth2(ALICE, token(key)),
                              initial_response_ok=True)
        assert code == 235
        client.sendmail(ALICE, [BOB], message(ALICE, BOB, marker))
    delivered(server, BOB, marker)


@pytest.mark.parametrize("claims,signer", [
    ({"exp": 1_000_000_000}, None), ({}, "other")], ids=["expired", "wrongly-signed"])
def test_bad_jwts_are_535(server, oauth_key, claims, signer):
    key, _ = oauth_key
    if signer == "other":
        key = ec.generate_private_key(ec.SECP256R1())
    with starttls_client(server) as client:
        answers = []

        def respond(challenge=None):
            answers.append(challenge)
            return xoauth2(ALICE, token(key, **claims)) if challenge is None else ""
        with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
            client.auth("XOAUTH2", respond, initial_response_ok=True)
        assert refused.value.smtp_code == 535
        assert json.loads(answers[1])["status"] == "401"    # the JSON error challenge
    reason = events_soon(server, "auth.failure")[-1]["reason"]
    assert reason == ("expired" if signer is None else "bad signature")


def test_the_self_signed_certificate_is_made_and_served(mailserver_factory):
    srv = mailserver_factory(listeners=LISTENERS)
    cert = srv.data_dir / "tls" / "cert.pem"
    assert (srv.data_dir / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    trust = ssl.create_default_context(cafile=str(cert))
    with socket.create_connection((srv.host, srv.port("submissions")), 20) as raw:
        with trust.wrap_socket(raw, server_hostname=HOSTNAME) as secure:
            assert secure.recv(512).startswith(b"220 ")


# -- swaks and nodemailer, both backends ------------------------------------------------------

def test_swaks_tls_auth_plain(any_backend):
    srv = any_backend
    marker = uuid.uuid4().hex
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed (.ci/run installs it)"
    done = subprocess.run(
        [swaks, "--server", f"{srv.host}:{srv.port('submission')}", "--tls",
         "--tls-verify", "--tls-ca-path", srv.ca_file,
         "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", srv.passwords[ALICE],
         "--from", ALICE, "--to", srv.recipient, "--helo", "client.example.test",
         "--header", f"Subject: swaks {marker}", "--body", f"marker {marker}"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0" in done.stdout
    srv.arrived(marker)


def test_swaks_wrong_password(any_backend):
    srv = any_backend
    done = subprocess.run(
        [shutil.which("swaks") or "swaks", "--server", f"{srv.host}:{srv.port('submission')}",
         "--tls", "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", "nope",
         "--from", ALICE, "--to", BOB, "--tls-ca-path", srv.ca_file, "--tls-verify"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "535 5.7.8" in done.stdout


@pytest.fixture(scope="session")
def node():
    """node with nodemailer installed into tests/e2e/node (npm install, once)."""
    node_bin, npm = shutil.which("node"), shutil.which("npm")
    if not node_bin or not npm:
        pytest.skip("Node.js/npm not installed (.ci/run installs them)")
    if not (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"npm install failed: {done.stderr[-2000:]}"
    return node_bin


def nodemailer_send(node, srv, listener, secure, password, sender=ALICE, subject="node",
                    to=BOB):
    options = {"host": srv.host, "port": srv.port(listener), "secure": secure,
               "user": ALICE, "pass": password, "ca": srv.ca_file, "servername": HOSTNAME,
               "from": sender, "to": to, "subject": subject, "text": f"{subject}\n"}
    done = subprocess.run([node, "send.js", json.dumps(options)], cwd=NODE_DIR,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("listener,secure", [("submission", False), ("submissions", True)])
def test_nodemailer(node, any_backend, listener, secure):
    srv = any_backend
    marker = uuid.uuid4().hex
    result = nodemailer_send(node, srv, listener, secure, srv.passwords[ALICE],
                             subject=f"node {marker}", to=srv.recipient)
    assert result["ok"], result
    assert result["response"].startswith("250 2.0.0 Ok: queued as ")
    srv.arrived(marker)


def test_nodemailer_refusals(node, server):
    wrong = nodemailer_send(node, server, "submission", False, "nope")
    assert (wrong["ok"], wrong["code"], wrong["responseCode"]) == (False, "EAUTH", 535)
    spoof = nodemailer_send(node, server, "submissions", True, ALICE_PW, sender=BOB)
    assert (spoof["ok"], spoof["responseCode"]) == (False, 553)

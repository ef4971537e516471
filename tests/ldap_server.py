"""A real OpenLDAP ``slapd`` for tests, started from a temp directory.

``SlapdServer(workdir)`` writes everything it needs into ``workdir``:

- a test PKI made with ``cryptography``: a CA (``ca.pem``) and a server
  certificate for ``127.0.0.1`` / ``::1`` / ``localhost`` signed by it, plus a
  second, unrelated CA ("rogue") that signs the server certificate instead
  when ``trusted_cert=False`` (a client trusting ``ca.pem`` must refuse it);
- ``slapd.conf`` (mdb backend, ACLs, TLS files, the small schema below);
- ``data.ldif``, loaded with ``slapadd`` before the start: ``ou=people`` with
  the users of ``USERS``, and ``ou=services`` with the service account the
  mail server binds as (password in ``bind.password``, with a trailing newline
  as an operator's editor would leave it).

``start()`` runs ``slapd -d 0`` in the foreground on free loopback ports, one
``ldap://`` (StartTLS) and one ``ldaps://``, and waits (bounded) until both
accept connections. ``stop()`` ends it; ``pause()`` / ``resume()`` freeze it
with SIGSTOP / SIGCONT (the kernel still accepts connections, nobody answers:
a hung directory). Nothing here sleeps without a deadline.

The server is deliberately permissive where real directories can be:
``allow bind_anon_dn`` makes a bind with a DN and an empty password succeed
as an anonymous bind, so a client that forgot to refuse empty passwords is
caught by the tests. With ``require_tls=True`` (the default) a simple bind
without TLS is refused (``confidentialityRequired``), so a client that skips
StartTLS fails loudly instead of sending passwords in clear.

Depends only on the standard library and ``cryptography``: the e2e tests and
the benchmarks reuse it.
"""

import base64
import datetime
import hashlib
import ipaddress
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.testing import free_ports

SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"

SUFFIX = "dc=example,dc=test"
PEOPLE = f"ou=people,{SUFFIX}"
SERVICE_DN = f"cn=mailservice,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service secret"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root secret"
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0

# uid -> (password, mail values, mailAlternateAddress values)
USERS = {
    "alice": ("alice password", ["alice@example.test"],
              ["postmaster@example.test", "Alice.Smith@Example.TEST"]),
    "bob": ("bob password", ["bob@example.test"], []),
    "carol": ("carol pässword ✓", ["carol@example.org"], []),
    # two entries with one address: an ambiguous login must never succeed
    "twin1": ("twin password", ["twin@example.test"], []),
    "twin2": ("twin password", ["twin@example.test"], []),
    # an entry without any address attribute
    "nomail": ("nomail password", [], []),
}

# mailAlternateAddress, in the OpenLDAP "experimental" OID arc (for tests).
SCHEMA = """\
attributetype ( 1.3.6.1.4.1.4203.666.11.77.1.1 NAME 'mailAlternateAddress'
    DESC 'another address the account may send as'
    EQUALITY caseIgnoreIA5Match
    SUBSTR caseIgnoreIA5SubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.26{256} )

objectclass ( 1.3.6.1.4.1.4203.666.11.77.2.1 NAME 'mailApplianceUser'
    DESC 'an account of the mail appliance'
    SUP top AUXILIARY
    MAY ( mailAlternateAddress ) )
"""


class SlapdError(Exception):
    """slapd could not be set up or started (the message says why)."""


# ---------------------------------------------------------------------------
# PKI

def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(builder):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)) \
                  .not_valid_after(now + datetime.timedelta(days=2))


def make_ca(common_name):
    """(key, certificate) of a new self-signed CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(_name(common_name))
                        .issuer_name(_name(common_name))
                        .public_key(key.public_key())
                        .serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0),
                                    critical=True)
    builder = builder.add_extension(
        x509.KeyUsage(digital_signature=True, content_commitment=False,
                      key_encipherment=False, data_encipherment=False,
                      key_agreement=False, key_cert_sign=True, crl_sign=True,
                      encipher_only=False, decipher_only=False), critical=True)
    builder = builder.add_extension(
        x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    return key, builder.sign(key, hashes.SHA256())


def issue_server_cert(ca_key, ca_cert, dns_names=("localhost",),
                      ips=("127.0.0.1", "::1")):
    """(key, certificate) for a TLS server, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    builder = _validity(x509.CertificateBuilder()
                        .subject_name(_name(dns_names[0] if dns_names else ips[0]))
                        .issuer_name(ca_cert.subject)
                        .public_key(key.public_key())
                        .serial_number(x509.random_serial_number()))
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None),
                                    critical=True)
    builder = builder.add_extension(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
        critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def write_cert_and_key(cert, key, cert_path, key_path):
    """``cert`` and ``key`` as PEM files (the key readable by its owner only)."""
    Path(cert_path).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(key_path).write_bytes(_pem_key(key))
    os.chmod(key_path, 0o600)


def write_pki(directory, trusted_cert=True, dns_names=("localhost",),
              ips=("127.0.0.1", "::1")):
    """Write ``ca.pem``, ``server.pem``, ``server.key`` (and the rogue CA).

    ``ca.pem`` is what clients trust. With ``trusted_cert=False`` the server
    certificate comes from ``rogue-ca.pem`` instead. The server certificate
    names ``dns_names`` and ``ips``.
    """
    directory = Path(directory)
    ca_key, ca_cert = make_ca("mailappliance test CA")
    rogue_key, rogue_cert = make_ca("mailappliance rogue CA")
    signer_key, signer_cert = (ca_key, ca_cert) if trusted_cert else (rogue_key, rogue_cert)
    key, cert = issue_server_cert(signer_key, signer_cert, dns_names, ips)
    pem = serialization.Encoding.PEM
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    (directory / "rogue-ca.pem").write_bytes(rogue_cert.public_bytes(pem))
    write_cert_and_key(cert, key, directory / "server.pem", directory / "server.key")


# ---------------------------------------------------------------------------
# Directory content

def ssha(password):
    """An RFC 2307 ``{SSHA}`` userPassword value."""
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _ldif_value(name, value):
    """``name: value``, base64 (``name:: ...``) when LDIF requires it."""
    if value.isascii() and value == value.strip() and not value.startswith((":", "<")):
        return f"{name}: {value}"
    return f"{name}:: {base64.b64encode(value.encode('utf-8')).decode('ascii')}"


def user_dn(uid):
    return f"uid={uid},{PEOPLE}"


def make_ldif(users):
    entries = [
        [f"dn: {SUFFIX}", "objectClass: dcObject", "objectClass: organization",
         "o: Example", "dc: example"],
        [f"dn: {PEOPLE}", "objectClass: organizationalUnit", "ou: people"],
        [f"dn: ou=services,{SUFFIX}", "objectClass: organizationalUnit", "ou: services"],
        [f"dn: {SERVICE_DN}", "objectClass: organizationalRole",
         "objectClass: simpleSecurityObject", "cn: mailservice",
         _ldif_value("userPassword", ssha(SERVICE_PASSWORD))],
    ]
    for uid, (password, mails, alternates) in users.items():
        entry = [f"dn: {user_dn(uid)}", "objectClass: inetOrgPerson",
                 "objectClass: mailApplianceUser", f"uid: {uid}", f"cn: {uid}",
                 f"sn: {uid}", _ldif_value("userPassword", ssha(password))]
        entry += [_ldif_value("mail", m) for m in mails]
        entry += [_ldif_value("mailAlternateAddress", a) for a in alternates]
        entries.append(entry)
    return "\n\n".join("\n".join(entry) for entry in entries) + "\n"


def make_slapd_conf(workdir, require_tls):
    workdir = Path(workdir)
    security = "security simple_bind=1\n" if require_tls else ""
    return f"""\
include {SCHEMA_DIR}/core.schema
include {SCHEMA_DIR}/cosine.schema
include {SCHEMA_DIR}/inetorgperson.schema
include {workdir}/mailappliance-test.schema

pidfile {workdir}/slapd.pid
argsfile {workdir}/slapd.args
modulepath {MODULE_DIR}
moduleload back_mdb

TLSCACertificateFile {workdir}/ca.pem
TLSCertificateFile {workdir}/server.pem
TLSCertificateKeyFile {workdir}/server.key
TLSProtocolMin 3.3

# a DN with an empty password binds as anonymous: the trap clients must avoid
allow bind_anon_dn
{security}
database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw "{ROOT_PASSWORD}"
directory {workdir}/db
index objectClass eq
index mail,mailAlternateAddress,uid eq

access to attrs=userPassword
    by anonymous auth
    by * none
access to dn.subtree="{PEOPLE}"
    by dn.exact="{SERVICE_DN}" read
    by * none
access to *
    by * none
"""


def _stopped(pid):
    """Are all threads of process ``pid`` stopped (Linux /proc)? None if unknown."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        states = []
        for task in tasks:
            with open(f"/proc/{pid}/task/{task}/stat", encoding="ascii",
                      errors="replace") as f:
                states.append(f.read().rsplit(")", 1)[1].split()[0])
    except (OSError, IndexError):
        return None
    return all(state in ("T", "t") for state in states)


def _accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------
# The server

class SlapdServer:
    """One slapd in ``workdir``; see the module docstring."""

    host = "127.0.0.1"
    suffix = SUFFIX
    base_dn = PEOPLE
    bind_dn = SERVICE_DN
    bind_password = SERVICE_PASSWORD

    def __init__(self, workdir, users=None, trusted_cert=True, require_tls=True,
                 cert_dns_names=("localhost",), cert_ips=("127.0.0.1", "::1")):
        self.workdir = Path(workdir)
        self.users = dict(USERS if users is None else users)
        self.trusted_cert = trusted_cert
        self.cert_names = (tuple(cert_dns_names), tuple(cert_ips))
        self.require_tls = require_tls
        self.process = None
        self.port = self.ldaps_port = None
        self._log = None
        self._prepare()

    # -- files ------------------------------------------------------------

    def _prepare(self):
        for tool in (SLAPD, SLAPADD):
            if not os.access(tool, os.X_OK):
                raise SlapdError(f"{tool} not found: install the slapd package")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "db").mkdir(exist_ok=True)
        write_pki(self.workdir, self.trusted_cert, *self.cert_names)
        (self.workdir / "mailappliance-test.schema").write_text(SCHEMA)
        self.conf_path.write_text(make_slapd_conf(self.workdir, self.require_tls))
        ldif = self.workdir / "data.ldif"
        ldif.write_text(make_ldif(self.users), encoding="utf-8")
        self.bind_password_file.write_text(self.bind_password + "\n")
        self._run_tool([SLAPADD, "-q", "-f", str(self.conf_path), "-l", str(ldif)])

    def _run_tool(self, argv):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise SlapdError(f"{' '.join(argv)} failed ({done.returncode}): "
                             f"{(done.stderr or done.stdout).strip()[-2000:]}")

    @property
    def conf_path(self):
        return self.workdir / "slapd.conf"

    @property
    def ca_file(self):
        return str(self.workdir / "ca.pem")

    @property
    def rogue_ca_file(self):
        return str(self.workdir / "rogue-ca.pem")

    @property
    def bind_password_file(self):
        return self.workdir / "bind.password"

    @property
    def ldap_url(self):
        return f"ldap://{self.host}:{self.port}"

    @property
    def ldaps_url(self):
        return f"ldaps://{self.host}:{self.ldaps_port}"

    def password(self, uid):
        return self.users[uid][0]

    def auth_section(self, tls="starttls", **overrides):
        """``[auth]`` keys (strings) for this server: ``tls`` is "starttls",
        "ldaps" or "none" (plain ldap://)."""
        url = self.ldaps_url if tls == "ldaps" else self.ldap_url
        keys = {
            "backend": "ldap",
            "ldap_url": url,
            "ldap_bind_dn": self.bind_dn,
            "ldap_bind_password_file": str(self.bind_password_file),
            "ldap_base_dn": self.base_dn,
            "ldap_user_filter": "(mail={address})",
            "ldap_address_attributes": "mail, mailAlternateAddress",
            "ldap_starttls": "off" if tls == "none" else "on",
            "ldap_ca_file": self.ca_file,
        }
        keys.update(overrides)
        return keys

    # -- life -------------------------------------------------------------

    def start(self, timeout=START_TIMEOUT):
        """Start slapd (on new free ports unless it ran before) and wait
        until both listeners accept connections."""
        if self.process is not None:
            raise SlapdError("slapd is already running")
        if self.port is None:
            self.port, self.ldaps_port = free_ports(2, self.host)
        urls = f"ldap://{self.host}:{self.port}/ ldaps://{self.host}:{self.ldaps_port}/"
        self._log = open(self.workdir / "slapd.out", "ab")
        # -d 0: stay in the foreground (we own the process) and log to stderr
        self.process = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(self.conf_path), "-h", urls],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_listening(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise SlapdError(f"slapd exited with {self.process.returncode}: "
                                 f"{self.output()[-2000:]}")
            if _accepts(self.host, self.port) and _accepts(self.host, self.ldaps_port):
                return
            if time.monotonic() >= deadline:
                raise SlapdError(f"slapd did not listen within {timeout:g}s: "
                                 f"{self.output()[-2000:]}")
            time.sleep(0.05)

    def stop(self, timeout=STOP_TIMEOUT):
        """Stop slapd (SIGTERM, then SIGKILL after ``timeout``); idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)     # a paused slapd cannot exit
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self):
        """Stop and start again on the same ports (a directory that came back)."""
        self.stop()
        self.start()

    def pause(self, timeout=STOP_TIMEOUT):
        """Freeze slapd: connections are accepted by the kernel, never answered.
        Returns once the process is stopped (a signal is delivered a moment
        later, and a busy machine may let slapd answer one more request)."""
        self.process.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while _stopped(self.process.pid) is False:
            if time.monotonic() >= deadline:
                raise SlapdError(f"slapd did not stop within {timeout:g}s")
            time.sleep(0.01)

    def resume(self):
        self.process.send_signal(signal.SIGCONT)

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    def output(self):
        try:
            return (self.workdir / "slapd.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stop()

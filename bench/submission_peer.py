"""The submission peer: Postfix + OpenDKIM + Dovecot SASL, private, on loopback.

What a self-hosted stack runs on 587 (Mail-in-a-Box, iRedMail): Postfix's
smtpd with STARTTLS required before AUTH (Debian's master.cf ``submission``
service options), SASL through Dovecot's auth service, and an OpenDKIM
milter signing relaxed/relaxed with RSA 2048. Everything lives in one temp
directory (``postconf -c``, ``dovecot -c``, ``opendkim -x``): no system
service is started, enabled or touched, and ``stop()`` ends what it started.

For a like-for-like run the peer gets the appliance's own material:

- its TLS certificate and key (the clients trust that one file);
- its DKIM key for the domain, under the same selector and header list
  (From over-signed);
- the user's bcrypt hash from the appliance's users file, as Dovecot's
  ``BLF-CRYPT``, with Dovecot's auth cache on for as long as the appliance
  remembers a verified login (5 minutes). Dovecot's cache keeps the hash, not
  the outcome: it still runs bcrypt at every login (in the one auth process;
  ``auth_cache_verify_password_with_worker`` would spread it over processes,
  but lost Postfix's auth connection under this load on 2.3.19), where the
  appliance remembers a verified login (an HMAC) and pays one bcrypt per user
  and password. ``--bcrypt-cost 4`` makes that difference small.

Mail to other domains is relayed to a closed loopback port (deferred at
once, as the appliance's outbound port in the bench is closed too).
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from postfix_peer import PostfixError, PostfixInstance, postfix_available  # noqa: E402

DOVECOT = "/usr/sbin/dovecot"
OPENDKIM = "/usr/sbin/opendkim"
SIGNED_HEADERS = ("From,To,Cc,Subject,Date,Message-ID,MIME-Version,Content-Type,"
                  "Reply-To,In-Reply-To,References")
SUBMISSION_OPTIONS = (
    # Debian's master.cf "submission" entry, as Postfix ships it (commented out).
    "-o syslog_name=postfix/submission -o smtpd_tls_security_level=encrypt "
    "-o smtpd_sasl_auth_enable=yes -o smtpd_tls_auth_only=yes "
    "-o smtpd_client_restrictions=permit_sasl_authenticated,reject "
    "-o smtpd_relay_restrictions=permit_sasl_authenticated,reject "
    "-o milter_macro_daemon_name=ORIGINATING")


def peer_missing():
    """Why the peer cannot run here ("" when it can)."""
    why = postfix_available()
    if why:
        return why
    for path, package in ((DOVECOT, "dovecot-core"), (OPENDKIM, "opendkim")):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install {package})"
    for user in ("dovecot", "dovenull", "opendkim"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no system user {user!r} (its package is not fully installed)"
    return ""


class PeerError(Exception):
    pass


class SubmissionPeer:
    """Postfix on ``port`` with Dovecot SASL and an OpenDKIM milter.

    ``cert_file``/``key_file``: TLS; ``dkim_key_file``: the PEM to sign
    with as ``selector._domainkey.domain``; ``users``: {address: bcrypt hash}.
    """

    def __init__(self, workdir, port, domain, selector, cert_file, key_file, dkim_key_file,
                 users, milter_port, dead_port, host="127.0.0.1"):
        self.dir = Path(workdir)
        self.port = port
        self.host = host
        self.domain = domain
        self.selector = selector
        self.cert_file, self.key_file = cert_file, key_file
        self.dkim_key_file = dkim_key_file
        self.users = dict(users)
        self.milter_port = milter_port
        self.dead_port = dead_port
        self.auth_socket = self.dir / "dovecot" / "postfix-auth"
        self.milter_socket = self.dir / "opendkim" / "milter.sock"
        self.postfix = None
        self.children = []              # (name, Popen)

    # -- Dovecot: SASL only -------------------------------------------------------

    def _dovecot_conf(self):
        base = self.dir / "dovecot"
        for sub in ("run", "state"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        passwd = base / "users"
        passwd.write_text("".join(f"{address}:{{BLF-CRYPT}}{hashed}\n"
                                  for address, hashed in self.users.items()))
        os.chmod(passwd, 0o644)
        os.chmod(base, 0o755)
        conf = base / "dovecot.conf"
        conf.write_text(f"""\
base_dir = {base / 'run'}
state_dir = {base / 'state'}
log_path = {base / 'dovecot.log'}
instance_name = bench-submission-{os.getpid()}
protocols =
listen = 127.0.0.1
ssl = no
auth_mechanisms = plain login
auth_cache_size = 10M
auth_cache_ttl = 5 min
auth_cache_negative_ttl = 0
default_internal_user = dovecot
default_login_user = dovenull
passdb {{
  driver = passwd-file
  args = scheme=BLF-CRYPT username_format=%u {passwd}
}}
userdb {{
  driver = static
  args = uid=nobody gid=nogroup home=/nonexistent
}}
service auth {{
  unix_listener {self.auth_socket} {{
    mode = 0666
  }}
}}
""")
        return conf

    # -- OpenDKIM: the signing milter --------------------------------------------

    def _opendkim_conf(self):
        base = self.dir / "opendkim"
        base.mkdir(parents=True, exist_ok=True)
        key = base / f"{self.selector}.private"
        shutil.copyfile(self.dkim_key_file, key)
        user = pwd.getpwnam("opendkim")
        os.chown(key, user.pw_uid, user.pw_gid)
        os.chmod(key, 0o600)
        os.chown(base, user.pw_uid, user.pw_gid)
        conf = base / "opendkim.conf"
        conf.write_text(f"""\
Mode s
Domain {self.domain}
Selector {self.selector}
KeyFile {key}
Socket local:{self.milter_socket}
UMask 000
Canonicalization relaxed/relaxed
SignHeaders {SIGNED_HEADERS}
OversignHeaders From
InternalHosts 127.0.0.0/8
Syslog no
UserID opendkim
# The key sits in a temp directory under /tmp (world-writable, sticky): allowed here.
RequireSafeKeys false
PidFile {base / 'opendkim.pid'}
""")
        return conf

    # -- Postfix -------------------------------------------------------------------

    def _postfix(self):
        extra = {
            "smtpd_tls_cert_file": self.cert_file,
            "smtpd_tls_key_file": self.key_file,
            "smtpd_tls_security_level": "may",
            "smtpd_sasl_type": "dovecot",
            "smtpd_sasl_path": str(self.auth_socket),
            "smtpd_sasl_auth_enable": "no",       # on for the submission service only
            "smtpd_milters": f"unix:{self.milter_socket}",
            "non_smtpd_milters": "",
            "milter_default_action": "tempfail",
            "mynetworks": "127.255.255.254/32",   # nobody relays without AUTH
            "relayhost": f"[{self.host}]:{self.dead_port}",
        }
        postfix = PostfixInstance(self.dir / "postfix", self.port, "local.bench.test",
                                  ["nobody"], host=self.host,
                                  hostname="postfix.bench.test", extra_main=extra)
        postfix.configure()
        postfix._postconf("-M", f"{self.port}/inet={self.port} inet n - n - - smtpd "
                          + SUBMISSION_OPTIONS)
        return postfix

    # -- lifecycle ------------------------------------------------------------------

    def _spawn(self, name, argv):
        log = open(self.dir / f"{name}.out", "wb")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()
        self.children.append((name, process))
        return process

    def start(self, timeout=30.0):
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in (self.dir.parent, self.dir):     # the daemons' users traverse them
            os.chmod(path, 0o755)
        try:
            self._spawn("dovecot", [DOVECOT, "-F", "-c", str(self._dovecot_conf())])
            self._spawn("opendkim", [OPENDKIM, "-f", "-x", str(self._opendkim_conf())])
            self._wait(lambda: self.auth_socket.exists(), timeout, "dovecot's auth socket")
            self._wait(lambda: self.milter_socket.exists(), timeout, "opendkim's socket")
            self.postfix = self._postfix()
            self.postfix._run("postfix", "-c", str(self.postfix.config_dir), "start")
            self.postfix.started = True
            self.postfix._wait_listening(timeout)
        except (PostfixError, OSError, PeerError) as error:
            self.stop()
            raise PeerError(f"the submission peer did not start: {error}\n{self.logs()}") \
                from None
        return self

    def _wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, process in self.children:
                if process.poll() is not None:
                    raise PeerError(f"{name} exited ({process.returncode})")
            if predicate():
                return
            time.sleep(0.05)
        raise PeerError(f"no {what} after {timeout:g} s")

    def stop(self):
        if self.postfix is not None:
            self.postfix.stop()
        for _name, process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)
        self.children = []

    def logs(self):
        parts = []
        for path in sorted(self.dir.glob("*.out")) + [self.dir / "dovecot" / "dovecot.log"]:
            if path.exists():
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}")
        if self.postfix is not None:
            parts.append(f"--- postfix.log\n{self.postfix.log()[-3000:]}")
        return "\n".join(parts)

    def postfix_log(self):
        return self.postfix.log_path.read_text(errors="replace") if self.postfix else ""

    def check_signing(self, sender, password, context, verify):
        """Send one message to a local mailbox of the peer and return it as
        stored, after ``verify(message)`` (PeerError if it is not signed)."""
        import smtplib
        mailbox = self.postfix.maildir("nobody")
        client = smtplib.SMTP(self.host, self.port, local_hostname="bench.example.test",
                              timeout=60)
        try:
            client.ehlo()
            client.starttls(context=context)
            client.ehlo()
            client.login(sender, password)
            client.sendmail(sender, ["nobody@local.bench.test"],
                            f"From: {sender}\r\nTo: nobody@local.bench.test\r\n"
                            "Subject: peer check\r\n\r\nsigned by OpenDKIM?\r\n")
            client.quit()
        except smtplib.SMTPException as error:
            raise PeerError(f"the peer refused the check message: {error}\n{self.logs()}") \
                from None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            found = [p for folder in ("new", "cur") if (mailbox / folder).is_dir()
                     for p in (mailbox / folder).iterdir()]
            if found:
                message = found[0].read_bytes()
                if not verify(message):
                    raise PeerError("the peer's check message does not carry a valid "
                                    f"DKIM signature:\n{message[:1500]!r}")
                return message
            time.sleep(0.1)
        raise PeerError(f"the peer did not deliver the check message\n{self.logs()}")

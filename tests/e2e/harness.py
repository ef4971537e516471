"""Run the real server as a subprocess on loopback, for end-to-end tests and benchmarks.

Shared by tests/e2e/conftest.py and bench/*.py, so it depends on nothing but the
standard library. A ``MailServer`` owns one temp directory: its config file,
its data_dir (spool, Maildirs, users file, event log) and the server's output.
Every wait is bounded in time; nothing here sleeps without a deadline.
"""

import email.parser
import email.policy
import json
import resource
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

from appliance.testing import free_ports  # noqa: F401  (the tests and benches take it from here)

REPO_ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "mail.example.test"
DOMAIN = "example.test"
LISTENERS = ("mx", "submission", "submissions", "submission_alt",
             "imap", "imaps", "pop3", "pop3s", "admin_ssh", "http", "https")

# `python -m twisted` runs `twist`, which has no -n; this is twistd itself.
# cwd = the repo root puts twisted/plugins on sys.path whatever the install mode.
TWISTD = ("-c", "from twisted.scripts.twistd import run; run()")


class ServerError(Exception):
    """The server did not start, or stopped when it should not have."""


def email_message(sender, to, subject, body, marker, domain):
    """A small text message with Message-ID ``<marker@domain>``."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{marker}@{domain}>"
    msg.set_content(body)
    return msg


def mailboxes(prefix, count):
    """``count`` users (address, password), ``{prefix}0@example.test`` on: a
    mailbox for each test of a module that shares one server (conftest's
    ``shared_server``: ``server.user`` is the next one)."""
    return tuple((f"{prefix}{n}@{DOMAIN}", f"{prefix} password {n}") for n in range(count))


def wait_until(predicate, timeout, interval=0.05, what="condition"):
    """Poll ``predicate`` until it returns a true value or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def raise_fd_limit(want=65536):
    """Raise this process's soft RLIMIT_NOFILE towards ``want``; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def render_config(sections):
    """INI text from ``{section: {key: value}}``; values already strings."""
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


def maildir_messages(maildir, folders=("new", "cur")):
    """The message files in ``folders`` of the Maildir at ``maildir`` (a Path that
    may not exist yet), sorted by name."""
    found = []
    for folder in folders:
        path = maildir / folder
        if path.is_dir():
            found.extend(p for p in path.iterdir() if p.is_file())
    return sorted(found)


def header_values(path, name):
    """The values of header ``name`` in the message file at ``path``."""
    with open(path, "rb") as handle:
        headers = email.parser.BytesHeaderParser().parse(handle)
    return headers.get_all(name) or []


class MailServer:
    """One server instance in ``workdir``: config, data, output, lifecycle.

    ``listeners``: which [listen] entries get a free loopback port (others are
    left empty, i.e. disabled). ``overrides``: ``{section: {key: value}}``
    merged over the defaults below. The defaults keep the run hermetic: DNS
    goes to a closed loopback port (fails fast instead of waiting on a
    resolver that cannot be reached), the outbound port is closed too, and
    the SPF/DKIM/DMARC checks and greylisting are off; tests of those turn
    them on through ``overrides``.
    """

    def __init__(self, workdir, listeners=LISTENERS, overrides=None,
                 python=sys.executable, host="127.0.0.1", fd_limit=4096):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.host = host
        self.python = python
        self.fd_limit = fd_limit
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir(exist_ok=True)
        self.config_path = self.workdir / "mailappliance.ini"
        self.events_path = self.data_dir / "log" / "events.json"
        self.output_path = self.workdir / "server.out"
        ports = free_ports(len(listeners) + 2, host)
        self.ports = dict(zip(listeners, ports))
        self.dead_port, self.outbound_port = ports[len(listeners):]
        self.sections = self._default_sections()
        for section, keys in (overrides or {}).items():
            self.sections.setdefault(section, {}).update(
                {k: str(v) for k, v in keys.items()})
        self.config_path.write_text(render_config(self.sections), encoding="utf-8")
        self.process = None
        self._output = None
        self.starts = 0

    def _default_sections(self):
        listen = {name: (f"{self.host}:{self.ports[name]}" if name in self.ports else "")
                  for name in LISTENERS}
        return {
            "server": {"hostname": HOSTNAME, "domains": DOMAIN,
                       "data_dir": str(self.data_dir)},
            "listen": listen,
            "auth": {"backend": "file", "users_file": str(self.data_dir / "users")},
            "dns": {"nameservers": f"127.0.0.1:{self.dead_port}", "timeout": "2s"},
            "outbound": {"port": str(self.outbound_port)},
            "checks": {"spf": "off", "dkim": "off", "dmarc": "off", "greylist": "off"},
            # As the sample config: local scripts on 127.0.0.1 are never limited
            # (tests that probe limits use other 127.0.0.x addresses, SPEC §4).
            "limits": {"allow": "127.0.0.1, ::1"},
            "admin": {"authorized_keys": str(self.data_dir / "admin_authorized_keys")},
            "log": {"events": str(self.events_path)},
        }

    # -- addresses and files -------------------------------------------------

    @property
    def mx_port(self):
        return self.ports["mx"]

    def port(self, listener):
        return self.ports[listener]

    def maildir(self, address):
        """The Maildir of a local ``address`` (it may not exist yet)."""
        local, _, domain = address.rpartition("@")
        return self.data_dir / "mail" / domain.lower() / local.lower()

    def messages(self, address, folders=("new", "cur")):
        """Message files delivered to ``address``, sorted by name."""
        return maildir_messages(self.maildir(address), folders)

    def cert_file(self):
        """The self-signed certificate the server made in data_dir at start."""
        return str(self.data_dir / "tls" / "cert.pem")

    def tls_context(self):
        """A client context trusting that certificate."""
        context = ssl.create_default_context(cafile=self.cert_file())
        context.check_hostname = False      # we connect to 127.0.0.1, it names the host
        return context

    def curl(self, scheme, url_path, *extra, timeout=30):
        """curl as a mail client of ``self.user``: ``scheme`` (imap, imaps, pop3,
        pop3s) on that listener, the certificate verified for HOSTNAME; the
        output of a run that must succeed."""
        port = self.port(scheme)
        result = subprocess.run(
            ["curl", "--silent", "--show-error", "--max-time", str(timeout),
             "--cacert", self.cert_file(),
             "--connect-to", f"{HOSTNAME}:{port}:{self.host}:{port}",
             "--user", f"{self.user}:{self.password}", *extra,
             f"{scheme}://{HOSTNAME}:{port}/{url_path}"],
            capture_output=True, timeout=timeout + 10)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        return result.stdout

    def send_through_mx(self, subject, body, recipient, sender="friend@example.net",
                        timeout=30):
        """A small message to ``recipient`` through the MX port, with smtplib."""
        msg = email_message(sender, recipient, subject, body, uuid.uuid4().hex, "example.net")
        with smtplib.SMTP(self.host, self.mx_port, timeout=timeout) as client:
            client.sendmail(sender, [recipient], msg.as_bytes(policy=email.policy.SMTP))

    def wait_for_messages(self, address, count, timeout=20.0):
        """Wait until ``address`` holds at least ``count`` messages; return them."""
        wait_until(lambda: len(self.messages(address)) >= count, timeout,
                   what=f"{count} message(s) for {address}")
        return self.messages(address)

    def spool_files(self):
        """Every file left under ``<data_dir>/queue`` (pending entries, temp files)."""
        queue = self.data_dir / "queue"
        if not queue.is_dir():
            return []
        return sorted(p for p in queue.rglob("*") if p.is_file())

    def wait_spool_empty(self, timeout=30.0):
        wait_until(lambda: not self.spool_files(), timeout, interval=0.1,
                   what="an empty spool")

    def events(self, name=None, since=None):
        """The event records written so far (optionally only those named ``name``,
        only those stamped at or after ``since``, a ``time.time()`` value: what a
        test on a shared server caused)."""
        if not self.events_path.exists():
            return []
        records = []
        for line in self.events_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue        # a line being written right now
            if since is not None and record.get("ts", 0) < since:
                continue
            if name is None or record.get("event") == name:
                records.append(record)
        return records

    def output(self):
        """What the server printed (stdout and stderr, all runs)."""
        if not self.output_path.exists():
            return ""
        return self.output_path.read_text(encoding="utf-8", errors="replace")

    # -- the CLI -------------------------------------------------------------

    def cli(self, *args, stdin=""):
        """Run ``mailappliance ARGS --config F``; returns the CompletedProcess."""
        return subprocess.run(
            [self.python, "-m", "appliance.cli", *args, "--config", str(self.config_path)],
            input=stdin, capture_output=True, text=True, cwd=REPO_ROOT, timeout=60)

    def add_user(self, address, password, bcrypt_cost=None):
        """Add a user with ``mailappliance user add --password-stdin``.

        With ``bcrypt_cost`` the user goes straight into the users file instead,
        with a bcrypt hash of that cost (the e2e fixtures pass 4, as the unit
        tests do): no CLI process to start, and each login costs the server about
        a millisecond of CPU instead of ~0.25 s. The benchmarks keep the default,
        so what they measure is what a real users file costs.
        """
        if bcrypt_cost is not None:
            import bcrypt
            from appliance.auth.users import UsersFile
            hashed = bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(bcrypt_cost))
            UsersFile(self.sections["auth"]["users_file"]).add(address, hashed.decode("ascii"))
            return None
        result = self.cli("user", "add", address, "--password-stdin", stdin=password + "\n")
        if result.returncode != 0:
            raise ServerError(f"user add {address} failed ({result.returncode}): "
                              f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    # -- lifecycle -----------------------------------------------------------

    def command(self):
        return [self.python, *TWISTD, "-n", "--pidfile=", "mailappliance",
                "--config", str(self.config_path)]

    def _preexec(self):
        # Many idle connections (bench/idle_rss.py) need more than the usual 1024 fds.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = self.fd_limit if hard == resource.RLIM_INFINITY else min(self.fd_limit, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    @property
    def ready_listener(self):
        """The listener whose greeting means "started": mx, else the first one."""
        return "mx" if "mx" in self.ports else next(iter(self.ports))

    def start(self, timeout=20.0):
        """Start the server and wait until its first listener sends a greeting.

        A first start that finds a listener's port taken (another process
        bound it between ``free_ports()`` and our bind: test runs side by
        side) is retried on new ports, twice at most."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except ServerError as error:
                if attempt == 2 or self.starts > attempt + 1 or "Address already in use" \
                        not in str(error) or not self._repick_ports():
                    raise

    def _repick_ports(self):
        """New free ports for the listeners we chose (not ones a test set)."""
        listen = self.sections["listen"]
        ours = [name for name in self.ports
                if listen.get(name) == f"{self.host}:{self.ports[name]}"]
        if not ours:
            return False
        for name, port in zip(ours, free_ports(len(ours), self.host)):
            self.ports[name] = port
            listen[name] = f"{self.host}:{port}"
        self.config_path.write_text(render_config(self.sections), encoding="utf-8")
        return True

    def _start(self, timeout):
        if self.running:
            raise ServerError("already running")
        self.starts += 1
        self._output = open(self.output_path, "ab")
        self._output.write(f"--- start #{self.starts}: {' '.join(self.command())}\n".encode())
        self._output.flush()
        self.process = subprocess.Popen(
            self.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=self._output, stderr=subprocess.STDOUT, preexec_fn=self._preexec)
        try:
            wait_until(self._ready, timeout, interval=0.1,
                       what=f"a greeting on {self.ready_listener} "
                            f"({self.host}:{self.ports[self.ready_listener]})")
        except (TimeoutError, ServerError) as error:
            self.stop()
            raise ServerError(f"{error}\n--- server output ---\n{self.output()}") from None
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise ServerError(f"server exited with {self.process.returncode} during start")
        try:
            address = (self.host, self.ports[self.ready_listener])
            with socket.create_connection(address, timeout=2) as sock:
                return bool(sock.recv(512))      # 220 / * OK / +OK / SSH-2.0
        except OSError:
            return False

    @property
    def running(self):
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self):
        return self.process.pid if self.process else None

    def kill(self):
        """SIGKILL: the crash the spool must survive."""
        if self.running:
            self.process.send_signal(signal.SIGKILL)
        self._reap(10)

    def for_next_test(self):
        """This (shared) server for one more test: a mailbox no other test
        touches (``user``, ``password``) and ``since``, when the test began
        (it reads only the events stamped after that)."""
        self.user, self.password = self.unused_users.pop(0)
        self.since = time.time()
        return self

    def stop(self, timeout=10.0):
        """SIGTERM (a clean twistd shutdown), SIGKILL if it does not end in time."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGKILL)
        self._reap(10)

    def _reap(self, timeout):
        if self.process is not None:
            self.process.wait(timeout)
        if self._output is not None:
            self._output.close()
            self._output = None

    def restart(self, timeout=20.0):
        self.stop()
        return self.start(timeout)

    def rss_kib(self, field="VmRSS"):
        """Resident set size of the server process, KiB (Linux /proc);
        ``field="VmHWM"``: its peak so far."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise ServerError(f"no {field} in /proc status")

    def fd_limit_of_server(self):
        """The server's soft 'Max open files', as the kernel reports it."""
        with open(f"/proc/{self.pid}/limits", encoding="ascii") as limits:
            for line in limits:
                if line.startswith("Max open files"):
                    return int(line.split()[3])
        raise ServerError("no 'Max open files' in /proc limits")

"""A private, stock Postfix instance on a loopback port: benchmark peer and test MX.

It lives entirely in one directory: its own config_directory (``postconf -c``),
queue_directory, data_directory, log file and virtual Maildirs, so it neither
needs nor touches the system's /etc/postfix instance or port 25. Postfix is
started and stopped as root (``postfix -c DIR start``), as on any host.

Mail for ``domain`` goes to Maildirs under ``<dir>/vmail/<domain>/<localpart>/``
through the virtual(8) agent (owned by ``nobody``: local(8) will not deliver
as root). Everything else is stock: master.cf is Debian's shipped master.cf
with the port-25 listener replaced and chroot turned off (no jail to set up).
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from harness import maildir_messages

MASTER_CF_SOURCES = ("/usr/share/postfix/master.cf.dist", "/etc/postfix/master.cf")
NOBODY = 65534


class PostfixError(Exception):
    pass


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def postfix_available():
    """Why Postfix cannot run here, or None when it can."""
    if shutil.which("postfix") is None and not os.path.exists("/usr/sbin/postfix"):
        return "postfix is not installed"
    if os.geteuid() != 0:
        return "postfix must be started as root"
    if not any(os.path.exists(p) for p in MASTER_CF_SOURCES):
        return "no master.cf template (postfix package incomplete)"
    return None


class PostfixInstance:
    def __init__(self, workdir, port, domain, mailboxes, host="127.0.0.1",
                 hostname="postfix.bench.test", extra_main=None):
        self.dir = Path(workdir)
        self.port = port
        self.host = host
        self.domain = domain
        self.mailboxes = list(mailboxes)
        self.hostname = hostname
        self.extra_main = dict(extra_main or {})
        self.config_dir = self.dir / "etc"
        self.queue_dir = self.dir / "spool"
        self.data_dir = self.dir / "data"
        self.vmail = self.dir / "vmail"
        self.log_path = self.dir / "postfix.log"
        self.started = False

    # -- configuration -------------------------------------------------------

    def _postconf(self, *args):
        self._run("postconf", "-c", str(self.config_dir), *args)

    def _run(self, *argv):
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise PostfixError(f"{' '.join(argv)} failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()}\n{self.log()}")
        return result

    def main_cf(self):
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.dir),
            "myhostname": self.hostname,
            "mydomain": self.hostname.partition(".")[2] or self.hostname,
            "mydestination": "localhost",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "alias_maps": "",
            "alias_database": "",
            "smtputf8_enable": "no",
            "virtual_mailbox_domains": self.domain,
            "virtual_mailbox_base": str(self.vmail),
            "virtual_mailbox_maps": f"texthash:{self.config_dir / 'vmailbox'}",
            "virtual_uid_maps": f"static:{NOBODY}",
            "virtual_gid_maps": f"static:{NOBODY}",
        }
        settings.update(self.extra_main)
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def configure(self):
        for path in (self.config_dir, self.queue_dir, self.vmail):
            path.mkdir(parents=True, exist_ok=True)
        # Postfix daemons run as postfix/nobody: they must traverse to their dirs.
        for path in (self.dir, self.config_dir, self.queue_dir):
            os.chmod(path, 0o755)
        os.chown(self.vmail, NOBODY, NOBODY)
        template = next(p for p in MASTER_CF_SOURCES if os.path.exists(p))
        shutil.copyfile(template, self.config_dir / "master.cf")
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "vmailbox").write_text(
            "".join(f"{local}@{self.domain} {self.domain}/{local}/\n"
                    for local in self.mailboxes))
        self._postconf("-MX", "smtp/inet")
        self._postconf("-M", f"{self.port}/inet={self.port} inet n - n - - smtpd")
        self._postconf("-F", "*/*/chroot=n")

    # -- lifecycle -----------------------------------------------------------

    def start(self, timeout=30.0):
        self.configure()
        self._run("postfix", "-c", str(self.config_dir), "start")
        self.started = True
        self._wait_listening(timeout)
        return self

    def _wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=2) as sock:
                    if sock.recv(512).startswith(b"220"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PostfixError(f"postfix did not answer on {self.host}:{self.port}\n{self.log()}")

    def stop(self):
        if not self.started:
            return
        master = self.master_pid()
        subprocess.run(["postfix", "-c", str(self.config_dir), "stop"],
                       capture_output=True, timeout=60)
        self.started = False
        # `postfix stop` only signals master; wait (bounded) until it is gone.
        deadline = time.monotonic() + 15
        while master and _alive(master) and time.monotonic() < deadline:
            time.sleep(0.05)

    def master_pid(self):
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    # -- mail ----------------------------------------------------------------

    def maildir(self, local):
        return self.vmail / self.domain / local

    def messages(self, local, folders=("new", "cur")):
        return maildir_messages(self.maildir(local), folders)

    def log(self):
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-5000:]

"""bench/accept.py's checks mode: the loopback DNS and the fair Postfix peer.

- ``BenchDNS``: tests/dns_server.py with realistic TTLs (300 s) and negative
  answers an RFC 2308 resolver may cache (an SOA in the authority section,
  its MINIMUM the negative TTL), on port 53 of a loopback address, so that
  the C resolvers of the peer (glibc, libspf2, libunbound) can use it too.
- ``sender_zones``: the senders' SPF and DMARC records; the senders whose
  ``_dmarc`` is missing (NXDOMAIN there and at the organizational domain).
- ``CheckingPostfix``: a PostfixInstance that checks what we check with the
  Debian packages of the Mail-in-a-Box stack: postfix-policyd-spf-python
  (SPF of HELO and MAIL FROM, recorded, not enforced: our ``spf = on``),
  OpenDKIM (verify) and OpenDMARC (``RejectFailures``: our ``dmarc =
  enforce``). The whole stack runs in a private mount namespace whose
  /etc/resolv.conf names the loopback DNS; the host's is not touched.
"""

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from dns_server import DNSServer
from postfix_peer import PostfixError, PostfixInstance

TTL = 300
NEGATIVE_TTL = 300
PEER_PACKAGES = {"policyd-spf": "/usr/bin/policyd-spf", "opendkim": "/usr/sbin/opendkim",
                 "opendmarc": "/usr/sbin/opendmarc"}
PSL = "/usr/share/publicsuffix/public_suffix_list.dat"


class BenchDNS(DNSServer):
    """The test DNS server on port 53, ``TTL`` on answers, an SOA on negative ones."""

    def __init__(self, zones, host, port=53, ttl=TTL, negative_ttl=NEGATIVE_TTL):
        super().__init__(zones, host, port, ttl=ttl, negative_ttl=negative_ttl)


def free_loopback_53():
    """A 127.0.0.x whose port 53 is free for UDP and TCP (we run as root)."""
    for last in range(153, 254):
        host = f"127.0.0.{last}"
        try:
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                with socket.socket(socket.AF_INET, kind) as probe:
                    probe.bind((host, 53))
        except OSError:
            continue
        return host
    raise OSError("no 127.0.0.x with port 53 free")


def sender_zones(senders, client_name, missing_dmarc):
    """SPF for every sender domain and the HELO name; ``_dmarc`` (p=reject) for
    the senders not in ``missing_dmarc``."""
    zones = {client_name: {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}}
    for sender in senders:
        domain = sender.rpartition("@")[2]
        zones[domain] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "MX": [(10, domain)],
                         "A": ["192.0.2.10"]}
        if sender not in missing_dmarc:
            zones["_dmarc." + domain] = {"TXT": ["v=DMARC1; p=reject"]}
    return zones


def peer_missing():
    """Why the checking peer cannot run here, or None."""
    missing = [package for package, path in PEER_PACKAGES.items() if not os.path.exists(path)]
    if missing:
        names = {"policyd-spf": "postfix-policyd-spf-python"}
        return "missing Debian packages: " + " ".join(names.get(m, m) for m in missing)
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is missing"
    return None


class CheckingPostfix(PostfixInstance):
    """Postfix + policyd-spf + OpenDKIM + OpenDMARC; see the module docstring."""

    def __init__(self, workdir, port, domain, mailboxes, dns_host):
        workdir = Path(workdir)
        # Unix sockets, as Debian's packages ship them (inet milters on loopback
        # meet Nagle and delayed ACKs: about 40 ms a message).
        self.dkim_socket = workdir / "opendkim.sock"
        self.dmarc_socket = workdir / "opendmarc.sock"
        super().__init__(workdir, port, domain, mailboxes, hostname="postfix-checks.bench.test",
                         extra_main={
                             # 127.0.0.1 must not be "ours": the checks apply to it.
                             "mynetworks": "192.0.2.1/32",
                             "smtpd_recipient_restrictions":
                                 "reject_unauth_destination, "
                                 "check_policy_service unix:private/policyd-spf",
                             "policyd-spf_time_limit": "3600",
                             "smtpd_milters": f"unix:{self.dkim_socket}, "
                                              f"unix:{self.dmarc_socket}",
                             "non_smtpd_milters": "",
                             "milter_default_action": "accept",
                         })
        self.dns_host = dns_host
        self.resolv_conf = workdir / "resolv.conf"
        self.filters = []

    def configure(self):
        super().configure()
        etc = self.config_dir
        self.resolv_conf.write_text(f"nameserver {self.dns_host}\n")
        (etc / "policyd-spf.conf").write_text(
            "debugLevel = 0\nTestOnly = 1\nHELO_reject = False\nMail_From_reject = False\n"
            "PermError_reject = False\nTempError_Defer = False\n"
            "skip_addresses = 192.0.2.1/32\n")      # not 127.0.0.0/8 (its default)
        self._postconf("-M", "policyd-spf/unix=policyd-spf unix - n n - 0 spawn "
                       f"user=nobody argv=/usr/bin/policyd-spf {etc / 'policyd-spf.conf'}")
        (etc / "peers.none").write_text("192.0.2.1\n")
        (etc / "opendkim.conf").write_text(
            f"Mode v\nSocket local:{self.dkim_socket}\n"
            f"AuthservID {self.hostname}\nInternalHosts {etc / 'peers.none'}\n"
            f"Nameservers {self.dns_host}\nSyslog no\nUMask 000\n"
            f"PidFile {self.dir / 'opendkim.pid'}\n")
        (etc / "opendmarc.conf").write_text(
            f"Socket local:{self.dmarc_socket}\nAuthservID {self.hostname}\nUMask 000\n"
            f"TrustedAuthservIDs {self.hostname}\nIgnoreHosts {etc / 'peers.none'}\n"
            "RejectFailures true\nSPFIgnoreResults false\nSPFSelfValidate true\n"
            f"PublicSuffixList {PSL}\nSyslog false\n"
            f"PidFile {self.dir / 'opendmarc.pid'}\n")

    def _in_namespace(self, command):
        """argv running ``command`` (a shell line) with our resolv.conf."""
        return ["unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount --bind {self.resolv_conf} /etc/resolv.conf && exec {command}"]

    def start(self, timeout=30.0):
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout):
        self.configure()
        for name in ("opendkim", "opendmarc"):
            conf = self.config_dir / f"{name}.conf"
            log = open(self.dir / f"{name}.out", "wb")
            flag = "-x" if name == "opendkim" else "-c"
            process = subprocess.Popen(self._in_namespace(f"/usr/sbin/{name} -f {flag} {conf}"),
                                       stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self.filters.append(process)
        for path in (self.dkim_socket, self.dmarc_socket):
            self._wait_socket(path, timeout)
        self._run(*self._in_namespace(f"postfix -c {self.config_dir} start"))
        self.started = True
        self._wait_listening(timeout)
        return self

    def _wait_socket(self, path, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(1)
                    probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.1)
        outputs = "".join((self.dir / f"{n}.out").read_text(errors="replace")
                          for n in ("opendkim", "opendmarc"))
        raise PostfixError(f"milter on {path} did not start\n{outputs}")

    def stop(self):
        super().stop()
        for process in self.filters:
            process.terminate()
        for process in self.filters:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.filters = []

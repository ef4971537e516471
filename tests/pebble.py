"""Let's Encrypt's test CA (Debian's ``pebble``) on loopback, for the ACME tests.

    with Pebble(tmp_path, dns_address="127.0.0.1:5353", http_port=..., tls_port=...,
                validity=45) as pebble:
        pebble.directory     # https://127.0.0.1:PORT/dir (the ACME directory URL)
        pebble.ca_file       # the CA of pebble's own HTTPS (for [tls] acme_ca_file)
        pebble.root_pem()    # the root that signs the certificates it issues

Pebble resolves the names it validates through ``dns_address`` (the tests'
DNS server) and connects to ``http_port`` (http-01) and ``tls_port``
(tls-alpn-01) there: the appliance's ``http``/``https`` listeners.
PEBBLE_VA_NOSLEEP and PEBBLE_WFE_NONCEREJECT=0 make it fast and
deterministic (no random validation delays, no random bad-nonce errors).
"""

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request

from cryptography.hazmat.primitives import serialization

from appliance.testing import free_ports
from ldap_server import issue_server_cert, make_ca, write_cert_and_key

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


def make_tls_files(directory):
    """(ca path, cert path, key path): a CA and a 127.0.0.1/localhost leaf for pebble."""
    ca_key, ca = make_ca("pebble test CA")
    key, leaf = issue_server_cert(ca_key, ca, dns_names=("localhost",), ips=("127.0.0.1",))
    paths = [os.path.join(directory, n) for n in ("ca.pem", "cert.pem", "key.pem")]
    with open(paths[0], "wb") as handle:
        handle.write(ca.public_bytes(serialization.Encoding.PEM))
    write_cert_and_key(leaf, key, paths[1], paths[2])
    return paths


class Pebble:
    """See the module docstring."""

    def __init__(self, workdir, dns_address, http_port, tls_port, validity=None):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.ca_file, cert, key = make_tls_files(self.workdir)
        self.port, self.management_port = free_ports(2, "127.0.0.1")
        settings = {"listenAddress": f"127.0.0.1:{self.port}",
                    "managementListenAddress": f"127.0.0.1:{self.management_port}",
                    "certificate": cert, "privateKey": key,
                    "httpPort": http_port, "tlsPort": tls_port,
                    "ocspResponderURL": "", "externalAccountBindingRequired": False}
        if validity is not None:
            settings["certificateValidityPeriod"] = int(validity)
        self.config_path = os.path.join(self.workdir, "pebble.json")
        with open(self.config_path, "w", encoding="utf-8") as handle:
            json.dump({"pebble": settings}, handle)
        self.dns_address = dns_address
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        self.process = None
        self.log_path = os.path.join(self.workdir, "pebble.log")

    def start(self, timeout=20.0):
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0",
                   PEBBLE_AUTHZREUSE="0")
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [PEBBLE, "-config", self.config_path, "-dnsserver", self.dns_address,
             "-strict=false"], stdout=self._log, stderr=subprocess.STDOUT, env=env,
            cwd=self.workdir)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pebble exited: {self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    with socket.create_connection(("127.0.0.1", self.management_port),
                                                  timeout=1):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pebble did not start: {self.output()}")

    def root_pem(self):
        """The root of the certificates pebble issues (its management API)."""
        context = ssl.create_default_context(cafile=self.ca_file)
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}/roots/0",
                                    context=context, timeout=10) as answer:
            return answer.read()

    def output(self):
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as handle:
                return handle.read()[-5000:]
        except OSError:
            return ""

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

"""A real ``redis-server`` (the Debian package) for tests and benchmarks.

``RedisServer(workdir)`` runs ``redis-server`` in the foreground on a free
loopback port with its own directory and no persistence (``--save ''``,
``--appendonly no``): the system service is never needed. ``start()`` waits
(bounded) until it answers PING; ``stop()`` ends it; ``start()`` again brings
it back on the same port, empty (Redis lost its data: the appliances must
refill it). ``pause()`` / ``resume()`` freeze it with SIGSTOP / SIGCONT (the
kernel still accepts connections, nobody answers: a hung Redis).

With ``password`` it requires AUTH (``requirepass``). With ``tls`` it
speaks TLS only (``rediss://``), with a certificate for ``localhost`` and
127.0.0.1 from the test PKI of ``ldap_server.write_pki`` (``ca.pem`` is what
clients trust; ``trusted_cert=False``: signed by the rogue CA instead).
"""

import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

from appliance.testing import free_ports

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir, password=None, tls=False, trusted_cert=True):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.tls = tls
        if tls:
            from ldap_server import write_pki
            write_pki(self.workdir, trusted_cert=trusted_cert)
            self.ca_file = self.workdir / "ca.pem"
        self.port = free_ports(1)[0]
        self.process = None

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}/0?ssl_ca_certs={self.ca_file}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout=10.0):
        if self.tls:
            ports = ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.workdir / "server.pem"),
                     "--tls-key-file", str(self.workdir / "server.key"),
                     "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]
        else:
            ports = ["--port", str(self.port)]
        args = [REDIS_SERVER, *ports, "--bind", "127.0.0.1",
                "--dir", str(self.workdir), "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}); "
                                   f"see {self.workdir / 'redis.log'}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer within {timeout:g}s")
            time.sleep(0.02)
        return self

    def _answers(self):
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.tls:
                    context = ssl.create_default_context(cafile=str(self.workdir / "rogue-ca.pem"))
                    context.load_verify_locations(cafile=str(self.ca_file))
                    context.check_hostname = False
                    sock = context.wrap_socket(sock)
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def pause(self):
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.process.pid, signal.SIGCONT)

    def client(self):
        import redis
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

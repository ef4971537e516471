"""A real ``redis-server`` (the Debian package) for tests and benchmarks.

``RedisServer(workdir)`` runs ``redis-server`` in the foreground on a free
loopback port with its own directory and no persistence (``--save ''``,
``--appendonly no``): the system service is never needed. ``start()`` waits
(bounded) until it answers PING; ``stop()`` ends it; ``start()`` again brings
it back on the same port, empty (Redis lost its data: the appliances must
refill it). ``pause()`` / ``resume()`` freeze it with SIGSTOP / SIGCONT (the
kernel still accepts connections, nobody answers: a hung Redis).

With ``password`` it requires AUTH (``requirepass``).
"""

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from appliance.testing import free_ports

REDIS_SERVER = "/usr/bin/redis-server"


class RedisServer:
    def __init__(self, workdir, password=None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = free_ports(1)[0]
        self.process = None

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout=10.0):
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
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

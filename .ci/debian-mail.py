"""Inside a fresh chroot with the mailappliance .deb installed (.ci/debian):
start the server the way mailappliance.service does (twistd3 as the
mailappliance user) from a copy of the packaged config with the ports moved
to free loopback ports, add a user with the CLI, deliver one message over
SMTP and read it back over IMAP (TLS). Exit 0 or one line saying what failed.
"""

import imaplib
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
import time

CONF = "/etc/mailappliance/mailappliance.ini"
TEST_CONF = "/tmp/mailappliance-test.ini"
USER, PASSWORD = "alice@example.test", "correct horse battery staple"
TOKEN = "deb-check-%d" % os.getpid()


def fail(message):
    print("debian-mail: FAIL: " + message, flush=True)
    sys.exit(1)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_config():
    """The packaged config, every [::]:PORT moved to 127.0.0.1:<free>; no DNS."""
    with open(CONF, encoding="utf-8") as handle:
        text = handle.read()
    ports = {}

    def move(match):
        ports[match.group(1)] = free_port()
        return "127.0.0.1:%d" % ports[match.group(1)]

    text = re.sub(r"\[::\]:(\d+)", move, text)
    # The chroot has no DNS: checks that would look up SPF/DKIM/DMARC are off
    # and the resolver points at a closed loopback port (fails at once).
    for key, value in (("spf", "off"), ("dkim", "off"), ("dmarc", "off"),
                       ("nameservers", "127.0.0.1:%d" % free_port())):
        text, count = re.subn(r"(?m)^%s *=.*$" % key, "%s = %s" % (key, value), text)
        if count != 1:
            fail("%s: no single '%s =' line to change" % (CONF, key))
    with open(TEST_CONF, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(TEST_CONF, 0o644)
    return {"25": ports["25"], "993": ports["993"], "143": ports["143"]}


def wait_for_port(port, server, timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            fail("the server exited with %s before listening" % server.returncode)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    fail("the server did not listen on 127.0.0.1:%d within %ds" % (port, timeout))


def main():
    ports = test_config()
    check = subprocess.run(["mailappliance", "check-config", "--config", TEST_CONF])
    if check.returncode:
        fail("check-config refuses the test copy of the config")
    log = open("/tmp/mailappliance-twistd.log", "wb")
    server = subprocess.Popen(
        ["/usr/bin/twistd3", "--nodaemon", "--pidfile=", "mailappliance",
         "--config", TEST_CONF],
        user="mailappliance", group="mailappliance", extra_groups=[],
        cwd="/var/lib/mailappliance", stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(ports["25"], server)
        wait_for_port(ports["993"], server)
        print("debian-mail: server listening (mx %d, imaps %d)" % (ports["25"], ports["993"]),
              flush=True)

        # Added while the server runs, by root as an administrator would.
        add = subprocess.run(["mailappliance", "user", "add", USER, "--password-stdin",
                              "--config", TEST_CONF], input=PASSWORD + "\n", text=True)
        if add.returncode:
            fail("mailappliance user add exited with %d" % add.returncode)

        message = ("From: Bob <bob@client.example.net>\r\nTo: %s\r\n"
                   "Subject: %s\r\nMessage-ID: <%s@client.example.net>\r\n\r\n"
                   "Delivered by .ci/debian.\r\n" % (USER, TOKEN, TOKEN))
        with smtplib.SMTP("127.0.0.1", ports["25"], local_hostname="client.example.net",
                          timeout=30) as smtp:
            refused = smtp.sendmail("bob@client.example.net", [USER], message)
        if refused:
            fail("SMTP refused %r" % refused)
        print("debian-mail: SMTP accepted the message", flush=True)

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE     # the self-signed certificate of first start
        deadline = time.monotonic() + 60
        while True:
            imap = imaplib.IMAP4_SSL("127.0.0.1", ports["993"], ssl_context=context)
            try:
                imap.login(USER, PASSWORD)
                imap.select("INBOX", readonly=True)
                status, data = imap.search(None, "SUBJECT", TOKEN)
                numbers = data[0].split() if status == "OK" else []
                if numbers:
                    status, parts = imap.fetch(numbers[0], "(RFC822)")
                    body = parts[0][1].decode("utf-8", "replace")
                    if "Delivered by .ci/debian." not in body:
                        fail("the message read over IMAP lacks its body: %r" % body[:500])
                    break
            finally:
                try:
                    imap.logout()
                except (imaplib.IMAP4.error, OSError):
                    pass
            if time.monotonic() > deadline:
                fail("the message did not reach alice's INBOX within 60s")
            time.sleep(1)
        print("debian-mail: IMAP read the message back", flush=True)

        os.kill(server.pid, signal.SIGHUP)      # what systemctl reload sends
        time.sleep(2)
        if server.poll() is not None:
            fail("the server exited on SIGHUP")
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                fail("the server did not stop within 60s of SIGTERM")
        log.close()
    events = "/var/log/mailappliance/events.json"
    if not os.path.exists(events) or os.path.getsize(events) == 0:
        fail("no events in " + events)
    print("debian-mail: OK", flush=True)


if __name__ == "__main__":
    main()

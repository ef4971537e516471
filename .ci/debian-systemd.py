"""Inside a Debian 12 container booted with systemd (.ci/debian, systemd-nspawn
--private-network), the mailappliance .deb installed and its unit started at
boot: check the service runs hardened as the mailappliance user on the
production ports, delivers one message (SMTP on 25, IMAPS on 993), and survives
`systemctl reload` and `systemctl restart`. Exit 0 or one line saying what failed.
"""

import imaplib
import pwd
import smtplib
import ssl
import subprocess
import sys
import time

USER, PASSWORD = "alice@example.test", "correct horse battery staple"


def fail(message):
    print("debian-systemd: FAIL: " + message, flush=True)
    subprocess.run(["journalctl", "-u", "mailappliance", "--no-pager", "-n", "30"])
    sys.exit(1)


def systemctl(*args):
    return subprocess.run(["systemctl", *args], capture_output=True, text=True)


def main_pid():
    return int(systemctl("show", "-p", "MainPID", "--value", "mailappliance").stdout.strip())


def wait_active(timeout=90):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = systemctl("is-active", "mailappliance").stdout.strip()
        if state == "active" and main_pid():
            return
        if state == "failed":
            fail("mailappliance.service failed")
        time.sleep(1)
    fail("mailappliance.service is not active after %ds" % timeout)


def wait_port(port, timeout=60):
    import socket
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    fail("nothing listens on port %d" % port)


def main():
    wait_active()
    pid = main_pid()
    status = open("/proc/%d/status" % pid).read()
    uid = int(status.split("Uid:")[1].split()[0])
    if uid != pwd.getpwnam("mailappliance").pw_uid:
        fail("the server runs as uid %d, not mailappliance" % uid)
    ambient = int(status.split("CapAmb:")[1].split()[0], 16)
    effective = int(status.split("CapEff:")[1].split()[0], 16)
    if ambient != 1 << 10 or effective != 1 << 10:      # CAP_NET_BIND_SERVICE only
        fail("capabilities: ambient %x, effective %x" % (ambient, effective))
    wait_port(25)
    wait_port(993)
    print("debian-systemd: the unit runs as mailappliance with CAP_NET_BIND_SERVICE only,"
          " on ports 25 and 993", flush=True)

    add = subprocess.run(["mailappliance", "user", "add", USER, "--password-stdin"],
                         input=PASSWORD + "\n", text=True)
    if add.returncode:
        fail("mailappliance user add exited with %d" % add.returncode)
    message = ("From: bob@client.example.net\r\nTo: %s\r\nSubject: via-systemd\r\n\r\n"
               "Delivered to the systemd unit.\r\n" % USER)
    with smtplib.SMTP("127.0.0.1", 25, local_hostname="client.example.net", timeout=60) as smtp:
        refused = smtp.sendmail("bob@client.example.net", [USER], message)
    if refused:
        fail("SMTP refused %r" % refused)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    deadline = time.monotonic() + 90
    while True:
        imap = imaplib.IMAP4_SSL("127.0.0.1", 993, ssl_context=context)
        imap.login(USER, PASSWORD)
        imap.select("INBOX", readonly=True)
        found = imap.search(None, "SUBJECT", "via-systemd")[1][0].split()
        imap.logout()
        if found:
            break
        if time.monotonic() > deadline:
            fail("the message did not reach the INBOX within 90s")
        time.sleep(1)
    print("debian-systemd: delivered over SMTP on 25, read back over IMAPS on 993", flush=True)

    reload = systemctl("reload", "mailappliance")
    if reload.returncode:
        fail("systemctl reload: " + reload.stderr.strip())
    time.sleep(2)
    wait_active(10)
    if main_pid() != pid:
        fail("systemctl reload restarted the server")
    restart = systemctl("restart", "mailappliance")
    if restart.returncode:
        fail("systemctl restart: " + restart.stderr.strip())
    wait_active()
    wait_port(25)
    print("debian-systemd: systemctl reload (SIGHUP) and restart: OK", flush=True)


if __name__ == "__main__":
    main()

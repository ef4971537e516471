"""kill -9 under load: every message answered 250 is delivered exactly once.

SPEC §4: a 250 after DATA means the message is on disk, fsynced, and will be
delivered even if the process dies the next instant; local delivery is
exactly once across crashes. Four clients send numbered messages, the server
is SIGKILLed in the middle, restarted, and the Maildir is counted.
"""

import smtplib
import threading
from collections import Counter
from email import policy
from email.message import EmailMessage

from harness import header_values, wait_until

THREADS = 4
PER_THREAD = 50
KILL_AFTER = 60          # confirmed messages before the kill
ID_HEADER = "X-Crash-Test-Id"


class Load:
    """Numbered messages from THREADS clients; records what got a 250."""

    def __init__(self, server):
        self.server = server
        self.lock = threading.Lock()
        self.attempted = []
        self.confirmed = []
        self.threads = [threading.Thread(target=self.client, args=(n,), daemon=True)
                        for n in range(THREADS)]

    def message(self, test_id):
        msg = EmailMessage()
        msg["From"] = "load@example.org"
        msg["To"] = self.server.user
        msg["Subject"] = f"crash test {test_id}"
        msg["Message-ID"] = f"<{test_id}@crash.example.org>"
        msg[ID_HEADER] = test_id
        msg.set_content(f"message {test_id}\n" + "x" * 2000 + "\n")
        return msg.as_bytes(policy=policy.SMTP)     # CRLF line ends

    def client(self, number):
        # One connection per client, reused; the first error (the kill) ends it.
        try:
            with smtplib.SMTP(self.server.host, self.server.mx_port, timeout=15) as smtp:
                for i in range(PER_THREAD):
                    test_id = f"t{number}-{i}"
                    with self.lock:
                        self.attempted.append(test_id)
                    smtp.sendmail("load@example.org", [self.server.user],
                                  self.message(test_id))
                    with self.lock:
                        self.confirmed.append(test_id)
        except (smtplib.SMTPException, OSError):
            pass

    def start(self):
        for thread in self.threads:
            thread.start()

    def done(self):
        return not any(thread.is_alive() for thread in self.threads)

    def join(self, timeout=30):
        for thread in self.threads:
            thread.join(timeout)
        assert self.done(), "a load client is still running"


def delivered_ids(server):
    ids = Counter()
    for path in server.messages(server.user):
        ids.update(header_values(path, ID_HEADER))
    return ids


def test_kill_9_under_load_loses_and_duplicates_nothing(mailserver_factory):
    server = mailserver_factory(overrides={"limits": {
        "allow": "127.0.0.0/8", "connections_per_ip": "100",
        "messages_per_hour_per_ip": "100000"}})
    load = Load(server)
    load.start()
    wait_until(lambda: len(load.confirmed) >= KILL_AFTER or load.done(), 60,
               interval=0.01, what=f"{KILL_AFTER} accepted messages")
    server.kill()
    load.join()
    confirmed = set(load.confirmed)
    assert len(confirmed) >= KILL_AFTER, f"the load stopped early: {len(confirmed)} accepted"
    assert len(confirmed) < THREADS * PER_THREAD, "the kill came after the whole load"

    server.start()
    # An entry leaves the spool only once delivered: empty spool = all delivered.
    server.wait_spool_empty(timeout=60)

    ids = delivered_ids(server)
    print(f"{len(load.attempted)} attempted, {len(confirmed)} answered 250 before the kill, "
          f"{len(ids)} delivered")
    twice = {test_id: n for test_id, n in ids.items() if n > 1}
    assert twice == {}, f"delivered more than once: {twice}"
    missing = confirmed - set(ids)
    assert missing == set(), f"answered 250 but not delivered: {sorted(missing)}"
    assert set(ids) <= set(load.attempted), "a message nobody sent"

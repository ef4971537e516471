"""Value objects of a message's journey: the session, the envelope, queue ids,
the state of each recipient and a new entry's route."""

import collections
import os
import random
import time
from dataclasses import dataclass, field


# Uniqueness, not secrecy: a generator seeded from the OS once, instead of a
# getrandom system call per message. (A fork must not share it: the server
# does not fork after start, and each process seeds its own.)
_ids = random.Random(os.urandom(16))


def new_session_id():
    """8 hex digits naming one connection in the event stream (not a secret)."""
    return f"{_ids.getrandbits(32):08x}"


def new_queue_id(now=None):
    """A sortable, unique queue id: 10 hex digits of microseconds + 8 random hex.

    It names the spool files and the Maildir file, so it must be safe as a file
    name (hex only) and unique across restarts without a counter on disk.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    return f"{micros:014x}{_ids.getrandbits(32):08x}"


@dataclass
class Session:
    """What the SMTP server knows about one connection."""

    peer_ip: str
    peer_port: int = 0
    listener: str = "mx"          # mx | submission | submissions | submission_alt
    helo: str = ""
    tls: bool = False
    auth_user: str = ""           # canonical address of the authenticated account
    account: object = None        # its appliance.auth.accounts.Account (addresses)
    mail_from: str = ""           # MAIL FROM of the transaction under way (RCPT stages)


@dataclass
class Envelope:
    """One accepted message: who sent it, to whom, and how it arrived.

    ``recipients`` are canonical addresses (see appliance.address). The queue
    keeps per-recipient delivery state beside this; the envelope itself never
    changes after acceptance.
    """

    queue_id: str
    sender: str                   # "" for the null sender <>
    recipients: list
    received_at: float
    helo: str = ""
    peer_ip: str = ""
    listener: str = "mx"
    auth_user: str = ""
    size: int = 0
    params: dict = field(default_factory=dict)   # BODY=8BITMIME, SMTPUTF8 ...

    def to_json(self):
        return {
            "queue_id": self.queue_id, "sender": self.sender,
            "recipients": list(self.recipients), "received_at": self.received_at,
            "helo": self.helo, "peer_ip": self.peer_ip, "listener": self.listener,
            "auth_user": self.auth_user, "size": self.size, "params": dict(self.params),
        }

    @classmethod
    def from_json(cls, data):
        return cls(**{k: data[k] for k in (
            "queue_id", "sender", "recipients", "received_at", "helo", "peer_ip",
            "listener", "auth_user", "size", "params") if k in data})


# -- each recipient's delivery state, as the queue keeps it --------------------

PENDING, DELIVERED, DEFERRED, FAILED = "pending", "delivered", "deferred", "failed"
STATES = (PENDING, DELIVERED, DEFERRED, FAILED)


Route = collections.namedtuple("Route", "resolved links complete", defaults=(False,))
Route.__doc__ = """What a router found for a new entry: ``resolved`` ``{recipient:
targets}`` for the first delivery pass, ``links`` the CommitLinks to make in
the commit's batch (or None), ``complete`` when those links deliver every
recipient (then the entry is retired in the same batch once they are durable)."""


def new_recipient_state(now):
    return {"state": PENDING, "attempts": 0, "next_attempt": None, "last_error": "",
            "delivered_to": [], "remote": [], "updated_at": now}

"""The admin command set: one table of commands for every door.

Each command is a function ``run(ctx, args)`` over a ``Context`` (the
running appliance, or an offline one built from the config file) with its
argument spec, one-line help, a read-only flag (a ``readonly_keys`` key may
run only those) and, for what lists or shows, ``--json``. The doors (the SSH
shell, the control socket, the ``mailappliance`` CLI) only parse a line into
words and hand them to ``dispatch``; they never know a command's insides.

Exit codes: 0 ok (also a command that returns nothing), 1 failed or not
found, 2 usage or bad config, 3 partial (a bulk operation where some items
failed), 77 permission denied, 127 unknown command. Errors are one line on the error stream, ``error: ...``.

Passwords never come from the command line: ``ctx.read_secret`` reads them
(stdin of a one-shot command, a no-echo prompt in the interactive shell).
Every command run through a door that audits (``ctx.audit``) is an
``admin.command`` event: who (the key's fingerprint, role, peer), what (the
words, redacted when they did not parse), the result and the time it took.
"""

import argparse
import dataclasses
import inspect
import os
import time

from twisted.internet import defer

from appliance import config as configmod
from appliance import dnsrecords, events
from appliance.admin.output import duration, safe, size, table
from appliance.admin.output import dumps as json_line
from appliance.admin.userinfo import DirectoryUnavailable, LdapUsers, aliases_of, mailbox_usage
from appliance.auth.users import UsersError, canonical_address, hash_password
from appliance.address import domain_of
from appliance.directory import alias_key, canonical_domain
from appliance.policy.keys import KeyStoreError, announce
from appliance.queue.admin import QueueError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
EXIT_DENIED, EXIT_UNKNOWN = 77, 127

READ, ADMIN = "read", "admin"

events.register("admin.command", "an admin command was run (or refused) through the "
                "admin shell or the control socket",
                ("user", "key_fingerprint", "role", "peer_ip", "mode", "command", "rc",
                 "ms"))

STREAM_CHUNK = 500          # rows of a long listing written per reactor turn


class UsageError(Exception):
    """Bad words or arguments (exit 2)."""


class Failed(Exception):
    """The command could not do its work (exit 1)."""


class Denied(Exception):
    """Not allowed for this caller's role (exit 77)."""


class NeedsServer(Failed):
    """An online command asked of the offline CLI."""


@dataclasses.dataclass(frozen=True)
class Identity:
    """Who runs a command: the SSH user name (logged; the key decides), the
    key's ``SHA256:`` fingerprint, the role (``admin`` or ``read``), the
    peer, and the door (``exec``, ``shell``, ``pty``, ``socket``, ``cli``)."""

    user: str = ""
    fingerprint: str = ""
    role: str = ADMIN
    peer_ip: str = ""
    mode: str = "cli"
    comment: str = ""


class Sink:
    """Where a command's output goes: ``out(line)``, ``err(line)``; ``width``
    (columns of the admin's terminal, None without one)."""

    width = None

    def __init__(self, out, err, width=None):
        self._out = out
        self._err = err
        self.width = width

    def out(self, line):
        self._out(line)

    def err(self, line):
        self._err(line)


class Context:
    """What a command works on, and how it talks to its caller.

    ``cfg``: the Config; ``users``, ``aliases``, ``directory``, ``dkim``
    (KeyStore), ``suspensions``: the files; ``queue`` (QueueAdmin),
    ``state`` (appliance.admin.service.AdminState: uptime, listeners,
    counters, TLS) exist only in the running server (``online``).
    ``ldap_users`` (appliance.admin.userinfo.LdapUsers) reads the users of
    an LDAP directory (``[auth] backend = ldap``; the offline CLI makes its
    own when it needs one).
    ``blocking(f, *args) -> Deferred`` runs file, hash and key work (a
    thread in the server; a direct call offline). ``read_secret(prompt)``
    and ``confirm(question)`` return Deferreds; ``cancelled`` fires when the
    caller goes away (ends ``log tail --follow``).
    """

    def __init__(self, cfg, sink, *, users=None, aliases=None, directory=None, dkim=None,
                 suspensions=None, queue=None, state=None, blocking=None,
                 identity=Identity(), read_secret=None, confirm=None, interactive=False,
                 audit=False, clock=None, cooperate=None, ldap_users=None):
        self.cfg = cfg
        self.ldap_users = ldap_users
        self.sink = sink
        self.users = users
        self.aliases = aliases
        self.directory = directory
        self.dkim = dkim
        self.suspensions = suspensions
        self.queue = queue
        self.state = state
        self.blocking = blocking or _direct
        self.identity = identity
        self._read_secret = read_secret
        self._confirm = confirm
        self.interactive = interactive
        self.audit = audit
        self.clock = clock
        self._cooperate = cooperate
        self.cancelled = defer.Deferred()

    @property
    def online(self):
        return self.state is not None

    def out(self, line=""):
        self.sink.out(safe(line))

    def raw(self, line):
        """A line that is already safe (JSON from ``json_line``, tables)."""
        self.sink.out(line)

    def err(self, line):
        self.sink.err(safe(line))

    def read_secret(self, prompt):
        if self._read_secret is None:
            return defer.fail(Failed("no way to read a password here"))
        return defer.maybeDeferred(self._read_secret, prompt)

    def confirm(self, question):
        if self._confirm is None or not self.interactive:
            return defer.succeed(False)
        return defer.maybeDeferred(self._confirm, question)

    def json(self, value):
        self.sink.out(json_line(value))

    def table(self, columns, rows):
        for line in table(columns, rows, self.sink.width):
            self.sink.out(line)

    def stream(self, steps):
        """Run the generator ``steps`` (it yields between chunks of output):
        in the server a few rows per reactor turn (a long listing never
        holds the reactor), elsewhere at once. Deferred[None]."""
        if self._cooperate is None:
            for _ in steps:
                pass
            return defer.succeed(None)
        return self._cooperate(steps).whenDone()

    def seconds(self):
        return self.clock.seconds() if self.clock is not None else time.time()


def _direct(f, *args, **kwargs):
    return defer.maybeDeferred(f, *args, **kwargs)


# ---------------------------------------------------------------------------
# The table of commands

@dataclasses.dataclass(frozen=True)
class Arg:
    """One argument: ``name`` is a positional (``id``) or an option (``--sender``)."""

    name: str
    help: str
    nargs: object = None
    flag: bool = False
    metavar: str = None
    complete: str = None        # what Tab offers: queue_id, user, alias, domain, selector
    type: object = None
    choices: tuple = None


# Arguments several commands take.
A_USER = Arg("address", "the user", metavar="ADDRESS", complete="user")
AN_ALIAS = Arg("address", "the alias", metavar="ADDRESS", complete="alias")
HOW_MANY = Arg("count", "how many", nargs="?", type=int, metavar="N")


@dataclasses.dataclass
class Command:
    words: tuple
    summary: str
    run: object
    args: tuple = ()
    readonly: bool = False
    offline: bool = False       # the CLI runs it without the server
    online: bool = False        # needs the running server (queue, status, log ...)
    lists: bool = False         # takes --json
    aliases: tuple = ()         # other word tuples that name it (SPEC names)
    hidden: bool = False

    @property
    def name(self):
        return " ".join(self.words)

    def parser(self):
        parser = _Parser(prog=self.name, description=self.summary, add_help=False)
        for arg in self.args:
            kwargs = {"help": arg.help}
            if arg.flag:
                kwargs["action"] = "store_true"
            else:
                if arg.nargs is not None:
                    kwargs["nargs"] = arg.nargs
                if arg.metavar:
                    kwargs["metavar"] = arg.metavar
                if arg.type is not None:
                    kwargs["type"] = arg.type
                if arg.choices:
                    kwargs["choices"] = arg.choices
            parser.add_argument(arg.name, **kwargs)
        if self.lists:
            parser.add_argument("--json", action="store_true",
                                help="one JSON document (for scripts)")
        return parser

    def usage(self):
        parts = [self.name]
        for arg in self.args:
            shown = arg.metavar or (arg.name if arg.name.startswith("-") else arg.name.upper())
            if arg.name.startswith("-"):
                shown = arg.name if arg.flag else f"{arg.name} {arg.metavar or 'VALUE'}"
                parts.append(f"[{shown}]")
            elif arg.nargs in ("*", "?"):
                parts.append(f"[{shown}...]" if arg.nargs == "*" else f"[{shown}]")
            elif arg.nargs == "+":
                parts.append(f"{shown}...")
            else:
                parts.append(shown)
        if self.lists:
            parts.append("[--json]")
        return " ".join(parts)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")

    def exit(self, status=0, message=None):
        raise UsageError(message or self.prog)


COMMANDS = {}           # words tuple -> Command (aliases included)
ORDER = []              # the commands in help order (no aliases)
DESTRUCTIVE = {"delete", "del", "remove"}


def command(words, summary, *, args=(), readonly=False, offline=False, online=False,
            lists=False, aliases=(), hidden=False):
    def register(run):
        if inspect.isgeneratorfunction(run):    # yields Deferreds: one inlineCallbacks here
            run = defer.inlineCallbacks(run)
        cmd = Command(tuple(words.split()), summary, run, tuple(args), readonly, offline,
                      online, lists, tuple(tuple(a.split()) for a in aliases), hidden)
        for key in (cmd.words,) + cmd.aliases:
            COMMANDS[key] = cmd
        ORDER.append(cmd)
        return run
    return register


def nouns():
    return sorted({words[0] for words in COMMANDS})


def resolve(argv):
    """``(Command, rest of argv)`` for the words in ``argv``; unique prefixes
    of nouns and of read-only verbs are accepted (``q l`` = ``queue list``),
    destructive verbs must be spelled out. UsageError / LookupError."""
    if not argv:
        raise LookupError("")
    for length in (2, 1):
        key = tuple(argv[:length])
        if key in COMMANDS:
            return COMMANDS[key], list(argv[length:])
    noun = _unique(argv[0], nouns())
    if noun is None:
        raise LookupError(argv[0])
    if (noun,) in COMMANDS:
        return COMMANDS[(noun,)], list(argv[1:])
    verbs = sorted(words[1] for words in COMMANDS if len(words) == 2 and words[0] == noun)
    if len(argv) < 2:
        raise UsageError(f"{noun}: which one? {', '.join(verbs)}")
    verb = argv[1] if argv[1] in verbs else _unique(argv[1], verbs)
    if verb is None:
        raise UsageError(f"{noun}: unknown {argv[1]!r} (one of {', '.join(verbs)})")
    cmd = COMMANDS[(noun, verb)]
    if verb != argv[1] and verb in DESTRUCTIVE:
        raise UsageError(f"{noun} {verb}: spell out {verb!r} (destructive)")
    return cmd, list(argv[2:])


def _unique(prefix, names):
    if prefix in names:
        return prefix
    found = [n for n in names if n.startswith(prefix)]
    return found[0] if len(found) == 1 else None


# ---------------------------------------------------------------------------
# Running one command

def dispatch(argv, ctx):
    """Run the command ``argv`` (a list of words) in ``ctx``: Deferred[exit code].
    Never fails: every error becomes a line on ``ctx.err`` and a code."""
    started = time.monotonic()
    shown = _redacted(argv, None)
    try:
        cmd, rest = resolve(argv)
        if ctx.identity.role != ADMIN and not cmd.readonly:
            shown = list(cmd.words) + (["…"] if rest else [])
            raise Denied(f"{cmd.name}: not allowed for a read-only key")
        shown = _redacted(argv, cmd)
        args = cmd.parser().parse_args(rest)
        if cmd.online and not ctx.online:
            raise NeedsServer(f"{cmd.name}: needs the running server")
        d = defer.maybeDeferred(cmd.run, ctx, args)
    except LookupError as exc:
        word = str(exc.args[0]) if exc.args else ""
        if word:
            ctx.err(f"error: unknown command {word!r} (try help)")
        d = defer.succeed(EXIT_UNKNOWN)
        shown = argv[:1]
    except UsageError as exc:
        ctx.err(f"error: {exc}")
        d = defer.succeed(EXIT_USAGE)
        shown = shown[:2] + (["…"] if len(argv) > 2 else [])
    except Denied as exc:
        ctx.err(f"error: {exc}")
        d = defer.succeed(EXIT_DENIED)
    except Exception as exc:  # noqa: BLE001 - one line, a code
        d = defer.fail(exc)
    d.addErrback(_failed, ctx)
    d.addCallback(_ended, ctx, shown, started)
    return d


def _failed(failure, ctx):
    error = failure.value
    if failure.check(Denied):
        ctx.err(f"error: {error}")
        return EXIT_DENIED
    if failure.check(UsageError):
        ctx.err(f"error: {error}")
        return EXIT_USAGE
    if failure.check(configmod.ConfigError):
        for problem in error.problems:
            ctx.err(f"error: {problem}")
        return EXIT_USAGE
    if failure.check(Failed, UsersError, KeyStoreError, QueueError, DirectoryUnavailable):
        ctx.err(f"error: {error}")
        return EXIT_FAILED
    if failure.check(OSError):
        where = f"{error.filename}: " if error.filename else ""
        ctx.err(f"error: {where}{error.strerror or error}")
        return EXIT_FAILED
    if failure.check(defer.CancelledError):
        ctx.err("error: interrupted")
        return EXIT_FAILED
    ctx.err(f"error: internal error: {type(error).__name__}: {error}")
    return EXIT_FAILED


def _ended(rc, ctx, shown, started):
    rc = EXIT_OK if rc is None else rc
    if ctx.audit:
        who = ctx.identity
        events.emit("admin.command", user=who.user, key_fingerprint=who.fingerprint,
                    role=who.role, peer_ip=who.peer_ip, mode=who.mode,
                    command=" ".join(shown), rc=rc,
                    ms=round((time.monotonic() - started) * 1000, 1))
    return rc


SECRET_OPTIONS = ("--password", "--secret", "--token")


def _redacted(argv, cmd):
    """The words to audit: as typed, but a value after a secret-looking
    option is hidden, and a command that did not resolve keeps only its
    first word (a password typed in the wrong place stays out of the log)."""
    if cmd is None:
        return list(argv[:1])
    shown, hide = [], False
    for word in argv:
        if hide:
            shown.append("***")
            hide = False
            continue
        name = word.split("=", 1)[0]
        if name in SECRET_OPTIONS:
            shown.append(name + ("=***" if "=" in word else ""))
            hide = "=" not in word
            continue
        shown.append(word)
    return shown


# ---------------------------------------------------------------------------
# help

@command("help", "list the commands, or explain one: help queue delete",
         args=(Arg("words", "a command", nargs="*", complete="command"),),
         readonly=True, offline=True, aliases=("?",))
def cmd_help(ctx, args):
    if args.words:
        try:
            cmd, _ = resolve(args.words)
        except LookupError:
            cmd = None
        except UsageError:
            cmd = None
        if cmd is None or len(args.words) == 1 and (args.words[0],) not in COMMANDS:
            matches = [c for c in ORDER if c.words[0] == args.words[0] and not c.hidden]
            if not matches:
                raise Failed(f"no command {' '.join(args.words)!r} (try help)")
            ctx.table(("command", "does"), [(c.name, c.summary) for c in matches])
            return EXIT_OK
        ctx.out(f"usage: {cmd.usage()}")
        ctx.out(cmd.summary + ("" if cmd.readonly else "  (changes things: admin keys only)"))
        for arg in cmd.args:
            ctx.out(f"  {arg.name:<18} {arg.help}")
        if cmd.lists:
            ctx.out(f"  {'--json':<18} one JSON document (for scripts)")
        if cmd.aliases:
            ctx.out("also: " + ", ".join(" ".join(a) for a in cmd.aliases))
        return EXIT_OK
    rows = [(c.name, c.summary + (f" (also: {', '.join(' '.join(a) for a in c.aliases)})"
                                   if c.aliases else ""))
            for c in ORDER if not c.hidden]
    ctx.table(("command", "does"), rows)
    ctx.out("help COMMAND shows its arguments.")
    if ctx.identity.role != ADMIN:
        ctx.out("(read-only key: only commands that change nothing will run)")


# ---------------------------------------------------------------------------
# status

@command("status", "uptime, listeners, connections, queue, messages in/out today, alerts",
         readonly=True, online=True, lists=True, aliases=("server status",))
def cmd_status(ctx, args):
    info = ctx.state.status()
    if args.json:
        ctx.json(info)
        return EXIT_OK
    queue = info["queue"]
    ctx.out(f"mailappliance {info['version']} on {info['hostname']}, "
            f"up {duration(info['uptime'])}")
    ctx.out(f"queue: {queue['messages']} messages ({queue['deferred']} deferred, "
            f"{queue['held']} held), oldest {duration(queue['oldest_age'])}")
    ctx.out(f"today: {info['today']['in']} in, {info['today']['out']} out; "
            f"{info['connections']} connections open")
    ctx.table(("listener", "address", "connections"),
              [(lst["name"], lst["address"],
                "" if lst["connections"] is None else lst["connections"])
               for lst in info["listeners"]])
    for alert in info.get("alerts", ()):
        ctx.out(f"alert #{alert['alert_id']}: {alert['text']}")
    for warning in info["warnings"]:
        ctx.out(f"warning: {warning}")


# ---------------------------------------------------------------------------
# users

def _ldap_backend(ctx):
    return ctx.cfg.auth.backend == "ldap"


def _file_users(ctx, verb):
    """The users file, for the commands that change users; with LDAP the
    directory is managed elsewhere (as doveadm says of an LDAP userdb)."""
    if _ldap_backend(ctx):
        raise Failed(f"user {verb}: the users live in the LDAP directory "
                     f"{ctx.cfg.auth.ldap_url} ([auth] backend = ldap) and are managed "
                     "there; here user list and user show read it")
    return ctx.users


def _ldap_users(ctx):
    """The LDAP directory's users: the server's, or (offline CLI) our own."""
    if ctx.ldap_users is None:
        if ctx.online:
            raise Failed("the LDAP directory is not set up in this server")
        from appliance.auth.ldap import LdapConfigError
        try:
            ctx.ldap_users = LdapUsers.offline(ctx.cfg)
        except LdapConfigError as exc:
            raise Failed(str(exc)) from None
    return ctx.ldap_users


def _local_address(ctx, address):
    key = alias_key(address)
    domain = domain_of(key)
    if not ctx.directory.is_local_domain(domain):
        raise Failed(f"{domain} is not one of the local domains ([server] domains)")
    return key


@defer.inlineCallbacks
def _store_password(ctx, write, address):
    """Read a password from the caller (stdin or a prompt), hash it and
    store the hash with ``write(address, hash)``."""
    password = yield ctx.read_secret("Password: ")
    if not password:
        raise Failed("empty password refused")
    hashed = yield ctx.blocking(hash_password, password)
    yield ctx.blocking(write, address, hashed)


PASSWORD_STDIN = Arg("--password-stdin", "read the password from the first line of stdin",
                     flag=True)


def _suspended(ctx):
    return ctx.suspensions.list() if ctx.suspensions is not None else {}


@command("user list", "list the users (the users file, or the LDAP directory read-only), "
         "suspended ones marked",
         args=(Arg("--domain", "only this domain", metavar="DOMAIN", complete="domain"),),
         readonly=True, offline=True, lists=True)
def cmd_user_list(ctx, args):
    domain = canonical_domain(args.domain) if args.domain else None
    suspended = _suspended(ctx)
    warning = None
    if _ldap_backend(ctx):
        accounts, warning = yield _ldap_users(ctx).list()
        rows = [{"address": a.address, "alternates": list(a.addresses[1:]),
                 "suspended": a.address in suspended} for a in accounts
                if domain is None or domain_of(a.address) == domain]
    else:
        rows = [{"address": address, "suspended": address in suspended}
                for address in ctx.users.list()
                if domain is None or domain_of(address) == domain]
    if args.json:
        ctx.json(rows)
    else:
        for row in rows:
            also = row.get("alternates")
            ctx.out(row["address"] + (f"  (also: {', '.join(also)})" if also else "")
                    + ("  (suspended)" if row["suspended"] else ""))
    if warning:
        ctx.err(f"warning: {warning}")


def _one_entry(ldap, address, entries):
    if not entries:
        raise Failed(f"{address}: no such user in {ldap.url}")
    if len(entries) > 1:
        raise Failed(f"{address}: ambiguous, several entries of {ldap.url} hold it: "
                     + ", ".join(e["dn"] for e in entries))
    [entry] = entries
    if not entry["addresses"]:
        raise Failed(f"{address}: the entry {entry['dn']} holds no address")
    return entry


@defer.inlineCallbacks
def _ldap_mailbox(ctx, address):
    """The primary address of the one LDAP entry holding ``address``."""
    ldap = _ldap_users(ctx)
    entries = yield ldap.describe(address)
    return _one_entry(ldap, address, entries)["addresses"][0]


@command("user show", "one user: its addresses, the aliases that reach it, suspended or "
         "not, its mailbox's size",
         args=(Arg("address", "the user (with LDAP: any of its addresses)", metavar="ADDRESS",
                   complete="user"),),
         readonly=True, offline=True, lists=True)
def cmd_user_show(ctx, args):
    address = canonical_address(args.address)
    info = {"address": address, "backend": ctx.cfg.auth.backend}
    if _ldap_backend(ctx):
        ldap = _ldap_users(ctx)
        entries = yield ldap.describe(address)
        entry = _one_entry(ldap, address, entries)
        info["address"] = entry["addresses"][0]
        info["dn"] = entry["dn"]
        info["alternates"] = entry["addresses"][1:]
    else:
        if ctx.users.lookup(address) is None:
            raise Failed(f"{address} does not exist")
        info["alternates"] = []
    mailbox = info["address"]
    info["suspended_since"] = _suspended(ctx).get(mailbox)
    info["aliases"] = [{"address": a, "targets": t} for a, t in
                       aliases_of(ctx.aliases, [mailbox] + info["alternates"])]
    info["mailbox"] = yield ctx.blocking(
        mailbox_usage, os.path.join(ctx.cfg.server.data_dir, "mail"), mailbox)
    if args.json:
        ctx.json(info)
        return EXIT_OK
    ctx.out(f"user:       {info['address']}")
    if "dn" in info:
        ctx.out(f"entry:      {info['dn']} ({ctx.ldap_users.url})")
    if info["alternates"]:
        ctx.out(f"also:       {', '.join(info['alternates'])}")
    for alias in info["aliases"]:
        ctx.out(f"alias:      {alias['address']} -> {', '.join(alias['targets'])}")
    since = info["suspended_since"]
    ctx.out("suspended:  " + ("no" if since is None else
                              f"yes, for {duration(ctx.seconds() - since)}"))
    box = info["mailbox"]
    if box["exists"]:
        more = "" if box["complete"] else " (at least: counting stopped)"
        folders = f" in the inbox and {box['folders']} folders" if box["folders"] else ""
        ctx.out(f"mailbox:    {box['messages']} messages, {size(box['bytes'])}{folders}"
                f"{more}")
    else:
        ctx.out("mailbox:    empty (nothing delivered yet)")


@command("user add", "add a user; the password comes from stdin or a prompt, never argv",
         args=(Arg("address", "user@local.domain", metavar="ADDRESS"),
               PASSWORD_STDIN,
               Arg("--if-missing", "if the user exists, leave it as it is and exit 0 (no "
                   "password is asked for)", flag=True)),
         offline=True)
def cmd_user_add(ctx, args):
    users = _file_users(ctx, "add")
    address = _local_address(ctx, canonical_address(args.address))
    if users.lookup(address) is not None:
        if args.if_missing:
            ctx.out(f"user exists, unchanged: {address}")
            return EXIT_OK
        raise Failed(f"{address} already exists")
    yield _store_password(ctx, users.add, address)
    ctx.out(f"user added: {address}")


@command("user passwd", "set a new password (stdin or a prompt)",
         args=(A_USER, PASSWORD_STDIN), offline=True)
def cmd_user_passwd(ctx, args):
    users = _file_users(ctx, "passwd")
    address = canonical_address(args.address)
    if users.lookup(address) is None:
        raise Failed(f"{address} does not exist")
    yield _store_password(ctx, users.set_hash, address)
    ctx.out(f"password changed: {address}")


@command("user del", "delete a user (its mail stays on disk)",
         args=(A_USER,), offline=True, aliases=("user delete",))
def cmd_user_del(ctx, args):
    users = _file_users(ctx, "del")
    address = canonical_address(args.address)
    yield ctx.blocking(users.delete, address)
    if ctx.suspensions is not None and address in ctx.suspensions.list():
        yield ctx.blocking(ctx.suspensions.resume, address)
    ctx.out(f"user deleted: {address}")


@command("user suspend", "refuse the user's logins and hold its queued outbound mail",
         args=(A_USER,), online=True)
def cmd_user_suspend(ctx, args):
    address = canonical_address(args.address)
    if _ldap_backend(ctx):
        address = yield _ldap_mailbox(ctx, address)     # the entry's own address
    elif ctx.users.lookup(address) is None:
        raise Failed(f"{address} does not exist")
    held = yield _set_suspended(ctx, address, True)
    ctx.out(f"suspended: {address} (logins refused; {held} queued messages held)")


@command("user resume", "undo suspend: logins work again, its held mail is released",
         args=(A_USER,), online=True)
def cmd_user_resume(ctx, args):
    address = canonical_address(args.address)
    if address not in ctx.suspensions.list() and _ldap_backend(ctx):
        address = yield _ldap_mailbox(ctx, address)     # named by another of its addresses
    if address not in ctx.suspensions.list():
        raise Failed(f"{address} is not suspended")
    released = yield _set_suspended(ctx, address, False)
    ctx.out(f"resumed: {address} ({released} messages released)")


def _outbound_of(ctx, address):
    """Queued messages the user sent: submitted by it, or with it as sender."""
    mine = set(ctx.queue.select(auth_user=address)) | set(ctx.queue.select(sender=address))
    return sorted(mine)


@defer.inlineCallbacks
def _set_suspended(ctx, address, suspended):
    """Suspend ``address`` and hold the mail it queued, or resume it and
    release its held mail; -> how many messages were held or released."""
    if suspended:
        yield ctx.blocking(ctx.suspensions.suspend, address, ctx.seconds())
        qids = _outbound_of(ctx, address)
    else:
        yield ctx.blocking(ctx.suspensions.resume, address)
        qids = [q for q in _outbound_of(ctx, address) if ctx.queue.entry(q).held]
    done = yield _hold_all(ctx, qids, hold=suspended)
    return done


@defer.inlineCallbacks
def _hold_all(ctx, qids, hold):
    done = 0
    for qid in qids:
        try:
            yield (ctx.queue.hold if hold else ctx.queue.release)(qid)
            done += 1
        except QueueError:
            pass                    # gone meanwhile (delivered)
    return done


# ---------------------------------------------------------------------------
# aliases

@command("alias list", "list the aliases; @domain is a catch-all",
         readonly=True, offline=True, lists=True)
def cmd_alias_list(ctx, args):
    found = list(ctx.aliases.list())
    if args.json:
        ctx.json([{"address": a, "targets": list(t)} for a, t in found])
    else:
        for address, targets in found:
            ctx.out(f"{address}: {', '.join(targets)}")


@command("alias add", "add an alias (or more targets to one); @domain is the catch-all",
         args=(AN_ALIAS,
               Arg("targets", "where its mail goes", nargs="+", metavar="TARGET")),
         offline=True)
def cmd_alias_add(ctx, args):
    address = _local_address(ctx, args.address)
    yield ctx.blocking(ctx.aliases.add, address, args.targets)
    ctx.out(f"alias {address}: {', '.join(ctx.aliases.targets(address))}")


@command("alias del", "delete an alias",
         args=(AN_ALIAS,),
         offline=True, aliases=("alias delete",))
def cmd_alias_del(ctx, args):
    address = alias_key(args.address)
    yield ctx.blocking(ctx.aliases.delete, address)
    ctx.out(f"alias deleted: {address}")


# ---------------------------------------------------------------------------
# queue

_FILTERS = (Arg("--sender", "messages from this sender (ADDRESS or @DOMAIN)",
                metavar="ADDRESS"),
            Arg("--domain", "messages with a recipient in this domain", metavar="DOMAIN"),
            Arg("--all", "every message", flag=True))


def _state_of(row):
    if row["held"]:
        return "held"
    states = {r["state"] for r in row["recipients"]}
    if "deferred" in states:
        return "deferred"
    if "pending" in states:
        return "active"
    return "/".join(sorted(states)) or "-"


def _queue_line(row, width):
    rcpts = ",".join(r["address"] for r in row["recipients"])
    line = (f"{row['queue_id']:<22} {_state_of(row):<8} {size(row['size']):>7} "
            f"{duration(row['age']):>6}  {safe(row['sender'] or '<>')} -> {safe(rcpts)}")
    if row["last_error"]:
        line += f"  ({safe(row['last_error'])})"
    if width and len(line) > width:
        line = line[:max(1, width - 1)] + "…"
    return line


@command("queue list", "the queued messages, oldest first (like postqueue -p)",
         args=(Arg("--sender", "only from this sender (ADDRESS or @DOMAIN)", metavar="ADDRESS"),
               Arg("--domain", "only with a recipient in this domain", metavar="DOMAIN"),
               Arg("--held", "only held messages", flag=True)),
         readonly=True, online=True, lists=True, aliases=("mailq",))
def cmd_queue_list(ctx, args):
    queue = ctx.queue
    if args.sender or args.domain or args.held:
        wanted = set(queue.select(sender=args.sender, domain=args.domain,
                                  held=True if args.held else None))
        rows = (r for r in queue.iter_list() if r["queue_id"] in wanted)
    else:
        rows = queue.iter_list()
    state = {"n": 0}
    if args.json:
        ctx.raw("[")
    else:
        ctx.raw(f"{'ID':<22} {'STATE':<8} {'SIZE':>7} {'AGE':>6}  SENDER -> RECIPIENTS")

    def lines():
        for row in rows:
            if args.json:
                prefix = "," if state["n"] else ""
                ctx.raw(prefix + json_line(row))
            else:
                ctx.raw(_queue_line(row, ctx.sink.width))
            state["n"] += 1
            if state["n"] % STREAM_CHUNK == 0:
                yield None          # let the reactor (and the output) move

    def done(_):
        if args.json:
            ctx.raw("]")
        else:
            ctx.out(f"-- {state['n']} messages")
        return EXIT_OK
    return ctx.stream(lines()).addCallback(done)


@command("queue show", "one message: envelope, each recipient's state, its headers",
         args=(Arg("id", "queue id", metavar="ID", complete="queue_id"),),
         readonly=True, online=True, lists=True)
def cmd_queue_show(ctx, args):
    info = yield ctx.queue.show(args.id)
    if args.json:
        ctx.json(info)
        return EXIT_OK
    env = info["envelope"]
    ctx.out(f"queue id:  {info['queue_id']}{'  (held)' if info['held'] else ''}")
    ctx.out(f"sender:    {env['sender'] or '<>'}")
    ctx.out(f"size:      {info['size']} bytes, age {duration(info['age'])}")
    ctx.out(f"received:  from {env.get('peer_ip', '')} helo {env.get('helo', '')} "
            f"on {env.get('listener', '')}"
            + (f" as {env['auth_user']}" if env.get("auth_user") else ""))
    ctx.table(("recipient", "state", "tries", "last error"),
              [(r["address"], r["state"], r["attempts"], r["last_error"])
               for r in info["recipients"]])
    ctx.out("")
    for line in info["headers"].splitlines():
        ctx.out(line)


def _chosen(ctx, args, verb, allow_ids=True):
    """The queue ids a bulk verb works on, and whether a filter chose them."""
    ids = list(getattr(args, "ids", None) or [])
    if ids == ["ALL"]:
        ids, args.all = [], True
    filtered = bool(args.sender or args.domain or args.all)
    if ids and filtered:
        raise UsageError(f"queue {verb}: give IDs or a filter (--sender, --domain, --all), "
                         "not both")
    if not ids and not filtered:
        raise UsageError(f"queue {verb}: which messages? IDs, --sender, --domain or --all")
    if ids:
        for qid in ids:
            ctx.queue.entry(qid)        # QueueError for an unknown one, before any change
        return ids, False
    if args.all:
        return ctx.queue.ids(), True
    return ctx.queue.select(sender=args.sender, domain=args.domain), True


@defer.inlineCallbacks
def _bulk(ctx, args, verb, action, confirm=False):
    qids, filtered = _chosen(ctx, args, verb)
    if filtered and not qids:
        ctx.out("no message matches")
        return EXIT_OK
    if filtered and (confirm or getattr(args, "dry_run", False)):
        ctx.out(f"{len(qids)} messages match:")
        for qid in qids[:20]:
            ctx.raw(_queue_line(ctx.queue.entry(qid).summary(ctx.seconds()), ctx.sink.width))
        if len(qids) > 20:
            ctx.out(f"... and {len(qids) - 20} more")
        if getattr(args, "dry_run", False):
            ctx.out(f"(dry run: nothing {verb}d)")
            return EXIT_OK
        if not args.yes:
            ok = yield ctx.confirm(f"{verb} {len(qids)} messages? [y/N] ")
            if not ok:
                if ctx.interactive:
                    ctx.out("nothing changed")
                    return EXIT_OK
                ctx.err(f"error: nothing changed: add --yes to {verb} these {len(qids)} "
                        "messages")
                return EXIT_FAILED
    done, failed = 0, 0
    for qid in qids:
        try:
            yield action(qid)
            done += 1
        except QueueError as exc:
            failed += 1
            ctx.err(f"error: {exc}")
    past = {"hold": "held", "release": "released", "delete": "deleted",
            "retry": "retried"}[verb]
    ctx.out(f"{past}: {done} messages" + (f", {failed} failed" if failed else ""))
    if failed:
        return EXIT_PARTIAL if done else EXIT_FAILED
    return EXIT_OK


_IDS = Arg("ids", "queue ids", nargs="*", metavar="ID", complete="queue_id")


@command("queue hold", "stop delivering messages until released (postsuper -h)",
         args=(_IDS,) + _FILTERS, online=True)
def cmd_queue_hold(ctx, args):
    return _bulk(ctx, args, "hold", ctx.queue.hold)


@command("queue release", "release held messages (postsuper -H)",
         args=(_IDS,) + _FILTERS, online=True)
def cmd_queue_release(ctx, args):
    return _bulk(ctx, args, "release", ctx.queue.release)


@command("queue retry", "attempt the deferred recipients now (postqueue -f / -i)",
         args=(_IDS,) + _FILTERS, online=True)
def cmd_queue_retry(ctx, args):
    if args.all and not args.ids:
        count = ctx.queue.retry()
        ctx.out(f"retried: {count} messages")
        return EXIT_OK
    return _bulk(ctx, args, "retry", lambda qid: defer.succeed(ctx.queue.retry(qid)))


@command("queue delete", "remove messages silently (postsuper -d); filters need --yes or y",
         args=(Arg("ids", "queue ids, or ALL", nargs="*", metavar="ID", complete="queue_id"),)
         + _FILTERS + (Arg("--yes", "do it without asking", flag=True),
                       Arg("--dry-run", "only list what would be deleted", flag=True)),
         online=True)
def cmd_queue_delete(ctx, args):
    return _bulk(ctx, args, "delete", ctx.queue.delete, confirm=True)


# ---------------------------------------------------------------------------
# DNS records and DKIM

@command("dns-records", "the DNS records to publish (zone-file syntax); --check looks them up",
         args=(Arg("--check", "look them up and say, per record, present, missing or "
                              "different (exit 1 unless all are present)", flag=True),),
         readonly=True, offline=True, aliases=("dns records",))
def cmd_dns_records(ctx, args):
    store = ctx.dkim
    made = yield _ensure_keys(ctx)
    notes = [f"new DKIM key: {k.dns_name} ({k.algorithm}): publish it" for k in made]
    text, ok = yield ctx.blocking(dnsrecords.report, ctx.cfg, store, args.check, None, notes)
    for line in text.rstrip("\n").split("\n"):
        ctx.out(line)
    return EXIT_OK if ok else EXIT_FAILED


@command("dkim list", "the DKIM keys: domain, selector, algorithm, state",
         args=(Arg("domain", "only this domain", nargs="?", complete="domain"),),
         readonly=True, offline=True, lists=True)
def cmd_dkim_list(ctx, args):
    yield _ensure_keys(ctx)
    keys = yield ctx.blocking(ctx.dkim.keys, args.domain)
    if args.json:
        ctx.json([k.to_json() for k in keys])
        return EXIT_OK
    for key in keys:
        ctx.out(f"{key.domain} {key.selector} {key.algorithm} {key.state}")


@defer.inlineCallbacks
def _ensure_keys(ctx):
    """Every local domain's first key made if missing (as the server does at start)."""
    made = yield ctx.blocking(ctx.dkim.ensure, ctx.cfg.server.domains)
    if made and ctx.online:
        announce(made)
    return made


def _known_domain(ctx, domain):
    if canonical_domain(domain) not in ctx.cfg.server.domains:
        raise Failed(f"{domain} is not one of the local domains ([server] domains)")
    return domain


@command("dkim rotate", "a new key under a new selector; the old one is kept (and "
         "published) until removed",
         args=(Arg("domain", "a local domain", metavar="DOMAIN", complete="domain"),),
         offline=True)
def cmd_dkim_rotate(ctx, args):
    domain = _known_domain(ctx, args.domain)
    yield _ensure_keys(ctx)
    made, retired = yield ctx.blocking(ctx.dkim.rotate, domain)
    if ctx.online:
        announce(made, retired)
    for key in retired:
        ctx.out(f"retired: {key.dns_name} (keep it published until you remove it)")
    for key in made:
        ctx.out(f"new key: {key.dns_name} ({key.algorithm}); publish:")
        ctx.out(dnsrecords.Record(key.dns_name + ".", "TXT", key.txt, "dkim").zone_line())


@command("dkim remove", "delete a retired key",
         args=(Arg("domain", "its domain", metavar="DOMAIN", complete="domain"),
               Arg("selector", "its selector", metavar="SELECTOR", complete="selector")),
         offline=True)
def cmd_dkim_remove(ctx, args):
    yield _ensure_keys(ctx)
    key = yield ctx.blocking(ctx.dkim.remove, args.domain, args.selector)
    ctx.out(f"removed: {key.dns_name} (its DNS record can go)")


# ---------------------------------------------------------------------------
# config, reload, log

@command("config check", "validate the configuration file on disk",
         readonly=True, offline=True, aliases=("check-config",))
def cmd_config_check(ctx, args):
    path = ctx.cfg.path
    cfg = yield ctx.blocking(configmod.load, path)
    ctx.out(f"config OK: {cfg.path}")
    if ctx.online and cfg != ctx.cfg:
        ctx.out("the file differs from the running configuration: restart to apply it")


@command("reload", "re-read users, aliases, suspensions, the TLS certificate and DKIM keys",
         online=True)
def cmd_reload(ctx, args):
    done = ctx.state.reload()
    for line in done:
        ctx.out(line)


def _tail_lines(path, count):
    """The last ``count`` lines of ``path`` (read from the end, not the whole file)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            end = handle.tell()
            block, data = 64 * 1024, b""
            while end > 0 and data.count(b"\n") <= count:
                start = max(0, end - block)
                handle.seek(start)
                data = handle.read(end - start) + data
                end = start
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-count:] if count else []


def _event_text(record):
    when = time.strftime("%H:%M:%S", time.localtime(record.get("ts", 0)))
    fields = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                      for k, v in record.items() if k not in ("ts", "event"))
    return f"{when} {record.get('event', '?')} {fields}".rstrip()


@command("log tail", "the last events (default 20); --follow streams until Ctrl-C",
         args=(HOW_MANY,
               Arg("prefix", "only events whose name starts so (smtp., queue. ...)",
                   nargs="?", metavar="EVENT-PREFIX"),
               Arg("--follow", "keep streaming new events", flag=True)),
         readonly=True, online=True, lists=True)
def cmd_log_tail(ctx, args):
    import json
    count, prefix = args.count, args.prefix
    if count is None:
        count = 20
    if count < 0 or count > 100000:
        raise UsageError("log tail: N is 0 to 100000")
    wanted = (lambda name: name.startswith(prefix)) if prefix else (lambda name: True)

    def show(record):
        if args.json:
            ctx.json(record)
        else:
            ctx.out(_event_text(record))

    scan = count if not prefix else min(100000, count * 50)
    lines = yield ctx.blocking(_tail_lines, ctx.cfg.log.events, scan)
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and wanted(str(record.get("event", ""))):
            records.append(record)
    for record in records[-count:] if count else []:
        show(record)
    if not args.follow:
        return EXIT_OK

    def observe(event):
        record = events.as_record(event)
        if record is not None and wanted(record["event"]):
            show(record)
    events.add_observer(observe)
    try:
        yield ctx.cancelled
    except defer.CancelledError:
        pass
    finally:
        events.remove_observer(observe)


@command("server hostkey", "the SSH host key's fingerprint (check ssh's first-connect "
         "prompt against it)", readonly=True, offline=True, lists=True)
def cmd_server_hostkey(ctx, args):
    from twisted.conch.ssh import keys
    path = ctx.cfg.admin.host_key

    def read():
        with open(path, "rb") as handle:
            return keys.Key.fromString(handle.read()).public()
    try:
        key = yield ctx.blocking(read)
    except FileNotFoundError:
        raise Failed(f"no host key yet at {path} (the server makes it at its first start)")
    fingerprint = "SHA256:" + key.fingerprint(keys.FingerprintFormats.SHA256_BASE64).rstrip("=")
    if args.json:
        ctx.json({"type": key.sshType().decode(), "fingerprint": fingerprint, "path": path})
    else:
        ctx.out(f"{key.sshType().decode()} {fingerprint} ({path})")


# ---------------------------------------------------------------------------
# the auditor

@command("audit", "replay JSON event logs (plain or .gz) through the auditor's rules and "
         "print the findings (on this machine: mailappliance audit)",
         args=(Arg("logfiles", "event log files", nargs="+", metavar="LOGFILE"),),
         readonly=True, offline=True, lists=True)
def cmd_audit(ctx, args):
    if ctx.online:
        raise Failed("audit replays log files on this machine: run `mailappliance audit` "
                     "there")
    from appliance.audit.replay import ReplayError, run
    try:
        run(ctx.cfg, args.logfiles, args.json, ctx.raw if args.json else ctx.out)
    except ReplayError as exc:
        raise Failed(str(exc)) from None


def _auditor(ctx):
    auditor = ctx.state.part("auditor") if hasattr(ctx.state, "part") else None
    if auditor is None or getattr(auditor, "store", None) is None:
        raise Failed("the auditor is off ([audit] enabled = off)")
    return auditor.store


@command("alerts", "the auditor's latest findings, newest first (default 20)",
         args=(HOW_MANY,),
         readonly=True, online=True, lists=True, aliases=("audit alerts",))
def cmd_alerts(ctx, args):
    from appliance.audit.alerts import describe
    count = 20 if args.count is None else args.count
    if count < 0:
        raise UsageError("alerts: N is 0 or more")
    found = _auditor(ctx).latest(count)
    if args.json:
        ctx.json(found)
        return EXIT_OK
    for alert in found:
        ctx.out(f"#{alert['alert_id']} {'   ' if alert.get('acked') else 'new'} "
                f"{describe(alert)}")
    if not found:
        ctx.out("no alerts")


@command("alerts ack", "mark an alert as seen",
         args=(Arg("alert_id", "its number (alerts shows it)", type=int, metavar="ID"),),
         online=True)
def cmd_alerts_ack(ctx, args):
    if not _auditor(ctx).ack(args.alert_id):
        raise Failed(f"no alert #{args.alert_id}")
    ctx.out(f"acknowledged: #{args.alert_id}")


# ---------------------------------------------------------------------------
# the defences: bans, greylisting, limits (appliance.defence)

def _defences(ctx):
    defences = ctx.state.part("defences") if hasattr(ctx.state, "part") else None
    if defences is None:
        raise Failed("the defences are not running in this server")
    return defences


def _network_arg(text):
    from appliance.defence.network import parse_network
    try:
        return parse_network(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _ends(ctx, until):
    if until is None:
        return "never"
    return "in " + duration(until - ctx.seconds())


@command("bans list", "the networks banned on every listener, soonest end first",
         readonly=True, online=True, lists=True)
def cmd_bans_list(ctx, args):
    bans = _defences(ctx).bans
    rows = []
    for ban in bans.list():
        row = ban.as_dict()
        row["offences"] = bans.offences(ban.network)
        rows.append(row)
    if args.json:
        ctx.json(rows)
        return EXIT_OK
    if not rows:
        ctx.out("no bans")
        return EXIT_OK
    ctx.table(("network", "reason", "rule", "expires", "offences"),
              [(row["network"], row["reason"] or "", row["rule"] or "",
                _ends(ctx, row["until"]), row["offences"]) for row in rows])


@command("ban", "ban an address or network on every listener; without DURATION "
         "(30s, 5m, 2h, 5d) the escalating ban_time",
         args=(Arg("network", "the client address or network", metavar="IP|CIDR"),
               Arg("duration", "how long", nargs="?", metavar="DURATION")),
         online=True)
def cmd_ban(ctx, args):
    network = _network_arg(args.network)
    seconds = None
    if args.duration is not None:
        try:
            seconds = configmod.duration(args.duration)
        except ValueError as exc:
            raise UsageError(f"ban: {exc}") from None
        if seconds <= 0:
            raise UsageError("ban: DURATION must be longer than zero")
    who = ctx.identity.fingerprint or ctx.identity.user or ctx.identity.mode
    ban = _defences(ctx).bans.ban(network, duration=seconds, reason=f"admin {who}",
                                  rule="admin")
    if ban is None:
        raise Failed(f"{network.with_prefixlen} is in [limits] allow or "
                     "[relay] trusted_networks: never banned")
    ctx.out(f"banned: {ban.network}, ends {_ends(ctx, ban.until)}")


@command("unban", "lift the ban of exactly this address or network",
         args=(Arg("network", "as bans list shows it (an address: its client key)",
                   metavar="IP|CIDR"),),
         online=True)
def cmd_unban(ctx, args):
    network = _network_arg(args.network)
    bans = _defences(ctx).bans
    if not bans.unban(network, reason="admin"):
        raise Failed(f"not banned: {network.with_prefixlen}")
    ctx.out(f"unbanned: {network.with_prefixlen}")


@command("greylist list", "the client networks that pass greylisting, and the triplets "
         "waiting for a retry", readonly=True, online=True, lists=True)
def cmd_greylist_list(ctx, args):
    greylist = _defences(ctx).greylist
    networks = [{"network": network, "passes": passes, "expires": expires,
                 "passing": passes >= greylist.pass_after}
                for network, passes, expires in greylist.networks()]
    pending = [{"network": network, "sender": sender, "recipient": recipient,
                "first": first} for network, sender, recipient, first in greylist.pending()]
    if args.json:
        ctx.json({"enabled": greylist.enabled, "networks": networks, "pending": pending})
        return EXIT_OK
    if not greylist.enabled:
        ctx.out("greylisting is off ([checks] greylist)")
    if networks:
        ctx.table(("network", "passes", "state", "forgotten"),
                  [(n["network"], n["passes"], "passes" if n["passing"] else "learning",
                    _ends(ctx, n["expires"])) for n in networks])
    else:
        ctx.out("no client networks remembered")
    if pending:
        ctx.table(("network", "sender", "recipient", "first seen"),
                  [(p["network"], p["sender"] or "<>", p["recipient"],
                    duration(ctx.seconds() - (p["first"] or 0)) + " ago") for p in pending])


A_NETWORK = Arg("network", "an address (its /24 or IPv6 prefix) or a network",
                metavar="NETWORK")


def _greylist_change(ctx, verb, network):
    """``greylist.<verb>(network)``; a bad network is a usage error."""
    try:
        return getattr(_defences(ctx).greylist, verb)(network)
    except ValueError as exc:
        raise UsageError(f"greylist {verb}: {exc}") from None


@command("greylist allow", "this client network passes greylisting from now on",
         args=(A_NETWORK,), online=True)
def cmd_greylist_allow(ctx, args):
    network = _greylist_change(ctx, "allow", args.network)
    ctx.out(f"passes greylisting: {network}")


@command("greylist forget", "forget a client network and its triplets (greylisted anew)",
         args=(A_NETWORK,), online=True)
def cmd_greylist_forget(ctx, args):
    network, found = _greylist_change(ctx, "forget", args.network)
    if not found:
        raise Failed(f"greylisting knows nothing of {network}")
    ctx.out(f"forgotten: {network}")


@command("limits", "the current counters of a client address or a user against the limits",
         args=(Arg("who", "a client address or a user's address", metavar="IP|ADDRESS"),),
         readonly=True, online=True, lists=True)
def cmd_limits(ctx, args):
    from appliance.defence.network import client_key, normalise
    defences = _defences(ctx)
    limits = ctx.cfg.limits
    counters = []
    if "@" in args.who:
        user = args.who.strip().lower()
        info = {"user": user}
        for kind, (count, limit) in defences.rates.counts_of_user(user).items():
            counters.append({"counter": kind, "current": count, "limit": limit})
    else:
        ip = normalise(args.who)
        if ip is None:
            raise UsageError(f"limits: {args.who!r} is not an IP address or a user")
        ip = str(ip)
        ban = defences.bans.is_banned(ip)
        info = {"ip": ip, "network": client_key(ip, limits.ipv6_prefix),
                "exempt": defences.exempt.contains(ip),
                "denied": bool(defences.deny) and defences.deny.contains(ip),
                "ban": None if ban is None else ban.as_dict(),
                "offences": defences.bans.offences(ip)}
        counters.append({"counter": "connections_per_ip",
                         "current": defences.admission.open_from(ip),
                         "limit": limits.connections_per_ip})
        for kind, (count, limit) in defences.rates.counts_of_ip(ip).items():
            counters.append({"counter": kind, "current": count, "limit": limit})
        counters.append({"counter": "auth_failures", "current": defences.auth.failures(ip),
                         "limit": defences.auth.limit})
    info["counters"] = counters
    if args.json:
        ctx.json(info)
        return EXIT_OK
    ctx.table(("counter", "current", "limit"),
              [(c["counter"], _number(c["current"]), c["limit"]) for c in counters])
    if "ip" in info:
        if info["denied"]:
            ctx.out("denied: in [limits] deny")
        if info["exempt"]:
            ctx.out("exempt: in [limits] allow or [relay] trusted_networks (never limited)")
        ban = info["ban"]
        if ban is None:
            ctx.out(f"not banned (offences: {info['offences']})")
        else:
            ctx.out(f"banned: {ban['network']}, ends {_ends(ctx, ban['until'])} "
                    f"({ban['reason']}; offences: {info['offences']})")


def _number(value):
    return int(value) if float(value).is_integer() else round(value, 1)


# ---------------------------------------------------------------------------
# Tab completion of live values

def prepare_completion(ctx):
    """At the start of an interactive session: fetch in the background the
    values Tab offers that live elsewhere (the LDAP directory's users), so
    the first Tab finds them."""
    if ctx.ldap_users is not None:
        ctx.ldap_users.names()


def complete(ctx, line_words, partial):
    """Candidates for the word ``partial`` after ``line_words`` (the words
    before it): command words first, then the values an argument takes."""
    if not line_words:
        return sorted({w[0] for w in COMMANDS if w[0].startswith(partial)
                       and w[0] != "?"})
    if len(line_words) == 1 and (line_words[0],) not in COMMANDS or \
            len(line_words) == 1 and any(len(w) == 2 and w[0] == line_words[0]
                                         for w in COMMANDS):
        noun = _unique(line_words[0], nouns())
        verbs = sorted(w[1] for w in COMMANDS if len(w) == 2 and w[0] == noun
                       and w[1].startswith(partial))
        if verbs:
            return verbs
    try:
        cmd, rest = resolve(line_words)
    except (LookupError, UsageError):
        return []
    if cmd.words == ("help",):
        return complete(ctx, rest, partial)
    if partial.startswith("-"):
        options = [a.name for a in cmd.args if a.name.startswith("-")]
        if cmd.lists:
            options.append("--json")
        return sorted(o for o in options if o.startswith(partial))
    positional = [a for a in cmd.args if not a.name.startswith("-")]
    given = [w for w in rest if not w.startswith("-")]
    kind = None
    if positional:
        index = min(len(given), len(positional) - 1)
        if len(given) < len(positional) or positional[-1].nargs in ("*", "+"):
            kind = positional[index].complete
    return sorted(v for v in _values(ctx, kind, given) if v.startswith(partial))


def _values(ctx, kind, given):
    try:
        if kind == "queue_id" and ctx.queue is not None:
            return ctx.queue.ids()
        if kind == "user" and ctx.cfg.auth.backend == "ldap":
            return ctx.ldap_users.names() if ctx.ldap_users is not None else []
        if kind == "user" and ctx.users is not None:
            return ctx.users.list()
        if kind == "alias" and ctx.aliases is not None:
            return [a for a, _ in ctx.aliases.list()]
        if kind == "domain":
            return list(ctx.cfg.server.domains)
        if kind == "selector" and ctx.dkim is not None and given:
            return [k.selector for k in ctx.dkim.keys(given[0])]
        if kind == "command":
            return sorted({w[0] for w in COMMANDS})
    except Exception:  # noqa: BLE001 - completion never breaks the line
        return []
    return []


__all__ = ["COMMANDS", "ORDER", "Context", "Identity", "Sink", "dispatch", "complete",
           "resolve", "UsageError", "Failed", "Denied", "EXIT_OK", "EXIT_FAILED",
           "EXIT_USAGE", "EXIT_PARTIAL", "EXIT_DENIED", "EXIT_UNKNOWN"]

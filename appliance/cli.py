"""The ``mailappliance`` command: the admin command set on the machine itself.

Every command of the admin shell (``appliance.admin.commands``) works here.
The offline ones (``check-config``, ``user``, ``alias``, ``dkim``,
``dns-records``) run in this process on the files the config names, with or
without a server; the others (``status``, ``queue ...``, ``log tail``,
``reload`` ...) are sent to the running server over its control socket
(``appliance.admin.control``): a clear one-line error when it is not running.
With ``[auth] backend = ldap``, ``user list`` and ``user show`` ask the
running server (its LDAP connections, the same answer as the admin shell's)
and, when none runs, the directory itself from this process.

Exit codes: 0 success, 1 an operation failed (the user exists, the disk is
full ...), 2 bad usage or a bad config, 3 a bulk operation partly failed.
Every error is one line on stderr, ``mailappliance: <problem>``; never a
traceback.
"""

import getpass
import os
import shutil
import sys

from appliance import config as configmod
from appliance.admin import commands, control
from appliance.admin.commands import (EXIT_FAILED, EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE,
                                      COMMANDS, Context, Identity, Sink, UsageError)
from appliance.admin.suspend import Suspensions, suspensions_path
from appliance.directory import Directory
from appliance.policy.keys import KeyStore

PROG = "mailappliance"
DEFAULT_CONFIG = "/etc/mailappliance/mailappliance.ini"


class IO:
    """The outside world of a command, injectable for tests."""

    def __init__(self, stdin=None, stdout=None, stderr=None, getpass=getpass.getpass):
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.getpass = getpass

    def out(self, line):
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def err(self, line):
        if line.startswith("error: "):
            line = line[len("error: "):]
        self.stderr.write(f"{PROG}: {line}\n")

    def isatty(self):
        try:
            return self.stdin.isatty() and self.stdout.isatty()
        except (AttributeError, ValueError):
            return False


class Arguments:
    """The command line split: ``config`` (``--config F`` anywhere) and ``words``."""

    def __init__(self, config, words):
        self.config = config
        self.words = words


def parse_args(argv):
    """``--config F`` (or ``--config=F``) may come before or after the words."""
    config, words, i = DEFAULT_CONFIG, [], 0
    argv = list(argv)
    while i < len(argv):
        word = argv[i]
        if word == "--config":
            if i + 1 >= len(argv):
                raise UsageError("--config: expected one argument (a file)")
            config, i = argv[i + 1], i + 2
            continue
        if word.startswith("--config="):
            config = word.split("=", 1)[1]
        else:
            words.append(word)
        i += 1
    return Arguments(config, words)


def offline_context(cfg, io, password_stdin):
    """A command context over the config's files, no server."""
    directory = Directory.from_config(cfg)

    def read_secret(prompt):
        if password_stdin:
            line = io.stdin.readline()
            password = line[:-1] if line.endswith("\n") else line
            return password[:-1] if password.endswith("\r") else password
        password = io.getpass(prompt)
        if io.getpass(prompt.replace(":", " (again):", 1)) != password:
            raise commands.Failed("the two passwords differ")
        return password

    return Context(cfg, Sink(io.out, io.err), users=directory.users,
                   aliases=directory.aliases, directory=directory,
                   dkim=KeyStore.from_config(cfg),
                   suspensions=Suspensions(suspensions_path(cfg)),
                   identity=Identity(user=_login(), mode="cli"),
                   read_secret=read_secret, interactive=io.isatty())


def _login():
    try:
        return os.getlogin()
    except OSError:
        return str(os.getuid())


# Offline commands that, with LDAP, the running server answers when there is one.
LDAP_READS = {("user", "list"), ("user", "show")}


def _run_offline(cmd, args, io):
    cfg = configmod.load(args.config)
    if cmd.words in LDAP_READS and cfg.auth.backend == "ldap":
        try:
            return _run_online(args, io)
        except control.NotRunning:
            pass                        # then this process asks the directory
    ctx = offline_context(cfg, io, "--password-stdin" in args.words)
    try:
        return _finish(commands.dispatch(args.words, ctx))
    finally:
        if ctx.ldap_users is not None:
            ctx.ldap_users.close()


def _finish(d):
    """The exit code of an offline command's Deferred (it has fired: offline
    work is done in this thread)."""
    result = []
    d.addBoth(result.append)
    if not result:
        raise RuntimeError("offline command did not finish")
    return result[0]


def _run_online(args, io):
    cfg = configmod.load(args.config)
    path = control.default_path(cfg)
    interactive = io.isatty()
    width = shutil.get_terminal_size((0, 0)).columns if interactive else None

    def ask(question):
        io.stdout.write(question)
        io.stdout.flush()
        return io.stdin.readline().strip()

    return control.call(path, args.words, io.out, io.err, width=width or None,
                        ask=ask if interactive else None,
                        secret=io.getpass if interactive else None)


def main(argv=None, io=None):
    """Run the command line ``argv``; returns the exit code."""
    io = io or IO()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if not args.words or args.words[0] in ("-h", "--help"):
            if not args.words:
                raise UsageError("a command is required (try: mailappliance help)")
            args.words = ["help"]
        try:
            cmd, rest = commands.resolve(args.words)
        except LookupError:
            raise UsageError(f"unknown command {args.words[0]!r} "
                             "(try: mailappliance help)") from None
        if "-h" in rest or "--help" in rest:
            args.words, cmd = ["help"] + list(cmd.words), COMMANDS[("help",)]
        cmd.parser().parse_args(rest if cmd.words != ("help",) else [])  # usage before config
        if cmd.words == ("help",):
            ctx = Context(None, Sink(io.out, io.err))
            return _finish(commands.dispatch(args.words, ctx))
        if cmd.online:
            rc = _run_online(args, io)
        else:
            rc = _run_offline(cmd, args, io)
        return EXIT_USAGE if rc == EXIT_UNKNOWN else rc
    except UsageError as exc:
        io.err(str(exc))
        return EXIT_USAGE
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            io.err(problem)
        return EXIT_USAGE
    except control.NotRunning as exc:
        io.err(str(exc))
        return EXIT_FAILED
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        io.err(f"{where}{exc.strerror or exc}")
        return EXIT_FAILED
    except (KeyboardInterrupt, EOFError):
        io.err("interrupted")
        return EXIT_FAILED
    except Exception as exc:            # a bug: still one line, with its kind
        io.err(f"internal error: {type(exc).__name__}: {exc}")
        return EXIT_FAILED


__all__ = ["main", "IO", "parse_args", "PROG", "DEFAULT_CONFIG", "COMMANDS", "EXIT_OK"]


if __name__ == "__main__":
    sys.exit(main())

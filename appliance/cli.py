"""The ``mailappliance`` command: check the config, manage users, aliases and
DKIM keys, print the DNS records to publish.

Exit codes: 0 success, 1 an operation failed (the user exists, the disk is
full ...), 2 bad usage or a bad config. Every error is one line on stderr,
``mailappliance: <problem>``; never a traceback.
"""

import argparse
import getpass
import sys

from appliance import config as configmod
from appliance import dnsrecords
from appliance.auth.users import UsersError, canonical_address, hash_password
from appliance.directory import Directory, alias_key, canonical_domain, domain_of
from appliance.policy.keys import KeyStore, KeyStoreError

PROG = "mailappliance"
DEFAULT_CONFIG = "/etc/mailappliance/mailappliance.ini"

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line (exit 2)."""


class Failed(Exception):
    """The command could not do its work (exit 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage and exiting."""

    def error(self, message):
        raise UsageError(message)


# ---------------------------------------------------------------------------
# The command line

def build_parser():
    # --config is accepted before or after the command words: every
    # sub-parser knows it, with SUPPRESS so a later level never resets it
    # (the default is filled in by parse_args below, not set_defaults, which
    # would change the action shared by all levels).
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"configuration file (default {DEFAULT_CONFIG})")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Manage a mailappliance mail server.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND",
                                     parser_class=_Parser)
    commands.required = True

    check = commands.add_parser("check-config", parents=[common],
                                help="validate the configuration file")
    check.set_defaults(run=cmd_check_config)

    _user_commands(commands.add_parser("user", parents=[common],
                                       help="users of the file backend"), common)
    _alias_commands(commands.add_parser("alias", parents=[common],
                                        help="address aliases and catch-alls"), common)

    records = commands.add_parser("dns-records", parents=[common],
                                  help="print the DNS records to publish (zone-file syntax)")
    records.add_argument("--check", action="store_true",
                         help="look them up through [dns] and say, per record, present, "
                              "missing or different (exit 1 unless all are present)")
    records.set_defaults(run=cmd_dns_records)
    _dkim_commands(commands.add_parser("dkim", parents=[common], help="DKIM signing keys"),
                   common)
    audit = commands.add_parser("audit", parents=[common],
                                help="replay JSON event logs (plain or .gz) through the "
                                     "auditor's rules and print the findings")
    audit.add_argument("logfiles", nargs="+", metavar="LOGFILE")
    audit.add_argument("--json", action="store_true", help="one JSON document")
    audit.set_defaults(run=cmd_audit)
    return parser


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if not hasattr(args, "config"):
        args.config = DEFAULT_CONFIG
    return args


def _user_commands(user, common):
    sub = user.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    add = sub.add_parser("add", parents=[common], help="add a user")
    add.add_argument("address")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of stdin")
    add.add_argument("--if-missing", action="store_true",
                     help="if the user exists, leave it as it is and exit 0 "
                          "(no password is asked for)")
    add.set_defaults(run=cmd_user_add)
    passwd = sub.add_parser("passwd", parents=[common], help="set a new password")
    passwd.add_argument("address")
    passwd.add_argument("--password-stdin", action="store_true",
                        help="read the password from the first line of stdin")
    passwd.set_defaults(run=cmd_user_passwd)
    delete = sub.add_parser("del", parents=[common], help="delete a user")
    delete.add_argument("address")
    delete.set_defaults(run=cmd_user_del)
    listing = sub.add_parser("list", parents=[common], help="list the users")
    listing.set_defaults(run=cmd_user_list)


def _alias_commands(alias, common):
    sub = alias.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    add = sub.add_parser("add", parents=[common],
                         help="add an alias (or more targets to one); "
                              "@domain is the catch-all")
    add.add_argument("address")
    add.add_argument("targets", nargs="+", metavar="TARGET")
    add.set_defaults(run=cmd_alias_add)
    delete = sub.add_parser("del", parents=[common], help="delete an alias")
    delete.add_argument("address")
    delete.set_defaults(run=cmd_alias_del)
    listing = sub.add_parser("list", parents=[common], help="list the aliases")
    listing.set_defaults(run=cmd_alias_list)


def _dkim_commands(dkim, common):
    sub = dkim.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    listing = sub.add_parser("list", parents=[common], help="list the keys")
    listing.set_defaults(run=cmd_dkim_list)
    rotate = sub.add_parser("rotate", parents=[common],
                            help="a new key under a new selector; the old one is kept "
                                 "(and published) until removed")
    rotate.add_argument("domain")
    rotate.set_defaults(run=cmd_dkim_rotate)
    remove = sub.add_parser("remove", parents=[common], help="delete a retired key")
    remove.add_argument("domain")
    remove.add_argument("selector")
    remove.set_defaults(run=cmd_dkim_remove)


# ---------------------------------------------------------------------------
# Commands: each takes (args, io) and returns an exit code or raises.

class IO:
    """The outside world of a command, injectable for tests."""

    def __init__(self, stdin=None, stdout=None, stderr=None, getpass=getpass.getpass):
        self.stdin = stdin if stdin is not None else sys.stdin
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr
        self.getpass = getpass

    def out(self, line):
        self.stdout.write(line + "\n")

    def err(self, line):
        self.stderr.write(f"{PROG}: {line}\n")


def cmd_check_config(args, io):
    cfg = configmod.load(args.config)
    io.out(f"config OK: {cfg.path}")
    return EXIT_OK


def _file_directory(args):
    """The config's file-backed directory; refuse when users live in LDAP."""
    cfg = configmod.load(args.config)
    if cfg.auth.backend != "file":
        raise Failed(f"[auth] backend is {cfg.auth.backend}: manage users in the "
                     "directory server, not with this command")
    return cfg, Directory.from_config(cfg)


def _local_address(directory, address):
    key = alias_key(address)
    domain = domain_of(key)
    if not directory.is_local_domain(domain):
        raise Failed(f"{domain} is not one of the local domains ([server] domains)")
    return key


def _read_password(args, io):
    if args.password_stdin:
        line = io.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        password = io.getpass("Password: ")
        if io.getpass("Password (again): ") != password:
            raise Failed("the two passwords differ")
    if not password:
        raise Failed("empty password refused")
    return password


def cmd_user_add(args, io):
    _, directory = _file_directory(args)
    address = _local_address(directory, canonical_address(args.address))
    if directory.users.lookup(address) is not None:
        if args.if_missing:
            io.out(f"user exists, unchanged: {address}")
            return EXIT_OK
        raise Failed(f"{address} already exists")
    directory.users.add(address, hash_password(_read_password(args, io)))
    io.out(f"user added: {address}")
    return EXIT_OK


def cmd_user_passwd(args, io):
    _, directory = _file_directory(args)
    address = canonical_address(args.address)
    if directory.users.lookup(address) is None:
        raise Failed(f"{address} does not exist")
    directory.users.set_hash(address, hash_password(_read_password(args, io)))
    io.out(f"password changed: {address}")
    return EXIT_OK


def cmd_user_del(args, io):
    _, directory = _file_directory(args)
    address = canonical_address(args.address)
    directory.users.delete(address)
    io.out(f"user deleted: {address}")
    return EXIT_OK


def cmd_user_list(args, io):
    _, directory = _file_directory(args)
    for address in directory.users.list():
        io.out(address)
    return EXIT_OK


def cmd_alias_add(args, io):
    _, directory = _file_directory(args)
    address = _local_address(directory, args.address)
    directory.aliases.add(address, args.targets)
    io.out(f"alias {address}: {', '.join(directory.aliases.targets(address))}")
    return EXIT_OK


def cmd_alias_del(args, io):
    _, directory = _file_directory(args)
    address = alias_key(args.address)
    directory.aliases.delete(address)
    io.out(f"alias deleted: {address}")
    return EXIT_OK


def cmd_alias_list(args, io):
    _, directory = _file_directory(args)
    for address, targets in directory.aliases.list():
        io.out(f"{address}: {', '.join(targets)}")
    return EXIT_OK


def _key_store(args):
    """The config and its DKIM key store, with every local domain's keys made."""
    cfg = configmod.load(args.config)
    store = KeyStore.from_config(cfg)
    made = store.ensure(cfg.server.domains)
    notes = [f"new DKIM key: {k.dns_name} ({k.algorithm}): publish it" for k in made]
    return cfg, store, notes


def cmd_dns_records(args, io):
    cfg, store, notes = _key_store(args)
    text, ok = dnsrecords.report(cfg, store, check_dns=args.check, notes=notes)
    io.stdout.write(text)
    return EXIT_OK if ok else EXIT_FAILED


def cmd_dkim_list(args, io):
    _, store, _ = _key_store(args)
    for key in store.keys():
        io.out(f"{key.domain} {key.selector} {key.algorithm} {key.state}")
    return EXIT_OK


def _known_domain(cfg, domain):
    if canonical_domain(domain) not in cfg.server.domains:
        raise Failed(f"{domain} is not one of the local domains ([server] domains)")
    return domain


def cmd_dkim_rotate(args, io):
    cfg, store, _ = _key_store(args)
    made, retired = store.rotate(_known_domain(cfg, args.domain))
    for key in retired:
        io.out(f"retired: {key.dns_name} (keep it published until you remove it)")
    for key in made:
        io.out(f"new key: {key.dns_name} ({key.algorithm}); publish:")
        io.out(dnsrecords.Record(key.dns_name + ".", "TXT", key.txt, "dkim").zone_line())
    return EXIT_OK


def cmd_dkim_remove(args, io):
    _, store, _ = _key_store(args)
    key = store.remove(args.domain, args.selector)
    io.out(f"removed: {key.dns_name} (its DNS record can go)")
    return EXIT_OK


def cmd_audit(args, io):
    from appliance.audit.replay import ReplayError, run
    cfg = configmod.load(args.config)
    try:
        run(cfg, args.logfiles, args.json, io.out)
    except ReplayError as exc:
        raise Failed(str(exc)) from None
    return EXIT_OK


# ---------------------------------------------------------------------------
# Entry point

def main(argv=None, io=None):
    """Run the command line ``argv``; returns the exit code."""
    io = io or IO()
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        return args.run(args, io)
    except SystemExit as exc:           # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except UsageError as exc:
        io.err(f"{exc} (try --help)")
        return EXIT_USAGE
    except configmod.ConfigError as exc:
        for problem in exc.problems:
            io.err(problem)
        return EXIT_USAGE
    except (Failed, UsersError, KeyStoreError) as exc:
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


if __name__ == "__main__":
    sys.exit(main())

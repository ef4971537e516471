"""Every command of SPEC §5 through each of the three doors, on one real server:

- ``ssh``: ``ssh -p PORT admin@host COMMAND``, one-shot (exit status, stdout);
- ``pty``: an interactive session under tmux (``ssh -tt``), the command typed
  at the prompt, passwords answered at the no-echo prompts;
- ``mailappliance``: the local CLI (over the control socket for what needs the
  server, in-process for the offline commands).

Each door runs the same script with values of its own (user, alias, ban,
network, queued mail), and leaves the server as it found it. The other admin
tests check the details; this one checks that nothing is missing from a door.
"""

import json
import re
import shlex
import shutil
import subprocess
import time

import pytest

from appliance.admin.commands import resolve
from harness import wait_until
from test_admin_ssh import Admin, make_key, queue_remote

pytestmark = pytest.mark.skipif(
    not (shutil.which("ssh") and shutil.which("ssh-keygen") and shutil.which("tmux")),
    reason="needs the OpenSSH client and tmux (.ci/run installs them)")

PROMPT = "mailappliance> "
# SPEC §5's table, one name a command (as `help` lists them)
SPEC_5 = {"status", "user list", "user add", "user del", "user passwd", "user show",
          "alias list", "alias add", "alias del", "queue list", "queue show", "queue retry",
          "queue hold", "queue release", "queue delete", "user suspend", "user resume",
          "bans list", "ban", "unban", "greylist list", "greylist allow", "greylist forget",
          "limits", "alerts", "alerts ack", "dns-records", "dkim list", "dkim rotate",
          "dkim remove", "log tail", "config check", "reload"}


@pytest.fixture(scope="module")
def server(module_mailserver_factory, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys")
    key = make_key(keys, "admin")
    server = module_mailserver_factory(start=False, overrides={
        "relay": {"trusted_networks": "127.0.0.1"},
        "limits": {"allow": "127.0.0.1"},
    })
    (server.data_dir / "admin_authorized_keys").write_text((keys / "admin.pub").read_text())
    server.start()
    server.admin = Admin(server, key)
    # One auditor alert for `alerts ack`: a login with a key nobody knows.
    stranger = Admin(server, make_key(keys, "stranger"))
    assert stranger.run("status").returncode == 255
    server.alert_id = wait_until(lambda: [a["alert_id"] for a in json.loads(
        server.admin.run("alerts", "--json").stdout) if a["rule"] == "admin_ssh"][:1], 10,
        interval=0.3, what="an admin_ssh alert")[0]
    return server


class CommandDoor:
    """A door that runs one process per command: ``ssh admin@host COMMAND``
    or ``mailappliance COMMAND`` (``start(*argv, stdin=...)``)."""

    def __init__(self, name, start):
        self.name = name
        self.start = start

    def run(self, line, password=None):
        result = self.start(*shlex.split(line),
                            stdin="" if password is None else password + "\n")
        return result.returncode, result.stdout + result.stderr

    def close(self):
        pass


class PtyDoor:
    """One interactive session in a tmux server of its own (a long history)."""

    name = "pty"

    def __init__(self, server, tmp_path):
        self.socket = f"doors{server.port('admin_ssh')}-{tmp_path.name}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g history-limit 100000\n")
        command = " ".join(["ssh", "-tt", *server.admin.options(), "admin@127.0.0.1"])
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "doors", "-x", "250", "-y",
                  "50", command)
        wait_until(lambda: PROMPT in self.screen(), 15, interval=0.1, what="the prompt")

    def tmux(self, *args):
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=10)

    def screen(self):
        return self.tmux("capture-pane", "-p", "-J", "-t", "doors", "-S", "-").stdout

    def keys(self, *keys):
        self.tmux("send-keys", "-t", "doors", *keys)

    def run(self, line, password=None):
        mark = PROMPT + line
        before = self.screen().count(mark)
        self.keys("-l", line)
        self.keys("Enter")
        if password is not None:
            for n in (1, 2):        # the no-echo prompt, then once again
                wait_until(lambda: self._after(mark, before).count("Password") >= n, 10,
                           interval=0.05, what=f"password prompt {n} for {line!r}")
                self.keys("-l", password)
                self.keys("Enter")
        output = wait_until(lambda: self._finished(mark, before), 30, interval=0.05,
                            what=f"{line!r} to finish")
        return None, output

    def _after(self, mark, before):
        text = self.screen()
        if text.count(mark) <= before:
            return ""
        return text[text.rindex(mark) + len(mark):]

    def _finished(self, mark, before):
        after = self._after(mark, before)
        lines = after.rstrip("\n").split("\n")
        if len(lines) >= 2 and lines[-1].rstrip() == PROMPT.rstrip():
            return "\n".join(lines[1:-1])
        return None

    def close(self):
        self.keys("C-d")
        self.tmux("kill-server")


@pytest.fixture(params=["ssh", "pty", "mailappliance"])
def door(request, server, tmp_path):
    if request.param == "ssh":
        made = CommandDoor("ssh", server.admin.run)
    elif request.param == "pty":
        made = PtyDoor(server, tmp_path)
    else:
        made = CommandDoor("mailappliance", server.cli)
    made.index = ["ssh", "pty", "mailappliance"].index(request.param)
    yield made
    made.close()


def test_every_command_of_spec_5_through_each_door(server, door):
    n = door.index
    user, alias = f"door{n}@example.test", f"alias{n}@example.test"
    ban, network = f"127.0.0.{40 + n}", f"198.51.{100 + n}.0/24"
    sender = f"door{n}@example.net"
    seen = []

    def run(line, *fragments, password=None):
        rc, out = door.run(line, password)
        seen.append(line)
        assert rc in (None, 0), f"{door.name}: {line!r} exited {rc}: {out}"
        assert "error:" not in out, f"{door.name}: {line!r}: {out}"
        for fragment in fragments:
            assert fragment in out, f"{door.name}: {line!r}: {fragment!r} not in {out!r}"
        return out

    run("status", "mailappliance", "queue:")
    run("status --json", '"hostname"')
    run("help", "queue delete")
    # users (the file backend; LDAP has its own e2e tests)
    run(f"user add {user} --password-stdin", f"user added: {user}", password="door pw 1")
    run("user list", user)
    run(f"user show {user} --json", f'"address": "{user}"')
    run(f"user passwd {user} --password-stdin", f"password changed: {user}",
        password="door pw 2")
    run(f"user suspend {user}", f"suspended: {user}")
    run("user list", f"{user}  (suspended)")
    run(f"user resume {user}", f"resumed: {user}")
    # aliases
    run(f"alias add {alias} {user}", f"alias {alias}: {user}")
    run("alias list --json", f'"address": "{alias}"')
    run(f"alias del {alias}", f"alias deleted: {alias}")
    run(f"user del {user}", f"user deleted: {user}")
    # the queue, on real queued mail (deferred: its remote side is unreachable)
    queue_remote(server, 3, sender=sender)
    ids = wait_until(lambda: len(_ids_of(server, sender)) == 3 and _ids_of(server, sender),
                     30, interval=0.3, what="three queued messages")
    run("queue list", ids[0], ids[2])
    run(f"queue list --sender {sender} --json", ids[1])
    run("mailq", ids[0])
    run(f"queue show {ids[0]}", f"queue id:  {ids[0]}", f"sender:    {sender}")
    run(f"queue hold {ids[0]}", "held: 1 messages")
    run("queue list --held", ids[0])
    run(f"queue release {ids[0]}", "released: 1 messages")
    run(f"queue retry {ids[0]}", "retried: 1 messages")
    run("queue retry --all", "retried:")
    run(f"queue delete {ids[0]}", "deleted: 1 messages")
    run(f"queue delete --sender {sender} --dry-run", "2 messages match", "dry run")
    run(f"queue delete --sender {sender} --yes", "deleted: 2 messages")
    assert _ids_of(server, sender) == []
    # bans, greylisting, limits
    run(f"ban {ban} 10m", f"banned: {ban}/32")
    run("bans list", f"{ban}/32")
    run(f"limits {ban}", "connections_per_ip", f"banned: {ban}/32")
    run(f"unban {ban}", f"unbanned: {ban}/32")
    run("limits alice@example.test --json", '"user": "alice@example.test"')
    run(f"greylist allow {network}", f"passes greylisting: {network}")
    run("greylist list", network)
    run(f"greylist forget {network}", f"forgotten: {network}")
    # the auditor
    run("alerts 5", f"#{server.alert_id}")
    run(f"alerts ack {server.alert_id}", f"acknowledged: #{server.alert_id}")
    # DNS and DKIM
    run("dns-records", "_domainkey.example.test", "MX")
    run("dkim list", "example.test")
    rotated = run("dkim rotate example.test", "new key:", "retired:")
    selector = re.search(r"retired: (\S+)\._domainkey\.example\.test", rotated).group(1)
    run(f"dkim remove example.test {selector}", f"removed: {selector}._domainkey")
    # log, config, reload
    run("log tail 5 admin.", "admin.command")
    run("config check", "config OK")
    run("reload", "users:", "aliases:")
    covered = {resolve(shlex.split(line))[0].name for line in seen}
    assert SPEC_5 <= covered, SPEC_5 - covered


def _ids_of(server, sender):
    rows = json.loads(server.admin.run("queue", "list", "--json").stdout)
    return [r["queue_id"] for r in rows if r["sender"] == sender]


def test_log_tail_follow_streams_until_ctrl_c_in_the_pty(server, tmp_path):
    pty = PtyDoor(server, tmp_path)
    try:
        pty.keys("-l", "log tail 0 admin. --follow")
        pty.keys("Enter")
        time.sleep(0.5)
        assert server.admin.run("status").returncode == 0      # an event to stream
        wait_until(lambda: "admin.command" in pty.screen(), 10, interval=0.1,
                   what="the event streamed")
        pty.keys("C-c")
        wait_until(lambda: pty.screen().rstrip().endswith(PROMPT.rstrip()), 10,
                   interval=0.1, what="the prompt after Ctrl-C")
    finally:
        pty.close()

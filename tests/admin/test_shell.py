"""The line shell (``ssh -T host < script``): order, exit code, idle timeout."""

from twisted.internet import task

from appliance.admin.commands import Context, Identity
from appliance.admin.shell import LineShell
from appliance.testing import make_config


class FakeProcess:
    def __init__(self):
        self.out, self.err, self.ended = b"", b"", None

    def outReceived(self, data):
        self.out += data

    def errReceived(self, data):
        self.err += data

    def processEnded(self, reason):
        self.ended = reason.value


class FakeSession:
    def identity(self, mode):
        return Identity("admin", "SHA256:x", "admin", "127.0.0.1", mode)


class Realm:
    def __init__(self, tmp_path):
        self.clock = task.Clock()
        self.idle_timeout = 900
        self.cfg = make_config(str(tmp_path), server={"domains": "example.test"})

    def make_context(self, sink, identity, read_secret, confirm, interactive, audit=True):
        return Context(self.cfg, sink, identity=identity, read_secret=read_secret)


def shell(tmp_path):
    pp = FakeProcess()
    return LineShell(pp, FakeSession(), Realm(tmp_path)), pp


def test_lines_run_in_order_and_eof_ends_with_the_last_code(tmp_path):
    sh, pp = shell(tmp_path)
    sh.data(b"help us\r\n# a comment\n\nfrob")
    assert b"COMMAND" not in pp.out and b"no command 'us'" in pp.err
    sh.data(b"nicate\n")
    assert b"unknown command 'frobnicate'" in pp.err and pp.ended is None
    sh.data(b"help user\n")
    sh.eof()
    assert b"user list" in pp.out and pp.ended.exitCode == 0
    assert "mailappliance>" not in pp.out.decode()          # no prompt without a pty


def test_a_failing_last_command_is_the_exit_status(tmp_path):
    sh, pp = shell(tmp_path)
    sh.data(b"help\nfrob\n")
    sh.eof()
    assert pp.ended.exitCode == 127


def test_idle_sessions_end(tmp_path):
    sh, pp = shell(tmp_path)
    sh.realm.clock.advance(899)
    sh.data(b"help\n")
    sh.realm.clock.advance(899)
    assert pp.ended is None
    sh.realm.clock.advance(2)
    assert b"idle too long" in pp.err and pp.ended.exitCode == 0

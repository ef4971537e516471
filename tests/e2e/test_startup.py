"""Start-up failures: one clear line and a non-zero exit, never a traceback."""

import os
import signal
import socket
import subprocess

import pytest

from harness import REPO_ROOT, MailServer, wait_until


def run_twistd(server, timeout=30):
    return subprocess.run(server.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_clear_line(result, *expected):
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.startswith("mailappliance:")]
    assert lines, output
    for text in expected:
        assert any(text in line for line in lines), output


def test_port_in_use(tmp_path):
    server = MailServer(tmp_path, listeners=("mx",))
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", server.mx_port))
        squatter.listen(1)
        result = run_twistd(server)
    assert_one_clear_line(result, "cannot listen for mx", str(server.mx_port))


def test_bad_config_names_section_and_key(tmp_path):
    server = MailServer(tmp_path, listeners=("mx",),
                        overrides={"limits": {"ban_time": "1x"}, "server": {"colour": "red"}})
    result = run_twistd(server)
    assert_one_clear_line(result, "[limits] ban_time", "[server] colour")
    assert result.returncode == 2


def test_missing_config_file(tmp_path):
    server = MailServer(tmp_path, listeners=("mx",))
    server.config_path.unlink()
    result = run_twistd(server)
    assert_one_clear_line(result, "no such file")


def test_unreadable_certificate(tmp_path):
    missing = tmp_path / "nope.pem"
    server = MailServer(tmp_path, listeners=("mx",),
                        overrides={"tls": {"certificate": str(missing),
                                           "private_key": str(missing)}})
    result = run_twistd(server)
    assert_one_clear_line(result, "[tls] certificate")


@pytest.mark.parametrize("listener", ["mx"])
def test_listener_is_logged(tmp_path, listener):
    server = MailServer(tmp_path, listeners=(listener,))
    server.start()
    try:
        assert f"listening for {listener} on 127.0.0.1:{server.port(listener)}" in server.output()
        assert server.events("listener.started")
        wait_until(lambda: server.events("server.started"), 10, what="server.started")
        assert "admin_ssh" not in server.output()         # [listen] admin_ssh is empty
    finally:
        server.stop()


def test_a_configured_admin_ssh_gets_the_admin_shell(tmp_path):
    """[listen] admin_ssh is a listener like the others (tests/e2e/test_admin_ssh.py
    holds the shell's own tests)."""
    server = MailServer(tmp_path, listeners=("mx", "admin_ssh"))
    address = f"127.0.0.1:{server.port('admin_ssh')}"
    server.start()
    try:
        assert f"listening for admin_ssh on {address}" in server.output()
        with socket.create_connection(("127.0.0.1", server.port("admin_ssh")),
                                      timeout=5) as sock:
            assert sock.recv(64).startswith(b"SSH-2.0-mailappliance")
    finally:
        server.stop()


def test_a_host_key_file_that_holds_no_key(tmp_path):
    server = MailServer(tmp_path, listeners=("mx", "admin_ssh"))
    (server.data_dir / "ssh_host_ed25519_key").write_text("not a key\n")
    result = run_twistd(server)
    assert_one_clear_line(result, "[admin] host_key", "not an SSH private key")


def test_ctrl_c_stops_the_server_without_a_traceback(tmp_path):
    """Ctrl-C in the terminal: SIGINT to the whole foreground process group."""
    server = MailServer(tmp_path, listeners=("mx",))
    server.add_user("alice@example.test", "pw", bcrypt_cost=4)
    with open(server.output_path, "wb") as output:
        process = subprocess.Popen(server.command(), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=subprocess.STDOUT,
                                   start_new_session=True, preexec_fn=_as_in_a_terminal)
        try:
            server.process = process
            wait_until(server._ready, 20, interval=0.1, what="the greeting")
            server.send_through_mx("hello", "hello\n", "alice@example.test")
            server.wait_for_messages("alice@example.test", 1)     # the writer child runs
            [started] = wait_until(lambda: server.events("spool.writer.started"), 10,
                                   what="spool.writer.started")
            os.killpg(process.pid, signal.SIGINT)
            # Recent twistd ends by the signal it got (the shell's 130), older ones with 0.
            assert process.wait(20) in (0, -signal.SIGINT)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    text = server.output()
    assert "Received SIGINT, shutting down." in text and "Server Shut Down." in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    wait_until(lambda: not _alive(started["pid"]), 10, what="the writer child's end")


def _as_in_a_terminal():
    """SIGINT handled by default, as in a terminal (a background job inherits it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True

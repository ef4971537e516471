"""``[relay] mailbox_host`` (appliance.config) and an edge's service tree (SPEC §7)."""

import pytest

from appliance import config
from appliance.config import ConfigError, HostPort

MINIMAL = "[server]\nhostname = edge1.example.test\ndomains = example.test\n"


def parse(extra=""):
    return config.parse(MINIMAL + extra, base_dir="/srv/mail")


def problems(extra):
    with pytest.raises(ConfigError) as info:
        parse(extra)
    return info.value.problems


def test_no_mailbox_host_by_default_keeps_the_mailboxes_here():
    cfg = parse()
    assert cfg.relay.mailbox_host is None and not cfg.is_edge
    assert cfg.listen.imap is not None and cfg.listen.pop3s is not None


def test_mailbox_host_is_host_and_port_with_25_by_default():
    cfg = parse("[relay]\nmailbox_host = mail.example.test:2525\n")
    assert cfg.relay.mailbox_host == HostPort("mail.example.test", 2525) and cfg.is_edge
    assert parse("[relay]\nmailbox_host = 192.0.2.10\n").relay.mailbox_host == \
        HostPort("192.0.2.10", 25)
    assert parse("[relay]\nmailbox_host = [2001:db8::10]:25\n").relay.mailbox_host == \
        HostPort("2001:db8::10", 25)


@pytest.mark.parametrize("value, why", [
    ("mail.example.test:0", "no valid port"),
    ("mail.example.test:smtp", "no valid port"),
    ("bad_host!:25", "no valid host"),
    ("[2001:db8::10:25", "not host:port"),
])
def test_a_malformed_mailbox_host_is_one_line(value, why):
    [problem] = problems(f"[relay]\nmailbox_host = {value}\n")
    assert problem.startswith("[relay] mailbox_host: ") and why in problem
    assert "\n" not in problem


def test_an_edge_starts_no_imap_or_pop3_left_at_their_defaults():
    cfg = parse("[relay]\nmailbox_host = mail.example.test\n")
    assert (cfg.listen.imap, cfg.listen.imaps, cfg.listen.pop3, cfg.listen.pop3s) == \
        (None, None, None, None)
    assert set(cfg.listeners()) >= {"mx", "submission", "submissions", "admin_ssh"}
    assert not {"imap", "imaps", "pop3", "pop3s"} & set(cfg.listeners())


def test_an_edge_asked_for_imap_or_pop3_is_refused_one_line_each():
    found = problems("[relay]\nmailbox_host = mail.example.test\n"
                     "[listen]\nimap = 127.0.0.1:143\npop3s = 127.0.0.1:995\n"
                     "imaps =\n")
    assert len(found) == 2
    assert found[0].startswith("[listen] imap: this appliance is an edge")
    assert found[1].startswith("[listen] pop3s: this appliance is an edge")
    assert all("leave" in line and "mailbox_host" in line for line in found)


def test_a_mailbox_host_that_is_our_own_smtp_listener_is_a_loop():
    [problem] = problems("[relay]\nmailbox_host = 127.0.0.1:8025\n"
                         "[listen]\nmx = 127.0.0.1:8025\n")
    assert problem.startswith("[relay] mailbox_host: 127.0.0.1:8025 is this appliance's "
                              "own [listen] mx")


def test_an_edge_keeps_its_smarthost_for_other_domains():
    cfg = parse("[relay]\nmailbox_host = mail.example.test\nsmarthost = out.example.net:587\n")
    assert cfg.relay.smarthost == HostPort("out.example.net", 587)
    assert cfg.relay.mailbox_host == HostPort("mail.example.test", 25)


def test_check_config_names_the_edge_problem_and_exits_2(tmp_path):
    import io

    from appliance import cli
    path = tmp_path / "edge.ini"
    path.write_text(MINIMAL + "[relay]\nmailbox_host = mail.example.test:25x\n")
    streams = cli.IO(stdin=io.StringIO(), stdout=io.StringIO(), stderr=io.StringIO())
    assert cli.main(["check-config", "--config", str(path)], streams) == 2
    [line] = streams.stderr.getvalue().splitlines()
    assert "[relay] mailbox_host:" in line and "no valid port" in line


def test_an_edges_service_tree_has_no_maildirs_and_no_imap_or_pop3(tmp_path):
    from twisted.internet import reactor

    from appliance import tap
    from appliance.deliver.routes import MAILBOX
    from appliance.testing import make_config
    listen = {name: f"127.0.0.1:{10100 + i}" for i, name in
              enumerate(("mx", "submission", "submissions", "submission_alt", "http",
                         "https", "admin_ssh"))}
    listen.update(imap="", imaps="", pop3="", pop3s="")
    cfg = make_config(base_dir=str(tmp_path), listen=listen,
                      auth={"users_file": str(tmp_path / "users")},
                      log={"events": str(tmp_path / "events.json")},
                      relay={"mailbox_host": "192.0.2.10:25"})
    app = tap.build(cfg, reactor).appliance
    assert sorted(app.listeners) == sorted(listen_name for listen_name, value in listen.items()
                                           if value)
    assert app.mailstore is None and app.runner.local.maildir is None
    assert app.runner.routing.kind("bob@example.test") == MAILBOX
    assert not (tmp_path / "var" / "mail").exists()

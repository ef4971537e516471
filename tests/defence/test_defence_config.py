"""check-config for the defence keys of [limits] and [checks] greylist*."""

import pytest

from appliance import config
from appliance.config import ConfigError

MINIMAL = "[server]\nhostname = mail.example.test\ndomains = example.test\n"


def problems(extra):
    with pytest.raises(ConfigError) as info:
        config.parse(MINIMAL + extra, base_dir="/srv")
    return info.value.problems


def test_defaults():
    cfg = config.parse(MINIMAL, base_dir="/srv")
    assert cfg.checks.greylist is False
    assert (cfg.checks.greylist_delay, cfg.checks.greylist_window) == (300, 2 * 86400)
    assert (cfg.checks.greylist_pass_after, cfg.checks.greylist_keep) == (5, 35 * 86400)
    limits = cfg.limits
    assert (limits.ban_time, limits.ban_time_max, limits.ipv6_prefix) == (3600, 30 * 86400, 64)
    assert (limits.connections_per_minute_per_ip, limits.junk_commands) == (60, 100)


@pytest.mark.parametrize("extra, expected", [
    ("[limits]\nipv6_prefix = 129\n", "[limits] ipv6_prefix: 129 is too large (at most 128)"),
    ("[limits]\nipv6_prefix = 8\n", "[limits] ipv6_prefix: 8 is too small (at least 16)"),
    ("[limits]\nban_time_max = forever\n",
     '[limits] ban_time_max: "forever" is not a duration (use 30s, 5m, 2h, 5d)'),
    ("[limits]\nconnections_per_minute_per_ip = 0\n",
     "[limits] connections_per_minute_per_ip: 0 is too small (at least 1)"),
    ("[limits]\njunk_commands = many\n", '[limits] junk_commands: "many" is not a whole number'),
    ("[limits]\nban_time = 2h\nban_time_max = 1h\n",
     "[limits] ban_time_max: must be at least ban_time"),
    ("[checks]\ngreylist_window = 0s\n",
     '[checks] greylist_window: "0s" must be longer than zero'),
    ("[checks]\ngreylist_delay = 1h\ngreylist_window = 30m\n",
     "[checks] greylist_window: must be longer than greylist_delay (a retry after the "
     "delay must still fall inside the window)"),
    ("[checks]\ngreylist_pass_after = 0\n",
     "[checks] greylist_pass_after: 0 is too small (at least 1)"),
    ("[checks]\ngreylist_keep = 1d\n", "[checks] greylist_keep: must be at least greylist_window"),
    ("[limits]\nauth_failure_window = -5m\n",
     '[limits] auth_failure_window: "-5m" is not a duration (use 30s, 5m, 2h, 5d)'),
    ("[limits]\nallow = 127.0.0.1, localhost\n",
     '[limits] allow: "localhost" is not an IP network (e.g. 192.0.2.0/24 or 2001:db8::/32)'),
])
def test_bad_values_are_refused_one_line_each(extra, expected):
    assert problems(extra) == [expected]

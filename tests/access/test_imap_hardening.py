"""Issue 17, policy gaps on IMAP: no LOGIN literal invited before TLS, a
pre-login deadline that partial input does not move, SEARCH syntax errors
answered BAD."""

from test_imap import Env, env, selected, session  # noqa: F401  (fixtures)


def test_login_literal_is_refused_before_the_continuation_in_the_clear(tmp_path):
    """092f303 answered ``+ Ready for literal data``: the client then sent
    its password in the clear, only to be refused after."""
    env = Env(tmp_path, implicit_tls=False)
    s = env.session()
    s.output()
    lines = s.cmd("LOGIN {5}")
    assert lines == [b"t1 NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS) first"]
    # The user name as a quoted string and the password as a literal: the same.
    lines = s.cmd('LOGIN "alice@example.test" {9}')
    assert lines == [b"t2 NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS) first"]
    lines = s.cmd("AUTHENTICATE PLAIN {24}")
    assert lines == [b"t3 NO [PRIVACYREQUIRED] Log in over TLS (STARTTLS) first"]
    assert not s.closed
    env.close()


def test_login_literal_is_invited_under_tls(env, session):
    assert session.cmd("LOGIN {18}") == [b"+ Ready for literal data"]


def test_preauth_deadline_is_not_moved_by_partial_input(env, session):
    """092f303 restarted the minute on every chunk: one byte every 50 s (or
    a literal trickled in) held the connection for ever."""
    assert session.cmd("LOGIN {1000}") == [b"+ Ready for literal data"]
    for _ in range(5):
        env.clock.advance(11)
        session.send(b"a")                   # a literal trickled in, chunk by chunk
    env.clock.advance(6)
    assert session.lines() == [b"* BYE Autologout; idle for too long"]
    assert session.closed


def test_preauth_deadline_is_not_moved_by_whole_commands(env, session):
    env.clock.advance(50)
    assert session.cmd("NOOP")[-1] == b"t1 OK completed"
    env.clock.advance(11)
    assert session.closed


def test_preauth_deadline_ends_at_login(env, session):
    env.clock.advance(50)
    session.login()
    env.clock.advance(120)
    assert not session.closed


def test_search_with_missing_operands_is_bad(env, selected):
    """092f303: ``SEARCH OR OR OR`` ran off the end of its keys and answered
    ``NO [SERVERBUG] Internal error``."""
    for keys in ("OR OR OR", "OR ALL", "NOT", "(NOT)", "OR (ALL) NOT"):
        lines = selected.cmd("SEARCH " + keys)
        assert lines[-1].split(b" ", 2)[1:] == [b"BAD", b"Missing search key"], (keys, lines)
    assert selected.ok("SEARCH OR ALL NOT ALL")[0] == b"* SEARCH 1 2"

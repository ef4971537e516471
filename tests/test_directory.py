"""appliance.directory: aliases file, catch-alls, recursion, loops, +tags."""

import os
import stat

import bcrypt
import pytest
from twisted.internet import task
from twisted.logger import globalLogPublisher

from appliance import config, events
from appliance.auth.users import AlreadyExists, NotFound, UsersError, UsersFile
from appliance.directory import MAX_DEPTH, AliasesFile, Directory, alias_key

HASH = bcrypt.hashpw(b"pw", bcrypt.gensalt(4)).decode()


@pytest.fixture
def cfg(tmp_path):
    return config.parse("[server]\nhostname = mail.example.test\n"
                        "domains = example.test, example.org, bücher.example\n"
                        "data_dir = var\n", base_dir=str(tmp_path))


@pytest.fixture
def directory(cfg):
    d = Directory.from_config(cfg)
    for user in ("alice@example.test", "bob@example.test", "carol@example.org"):
        d.users.add(user, HASH)
    return d


def write_aliases(directory, text):
    os.makedirs(os.path.dirname(directory.aliases.path), exist_ok=True)
    with open(directory.aliases.path, "w") as handle:
        handle.write(text)


# -- the aliases file ---------------------------------------------------------

def test_alias_keys():
    assert alias_key(" Sales@Example.TEST ") == "sales@example.test"
    assert alias_key("@Example.ORG.") == "@example.org"
    assert alias_key("@xn--bcher-kva.example") == "@bücher.example"
    for bad in ("@", "@bad domain", "sales", "a b@x.test"):
        with pytest.raises(UsersError):
            alias_key(bad)


def test_aliases_add_extend_list_delete(tmp_path):
    aliases = AliasesFile(str(tmp_path / "aliases"))
    aliases.add("Sales@x.test", ["Alice@x.test", "bob@x.test", "alice@x.test"])
    assert aliases.targets("sales@x.test") == ("alice@x.test", "bob@x.test")
    aliases.add("sales@x.test", ["bob@x.test", "ext@remote.test"])
    aliases.add("@x.test", ["postmaster@x.test"])
    assert aliases.list() == [
        ("@x.test", ("postmaster@x.test",)),
        ("sales@x.test", ("alice@x.test", "bob@x.test", "ext@remote.test"))]
    with open(aliases.path) as handle:
        assert handle.read() == ("sales@x.test: alice@x.test, bob@x.test, "
                                 "ext@remote.test\n@x.test: postmaster@x.test\n")
    assert stat.S_IMODE(os.stat(aliases.path).st_mode) == 0o600
    aliases.delete("SALES@x.test")
    assert aliases.targets("sales@x.test") is None
    with pytest.raises(NotFound):
        aliases.delete("sales@x.test")
    with pytest.raises(UsersError):
        aliases.add("list@x.test", [])
    with pytest.raises(UsersError):
        aliases.add("list@x.test", ["not an address"])


def test_aliases_file_skips_malformed_lines(tmp_path):
    path = tmp_path / "aliases"
    path.write_text("# aliases\nsales@x.test: a@x.test,, b@x.test\nbroken line\n"
                    "empty@x.test:\nbad@x.test: not an address\n@x.test: c@x.test\n")
    seen = []
    globalLogPublisher.addObserver(seen.append)
    try:
        aliases = AliasesFile(str(path))
        assert aliases.list() == [("@x.test", ("c@x.test",)),
                                  ("sales@x.test", ("a@x.test", "b@x.test"))]
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert [e["line"] for e in seen if "line" in e and "why" in e] == [3, 4, 5]


def test_aliases_reload_on_change(tmp_path):
    clock, collector = task.Clock(), events.EventCollector()
    events.add_observer(collector)
    try:
        server = AliasesFile(str(tmp_path / "aliases"), clock=clock)
        assert server.targets("sales@x.test") is None
        AliasesFile(server.path).add("sales@x.test", ["a@x.test"])
        assert server.targets("sales@x.test") is None     # checked < 1 s ago
        clock.advance(1)
        assert server.targets("sales@x.test") == ("a@x.test",)
    finally:
        events.remove_observer(collector)
    assert collector.named("aliases.reloaded")[-1]["count"] == 1
    assert collector.named("aliases.changed")[-1]["action"] == "add"


# -- the directory ------------------------------------------------------------

def test_local_domains(directory):
    assert directory.is_local_domain("EXAMPLE.test.")
    assert directory.is_local_domain("xn--bcher-kva.example")
    assert not directory.is_local_domain("example.net")
    assert not directory.is_local_domain("not a domain")


def test_local_users(directory):
    assert directory.is_local_user("Alice@Example.TEST")
    assert directory.is_local_user("alice+news@example.test")
    assert not directory.is_local_user("dave@example.test")
    assert not directory.is_local_user("garbage")


def test_resolve_users_and_unknowns(directory):
    assert directory.resolve("ALICE@example.test") == ["alice@example.test"]
    assert directory.resolve("dave@example.test") == []
    assert directory.resolve("<junk>") == []


def test_resolve_tags(directory):
    assert directory.resolve("alice+lists@example.test") == ["alice@example.test"]
    assert directory.resolve("dave+x@example.test") == []
    directory.users.add("alice+exact@example.test", HASH)
    assert directory.resolve("alice+exact@example.test") == ["alice+exact@example.test"]
    directory.aliases.add("sales@example.test", ["bob@example.test"])
    assert directory.resolve("sales+eu@example.test") == ["bob@example.test"]
    directory.aliases.add("alice@example.test", ["bob@example.test"])
    assert directory.resolve("alice+exact@example.test") == ["alice+exact@example.test"]
    assert directory.resolve("alice+other@example.test") == ["bob@example.test"]


def test_resolve_aliases_recursively_in_order_without_duplicates(directory):
    directory.aliases.add("team@example.test", ["bob@example.test", "ops@example.test",
                                                 "alice@example.test"])
    directory.aliases.add("ops@example.test", ["alice@example.test",
                                                "pager@remote.test", "bob@example.test"])
    assert directory.resolve("team@example.test") == [
        "bob@example.test", "alice@example.test", "pager@remote.test"]


def test_alias_pointing_to_unknown_local_address_drops_it(directory):
    directory.aliases.add("x@example.test", ["ghost@example.test", "bob@example.test"])
    assert directory.resolve("x@example.test") == ["bob@example.test"]


def test_alias_wins_over_user_and_may_keep_a_copy(directory):
    directory.aliases.add("alice@example.test", ["alice@example.test", "bob@example.test"])
    assert directory.resolve("alice@example.test") == [
        "alice@example.test", "bob@example.test"]
    directory.aliases.add("bob@example.test", ["away@remote.test"])
    assert directory.resolve("bob@example.test") == ["away@remote.test"]


def test_loops_are_cut(directory):
    directory.aliases.add("a@example.test", ["b@example.test"])
    directory.aliases.add("b@example.test", ["a@example.test", "carol@example.org"])
    assert directory.resolve("a@example.test") == ["carol@example.org"]
    directory.aliases.add("self@example.test", ["self@example.test"])
    assert directory.resolve("self@example.test") == []


def test_depth_limit(directory):
    chain = [f"l{n}@example.test" for n in range(MAX_DEPTH + 3)]
    for here, there in zip(chain, chain[1:]):
        directory.aliases.add(here, [there])
    directory.aliases.add(chain[-1], ["alice@example.test"])
    directory.aliases.add("short@example.test", [chain[-MAX_DEPTH + 1]])
    assert directory.resolve(chain[0]) == []
    assert directory.resolve("short@example.test") == ["alice@example.test"]


def test_catch_all(directory):
    directory.aliases.add("@example.org", ["alice@example.test", "fwd@remote.test"])
    assert directory.resolve("anything@example.org") == [
        "alice@example.test", "fwd@remote.test"]
    assert directory.resolve("carol@example.org") == ["carol@example.org"]
    assert directory.resolve("nobody@example.test") == []      # no catch-all there


def test_catch_all_loops_are_cut(directory):
    directory.aliases.add("@example.test", ["postmaster@example.test"])
    assert directory.resolve("who@example.test") == []
    directory.aliases.add("x@example.org", ["ghost@example.test"])
    directory.aliases.add("@example.test", ["bob@example.test"])
    assert directory.resolve("x@example.org") == ["bob@example.test"]


def test_non_local_address_is_a_forward(directory):
    assert directory.resolve("Someone@Remote.TEST") == ["someone@remote.test"]


def test_may_send_as(directory):
    directory.aliases.add("sales@example.test", ["alice@example.test", "x@remote.test"])
    directory.aliases.add("@example.org", ["alice@example.test"])
    assert directory.may_send_as("alice@example.test", "Alice@example.test")
    assert directory.may_send_as("alice@example.test", "alice+tag@example.test")
    assert directory.may_send_as("alice@example.test", "sales@example.test")
    assert not directory.may_send_as("bob@example.test", "sales@example.test")
    assert not directory.may_send_as("alice@example.test", "any@example.org")
    assert not directory.may_send_as("alice@example.test", "bob@example.test")
    assert not directory.may_send_as("alice@example.test", "garbage")


def test_directory_sees_cli_changes(cfg):
    clock = task.Clock()
    server = Directory.from_config(cfg, clock=clock)
    assert server.resolve("alice@example.test") == []
    cli = Directory.from_config(cfg)
    cli.users.add("alice@example.test", HASH)
    cli.aliases.add("info@example.test", ["alice@example.test"])
    clock.advance(1)
    assert server.resolve("info@example.test") == ["alice@example.test"]
    with pytest.raises(AlreadyExists):
        cli.users.add("alice@example.test", HASH)
    assert isinstance(server.users, UsersFile)

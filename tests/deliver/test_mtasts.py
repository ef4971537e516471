"""MTA-STS outbound (appliance.deliver.mtasts): parsing, matching, the cache, restrict().

The policy cache runs on a task.Clock with a fake resolver and fake fetches;
tests/e2e/test_mtasts_e2e.py fetches over real HTTPS and delivers.
"""

import dns.resolver
import pytest
from twisted.internet import defer, task

from appliance.deliver import mtasts
from appliance.deliver.mtasts import MTASTSPolicies, Policy, PolicyError, parse_policy
from appliance.testing import value_of

POLICY = b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.net\r\nmx: *.mx.example.net\r\nmax_age: 86400\r\n"


def test_a_policy_parses_with_lf_or_crlf():
    policy = parse_policy(POLICY.decode(), "abc")
    assert (policy.mode, policy.mx, policy.max_age, policy.id) == (
        "enforce", ("mx1.example.net", "*.mx.example.net"), 86400, "abc")
    assert parse_policy("version: STSv1\nmode: testing\nmx: a.test.\nmax_age: 5\nnew: x\n").mx \
        == ("a.test",)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n").mode == "none"


@pytest.mark.parametrize("text, why", [
    ("mode: enforce\nmx: a\nmax_age: 1\n", "version"),
    ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmx: a\nmax_age: 99999999999\n", "max_age"),
    ("version: STSv1\nmode: enforce\nmax_age: 10\n", "mx"),
    ("<html>nope</html>\n", "not a policy line"),
])
def test_bad_policies_are_refused(text, why):
    with pytest.raises(PolicyError, match=why):
        parse_policy(text)


def test_mx_patterns_match_exactly_or_one_leftmost_label():
    policy = Policy("enforce", ["mx1.example.net", "*.mx.example.net"], 60)
    assert policy.allows("MX1.example.net.")
    assert policy.allows("a.mx.example.net")
    assert not policy.allows("mx.example.net")
    assert not policy.allows("a.b.mx.example.net")
    assert not policy.allows("mx2.example.net")


def test_the_sts_record_needs_one_v_stsv1_with_an_id():
    assert mtasts.sts_id(["v=STSv1; id=20240101T0000"]) == "20240101T0000"
    assert mtasts.sts_id(["v=spf1 -all", "v=STSv1;id=x1;"]) == "x1"
    assert mtasts.sts_id([]) is None
    assert mtasts.sts_id(["v=STSv1; id=a", "v=STSv1; id=b"]) is None
    assert mtasts.sts_id(["v=STSv1; id=bad-id!"]) is None


def test_restrict_enforce_keeps_listed_hosts_and_requires_verified_tls(collected):
    policy = Policy("enforce", ["mx1.example.net"], 60)
    addresses = [("rogue.example.net", "192.0.2.9"), ("mx1.example.net", "192.0.2.1")]
    assert mtasts.restrict(policy, addresses, "Q1", "example.net") == (
        [("mx1.example.net", "192.0.2.1")], True)
    [failure] = collected.named("mta_sts.failure")
    assert (failure["host"], failure["mode"]) == ("rogue.example.net", "enforce")
    testing = Policy("testing", ["mx1.example.net"], 60)
    assert mtasts.restrict(testing, addresses, "Q2", "example.net") == (addresses, False)
    assert collected.named("mta_sts.failure")[-1]["mode"] == "testing"
    assert mtasts.restrict(None, addresses, "Q3", "example.net") == (addresses, False)
    assert mtasts.restrict(Policy("none", [], 0), addresses, "Q4", "x") == (addresses, False)


class FakeResolver:
    def __init__(self):
        self.txt = {}
        self.queries = []

    def resolve(self, name, rdtype, raise_on_no_answer=True):
        self.queries.append((name, rdtype))
        if name not in self.txt:
            raise dns.resolver.NXDOMAIN()
        value = self.txt[name]
        if isinstance(value, Exception):
            raise value

        class Answer:
            rrset = [type("R", (), {"strings": [value.encode()]})()]
        return Answer()


class Fetches:
    def __init__(self):
        self.asked = []
        self.answers = []

    def __call__(self, domain):
        self.asked.append(domain)
        answer = self.answers.pop(0) if self.answers else POLICY
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


def make():
    clock, resolver, fetch = task.Clock(), FakeResolver(), Fetches()
    clock.advance(1000)
    policies = MTASTSPolicies(resolver, lambda f, *a: defer.maybeDeferred(f, *a), clock,
                              fetch=fetch)
    return policies, clock, resolver, fetch


def test_no_record_no_policy_and_the_answer_is_reused_for_a_while():
    policies, clock, resolver, fetch = make()
    assert value_of(policies.policy_for("example.net")) is None
    assert value_of(policies.policy_for("example.net")) is None
    assert resolver.queries == [("_mta-sts.example.net", "TXT")] and fetch.asked == []
    clock.advance(mtasts.TXT_RECHECK)
    policies.policy_for("example.net")
    assert len(resolver.queries) == 2


def test_a_policy_is_fetched_once_cached_per_id_and_refetched_when_the_id_changes(collected):
    policies, clock, resolver, fetch = make()
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    policy = value_of(policies.policy_for("Example.NET."))
    assert (policy.mode, policy.id) == ("enforce", "one")
    assert value_of(policies.policy_for("example.net")) is policy
    assert fetch.asked == ["example.net"]
    assert collected.named("mta_sts.policy")[0]["mx"] == ["mx1.example.net", "*.mx.example.net"]
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=two"
    clock.advance(mtasts.TXT_RECHECK)
    assert value_of(policies.policy_for("example.net")).id == "two"
    assert len(fetch.asked) == 2


def test_known_answers_as_policy_for_while_nothing_is_to_ask(collected):
    policies, clock, resolver, fetch = make()
    assert policies.known("example.net") is mtasts.ASK          # never looked up
    assert value_of(policies.policy_for("example.net")) is None
    assert policies.known("Example.NET.") is None               # no record, checked
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    clock.advance(mtasts.TXT_RECHECK)
    assert policies.known("example.net") is mtasts.ASK          # TXT recheck due
    policy = value_of(policies.policy_for("example.net"))
    assert policies.known("example.net") is policy
    clock.advance(mtasts.TXT_RECHECK)
    assert policies.known("example.net") is mtasts.ASK
    queries = len(resolver.queries)
    assert value_of(policies.policy_for("example.net")) is policy
    assert policies.known("example.net") is policy and len(resolver.queries) == queries + 1
    # TXT checked again shortly before the policy is REFRESH_AFTER old:
    clock.advance(mtasts.REFRESH_AFTER - mtasts.TXT_RECHECK - 10)
    assert value_of(policies.policy_for("example.net")) is policy
    assert policies.known("example.net") is policy
    clock.advance(10)
    assert policies.known("example.net") is mtasts.ASK          # a refetch is due
    assert value_of(policies.policy_for("example.net")).id == "one"
    assert len(fetch.asked) == 2


def test_a_failed_fetch_keeps_the_cached_policy_until_it_expires(collected):
    policies, clock, resolver, fetch = make()
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    first = value_of(policies.policy_for("example.net"))
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=two"
    fetch.answers = [PolicyError("mta-sts.example.net answered HTTP 500")]
    clock.advance(mtasts.TXT_RECHECK)
    assert value_of(policies.policy_for("example.net")) is first
    assert collected.named("mta_sts.fetch_failed")[0]["error"] == (
        "mta-sts.example.net answered HTTP 500")
    # Once max_age is over and the fetch still fails: no policy.
    clock.advance(86400)
    fetch.answers = [PolicyError("still down")]
    assert value_of(policies.policy_for("example.net")) is None


def test_the_record_gone_but_a_cached_policy_still_applies():
    policies, clock, resolver, fetch = make()
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    first = value_of(policies.policy_for("example.net"))
    del resolver.txt["_mta-sts.example.net"]
    clock.advance(mtasts.TXT_RECHECK)
    assert value_of(policies.policy_for("example.net")) is first


def test_an_old_policy_is_refreshed_in_the_background_and_one_fetch_runs_at_a_time():
    policies, clock, resolver, fetch = make()
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    fetch.answers = [POLICY.replace(b"86400", b"604800")]
    first = value_of(policies.policy_for("example.net"))
    clock.advance(mtasts.REFRESH_AFTER)
    slow = defer.Deferred()
    fetch.answers = [slow]
    assert value_of(policies.policy_for("example.net")) is first     # not waiting
    assert value_of(policies.policy_for("example.net")) is first
    assert len(fetch.asked) == 2                                     # one refresh only
    slow.callback(POLICY.replace(b"86400", b"172800"))
    assert value_of(policies.policy_for("example.net")).max_age == 172800


def test_a_dns_failure_keeps_what_is_known():
    policies, clock, resolver, fetch = make()
    resolver.txt["_mta-sts.example.net"] = "v=STSv1; id=one"
    first = value_of(policies.policy_for("example.net"))
    resolver.txt["_mta-sts.example.net"] = dns.resolver.NoNameservers()
    clock.advance(mtasts.TXT_RECHECK)
    assert value_of(policies.policy_for("example.net")) is first

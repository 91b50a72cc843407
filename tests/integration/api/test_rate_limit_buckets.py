"""Token buckets of app/core/ratelimit.py against a real Redis, including many processes at once.

Redis: the session's own database (DREAMQ_TEST_REDIS_URL, which the suite reserves for this run),
else a private EmbeddedRedis started for this module; never a fixed database number that another
run could be using. Every test works under its own random key namespace and deletes only that
afterwards; the one test that needs a whole server (SCRIPT FLUSH, a restart) starts its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from app.core.ratelimit import Bucket, RateLimiter, RateLimiterUnavailable

ROOT = Path(__file__).resolve().parents[3]


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1, retry=None)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    url = os.environ.get("DREAMQ_TEST_REDIS_URL")
    if url:
        # Named for this run: if it does not answer, that is a failure to see, not a reason to
        # fall back to some other server.
        assert _answers(url), f"DREAMQ_TEST_REDIS_URL={url} does not answer"
        yield url
        return
    from app.stack.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("ratelimit-redis"), port=0)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def r(redis_url):
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def ns(r):
    """A per-test key prefix; everything under it is deleted at the end."""
    prefix = f"dreamqtest:rl:{uuid.uuid4().hex[:12]}:"
    yield prefix
    keys = list(r.scan_iter(match=prefix + "*", count=1000))
    if keys:
        r.delete(*keys)


def server_now(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1e6


# Refill follows the Redis server's clock (the script reads TIME). On a loaded machine any two
# calls may be a second or more apart, so a bound on tokens or waits is never a fixed margin: it
# is bracketed by server time read before the first take (`t0`) and after the call in question,
# which bounds how much refill there can have been, however slow the machine.
EPS = 1e-6


# -- single process ----------------------------------------------------------------------


def test_basic_capacity_then_refusal_then_refill(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    rate = 0.5  # 2 s to a token: the refusal below holds through a 2 s stall
    bucket = Bucket(ns + "user:u1", rate_per_s=rate, capacity=5)
    t0 = server_now(r)
    for i in range(5):
        verdict = limiter.take([bucket])
        assert verdict.allowed, i
        assert verdict.retry_after_s == 0 and verdict.limited_by is None
    assert 0 <= verdict.remaining[bucket.key] <= rate * (server_now(r) - t0) + EPS

    refused = limiter.take([bucket])
    spent = server_now(r) - t0
    assert not refused.allowed
    assert 1 / rate - spent - EPS <= refused.retry_after_s <= 1 / rate + EPS
    assert refused.limited_by == bucket.key

    time.sleep(refused.retry_after_s)
    again = limiter.take([bucket])
    assert again.allowed, again
    # 5 tokens, 6 granted: what is left is the refill since the first take, less one.
    assert 0 <= again.remaining[bucket.key] <= rate * (server_now(r) - t0) - 1 + EPS


def test_bucket_stored_as_hash_with_ttl(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    slow = Bucket(ns + "tier:slow", rate_per_s=0.1, capacity=10)  # full refill: 100 s
    fast = Bucket(ns + "user:fast", rate_per_s=100.0, capacity=2)  # full refill: 20 ms
    t0 = server_now(r)
    assert limiter.take([slow, fast]).allowed

    stored = r.hgetall(slow.key)
    assert set(stored) == {b"tokens", b"ts"}
    assert float(stored[b"tokens"]) == pytest.approx(9.0, abs=1e-3)
    assert t0 - EPS <= float(stored[b"ts"]) <= server_now(r) + EPS

    # Twice the full-refill time, with a floor so tiny buckets are not recreated every call; less
    # whatever time has passed since the take (1 ms for PTTL's rounding).
    slow_ttl, fast_ttl = r.pttl(slow.key), r.pttl(fast.key)
    passed_ms = (server_now(r) - t0) * 1000 + 1
    assert 200_000 - passed_ms <= slow_ttl <= 200_000
    assert 5_000 - passed_ms <= fast_ttl <= 5_000


def test_refill_is_capped_at_capacity(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    bucket = Bucket(ns + "user:idle", rate_per_s=50.0, capacity=3)
    for _ in range(3):
        assert limiter.take([bucket]).allowed
    time.sleep(0.2)  # at least 10 tokens' worth of refill (load only adds) for a bucket that holds 3
    verdict = limiter.take([bucket])
    assert verdict.allowed
    assert verdict.remaining[bucket.key] == pytest.approx(2.0, abs=1e-6)


def test_refused_call_takes_nothing_from_any_bucket(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    user = Bucket(ns + "user:alice", rate_per_s=1.0, capacity=5)
    other = Bucket(ns + "user:bob", rate_per_s=1.0, capacity=5)
    tier = Bucket(ns + "tier:free", rate_per_s=0.01, capacity=1)  # refused through a 100 s stall

    t0 = server_now(r)
    assert limiter.take([user]).allowed  # alice's bucket exists, 4 tokens left
    assert limiter.take([other, tier]).allowed  # bob empties the shared tier bucket
    before = r.hgetall(user.key)

    for _ in range(3):
        refused = limiter.take([user, tier])
        assert not refused.allowed
        assert refused.limited_by == tier.key
        assert refused.remaining[user.key] >= 4.0  # reported, not taken

    assert r.hgetall(user.key) == before
    # Alice's own bucket still grants on its own: the refusals cost her nothing (4 left, 1 taken,
    # plus at most the refill since her first take).
    remaining = limiter.take([user]).remaining[user.key]
    assert 3.0 - EPS <= remaining <= min(4.0, 3.0 + 1.0 * (server_now(r) - t0)) + EPS


def test_retry_after_is_the_longest_wait_and_names_that_bucket(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    # Slow rates, so that both stay empty through any stall: 4 s and 20 s to a token.
    user = Bucket(ns + "user:u", rate_per_s=0.25, capacity=2)
    tier = Bucket(ns + "tier:t", rate_per_s=0.05, capacity=2)
    t0 = server_now(r)
    for _ in range(2):
        assert limiter.take([user, tier]).allowed

    for order in ([user, tier], [tier, user]):
        refused = limiter.take(order)
        assert not refused.allowed
        assert refused.limited_by == tier.key
        assert 20.0 - (server_now(r) - t0) - EPS <= refused.retry_after_s <= 20.0 + EPS

    # Only one bucket short: its wait, its name.
    roomy = Bucket(ns + "user:roomy", rate_per_s=1.0, capacity=5)
    refused = limiter.take([roomy, tier])
    assert not refused.allowed and refused.limited_by == tier.key
    refused = limiter.take([user, Bucket(ns + "tier:roomy", rate_per_s=1.0, capacity=5)])
    assert not refused.allowed and refused.limited_by == user.key
    assert 4.0 - (server_now(r) - t0) - EPS <= refused.retry_after_s <= 4.0 + EPS


def test_cost_above_one(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    bucket = Bucket(ns + "user:c", rate_per_s=0.5, capacity=4)
    t0 = server_now(r)
    assert limiter.take([bucket], cost=3).remaining[bucket.key] == pytest.approx(1.0, abs=0.01)
    refused = limiter.take([bucket], cost=3)
    assert not refused.allowed
    # 2 tokens short at 0.5/s: 4 s, less the refill since the first take.
    assert 4.0 - (server_now(r) - t0) - EPS <= refused.retry_after_s <= 4.0 + EPS


def test_submission_buckets_and_one_script_per_client(r, ns):
    limiter = RateLimiter(r, prefix=ns)
    both = limiter.submission_buckets(
        user_id="42", tier="pro", user_rate_per_min=30, user_burst=5, tier_rate_per_min=600, tier_burst=100
    )
    assert both == [Bucket(ns + "user:42", 0.5, 5), Bucket(ns + "tier:pro", 10.0, 100)]
    assert (
        limiter.submission_buckets(
            user_id="42", tier="pro", user_rate_per_min=30, user_burst=5, tier_rate_per_min=None, tier_burst=None
        )
        == both[:1]
    )
    assert limiter.take(both).allowed
    # The API builds a limiter per request: the script is still registered once per client.
    assert RateLimiter(r, prefix=ns)._script is limiter._script
    assert RateLimiter(r)._script is limiter._script


def test_private_server_restart_noscript_and_fail_fast(tmp_path):
    # SCRIPT FLUSH and a restart would hit everyone on a shared server, so this one gets its own.
    from app.stack.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", port=0)
    server.start()
    # No client-side retries: redis-py 8's default (10, with backoff) takes seconds to give up.
    client = redis.Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=1, retry=None)
    try:
        # Long enough for the restart below to fit inside it on a loaded machine.
        recheck_s = 3.0
        limiter = RateLimiter(client, recheck_after_s=recheck_s)
        bucket = Bucket("dreamq:rl:user:x", rate_per_s=0.01, capacity=5)
        t0 = server_now(client)
        assert limiter.take([bucket]).allowed
        client.script_flush()
        verdict = limiter.take([bucket])
        assert verdict.allowed
        assert 3.0 - EPS <= verdict.remaining[bucket.key] <= 3.0 + 0.01 * (server_now(client) - t0) + EPS

        server.stop()
        failed_at = time.monotonic()
        with pytest.raises(RateLimiterUnavailable) as first:
            limiter.take([bucket])
        assert isinstance(first.value.__cause__, redis.exceptions.ConnectionError)
        # Another limiter on the same client (the API makes one per request) shares the breaker.
        with pytest.raises(RateLimiterUnavailable) as fast:
            RateLimiter(client).take([bucket])
        assert fast.value.__cause__ is None

        server.start()  # same port, same AOF; the script cache is empty again
        restarted_in = time.monotonic() - failed_at
        with pytest.raises(RateLimiterUnavailable) as early:
            limiter.take([bucket])  # still within recheck_after_s: not even tried
        assert early.value.__cause__ is None, f"probed {restarted_in:.2f}s after the failure"
        # Failing fast until the window is over, then one probe finds the server back.
        deadline = time.monotonic() + 30
        while True:
            try:
                verdict = limiter.take([bucket])
                break
            except RateLimiterUnavailable as exc:
                assert exc.__cause__ is None, "a probe failed although the server is up"
                assert time.monotonic() < deadline, "the breaker never let a probe through"
                time.sleep(0.05)
        assert time.monotonic() - failed_at >= recheck_s
        assert verdict.allowed
        # The AOF kept the bucket: 2 left, plus the refill since the first take.
        assert 2.0 - EPS <= verdict.remaining[bucket.key] <= 2.0 + 0.01 * (server_now(client) - t0) + EPS
    finally:
        client.close()
        server.stop()


# -- bad input and an unreachable Redis ---------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead_client():
    # retry=None: the default retries would only make each call slower to fail.
    client = redis.Redis(
        host="127.0.0.1", port=_closed_port(), socket_connect_timeout=0.5, socket_timeout=0.5, retry=None
    )
    yield client
    client.close()


def test_redis_down_raises_unavailable_then_fails_fast(dead_client):
    limiter = RateLimiter(dead_client, recheck_after_s=0.2)
    bucket = Bucket("dreamq:rl:user:x", 1.0, 5)
    with pytest.raises(RateLimiterUnavailable) as info:
        limiter.take([bucket])
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)

    # Within recheck_after_s Redis is not asked again; afterwards one call probes it.
    with pytest.raises(RateLimiterUnavailable) as info:
        limiter.take([bucket])
    assert info.value.__cause__ is None
    time.sleep(0.2)
    with pytest.raises(RateLimiterUnavailable) as info:
        limiter.take([bucket])
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)


@pytest.mark.parametrize(
    "rate, capacity",
    [(0, 5), (-1, 5), (float("nan"), 5), (float("inf"), 5), (1, 0.5), (1, 0), (1, float("inf"))],
)
def test_bad_bucket_rejected(rate, capacity):
    with pytest.raises(ValueError):
        Bucket("dreamq:rl:user:x", rate, capacity)


def test_bad_take_rejected_before_redis(dead_client):
    # A dead client proves no Redis call happens: that would raise RateLimiterUnavailable.
    limiter = RateLimiter(dead_client)
    ok = Bucket("dreamq:rl:user:x", 1.0, 5)
    for cost in (0, -1, 6, float("nan")):
        with pytest.raises(ValueError):
            limiter.take([ok], cost=cost)
    with pytest.raises(ValueError):
        limiter.take([ok, Bucket(ok.key, 2.0, 9)])
    with pytest.raises(ValueError):
        limiter.submission_buckets(
            user_id="u", tier="t", user_rate_per_min=0, user_burst=5, tier_rate_per_min=None, tier_burst=None
        )
    assert limiter.take([]).allowed


# -- many processes -----------------------------------------------------------------------

# One API process: says it is ready, waits for the parent's start time (Redis time), then takes
# as fast as it can until start + run_s. It reports Redis TIME read before its first take and
# after its last, which bound the server times of all its takes, so the parent bounds the window
# without trusting any host clock.
HAMMER = r"""
import json, sys, time
import redis
from app.core.ratelimit import Bucket, RateLimiter

spec = json.loads(sys.argv[1])
client = redis.Redis.from_url(spec["url"], socket_timeout=5)
limiter = RateLimiter(client)

def now():
    sec, usec = client.time()
    return sec + usec / 1e6

buckets = [Bucket(spec["user_key"], spec["user_rate"], spec["user_cap"])]
if spec.get("tier_key"):
    buckets.append(Bucket(spec["tier_key"], spec["tier_rate"], spec["tier_cap"]))
client.rpush(spec["ready_key"], 1)
while (go := client.get(spec["go_key"])) is None:
    time.sleep(0.005)
start = float(go)
end = start + spec["run_s"]
while now() < start:
    time.sleep(0.002)
first = now()
allowed = calls = 0
while True:
    calls += 1
    if limiter.take(buckets).allowed:
        allowed += 1
    if calls % 10 == 0 and now() >= end:
        break
last = now()
client.close()
print(json.dumps({"allowed": allowed, "calls": calls, "first": first, "last": last}))
"""


def _hammer(r, ns: str, specs: list[dict], run_s: float, before_start=None) -> tuple[float, list[dict]]:
    """Run one HAMMER process per spec; return the common start (Redis time) and their reports."""
    ready_key, go_key = ns + "ready", ns + "go"
    specs = [{**spec, "ready_key": ready_key, "go_key": go_key, "run_s": run_s} for spec in specs]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, json.dumps(spec)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for spec in specs
    ]
    try:
        # Startup (interpreter, imports, connect) varies by seconds on a loaded box, so start
        # on a barrier rather than after a fixed delay.
        deadline = time.monotonic() + 30
        while r.llen(ready_key) < len(procs):
            assert time.monotonic() < deadline, "hammer processes did not get ready"
            assert all(p.poll() is None for p in procs), "a hammer process died during startup"
            time.sleep(0.01)
        start = server_now(r) + 0.05
        if before_start is not None:
            before_start(start)
        r.set(go_key, f"{start:.6f}")
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            results.append(json.loads(out.strip().splitlines()[-1]))
        return start, results
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


N_PROCS = 6


@pytest.mark.slow
def test_one_bucket_never_over_granted_across_processes(r, redis_url, ns):
    cap, rate = 50, 5.0
    spec = {"url": redis_url, "user_key": ns + "user:shared", "user_rate": rate, "user_cap": cap}
    start, results = _hammer(r, ns, [spec] * N_PROCS, run_s=2.0)

    allowed = sum(x["allowed"] for x in results)
    calls = sum(x["calls"] for x in results)
    elapsed = max(x["last"] for x in results) - min(x["first"] for x in results)
    ceiling = cap + rate * elapsed
    late = max(x["first"] for x in results) - start
    print(
        f"\n{N_PROCS} procs: {calls} calls, {allowed} allowed, elapsed {elapsed:.3f}s, "
        f"ceiling {ceiling:.2f}, last start {late:.3f}s late"
    )
    assert calls > 10 * allowed, "the processes must really contend"
    assert allowed <= ceiling + 1e-6
    assert allowed >= cap
    # Hammered without pause, the bucket hands out its refill too, not just the burst.
    assert allowed >= cap + rate * elapsed - 3


@pytest.mark.slow
def test_tier_bucket_shared_by_users_never_exceeded(r, redis_url, ns):
    # Buckets are seeded below capacity with ts = start, so none ever refills up to its cap:
    # then every balance obeys tokens = seed + rate * (ts - start) - grants exactly, which
    # checks all-or-nothing under contention (a refused call that took a token would break it).
    user_cap, user_rate, user_seed = 40, 3.0, 15
    tier_cap, tier_rate, tier_seed = 30, 5.0, 25  # 3 users could take 63 in 2 s; the tier, 35
    users = ["u1", "u2", "u3"]
    tier_key = ns + "tier:free"

    def seed(start: float) -> None:
        for key, tokens in [(tier_key, tier_seed)] + [(f"{ns}user:{u}", user_seed) for u in users]:
            r.hset(key, mapping={"tokens": tokens, "ts": f"{start:.6f}"})

    specs = [
        {
            "url": redis_url,
            "user_key": f"{ns}user:{user}",
            "user_rate": user_rate,
            "user_cap": user_cap,
            "tier_key": tier_key,
            "tier_rate": tier_rate,
            "tier_cap": tier_cap,
        }
        for user in users
        for _ in range(2)  # two API processes serving each user
    ]
    start, results = _hammer(r, ns, specs, run_s=2.0, before_start=seed)

    # The seeded ts, not the first take, is where refill starts counting.
    elapsed = max(x["last"] for x in results) - start
    late = max(x["first"] for x in results) - start
    total = sum(x["allowed"] for x in results)
    per_user = {u: sum(x["allowed"] for x, s in zip(results, specs) if s["user_key"] == f"{ns}user:{u}") for u in users}
    print(f"\nper user {per_user}, tier total {total}, elapsed {elapsed:.3f}s, last start {late:.3f}s late")
    assert total <= tier_seed + tier_rate * elapsed + 1e-6
    assert total >= tier_seed
    assert min(per_user.values()) > 0
    for user, n in per_user.items():
        assert n <= user_seed + user_rate * elapsed + 1e-6, user

    def balance_matches(key: str, seed: float, rate: float, grants: int) -> None:
        stored = r.hgetall(key)
        tokens, ts = float(stored[b"tokens"]), float(stored[b"ts"])
        assert tokens == pytest.approx(seed + rate * (ts - start) - grants, abs=1e-3), key
        assert tokens >= -1e-9, key

    balance_matches(tier_key, tier_seed, tier_rate, total)
    for user in users:
        balance_matches(f"{ns}user:{user}", user_seed, user_rate, per_user[user])

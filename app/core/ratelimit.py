"""Token buckets in Redis for API submissions: one per user, one per tier (across its users).

Why Redis and not Celery's ``rate_limit``: Celery's task rate limit is enforced by each worker
process on the tasks it consumes, so it throttles execution per worker, not submissions per
user; it knows nothing about who submitted, and adding workers raises the effective limit. The
limit we need is on intake, per user and per tier, shared by every API process on every host,
so the state has to live in one place that all of them reach: the Redis the system already runs.

Why a Lua script: a token bucket is read-refill-compare-write. Done as separate commands from
many processes, two callers read the same token count and both spend it (or a WATCH/MULTI
retry loop burns round trips under contention). Redis runs a script atomically, so the whole
read-refill-take over every bucket of a request happens as one step, in one round trip, and the
all-or-nothing rule (take from every bucket or from none) holds without locks.

Why server time: refill is computed from elapsed time, and API hosts' clocks differ (NTP skew,
a paused VM). Mixing timestamps from different hosts in one bucket would mint tokens (a host
ahead of the others) or starve it (one behind). The script reads ``redis.call('TIME')``, one
clock for every caller. Redis >= 5 replicates a script's effects (the writes), not the script,
so a non-deterministic TIME before a write is allowed and replicas see the same values.

Limits: the script touches several keys, so under Redis Cluster the keys of one call would need
a common hash tag; dreamq runs one Redis (or a Sentinel pair), where this does not arise. If a
failover lands on a server whose clock is behind, a bucket's stored timestamp can be in the
future: elapsed time is clamped to zero, so the bucket just refills late by the skew, never
grants extra.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import redis

__all__ = ["Bucket", "Verdict", "RateLimiter", "RateLimiterUnavailable"]

# KEYS: the bucket keys. ARGV: cost, then (rate_per_s, capacity) for each key, then min_ttl_ms.
# Returns {allowed, retry_after_s, limited_by_index (0 = none), tokens_1, ..., tokens_n}; floats
# go back as strings because Redis truncates Lua numbers to integers in replies.
_TAKE_LUA = """
local n = #KEYS
local cost = tonumber(ARGV[1])
local min_ttl_ms = tonumber(ARGV[2 * n + 2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000

local tokens = {}
local allowed = 1
local wait = 0
local limited = 0
for i = 1, n do
  local rate = tonumber(ARGV[2 * i])
  local cap = tonumber(ARGV[2 * i + 1])
  local h = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tok = tonumber(h[1])
  local ts = tonumber(h[2])
  if tok == nil or ts == nil then
    -- A new (or expired: it had refilled fully before its TTL ran out) bucket starts full.
    tok = cap
    ts = now
  end
  local elapsed = now - ts
  if elapsed < 0 then elapsed = 0 end
  -- min() also applies a lowered capacity at once to a bucket saved under the old one.
  tok = math.min(cap, tok + elapsed * rate)
  tokens[i] = tok
  if tok < cost then
    allowed = 0
    local w = (cost - tok) / rate
    if w > wait then
      wait = w
      limited = i
    end
  end
end

if allowed == 1 then
  for i = 1, n do
    local rate = tonumber(ARGV[2 * i])
    local cap = tonumber(ARGV[2 * i + 1])
    tokens[i] = tokens[i] - cost
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tokens[i]), 'ts', string.format('%.6f', now))
    -- Once idle this long the bucket is full again, so dropping it loses nothing.
    local ttl = math.max(min_ttl_ms, math.ceil(2000 * cap / rate))
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
-- A refusal writes nothing: refill is computed from the stored ts, so nothing is lost.

-- Rounded up to the microsecond so that sleeping retry_after_s is always enough.
local out = {allowed, string.format('%.6f', math.ceil(wait * 1000000) / 1000000), limited}
for i = 1, n do
  out[3 + i] = string.format('%.6f', tokens[i])
end
return out
"""

# give_back(): KEYS the buckets, ARGV: cost, then (rate_per_s, capacity) for each key. Refills to
# now as _TAKE_LUA does, then adds the cost back, capped at capacity; a bucket that expired
# (full) stays absent. The TTL is left as the take set it.
_GIVE_LUA = """
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for i = 1, #KEYS do
  local rate = tonumber(ARGV[2 * i])
  local cap = tonumber(ARGV[2 * i + 1])
  local h = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tok = tonumber(h[1])
  local ts = tonumber(h[2])
  if tok ~= nil and ts ~= nil then
    local elapsed = now - ts
    if elapsed < 0 then elapsed = 0 end
    tok = math.min(cap, tok + elapsed * rate + cost)
    redis.call('HSET', KEYS[i], 'tokens', string.format('%.17g', tok), 'ts', string.format('%.6f', now))
  end
end
return 1
"""

# Keeps a bucket that refills in milliseconds from being re-created on almost every call.
_MIN_TTL_MS = 5_000
_STATE_ATTR = "_dreamq_ratelimit_state"
_state_lock = threading.Lock()
# After a failed call, how long other calls on the same client fail fast instead of trying.
DEFAULT_RECHECK_AFTER_S = 1.0


class RateLimiterUnavailable(RuntimeError):
    """Redis could not be asked (down, timed out, refusing writes): no verdict was reached.

    Recommendation for the API: fail open, i.e. accept the submission and log a warning. Postgres
    is the source of truth for jobs and quotas, the monthly quota is still enforced there, and
    losing the limiter (a cache-like service) must not stop intake. Failing closed would turn a
    Redis outage into a full API outage.

    Failing open is only cheap if failing is fast. A redis-py 8 client retries a refused
    connection 10 times with backoff by default (measured ~3.4 s per call), and a black-holed
    host costs socket_connect_timeout per attempt; so after a failed call the limiter fails fast
    (raises at once, without a cause) for `recheck_after_s`, then lets one call through to probe
    while the others keep failing fast, and closes again on the first success. So during an
    outage only the calls already in flight when it began, then one probe per window, pay the
    client's full retry time. Give the limiter's client short timeouts and few retries too.
    """


@dataclass(frozen=True)
class Bucket:
    key: str  # e.g. "dreamq:rl:user:<user_id>" / "dreamq:rl:tier:<tier>"
    rate_per_s: float  # refill
    capacity: float  # burst

    def __post_init__(self) -> None:
        # Checked here so a bad tier row fails loudly before any Redis call: a rate of 0 would
        # divide by zero in the script, and a capacity under 1 could never grant a request.
        if not self.key:
            raise ValueError("bucket key must not be empty")
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"{self.key}: rate_per_s must be a positive finite number, got {self.rate_per_s!r}")
        if not (math.isfinite(self.capacity) and self.capacity >= 1):
            raise ValueError(f"{self.key}: capacity must be a finite number >= 1, got {self.capacity!r}")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    # 0 when allowed; else time until every bucket has enough tokens again (Retry-After, rounded up).
    retry_after_s: float
    remaining: dict[str, float]  # tokens left per bucket key after this call
    limited_by: str | None  # key of the refusing bucket with the longest wait


class _ClientState:
    """What RateLimiters on one redis client share: the registered script and the breaker."""

    def __init__(self, client: redis.Redis) -> None:
        self.script = client.register_script(_TAKE_LUA)
        self.give_script = client.register_script(_GIVE_LUA)
        self.lock = threading.Lock()
        self.failed = False
        self.retry_at = 0.0  # time.monotonic() from which one call may probe again
        self.probing = False


def _state_for(client: redis.Redis) -> _ClientState:
    # The API builds a RateLimiter per request around the process's one client; keeping the
    # state on the client registers the script once per client, not per request, and lets the
    # breaker see every request. (A WeakKeyDictionary would not do: the Script holds its client.)
    state = getattr(client, _STATE_ATTR, None)
    if state is None:
        with _state_lock:
            state = getattr(client, _STATE_ATTR, None)
            if state is None:
                state = _ClientState(client)
                setattr(client, _STATE_ATTR, state)
    return state


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class RateLimiter:
    """Atomic multi-bucket token limiter; safe to share across threads (redis-py pools)."""

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        prefix: str = "dreamq:rl:",
        recheck_after_s: float = DEFAULT_RECHECK_AFTER_S,
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.recheck_after_s = recheck_after_s
        self._state = _state_for(redis_client)
        self._script = self._state.script

    def submission_buckets(
        self,
        *,
        user_id: str,
        tier: str,
        user_rate_per_min: float,
        user_burst: int,
        tier_rate_per_min: float | None,
        tier_burst: int | None,
    ) -> list[Bucket]:
        """The user's bucket, plus the tier-wide one unless the tier is unlimited (either None)."""
        buckets = [Bucket(f"{self.prefix}user:{user_id}", user_rate_per_min / 60.0, float(user_burst))]
        if tier_rate_per_min is not None and tier_burst is not None:
            buckets.append(Bucket(f"{self.prefix}tier:{tier}", tier_rate_per_min / 60.0, float(tier_burst)))
        return buckets

    def _enter(self) -> None:
        state = self._state
        with state.lock:
            if not state.failed:
                return
            now = time.monotonic()
            if state.probing or now < state.retry_at:
                wait = max(0.0, state.retry_at - now)
                raise RateLimiterUnavailable(
                    "rate limiter Redis unavailable (a recent call failed; "
                    + ("another call is probing it)" if state.probing else f"next probe in {wait:.2f} s)")
                )
            state.probing = True

    def _leave(self, *, ok: bool | None) -> None:
        state = self._state
        with state.lock:
            state.probing = False
            if ok is None:
                return
            state.failed = not ok
            if not ok:
                state.retry_at = time.monotonic() + self.recheck_after_s

    def _evalsha(self, keys: list[str], args: list) -> list:
        # EVALSHA as one plain command: redis-py's Script.__call__ and evalsha() wrappers cost
        # as much CPU as the command itself (bench/intake.py). A server that lost the script
        # (restart, SCRIPT FLUSH, failover) answers NOSCRIPT: then the Script loads it and runs.
        try:
            return self.redis.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return self._script(keys=keys, args=args)

    def take(self, buckets: Sequence[Bucket], cost: float = 1.0) -> Verdict:
        """Take `cost` tokens from every bucket, or from none if any bucket lacks them.

        Raises ValueError for a bad request (before touching Redis) and RateLimiterUnavailable
        when Redis cannot answer, or failed to within `recheck_after_s` (see that class for the
        fail-fast rule and for what the caller should do).
        """
        if not (math.isfinite(cost) and cost > 0):
            raise ValueError(f"cost must be a positive finite number, got {cost!r}")
        if not buckets:
            return Verdict(True, 0.0, {}, None)
        keys = [b.key for b in buckets]
        if len(set(keys)) != len(keys):
            # The script would read one key twice before writing it, taking the cost once.
            raise ValueError(f"duplicate bucket keys: {keys}")
        for b in buckets:
            if cost > b.capacity:
                # It would never be granted, and a retry_after would promise otherwise.
                raise ValueError(f"{b.key}: cost {cost} exceeds capacity {b.capacity}")

        args: list[float | int] = [cost]
        for b in buckets:
            args += [float(b.rate_per_s), float(b.capacity)]
        args.append(_MIN_TTL_MS)
        self._enter()
        try:
            reply = self._evalsha(keys, [repr(a) if isinstance(a, float) else a for a in args])
        except redis.exceptions.RedisError as exc:
            # Connection refused, timeouts, a loading or read-only replica, OOM under
            # noeviction: in every case there is no verdict, and the caller decides (fail open).
            self._leave(ok=False)
            raise RateLimiterUnavailable(f"rate limiter Redis unavailable: {exc}") from exc
        except BaseException:
            self._leave(ok=None)  # interrupted (say KeyboardInterrupt): no news about Redis
            raise
        self._leave(ok=True)

        allowed = int(reply[0]) == 1
        wait = float(_text(reply[1]))
        limited = int(reply[2])
        remaining = {key: float(_text(v)) for key, v in zip(keys, reply[3:])}
        return Verdict(
            allowed=allowed,
            retry_after_s=0.0 if allowed else wait,
            remaining=remaining,
            limited_by=None if allowed or limited == 0 else keys[limited - 1],
        )

    def give_back(self, buckets: Sequence[Bucket], cost: float = 1.0) -> None:
        """Return `cost` tokens that `take()` granted for work that then did not happen (the
        job insert after the token failed), so a request that creates no job costs none.
        Best effort: raises RateLimiterUnavailable when Redis cannot be asked."""
        if not buckets:
            return
        args: list = [repr(float(cost))]
        for b in buckets:
            args += [repr(float(b.rate_per_s)), repr(float(b.capacity))]
        try:
            self._state.give_script(keys=[b.key for b in buckets], args=args)
        except redis.exceptions.RedisError as exc:
            raise RateLimiterUnavailable(f"rate limiter Redis unavailable: {exc}") from exc

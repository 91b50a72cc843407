"""One Redis client per process for rate limits, dispatch coalescing and heartbeats."""

from __future__ import annotations

import functools

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from app.core.config import get_settings


@functools.lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    # Short timeouts and a single retry: this client sits on the request path (rate limits,
    # dispatch coalescing), and redis-py's default ten retries turn an outage into seconds of
    # latency on every submission instead of a quick fail-open.
    return redis.Redis.from_url(
        url,
        socket_timeout=2,
        socket_connect_timeout=1,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    )


def get_redis() -> redis.Redis | None:
    """None when no Redis is configured (RabbitMQ broker without DREAMQ_REDIS_URL)."""
    url = get_settings().effective_redis_url
    return _client(url) if url else None


def reset() -> None:
    _client.cache_clear()

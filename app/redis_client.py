"""One Redis client per process for rate limits, dispatch coalescing and heartbeats."""

from __future__ import annotations

import functools

import redis

from app.config import get_settings


@functools.lru_cache(maxsize=4)
def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5, health_check_interval=30)


def get_redis() -> redis.Redis | None:
    """None when no Redis is configured (RabbitMQ broker without DREAMQ_REDIS_URL)."""
    url = get_settings().effective_redis_url
    return _client(url) if url else None


def reset() -> None:
    _client.cache_clear()

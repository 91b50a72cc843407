"""The bottom layer: settings, errors without Flask, queue naming and tier order, signals, logging,
the Redis client, object storage, media decoding and the token-bucket rate limiter. Imports nothing
else of the project."""

"""Tier order, most important first: the order a GPU worker takes work from its queues and the
rank order of the SLO policy (app/scheduling/tiers.py holds each tier's SLO, floor and cap)."""

from __future__ import annotations

TIER_ORDER: tuple[str, ...] = ("api", "enterprise", "unlimited", "light", "free")

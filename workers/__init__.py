"""GPU worker runtime: device pinning, model repository client, local cache, demo models."""

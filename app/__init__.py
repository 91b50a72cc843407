"""dreamq: serving system for generative video.

Flask accepts requests and stores jobs in Postgres, Celery routes them to per-tier queues, and
GPU-pinned Celery workers load PyTorch checkpoints from versioned object storage.
"""

__version__ = "0.1.0"

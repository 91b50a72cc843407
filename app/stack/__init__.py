"""Local service stack: process supervision and embedded Postgres, Redis and SeaweedFS (S3)."""

"""Flower's config file (`celery flower --conf=app/observability/flowerconfig.py`, as `dreamq up`
runs it). Flower executes it before it starts: options are module-level names; the command line
and FLOWER_* variables still override them.

Production (README, "Flower in production"): pass auth on the command line or in the
environment, never here: `--basic-auth=user:password` or `--auth=<email regex>` with
`--auth_provider` (Google, GitHub, GitLab, Okta OAuth) and FLOWER_OAUTH2_* variables; serve it
behind the reverse proxy with TLS and `--url_prefix=flower`.
"""

from app.observability.flower import install

# Every pool and tier queue on /broker and /api/queues/length, not just what workers report.
install()

# Task history lives in Postgres (jobs, job_events); Flower's would be a second, partial copy.
persistent = False
# Flower keeps task events in memory: bound it (one launch day is millions of tasks).
max_tasks = 10000
max_workers = 5000
# Burst workers come and go; forget those gone for an hour instead of listing them forever.
purge_offline_workers = 3600

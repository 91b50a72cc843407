"""Webhooks: per-job callback URLs, signed deliveries with retries, and the address rule (SSRF).

addresses.py   which URLs we may connect to (pure; reused for any server-side fetch of a
               user-supplied URL)
allowlist.py   the admin allow-list (table webhook_allowlist) that lifts the address rule
events.py      job lifecycle -> delivery rows (started, progress, completed), after commit
delivery.py    one signed POST to a checked, pinned address; attempt bookkeeping
"""

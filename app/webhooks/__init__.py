"""Webhooks: per-job callback URLs and signed deliveries with retries.

events.py      listeners on the job signals -> delivery rows (started, progress, completed) in the
               change's own transaction, published after its commit
delivery.py    one signed POST to a checked, pinned address; attempt bookkeeping

The address rule every callback URL passes (SSRF guard) and its allow-list are app/outbound/.
"""

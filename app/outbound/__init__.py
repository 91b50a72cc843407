"""Outbound URLs: the address rule every URL dreamq calls passes (webhook deliveries, media
fetches, callback URLs at submission), and the operator's allow-list of exceptions to it."""

"""The simulator: proves a dispatch policy against synthetic or recorded workloads, offline.

It calls the same pure decision function as the live dispatcher (app/scheduling/policy.py);
`traces` makes the workloads, `report` the metrics (`python -m app.scheduling.sim.simulator`).
"""

"""The burst controller policy (app/scheduling/burst.py): pure logic, a clock passed in."""

from __future__ import annotations

import pytest

from app.scheduling.burst import (
    DRAINING,
    SERVING,
    STARTING,
    Action,
    BurstController,
    BurstObservation,
    BurstParams,
    BurstState,
    BurstWorker,
    TierPressure,
    count_reversals,
)
from app.scheduling.sim.simulator import REVERSAL_WINDOW_S, simulate

MEAN = 160.0
WARMUP = 600.0


def obs(
    now,
    *,
    api=0,
    free=0,
    api_rate=0.0,
    free_rate=0.0,
    api_wait=0.0,
    standing=100,
    busy=None,
    workers=(),
    warmup=WARMUP,
    max_workers=1000,
    reclaimed=False,
    reclaim_reason="",
):
    """100 standing GPUs; api (W 60 s) above free (W 7,200 s); rates in jobs/s."""
    tiers = (TierPressure("api", 60.0, api, api_wait, api_rate), TierPressure("free", 7200.0, free, 0.0, free_rate))
    return BurstObservation(
        now=now,
        tiers=tiers,
        standing_busy=standing if busy is None else busy,
        standing_total=standing,
        workers=tuple(workers),
        mean_job_s=MEAN,
        warmup_s=warmup,
        max_workers=max_workers,
        reclaimed=reclaimed,
        reclaim_reason=reclaim_reason,
    )


# free: 3,000 queued on 100 GPUs -> drain 4,800 s = 0.67 W: high pressure, well past warm-up
HIGH = {"free": 3000}
CALM = {"free": 0, "free_rate": 0.3}  # load 48 GPUs, no backlog


def tick(ctrl, t, **kw):
    d = ctrl.decide(obs(t, **kw))
    assert d.reason and "pressure" in d.numbers  # every decision says why, with its numbers
    return d


def test_sustained_pressure_scales_up_and_sizes_the_step():
    c = BurstController()
    sustain = c.params.sustain_s
    decisions = [tick(c, t, **HIGH) for t in range(0, int(sustain), 60)]
    assert all(d.action is Action.HOLD for d in decisions)
    assert "needs" in decisions[-1].reason
    d = tick(c, sustain, **HIGH)
    assert d.action is Action.SCALE_UP and d.count > 0
    # target: drain <= W/2 for the backlog left when they are ready: 3,000 - 100 GPUs x 600 s /
    # 160 s = 2,625 jobs; 2,625 x 160 / 3,600 = 116.7 GPUs, so 17 more than 100
    assert d.count == 17
    assert d.numbers["target_capacity"] == pytest.approx(116.7, abs=0.1)
    assert "scale up 17" in d.reason and "free" in d.reason
    # the next step needs a new sustained streak
    starting = [BurstWorker("b1", STARTING, sustain, 17)]
    assert tick(c, sustain + 60, free=4000, workers=starting).action is Action.HOLD


def test_one_tick_spike_does_not_scale_up():
    c = BurstController()
    assert tick(c, 0, api=500, api_wait=50).action is Action.HOLD  # huge for one tick
    assert tick(c, 60).action is Action.HOLD  # gone
    for t in range(120, 120 + int(c.params.sustain_s), 60):  # back, but the streak restarted at 120
        assert tick(c, t, **HIGH).action is Action.HOLD
    assert tick(c, 120 + c.params.sustain_s, **HIGH).action is Action.SCALE_UP


def test_no_scale_up_when_backlog_drains_before_warm_up_ends():
    def run(warmup):
        c = BurstController()
        for t in range(0, int(c.params.sustain_s) + 1, 60):
            d = tick(c, t, warmup=warmup, **HIGH)
        return d

    assert run(WARMUP).action is Action.SCALE_UP  # drain 4,800 s > 600 + 300
    d = run(6000.0)  # drain 4,800 s < warm-up 6,000 s: they would be ready after the backlog is gone
    assert d.action is Action.HOLD and "before new workers would be useful" in d.reason
    assert d.numbers["drain_planned_s"] == pytest.approx(4800.0)


def test_growing_backlog_counts_as_pressure_even_if_small():
    # 10 queued, but arrivals (0.7 jobs/s = 112 GPUs) exceed the 100 GPUs: it only grows
    c = BurstController()
    d = tick(c, 0, free=10, free_rate=0.7)
    assert d.numbers["pressure"] >= 1e9
    for t in range(60, int(c.params.sustain_s) + 1, 60):
        d = tick(c, t, free=10 + t // 10, free_rate=0.7)
    assert d.action is Action.SCALE_UP
    assert 100 + d.count >= 112 / c.params.target_utilization  # carries the load with headroom


def test_urgency_counts_only_while_gpus_are_saturated():
    # an api job waiting 2 W next to idle GPUs is held by its user's cap, not by capacity
    c = BurstController()
    idle = tick(c, 0, api=1, api_wait=120, busy=40)
    assert idle.numbers["pressure"] < 0.5
    full = tick(c, 60, api=1, api_wait=120, busy=100)
    assert full.numbers["pressure"] == pytest.approx(2.0)


def serving(started, n=50, busy=0, wid="b1"):
    return [BurstWorker(wid, SERVING, started, n, busy)]


def test_short_dip_keeps_workers():
    c = BurstController()
    w = serving(-5000)
    calm_s = c.params.calm_s
    for t in range(0, int(calm_s) - 60, 60):  # calm, but not for long enough
        d = tick(c, t, workers=w, **CALM)
        assert d.action is Action.HOLD
    assert "keeping" in d.reason
    # pressure comes back in the middle band: the calm streak restarts
    assert tick(c, calm_s - 60, free=1500, workers=w).action is Action.HOLD  # 0.33 W
    for t in range(int(calm_s), 2 * int(calm_s), 60):
        assert tick(c, t, workers=w, **CALM).action is Action.HOLD
    assert tick(c, 2 * calm_s, workers=w, **CALM).action is Action.DRAIN


def test_min_lifetime_respected():
    c = BurstController()
    life = c.params.min_lifetime_s
    young = serving(0)
    t = c.params.calm_s
    for s in range(0, int(t) + 1, 60):
        d = tick(c, s, workers=young, **CALM)
    assert d.action is Action.HOLD and "min lifetime" in d.reason  # calm long enough, workers too young
    d = tick(c, life, workers=young, **CALM)
    assert d.action is Action.DRAIN


def test_no_drain_soon_after_a_scale_up():
    c = BurstController()
    for t in range(0, int(c.params.sustain_s) + 1, 60):
        d = tick(c, t, **HIGH)
    assert d.action is Action.SCALE_UP
    up_at = c.params.sustain_s
    old = serving(-10_000)
    for t in range(int(up_at) + 60, int(up_at + c.params.min_lifetime_s), 60):
        d = tick(c, t, workers=old, **CALM)
        assert d.action is Action.HOLD
    assert tick(c, up_at + c.params.min_lifetime_s, workers=old, **CALM).action is Action.DRAIN


def test_backlog_gone_drains_idle_oldest_first_never_kills():
    c = BurstController(calm_s=0, drain_interval_s=0)
    workers = [
        BurstWorker("old-busy", SERVING, -9000, 1, 1),
        BurstWorker("old-idle", SERVING, -8000, 1, 0),
        BurstWorker("oldest-idle", SERVING, -9500, 1, 0),
        BurstWorker("young-idle", SERVING, -100, 1, 0),
        BurstWorker("leaving", DRAINING, -9999, 1, 1),
    ]
    # load 0.6 jobs/s x 160 = 96 GPUs -> keep ceil(96 / 0.85) = 113 -> 13 burst workers beyond 100
    d = tick(c, 0, free=0, free_rate=0.6, workers=workers)
    assert d.action is Action.HOLD and d.numbers["keep"] == 13
    d = tick(c, 60, free=0, free_rate=0.0, workers=workers)  # no load at all
    assert d.action is Action.DRAIN  # drain: finish the current job, take nothing new
    # the young one is within its min lifetime; idle before busy, oldest first
    assert d.workers == (("oldest-idle", 1), ("old-idle", 1), ("old-busy", 1))
    assert d.count == 3 and "drain 3" in d.reason


def test_drain_keeps_what_the_load_needs():
    c = BurstController(calm_s=0)
    # 100 standing + 100 burst; load 1 job/s x 160 = 160 GPUs -> keep ceil(160/0.85) - 100 = 89
    d = tick(c, 0, free=0, free_rate=1.0, busy=100, workers=serving(-9000, n=100, busy=60))
    assert d.action is Action.DRAIN and d.count == 11 and d.numbers["keep"] == 89
    # 2 jobs/s: the standing GPUs could not carry it: nothing is drained
    c = BurstController(calm_s=0)
    d = tick(c, 0, free=0, free_rate=2.0, workers=serving(-9000, n=100, busy=100))
    assert d.action is Action.HOLD and "needs" in d.reason


def test_reclaim_releases_everything_with_reason():
    c = BurstController()
    workers = [
        BurstWorker("a", STARTING, -10, 5),
        BurstWorker("b", SERVING, -5000, 20, 12),
        BurstWorker("c", DRAINING, -6000, 3, 3),
    ]
    d = tick(c, 0, workers=workers, reclaimed=True, reclaim_reason="training needs partition gpu", **HIGH)
    assert d.action is Action.RELEASE and d.count == 28
    assert dict(d.workers) == {"a": 5, "b": 20, "c": 3}
    assert "reclaimed" in d.reason and "training needs partition gpu" in d.reason and "requeued" in d.reason
    # while reclaimed nothing starts, however high the pressure
    for t in range(60, 1200, 60):
        assert tick(c, t, reclaimed=True, **HIGH).action is Action.HOLD


def test_scale_up_capped_by_cluster_and_step():
    c = BurstController()
    for t in range(0, int(c.params.sustain_s) + 1, 60):
        d = tick(c, t, free=100_000, max_workers=80, workers=[BurstWorker("b1", SERVING, -5000, 50, 50)])
    assert d.action is Action.SCALE_UP and d.count == 30 and "cluster room" in d.reason
    c = BurstController()
    for t in range(0, int(c.params.sustain_s) + 1, 60):
        d = tick(c, t, free=100_000, max_workers=1000)
    assert d.action is Action.SCALE_UP and d.count == 500 and "max step 500" in d.reason
    # full cluster: hold and say so
    c = BurstController()
    for t in range(0, int(c.params.sustain_s) + 1, 60):
        d = tick(c, t, free=100_000, max_workers=50, workers=[BurstWorker("b1", SERVING, -5000, 50, 50)])
    assert d.action is Action.HOLD and "full" in d.reason


def test_over_the_limit_releases_the_excess_starting_first():
    c = BurstController()
    workers = [BurstWorker("s", STARTING, -60, 4), BurstWorker("b", SERVING, -5000, 10, 10)]
    d = tick(c, 0, workers=workers, max_workers=8)
    assert d.action is Action.RELEASE and d.count == 6
    assert d.workers == (("s", 4), ("b", 2))


def test_state_survives_a_process_boundary():
    a = BurstController()
    for t in range(0, 240, 60):
        a.decide(obs(t, **HIGH))
    saved = a.state.as_dict()
    b = BurstController(state=BurstState.from_dict(saved))
    assert b.decide(obs(300, **HIGH)).action is Action.SCALE_UP
    assert BurstState.from_dict(None) == BurstState()


def test_deterministic():
    def run():
        c = BurstController()
        return [c.decide(obs(t, free=3000 if t < 900 else 0)) for t in range(0, 4000, 60)]

    assert run() == run()


def test_params_validated_and_overridable():
    assert BurstController(sustain_s=60).params.sustain_s == 60
    with pytest.raises(ValueError):
        BurstParams(calm_pressure=0.6, up_pressure=0.5)
    with pytest.raises(ValueError):
        BurstWorker("x", "warming", 0)


def test_count_reversals():
    acts = [(0, "scale_up"), (100, "scale_up"), (2000, "drain"), (2100, "scale_up"), (9000, "drain")]
    assert count_reversals(acts, 1800) == 1  # drain at 2000 -> up at 2100
    assert count_reversals(acts, 60) == 0
    assert count_reversals([(0, Action.SCALE_UP), (10, Action.RELEASE)], 60) == 1


def test_simulated_burst_does_not_flap():
    res = simulate("launch-day", "slo", burst=True, scale=0.05, hours=5.0)
    b = res.summary["burst"]
    assert b["max_gpus"] == 200
    assert b["scale_ups"] >= 1 and b["scale_downs"] >= 1 and b["peak_gpus"] > 0
    assert b["reversals"] == 0
    acts = b["actions"]
    assert all(a["reason"] for a in acts)
    ups = [a["t"] for a in acts if a["action"] == "scale_up"]
    downs = [a["t"] for a in acts if a["action"] in ("drain", "release")]
    assert min(abs(u - d) for u in ups for d in downs) >= REVERSAL_WINDOW_S
    assert max(res.timeline["burst_gpus"]) <= 200

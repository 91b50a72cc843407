"""Metrics, tables and plots for the scheduling simulator.

Per tier (all jobs of the tier submitted during the trace):

* wait = start - submit; a job not started by the end of the trace has wait = end - submit
  (its wait so far) and is always a miss.
* `p50_wait_s`, `p99_wait_s`, `max_wait_s`: over those waits.
* `within_slo`: fraction of jobs that started with wait <= W.
* `max_wait_over_slo`: max wait / W.
* `dispatched`: jobs dispatched by the end; `left_queued`: jobs still queued at the end.
* `starved_windows`, precisely. Time is cut into fixed 10-minute windows [600k, 600(k+1)) that
  the trace covers entirely. For tier t with floor f = min_share_t > 0 and window w let
    D      = dispatches of all tiers in w,
    d      = dispatches of tier t in w,
    need   = floor(f x D)                      (the share t was owed, in whole jobs),
    B0     = t's dispatchable backlog at the start of w,
    Bmin   = t's smallest dispatchable backlog at any dispatcher tick of w,
    A      = jobs of t submitted during w,
  where the dispatchable backlog counts each user's queued jobs only up to the user's remaining
  concurrency cap (sum over users of min(queued, cap - in_flight)): jobs held back by their own
  user's cap are not backlog the scheduler could have served. Window w is *eligible* when
  need >= 1 and the tier had enough backlog to use its share: B0 >= need (backlog at window
  start), or Bmin >= 1 and B0 + A >= need (backlog the whole window). It is *starved* when
  eligible and d < need. Tiers with min_share 0 never have starved windows.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from app.scheduling.tiers import TierSpec

TIER_COLORS = {
    "api": (220, 50, 47),
    "enterprise": (211, 130, 0),
    "unlimited": (38, 139, 210),
    "light": (133, 153, 0),
    "free": (108, 113, 196),
}


def starved_windows(
    min_share: float,
    disp: np.ndarray,
    total: np.ndarray,
    start_backlog: np.ndarray,
    min_backlog: np.ndarray,
    arrivals: np.ndarray,
) -> int:
    """Number of starved windows for one tier (arrays indexed by window; see module docstring)."""
    if min_share <= 0 or len(disp) == 0:
        return 0
    need = np.floor(min_share * total.astype(np.float64) + 1e-9).astype(np.int64)
    enough = (start_backlog >= need) | ((min_backlog >= 1) & (start_backlog + arrivals >= need))
    eligible = (need >= 1) & enough
    return int(np.count_nonzero(eligible & (disp < need)))


def summarize(
    *,
    tiers: Mapping[str, TierSpec],
    tier_names: Sequence[str],
    submit: np.ndarray,
    tier: np.ndarray,
    start: np.ndarray,
    state: np.ndarray,
    end: float,
    win_disp: np.ndarray,
    win_start_backlog: np.ndarray,
    win_min_backlog: np.ndarray,
    win_arrivals: np.ndarray,
) -> dict:
    out: dict[str, dict] = {}
    total = win_disp.sum(axis=1) if win_disp.size else np.zeros(0, dtype=np.int64)
    for i, name in enumerate(tier_names):
        spec = tiers[name]
        mask = tier == i
        n = int(np.count_nonzero(mask))
        s = start[mask]
        started = ~np.isnan(s)
        wait = np.where(started, s - submit[mask], end - submit[mask])
        w = spec.slo_s
        if n:
            within = float(np.count_nonzero(started & (wait <= w + 1e-9))) / n
            p50, p99 = (float(x) for x in np.percentile(wait, [50, 99]))
            mx = float(wait.max())
        else:
            within, p50, p99, mx = 1.0, 0.0, 0.0, 0.0
        st = state[mask]
        out[name] = {
            "jobs": n,
            "p50_wait_s": round(p50, 2),
            "p99_wait_s": round(p99, 2),
            "max_wait_s": round(mx, 2),
            "within_slo": round(within, 4),
            "max_wait_over_slo": round(mx / w, 3),
            "dispatched": int(np.count_nonzero(st >= 2)),
            "left_queued": int(np.count_nonzero(st == 1)),
            "starved_windows": starved_windows(
                spec.min_share,
                win_disp[:, i],
                total,
                win_start_backlog[:, i],
                win_min_backlog[:, i],
                win_arrivals[:, i],
            ),
        }
    return out


# --------------------------------------------------------------------------------------------
# text


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_run(summary: dict, tiers: Mapping[str, TierSpec]) -> str:
    """Markdown table of one run's per-tier metrics."""
    lines = [
        f"trace `{summary['trace']}`, policy `{summary['policy']}`: {summary['jobs']} jobs, "
        f"GPU utilisation {_pct(summary['gpu_utilization'])}, wall {summary['wall_s']:.1f} s",
        "",
        "| tier | W s | jobs | p50 s | p99 s | max s | within W | max/W | dispatched | left queued | starved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in summary["tiers"].items():
        w = tiers[name].slo_s if name in tiers else float("nan")
        lines.append(
            f"| {name} | {w:g} | {m['jobs']} | {m['p50_wait_s']:.1f} | {m['p99_wait_s']:.1f} | "
            f"{m['max_wait_s']:.1f} | {_pct(m['within_slo'])} | {m['max_wait_over_slo']:.2f} | "
            f"{m['dispatched']} | {m['left_queued']} | {m['starved_windows']} |"
        )
    return "\n".join(lines)


def format_table(results: Sequence[dict], tier_names: Sequence[str]) -> str:
    """Markdown comparison: one row per (trace, policy); per tier `within W / max wait/W / starved`."""
    head = "| trace | policy | " + " | ".join(tier_names) + " | GPU util | wall s |"
    sep = "|---|---|" + "---:|" * len(tier_names) + "---:|---:|"
    lines = [head, sep]
    for r in results:
        cells = []
        for name in tier_names:
            m = r["tiers"][name]
            cells.append(f"{_pct(m['within_slo'])} / {m['max_wait_over_slo']:.2f} / {m['starved_windows']}")
        lines.append(
            f"| {r['trace']} | {r['policy']} | "
            + " | ".join(cells)
            + f" | {_pct(r['gpu_utilization'])} | {r['wall_s']:.1f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# plot


def plot_timeline(
    timeline: dict, tiers: Mapping[str, TierSpec], path: str, *, title: str = "", y_max: float | None = None
) -> None:
    """PNG of each tier's oldest queued wait / W over time (1.0 = the SLO line), with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height = 1200, 640
    left, right, top, bottom = 70, 170, 40, 60
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    t = np.asarray(timeline["t"], dtype=np.float64) / 3600.0
    series = {k: np.asarray(v, dtype=np.float64) for k, v in timeline["oldest_over_slo"].items()}
    t_max = float(t[-1]) if t.size and t[-1] > 0 else 1.0
    peak = max([float(v.max()) for v in series.values() if v.size] + [1.0])
    if y_max is None:
        y_max = min(max(1.5, math.ceil(peak * 1.1 * 2) / 2), 10.0)
    pw, ph = width - left - right, height - top - bottom

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + pw * x / t_max, top + ph * (1 - min(y, y_max) / y_max)

    draw.rectangle([left, top, left + pw, top + ph], outline=(0, 0, 0))
    # grid and axes labels
    step_y = 0.5 if y_max <= 4 else 1.0
    y = 0.0
    while y <= y_max + 1e-9:
        _, py = xy(0, y)
        draw.line([left, py, left + pw, py], fill=(225, 225, 225))
        draw.text((left - 40, py - 6), f"{y:.1f}", fill=(0, 0, 0), font=font)
        y += step_y
    step_x = 1.0 if t_max <= 16 else 2.0
    x = 0.0
    while x <= t_max + 1e-9:
        px, _ = xy(x, 0)
        draw.line([px, top, px, top + ph], fill=(235, 235, 235))
        draw.text((px - 6, top + ph + 8), f"{x:g}h", fill=(0, 0, 0), font=font)
        x += step_x
    _, p1 = xy(0, 1.0)
    draw.line([left, p1, left + pw, p1], fill=(0, 0, 0), width=2)
    draw.text((left + pw + 5, p1 - 6), "W", fill=(0, 0, 0), font=font)
    for i, (name, v) in enumerate(series.items()):
        color = TIER_COLORS.get(name, (0, 0, 0))
        if v.size > 1:
            pts = [xy(a, b) for a, b in zip(t, v)]
            draw.line(pts, fill=color, width=2)
        ly = top + 20 + 18 * i
        draw.line([left + pw + 25, ly + 6, left + pw + 50, ly + 6], fill=color, width=3)
        w = tiers[name].slo_s if name in tiers else 0
        draw.text((left + pw + 55, ly), f"{name} (W={w:g}s)", fill=(0, 0, 0), font=font)
    draw.text((left, 12), title or "oldest queued wait / W", fill=(0, 0, 0), font=font)
    draw.text((left + pw // 2 - 20, height - 25), "time (h)", fill=(0, 0, 0), font=font)
    if peak > y_max:
        draw.text((left + pw - 160, top + 5), f"clipped at {y_max:g} (peak {peak:.1f})", fill=(0, 0, 0), font=font)
    img.save(path, format="PNG")

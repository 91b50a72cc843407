"""Intake throughput: `POST /v1/generations` through gunicorn against a bare Flask + INSERT endpoint.

    .venv/bin/python bench/intake.py [--json] [--quick] [--rounds 5] [--seconds 10]
                                     [--connections 16] [--generator wrk|python] [--details out.json]

Two gunicorn servers run side by side, started exactly as `dreamq up` starts the API
(`-c python:app.gunicorn_conf`, the same workers, threads and access log; see API_SERVER_ARGS):

* ours:     `app.api:create_app()`, the real route: Bearer key lookup, pydantic validation,
            model version resolution, monthly quota, the Redis token buckets, the jobs row plus
            its job_events row, commit, then the coalesced dispatch request (Redis SET NX; a
            Celery message when the flag is not already set).
* baseline: `bench.intake:baseline_app()`, the minimal Flask app most people write first: parse
            the JSON body, one `INSERT INTO jobs (...) RETURNING id, created_at` of a comparable
            row (same table, same indexes, autocommit, one psycopg connection per thread), answer
            202 with the id. No auth, no validation, no limits, no event, no dispatch request.

The same load generator drives both, over keep-alive connections, interleaved over several rounds
(ours first in odd rounds, baseline first in even ones); medians over rounds are reported, and
ratio = ours / baseline requests/s. Load generator: `wrk` with a Lua script (POST body, one of
8 users' API keys per request, status counts) when installed (`make system-packages`), else a
Python generator (threads, one keep-alive http.client connection each), which is slower and says
so in the output. The bench users belong to the `api` tier with its per-user bucket raised so that
no request is refused: every round must be all 2xx, and the rows each server inserted are counted
in Postgres against the 2xx the generator saw; a round with any other status is reported invalid.

Also measured per round, per request: CPU of each server's gunicorn processes and of the Postgres
backends serving it (read from /proc when Postgres runs on this host), and how busy the whole
machine was (the load generator, Postgres and the servers share it).

Services: DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL if set (a fresh database
`dreamq_bench_<random>` is created there and dropped at the end; give it a Redis db it may use:
the rate-limit keys of the bench users and the `dreamq.dispatch` messages the run published to the
`control` queue are deleted at the end), else embedded Postgres and Redis in a temp dir.

Output: a table on stdout (progress on stderr); with --json only one line
`{"intake": {"baseline": req/s, "ours": req/s, "ratio": r, "unit": "req/s", ...}, "measured_at": ..., ...}`
(the fields of bench/provenance.py: measured_at, commit, code, command, source_digest).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dispatch_scale import Services, configure_app, log, pct  # noqa: E402
from bench.provenance import provenance  # noqa: E402

GOAL = 0.6
USERS = 8
MODEL = "bench-video"
PROMPT = "a red circle moving right across a blue field"
BODY = json.dumps({"prompt": PROMPT, "model": MODEL}, separators=(",", ":"))
# What `dreamq up` passes to gunicorn for the API (app/stack/up.py); both servers get exactly this.
API_SERVER_ARGS = ["-c", "python:app.gunicorn_conf", "-w", "2", "--threads", "4", "--access-logfile", "-"]


# -- the baseline app (imported by gunicorn in its own process) ---------------------------------

_BASELINE_INSERT = """
    INSERT INTO jobs (id, user_id, tier, kind, prompt, params, model_id, model_version_id, max_attempts)
    VALUES (%s, %s, 'api', 'text_to_video', %s, %s, %s, %s, 3)
    RETURNING id, created_at
"""


def baseline_app():
    """Bare Flask + one INSERT per request: what intake costs without anything of ours."""
    import psycopg
    from flask import Flask, jsonify, request
    from psycopg.types.json import Jsonb

    dsn = os.environ["BENCH_BASELINE_DSN"]
    user_id, model_id, version_id = (
        uuid.UUID(os.environ[k]) for k in ("BENCH_BASELINE_USER", "BENCH_BASELINE_MODEL", "BENCH_BASELINE_VERSION")
    )
    local = threading.local()
    app = Flask("baseline")

    def connection() -> psycopg.Connection:
        conn = getattr(local, "conn", None)
        if conn is None or conn.closed:
            conn = local.conn = psycopg.connect(dsn, autocommit=True, application_name="bench-baseline")
        return conn

    @app.post("/v1/generations")
    def create():
        body = request.get_json()
        params = {"width": 128, "height": 128, "num_frames": 24, "fps": 12, "seed": 1}
        row = (
            connection()
            .execute(_BASELINE_INSERT, (uuid.uuid4(), user_id, body["prompt"], Jsonb(params), model_id, version_id))
            .fetchone()
        )
        return jsonify({"id": str(row[0]), "state": "queued", "created_at": row[1].isoformat()}), 202

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


# -- servers -----------------------------------------------------------------------------------


def _free_port() -> int:
    from app.stack.process import find_free_port

    return find_free_port(18080)


class Server:
    """One gunicorn (master + workers) started with API_SERVER_ARGS."""

    def __init__(self, name: str, factory: str, env: dict[str, str], tmp: Path, extra_args: list[str]) -> None:
        self.name = name
        self.port = _free_port()
        self.log_path = tmp / f"{name}.log"
        self._log = open(self.log_path, "wb")
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            *API_SERVER_ARGS,
            *extra_args,
            "-b",
            f"127.0.0.1:{self.port}",
            factory,
        ]
        self.proc = subprocess.Popen(
            argv,
            cwd=str(ROOT),
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready in {timeout_s:.0f}s:\n{self.log_path.read_text()[-3000:]}")

    def cpu_seconds(self) -> float:
        import psutil

        total = 0.0
        with contextlib.suppress(psutil.Error):
            master = psutil.Process(self.proc.pid)
            for p in [master, *master.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


# -- load generators ---------------------------------------------------------------------------

_WRK_LUA = """
local keys = {%(keys)s}
local body = %(body)s
local n = 0
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
end

function request()
  n = n + 1
  return wrk.format("POST", "/v1/generations",
    {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. keys[(n %% #keys) + 1]}, body)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    local s = thread:get("statuses")
    for code, c in pairs(s) do counts[code] = (counts[code] or 0) + c end
  end
  local parts = {}
  for code, c in pairs(counts) do table.insert(parts, string.format('"%%d":%%d', code, c)) end
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"errors":{"connect":%%d,"read":%%d,"write":%%d,"timeout":%%d},"statuses":{%%s}}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
"""


class Wrk:
    name = "wrk"

    def __init__(self, keys: list[str], tmp: Path, connections: int, threads: int) -> None:
        self.script = tmp / "intake.lua"
        self.script.write_text(_WRK_LUA % {"keys": ", ".join(json.dumps(k) for k in keys), "body": json.dumps(BODY)})
        self.connections = connections
        self.threads = threads

    def run(self, url: str, seconds: float) -> dict:
        argv = [
            "wrk",
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{seconds:g}s",
            "--timeout",
            "10s",
            "-s",
            str(self.script),
            url,
        ]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")
        raw = json.loads(line[len("WRKJSON ") :])
        return {
            "requests": raw["requests"],
            "seconds": raw["duration_us"] / 1e6,
            "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "statuses": {int(k): v for k, v in raw["statuses"].items()},
            "socket_errors": sum(raw["errors"].values()),
        }


class PythonLoad:
    """Fallback: threads, each with one keep-alive connection, POSTing back to back."""

    name = "python (threads, keep-alive)"

    def __init__(self, keys: list[str], connections: int) -> None:
        self.keys = keys
        self.connections = connections

    def run(self, url: str, seconds: float) -> dict:
        port = int(url.rsplit(":", 1)[1])
        body = BODY.encode()
        stop_at = time.perf_counter() + seconds
        latencies: list[list[float]] = [[] for _ in range(self.connections)]
        statuses: list[dict[int, int]] = [{} for _ in range(self.connections)]
        errors = [0] * self.connections

        def worker(i: int) -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            n = i
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    break
                n += self.connections
                headers = {
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {self.keys[n % len(self.keys)]}",
                }
                try:
                    conn.request("POST", "/v1/generations", body, headers)
                    resp = conn.getresponse()
                    resp.read()
                except (OSError, http.client.HTTPException):
                    errors[i] += 1
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                    continue
                latencies[i].append(time.perf_counter() - t0)
                statuses[i][resp.status] = statuses[i].get(resp.status, 0) + 1
            conn.close()

        started = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(self.connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        flat = [x * 1000 for lat in latencies for x in lat]
        merged: dict[int, int] = {}
        for s in statuses:
            for k, v in s.items():
                merged[k] = merged.get(k, 0) + v
        return {
            "requests": len(flat),
            "seconds": elapsed,
            "p50_ms": pct(flat, 50),
            "p99_ms": pct(flat, 99),
            "statuses": merged,
            "socket_errors": sum(errors),
        }


# -- the bench ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, services, args: argparse.Namespace) -> None:
        self.services = services
        self.args = args
        self.run_id = secrets.token_hex(4)
        self.tmp = Path(tempfile.mkdtemp(prefix="dreamq-intake-"))
        self.servers: dict[str, Server] = {}
        self.user_ids: list[uuid.UUID] = []
        self.keys: list[str] = []

    def setup(self) -> None:
        from sqlalchemy import text

        from app.admin.keys import create_key
        from app.db.migrate import upgrade
        from app.db.models import User
        from app.db.session import transaction
        from app.seed import seed_tiers

        started = time.perf_counter()
        upgrade(self.services.db_url)
        with transaction() as session:
            seed_tiers(session)
            # The api tier has no tier-wide bucket and no monthly quota; its per-user bucket is
            # raised so that the limiter is asked on every request but never refuses one.
            session.execute(text("UPDATE tiers SET rate_per_min = 1e9, burst = 1000000000 WHERE name = 'api'"))
            model_id = session.execute(
                text("INSERT INTO models (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"), {"n": MODEL}
            ).scalar_one()
            manifest = {"model": {"defaults": {"width": 128, "height": 128, "num_frames": 24, "fps": 12}}}
            version_id = session.execute(
                text(
                    "INSERT INTO model_versions (id, model_id, number, digest, manifest, size_bytes) "
                    "VALUES (gen_random_uuid(), :m, 1, :d, CAST(:manifest AS jsonb), 0) RETURNING id"
                ),
                {"m": model_id, "d": f"sha256:{uuid.uuid4().hex}{uuid.uuid4().hex}", "manifest": json.dumps(manifest)},
            ).scalar_one()
            session.execute(
                text("INSERT INTO model_aliases (model_id, alias, version_id) VALUES (:m, 'prod', :v)"),
                {"m": model_id, "v": version_id},
            )
            cluster_id = session.execute(
                text("INSERT INTO clusters (id, name) VALUES (gen_random_uuid(), :n) RETURNING id"),
                {"n": f"bench-{self.run_id}"},
            ).scalar_one()
            session.execute(
                text(
                    "INSERT INTO pools (id, cluster_id, model_id, dispatch_limit) VALUES (gen_random_uuid(), :c, :m, 8)"
                ),
                {"c": cluster_id, "m": model_id},
            )
            for i in range(USERS):
                user = User(name=f"bench-{self.run_id}-{i}", tier="api")
                session.add(user)
                session.flush()
                _, plaintext = create_key(session, user, ["user"], name="bench")
                self.user_ids.append(user.id)
                self.keys.append(plaintext)
            baseline_user = User(name=f"bench-{self.run_id}-baseline", tier="api")
            session.add(baseline_user)
            session.flush()
            self.baseline_user = baseline_user.id
        self.model_id, self.version_id = model_id, version_id
        log(f"schema + model + {USERS} users ready in {time.perf_counter() - started:.1f}s")

    def start_servers(self) -> None:
        from sqlalchemy.engine import make_url

        env = {
            "DATABASE_URL": self.services.db_url,
            "CELERY_BROKER_URL": self.services.redis_url,
            "DREAMQ_REDIS_URL": self.services.redis_url,
            "DREAMQ_DEFAULT_MODEL": MODEL,
        }
        dsn = make_url(self.services.db_url).set(drivername="postgresql").render_as_string(hide_password=False)
        base_env = {
            **env,
            "BENCH_BASELINE_DSN": dsn,
            "BENCH_BASELINE_USER": str(self.baseline_user),
            "BENCH_BASELINE_MODEL": str(self.model_id),
            "BENCH_BASELINE_VERSION": str(self.version_id),
        }
        extra = self.args.server_args.split() if self.args.server_args else []
        self.servers["ours"] = Server("ours", "app.api:create_app()", env, self.tmp, extra)
        self.servers["baseline"] = Server("baseline", "bench.intake:baseline_app()", base_env, self.tmp, extra)
        for server in self.servers.values():
            server.wait_ready()
        if self.args.generator == "python" or (self.args.generator == "auto" and not shutil.which("wrk")):
            self.load = PythonLoad(self.keys, self.args.connections)
            if not shutil.which("wrk"):
                self.load.name += ", wrk not installed"
        else:
            if not shutil.which("wrk"):
                raise SystemExit("--generator wrk: wrk is not installed (make system-packages)")
            self.load = Wrk(self.keys, self.tmp, self.args.connections, self.args.wrk_threads)
        log(
            f"servers up: ours {self.servers['ours'].url}, baseline {self.servers['baseline'].url}; "
            f"load generator: {self.load.name}, {self.args.connections} connections"
        )

    def rows(self, which: str) -> int:
        from sqlalchemy import text

        from app.db.session import transaction

        users = [self.baseline_user] if which == "baseline" else self.user_ids
        with transaction() as session:
            return session.execute(text("SELECT count(*) FROM jobs WHERE user_id = ANY(:u)"), {"u": users}).scalar_one()

    def backend_cpu(self, which: str) -> dict[int, float]:
        """CPU seconds of the Postgres backends serving one server (when Postgres runs on this host)."""
        import psutil
        from sqlalchemy import text

        from app.db.session import transaction

        app_name = "bench-baseline" if which == "baseline" else "dreamq"
        with transaction() as session:
            pids = (
                session.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                        "AND application_name = :a AND pid <> pg_backend_pid()"
                    ),
                    {"a": app_name},
                )
                .scalars()
                .all()
            )
        out = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                t = psutil.Process(pid).cpu_times()
                out[pid] = t.user + t.system
        return out

    def measure(self, which: str, seconds: float) -> dict:
        import psutil

        server = self.servers[which]
        rows0 = self.rows(which)
        pg0 = self.backend_cpu(which)
        cpu0 = server.cpu_seconds()
        machine0 = psutil.cpu_times()
        result = self.load.run(server.url, seconds)
        machine1 = psutil.cpu_times()
        cpu = server.cpu_seconds() - cpu0
        pg1 = self.backend_cpu(which)
        # Backends that lived through the whole measurement; none when Postgres is on another host.
        pg_cpu = sum(pg1[pid] - pg0[pid] for pid in pg1 if pid in pg0) if pg1 else float("nan")
        time.sleep(0.3)  # requests abandoned at the deadline commit now, not in the next round's count
        inserted = self.rows(which) - rows0
        busy = (sum(machine1) - machine1.idle - machine1.iowait) - (sum(machine0) - machine0.idle - machine0.iowait)
        wall = sum(machine1) - sum(machine0)
        ok = sum(v for k, v in result["statuses"].items() if 200 <= k < 300)
        result.update(
            {
                "which": which,
                "rate": ok / result["seconds"] if result["seconds"] else 0.0,
                "ok": ok,
                "non_2xx": result["requests"] - ok,
                "rows": inserted,
                "server_cpu_ms_per_req": cpu * 1000 / ok if ok else float("nan"),
                "postgres_cpu_ms_per_req": pg_cpu * 1000 / ok if ok else float("nan"),
                "machine_busy": busy / wall if wall else float("nan"),
            }
        )
        # wrk stops mid-request at the deadline: a request answered after it is a row without a
        # counted 2xx, so rows may exceed ok by up to the number of connections, never fall short.
        result["valid"] = (
            result["non_2xx"] == 0 and result["socket_errors"] == 0 and ok <= inserted <= ok + self.args.connections
        )
        return result

    def run(self) -> dict:
        warm = 2.0 if self.args.quick else 3.0
        for which in ("ours", "baseline"):
            w = self.measure(which, warm)
            log(f"warm-up {which:<8}: {w['rate']:>7,.0f} req/s, statuses {w['statuses']}")
            if w["non_2xx"]:
                log(f"  {which} answered non-2xx during warm-up; server log: {self.servers[which].log_path}")
        runs: dict[str, list[dict]] = {"ours": [], "baseline": []}
        for r in range(self.args.rounds):
            order = ("ours", "baseline") if r % 2 == 0 else ("baseline", "ours")
            for which in order:
                m = self.measure(which, self.args.seconds)
                runs[which].append(m)
                log(
                    f"round {r + 1} {which:<8}: {m['rate']:>7,.0f} req/s  p50 {m['p50_ms']:6.1f} ms  "
                    f"p99 {m['p99_ms']:6.1f} ms  server CPU {m['server_cpu_ms_per_req']:5.2f} ms/req  "
                    f"postgres CPU {m['postgres_cpu_ms_per_req']:5.2f} ms/req  "
                    f"machine {m['machine_busy'] * 100:3.0f}% busy  statuses {m['statuses']}  rows {m['rows']}"
                    + ("" if m["valid"] else "  INVALID")
                )
        out: dict[str, Any] = {
            "generator": self.load.name,
            "connections": self.args.connections,
            "rounds": self.args.rounds,
            "seconds": self.args.seconds,
            "runs": runs,
        }
        for which in ("ours", "baseline"):
            ms = runs[which]
            out[which] = {
                "rate": statistics.median(m["rate"] for m in ms),
                "p50_ms": statistics.median(m["p50_ms"] for m in ms),
                "p99_ms": statistics.median(m["p99_ms"] for m in ms),
                "server_cpu_ms_per_req": statistics.median(m["server_cpu_ms_per_req"] for m in ms),
                "postgres_cpu_ms_per_req": statistics.median(m["postgres_cpu_ms_per_req"] for m in ms),
                "machine_busy": statistics.median(m["machine_busy"] for m in ms),
                "non_2xx": sum(m["non_2xx"] for m in ms),
                "socket_errors": sum(m["socket_errors"] for m in ms),
                "valid": all(m["valid"] for m in ms),
            }
        out["ratio"] = out["ours"]["rate"] / out["baseline"]["rate"] if out["baseline"]["rate"] else float("inf")
        # Each round's two measurements ran back to back, under the same outside load: the median
        # of their ratios is the steadier figure on a shared machine.
        out["ratio_paired"] = statistics.median(
            o["rate"] / b["rate"] for o, b in zip(runs["ours"], runs["baseline"]) if b["rate"]
        )
        out["server_args"] = " ".join(
            API_SERVER_ARGS + (self.args.server_args.split() if self.args.server_args else [])
        )
        return out

    def cleanup(self) -> None:
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()
        with contextlib.suppress(Exception):
            import redis

            client = redis.Redis.from_url(self.services.redis_url)
            client.delete(*[f"dreamq:rl:user:{u}" for u in self.user_ids])
            # The run's dispatch requests: nobody consumes them here.
            for raw in client.lrange("control", 0, -1):
                with contextlib.suppress(ValueError, KeyError):
                    if json.loads(raw)["headers"]["task"] == "dreamq.dispatch":
                        client.lrem("control", 1, raw)
            client.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- report -------------------------------------------------------------------------------------


def render(result: dict, total_s: float) -> str:
    ours, base = result["ours"], result["baseline"]
    lines = [
        f"{'':<10} | {'req/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'server CPU ms/req':>17} | "
        f"{'postgres CPU ms/req':>19} | {'machine busy':>12} | {'non-2xx':>7} | valid"
    ]
    lines.append("-" * len(lines[0]))
    for name, r in (("ours", ours), ("baseline", base)):
        lines.append(
            f"{name:<10} | {r['rate']:>8,.0f} | {r['p50_ms']:>7.1f} | {r['p99_ms']:>7.1f} | "
            f"{r['server_cpu_ms_per_req']:>17.2f} | {r['postgres_cpu_ms_per_req']:>19.2f} | "
            f"{r['machine_busy'] * 100:>11.0f}% | "
            f"{r['non_2xx'] + r['socket_errors']:>7} | {'yes' if r['valid'] else 'NO'}"
        )
    lines.append(
        f"ratio ours/baseline = {result['ratio']:.2f}x (goal >= {GOAL}x: "
        f"{'MET' if result['ratio'] >= GOAL else 'NOT MET'}); median of the per-round ratios "
        f"{result['ratio_paired']:.2f}x"
    )
    lines.append(
        f"(medians of {result['rounds']} interleaved rounds of {result['seconds']:g}s; load generator: "
        f"{result['generator']}, {result['connections']} keep-alive connections; gunicorn "
        f"{result['server_args']} for both; server CPU = gunicorn master + workers, postgres CPU = "
        f"the backends serving it (when Postgres runs on this host); "
        f"total runtime {total_s:.0f}s)"
    )
    if not (ours["valid"] and base["valid"]):
        lines.append("INVALID RUN: some requests were refused or failed (see the rounds on stderr)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON result on stdout")
    parser.add_argument("--quick", action="store_true", help="about a minute: 3 rounds of 5 s")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--seconds", type=float, help="seconds of load per measurement (default 12, quick 5)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default 1: 2 cores are shared)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--server-args", help="extra gunicorn arguments for both servers, e.g. '-w 4 --threads 2'")
    parser.add_argument("--details", help="write every round as JSON to this path")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.seconds = args.seconds or (5.0 if args.quick else 12.0)

    prov = provenance(__file__, sys.argv[1:] if argv is None else argv)
    started = time.perf_counter()
    services = Services()
    bench = None
    try:
        services.start()
        configure_app(services)
        bench = Bench(services, args)
        bench.setup()
        bench.start_servers()
        result = bench.run()
    finally:
        if bench is not None:
            bench.cleanup()
        services.stop()
    total = time.perf_counter() - started
    if args.details:
        Path(args.details).write_text(json.dumps(result, indent=2, default=str))
    summary = {
        "baseline": round(result["baseline"]["rate"], 1),
        "ours": round(result["ours"]["rate"], 1),
        "ratio": round(result["ratio"], 3),
        "unit": "req/s",
        "ratio_paired": round(result["ratio_paired"], 3),
        "generator": result["generator"],
        "server_args": result["server_args"],
        "connections": result["connections"],
        "rounds": result["rounds"],
    }
    for which in ("ours", "baseline"):
        r = result[which]
        summary[f"{which}_p50_ms"] = round(r["p50_ms"], 2)
        summary[f"{which}_p99_ms"] = round(r["p99_ms"], 2)
        summary[f"{which}_server_cpu_ms_per_req"] = round(r["server_cpu_ms_per_req"], 3)
        summary[f"{which}_postgres_cpu_ms_per_req"] = round(r["postgres_cpu_ms_per_req"], 3)
        summary[f"{which}_non_2xx"] = r["non_2xx"] + r["socket_errors"]
    summary = {k: (None if isinstance(v, float) and v != v else v) for k, v in summary.items()}  # NaN is not JSON
    summary["valid"] = result["ours"]["valid"] and result["baseline"]["valid"]
    if args.json:
        print(json.dumps({"intake": summary, **prov}))
        log(render(result, total))
    else:
        print(render(result, total))
    return 0 if summary["valid"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""GPU busy fraction of the shipped GPU worker's job loop under a steady backlog.

    .venv/bin/python bench/gpu_busy.py [--device cuda|cpu] [--models dit,demo] [--jobs 8] [--rounds 2]
                                       [--quick] [--json] [--no-kernels] [--keep-logs DIR]

What runs (all of it the shipped code, nothing replayed or assumed):

* Postgres, Redis and SeaweedFS embedded in a temp dir (bench/live_stack.py `Services`, which uses
  DREAMQ_BENCH_DATABASE_URL / DREAMQ_BENCH_REDIS_URL instead when set), migrated and seeded
  (`Stack.setup`).
* Models pushed into the model repository with the repository code (workers/repository.py):
  `dit`, a video DiT of production shape (bench/bundles/dit: 387M parameters by default, 30
  denoising steps, 512x512x49 frames; random weights written for the run, bf16 on CUDA, float32
  elsewhere) and `demo`, the shipped demo model (workers/demo_models/shapes) at 512x512x120. A
  bundle's env/requirements.lock is this machine's torch/numpy/safetensors (the DiT's always;
  the demo's only where its shipped lock is not satisfied here, which the output says), so the
  worker runs both in its own process.
* One control+cpu Celery worker (dispatch, finalize: encode on the cpu queue) and, per model, two
  GPU workers started as `dreamq worker` starts them (workers.launch.worker_command: prefork,
  concurrency 1, prefetch 1, pinned with CUDA_VISIBLE_DEVICES; a CPU worker with --device cpu),
  each in its own pool: one with the job's tail in line (DREAMQ_OVERLAP_TAIL=0, the baseline)
  and one as shipped (the tail on its own thread, workers/job_tail.py). Only the pool being
  measured is open (app.admin.pools drain/enable), so the other worker idles.
* Per run: one warm-up job, then a backlog of --jobs + 1 jobs submitted at once through
  `app.jobs.submit.submit` (what POST /v1/generations calls, without HTTP), dispatched by the
  real dispatcher, run by tasks/generate.py and workers/executor.py, finalized on the cpu queue.
  Runs alternate baseline/ours (ABBA over rounds), model after model.

What is measured, from inside the worker: DREAMQ_JOB_PHASES_FILE makes the executor write each
job's marks and durations (workers/phases.py, a no-op when unset). The window of a run is from
the claim of the first backlog job to the claim of job --jobs + 1: --jobs whole periods of the
steady loop. Each period splits into

  claim          claim transaction, the dispatch request, lease start, model lookup
  model          the model's compute: on CUDA the union of GPU kernel and copy intervals inside
                 generate() (torch.profiler in the worker; with --no-kernels the span between
                 CUDA events around generate()); elsewhere generate()'s time less its on_step calls
  progress       on_step calls inside generate(): throttled progress writes and cancel checks
  after_model    frames made contiguous
  tail_in_loop   inline: the whole tail; ours: waiting for the previous job's tail to finish
  between_jobs   the task returning, the lease stopping, Celery's ack and the next message

and the tail itself (on the loop or on the tail thread): staging (frames to .npy bytes), upload
(to SeaweedFS), hand_off (the `generated` transaction and the finalize message), or for outputs
under DREAMQ_INLINE_FINALIZE_BYTES encode + complete. The cpu queue's encode (finalize) is read
from the succeeded event. busy = sum of model time / wall of the window; on CUDA the profiler's own
start and stop (the measurement's cost, `profiler`) are taken out of the wall and of the phases.

Output: a table; --json prints one line
{"gpu_busy_<model>": {"baseline", "ours", "ratio", "unit": "fraction of wall", "phases_ms",
"n_jobs", "device", ..., "measured_at", "commit", "code", ...}} (bench/provenance.py's fields).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.dispatch_scale import log  # noqa: E402
from bench.live_stack import Services, Stack  # noqa: E402
from bench.provenance import provenance  # noqa: E402

DIT_BUNDLE = ROOT / "bench" / "bundles" / "dit"
DEMO_BUNDLE = ROOT / "workers" / "demo_models" / "shapes"
MODES = ("inline", "ours")  # baseline: the tail in line (DREAMQ_OVERLAP_TAIL=0); ours: as shipped
LOOP_PHASES = ("claim", "model", "progress", "after_model", "tail_in_loop", "between_jobs")
TAIL_PHASES = ("staging", "upload", "hand_off", "encode", "complete")
PROMPT = "a red circle moving right"


@dataclass
class ModelSpec:
    name: str
    bundle: Path
    size: dict[str, int]
    info: dict[str, Any] = field(default_factory=dict)


# -- bundles -------------------------------------------------------------------------------------


def _lock_here() -> str:
    """torch, numpy and safetensors pinned at what this interpreter has (the worker's environment)."""
    from workers.environments import installed_distributions

    have = installed_distributions()
    return "".join(f"{name}=={have[name].split('+')[0]}\n" for name in ("torch", "numpy", "safetensors"))


def _lock_satisfied(lock: Path) -> bool:
    from workers.environments import installed_distributions, parse_lock

    have = installed_distributions()
    return all(r.name in have and r.matches(have[r.name]) for r in parse_lock(lock.read_text().splitlines()))


def build_dit(workdir: Path, net: dict[str, int], steps: int, cuda: bool) -> tuple[Path, dict[str, Any]]:
    """bench/bundles/dit with random weights and this machine's lock, ready to push."""
    import torch
    from safetensors.torch import save_file

    bundle = workdir / "dit"
    shutil.copytree(DIT_BUNDLE, bundle, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location("gpubusy_dit_model", bundle / "code" / "dit_model" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dtype = torch.bfloat16 if cuda else torch.float32
    tensors = module.random_weights(net, dtype)
    (bundle / "weights").mkdir()
    save_file(tensors, str(bundle / "weights" / "dit.safetensors"))
    (bundle / "weights" / "config.json").write_text(json.dumps({"net": net, "steps": steps}))
    (bundle / "env").mkdir()
    (bundle / "env" / "requirements.lock").write_text(_lock_here())
    params = sum(t.numel() for t in tensors.values())
    info = {"parameters": params, "dtype": str(dtype).removeprefix("torch."), "steps": steps, **net}
    info["weights_bytes"] = (bundle / "weights" / "dit.safetensors").stat().st_size
    return bundle, info


def build_demo(workdir: Path) -> tuple[Path, dict[str, Any]]:
    """The shipped demo bundle; a copy with this machine's lock where its own is not satisfied here."""
    if _lock_satisfied(DEMO_BUNDLE / "env" / "requirements.lock"):
        return DEMO_BUNDLE, {"lock": "as shipped"}
    bundle = workdir / "demo"
    shutil.copytree(DEMO_BUNDLE, bundle, ignore=shutil.ignore_patterns("__pycache__", "train.py"))
    (bundle / "env" / "requirements.lock").write_text(_lock_here())
    return bundle, {"lock": "rewritten to this machine's torch/numpy/safetensors: " + _lock_here().replace("\n", " ")}


# -- the stack -----------------------------------------------------------------------------------


def cluster(mode: str) -> str:
    return f"gpubusy-{mode}"


class Bench:
    def __init__(self, stack: Stack, gpus: str, kernels: bool, cpu_threads: int):
        self.stack = stack
        self.gpus = gpus
        self.kernels = kernels
        self.cpu_threads = cpu_threads
        self.phases_dir = stack.services._tmpdir() / "phases"
        self.phases_dir.mkdir(exist_ok=True)
        self.workers: dict[tuple[str, str], str] = {}  # (model, mode) -> worker name
        self.principal = None

    def push(self, spec: ModelSpec) -> None:
        from app.db.session import transaction
        from app.seed import ensure_pool
        from workers.repository import push_version

        with transaction() as session:
            pushed = push_version(session, spec.bundle, spec.name, created_by="bench/gpu_busy.py")
            for mode in MODES:
                ensure_pool(session, cluster(mode), spec.name, 10_000)
        spec.info["version"] = pushed.number

    def start_workers(self, specs: list[ModelSpec]) -> None:
        from app.stack.process import ManagedProcess
        from workers.launch import control_worker_command, worker_command

        base = {**os.environ, **self.stack.env}
        self.stack._start(
            ManagedProcess(
                "control",
                control_worker_command(f"control-{self.stack.run_id}"),
                env={**base, "DREAMQ_LOG_COMPONENT": "control"},
                cwd=str(ROOT),
                log_path=self.stack.logs / "control.log",
                signal_group=False,
            )
        )
        for spec in specs:
            for mode in MODES:
                name = f"{spec.name}-{mode}-{self.stack.run_id}"
                argv, env = worker_command(cluster(mode), spec.name, self.gpus, name)
                env = {
                    **env,
                    **self.stack.env,
                    "CUDA_VISIBLE_DEVICES": self.gpus,
                    "DREAMQ_OVERLAP_TAIL": "0" if mode == "inline" else "1",
                    "DREAMQ_JOB_PHASES_FILE": str(self.phases_dir / f"{name}.jsonl"),
                    "DREAMQ_JOB_PHASES_KERNELS": "1" if self.kernels else "0",
                }
                if self.cpu_threads:
                    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.cpu_threads)
                self.stack._start(
                    ManagedProcess(
                        name, argv, env=env, cwd=str(ROOT), log_path=self.stack.logs / f"{name}.log", signal_group=False
                    )
                )
                self.workers[(spec.name, mode)] = name
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 600) -> None:
        from sqlalchemy import text

        from app.db.session import transaction
        from tasks.celery_app import celery_app

        deadline = time.monotonic() + timeout_s
        waiting = set(self.workers.values())
        control = f"control-{self.stack.run_id}@"
        while True:
            for name, proc in self.stack.procs.items():
                if not proc.alive():
                    raise RuntimeError(f"{name} exited:\n" + (self.stack.logs / f"{name}.log").read_text()[-4000:])
            with transaction() as session:
                # Ready = registered, and its child has loaded the pool's model (it reports `loaded`).
                ready = {
                    row[0].split("@")[0]
                    for row in session.execute(
                        text(
                            "SELECT id FROM workers WHERE state = 'idle' "
                            "AND jsonb_array_length(COALESCE(info->'loaded', '[]'::jsonb)) > 0"
                        )
                    )
                }
            waiting -= ready
            if control:
                replies = celery_app.control.ping(timeout=0.5) or []
                if any(n.startswith(control) for reply in replies for n in reply):
                    control = ""
            if not waiting and not control:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers not ready: {sorted(waiting)} {control}; logs in {self.stack.logs}")
            time.sleep(0.2)

    def open_only(self, model: str, mode: str) -> None:
        """Only this mode's pool of `model` receives work (the operator's drain and enable)."""
        from app.admin.pools import drain_pool, enable_pool
        from app.db.session import transaction

        with transaction() as session:
            for other in MODES:
                if other != mode:
                    drain_pool(session, cluster(other), model, actor="bench/gpu_busy.py")
            enable_pool(session, cluster(mode), model, actor="bench/gpu_busy.py")

    def submit(self, spec: ModelSpec, count: int) -> list[uuid.UUID]:
        from app.api.auth import principal_for_key
        from app.api.schemas import GenerationCreate
        from app.db.session import transaction
        from app.jobs.submit import submit
        from app.seed import new_user_key

        if self.principal is None:
            with transaction() as session:
                key = new_user_key(session, f"gpubusy-{self.stack.run_id}", "api", ["user"])
            with transaction() as session:
                self.principal = principal_for_key(session, key, "user")
        ids = []
        for _ in range(count):
            body = GenerationCreate(prompt=PROMPT, model=spec.name, seed=len(ids), **spec.size)
            with transaction() as session:
                job, _version = submit(session, self.principal, body)
                ids.append(job.id)
        return ids

    def wait_done(self, ids: list[uuid.UUID], timeout_s: float) -> None:
        from sqlalchemy import text

        from app.db.session import transaction

        deadline = time.monotonic() + timeout_s
        while True:
            with transaction() as session:
                rows = session.execute(
                    text("SELECT state, failure_code, failure_message FROM jobs WHERE id = ANY(:ids)"),
                    {"ids": [str(i) for i in ids]},
                ).all()
            bad = [r for r in rows if r[0] in ("failed", "cancelled")]
            if bad:
                raise RuntimeError(f"{len(bad)} job(s) did not succeed: {bad[0]}; logs in {self.stack.logs}")
            if sum(r[0] == "succeeded" for r in rows) == len(ids):
                return
            if time.monotonic() > deadline:
                states = sorted(r[0] for r in rows)
                raise TimeoutError(f"jobs not done after {timeout_s:.0f} s: {states}; logs in {self.stack.logs}")
            time.sleep(0.05)

    def finalize_encode_s(self, ids: list[uuid.UUID]) -> list[float]:
        """encode_s of the cpu queue's finalize, from each job's succeeded event."""
        from sqlalchemy import text

        from app.db.session import transaction

        with transaction() as session:
            rows = session.execute(
                text(
                    "SELECT detail->>'encode_s' FROM job_events WHERE job_id = ANY(:ids) AND to_state = 'succeeded' "
                    "AND from_state = 'running' AND detail ? 'encode_s' AND NOT detail ? 'finalized'"
                ),
                {"ids": [str(i) for i in ids]},
            ).all()
        return [float(r[0]) for r in rows]

    def records(self, worker: str) -> dict[tuple[str, str], dict]:
        path = self.phases_dir / f"{worker}.jsonl"
        out: dict[tuple[str, str], dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                out[(rec["job"], rec["part"])] = rec
        return out

    def run(self, spec: ModelSpec, mode: str, jobs: int, job_timeout_s: float) -> dict[str, Any]:
        self.open_only(spec.name, mode)
        warm = self.submit(spec, 1)  # first job of the round: not counted
        self.wait_done(warm, job_timeout_s * 2)
        backlog = self.submit(spec, jobs + 1)  # all accepted before the first is claimed: a backlog
        self.wait_done(backlog, job_timeout_s * (jobs + 1))
        recs = self.records(self.workers[(spec.name, mode)])
        missing = [i for i in backlog if (str(i), "loop") not in recs or (str(i), "tail") not in recs]
        if missing:
            raise RuntimeError(f"no phase records for {len(missing)} job(s) of {mode} (DREAMQ_JOB_PHASES_FILE)")
        result = measure(
            [recs[(str(i), "loop")] for i in backlog], {str(i): recs[(str(i), "tail")] for i in backlog}, jobs
        )
        encode = self.finalize_encode_s(backlog)
        result["phases_s"]["finalize_encode_cpu_queue"] = statistics.fmean(encode) if encode else 0.0
        result["mode"] = mode
        return result


# -- the measurement -----------------------------------------------------------------------------


def measure(loops: list[dict], tails: dict[str, dict], jobs: int) -> dict[str, Any]:
    """Busy fraction and per-job phase means of the first `jobs` jobs in claim order; the claim
    of the next one closes the window."""
    loops = sorted(loops, key=lambda r: r["marks"]["claimed"])
    counted, closing = loops[:jobs], loops[jobs]
    devices = {r.get("device") for r in counted}
    if len(devices) != 1:
        raise RuntimeError(f"jobs ran on several devices: {devices}")
    device = devices.pop()
    cuda = str(device).startswith("cuda")
    kernels = cuda and all("kernels" in r["seconds"] for r in counted)
    totals = dict.fromkeys(LOOP_PHASES, 0.0)
    gpu = {"gpu_span": 0.0, "gpu_idle_in_generate": 0.0, "profiler": 0.0}  # CUDA only
    tail_totals = {"tail": 0.0}
    for rec, nxt in zip(counted, loops[1 : jobs + 1]):
        m, s = rec["marks"], rec["seconds"]
        generate = m["generate_end"] - m["generate_start"]
        progress = s.get("progress", 0.0)
        started, stopped = s.get("profiler_start", 0.0), s.get("profiler_stop", 0.0)
        model = (s["kernels"] if kernels else s["gpu_span"]) if cuda else generate - progress
        totals["claim"] += m["generate_start"] - m["claimed"]
        totals["model"] += model
        totals["progress"] += progress
        totals["after_model"] += m["tail_call"] - m["generate_end"] - stopped
        totals["tail_in_loop"] += m["tail_returned"] - m["tail_call"]
        totals["between_jobs"] += nxt["marks"]["claimed"] - m["tail_returned"]
        if cuda:
            gpu["gpu_span"] += s["gpu_span"]
            # Inside generate() but neither device work nor on_step: launch gaps, host work.
            gpu["gpu_idle_in_generate"] += max(0.0, generate - started - model - progress)
            gpu["profiler"] += started + stopped
        tail = tails[rec["job"]]
        tail_totals["tail"] += tail["marks"]["tail_end"] - tail["marks"]["tail_start"]
        for name in TAIL_PHASES:  # staging, upload, hand_off for a staged output; encode, complete inline
            if name in tail["seconds"]:
                tail_totals[name] = tail_totals.get(name, 0.0) + tail["seconds"][name]
    # The profiler's own start and stop are the measurement's cost, not the loop's: out of the wall.
    wall = closing["marks"]["claimed"] - counted[0]["marks"]["claimed"] - gpu["profiler"]
    if cuda:
        measure_name = (
            "union of GPU kernel and copy intervals inside generate() (torch.profiler in the worker) / wall"
            if kernels
            else "GPU time between CUDA events around generate() (kernel gaps counted as busy) / wall"
        )
    else:
        measure_name = "no CUDA: time inside the model's generate() less its on_step calls / wall"
    errors = sorted({r["profiler_error"] for r in counted if "profiler_error" in r})
    return {
        "busy": totals["model"] / wall,
        "gpu_span_fraction": gpu["gpu_span"] / wall if cuda else None,
        "wall_s": wall,
        "period_s": wall / jobs,
        "device": device,
        "measure": measure_name,
        "profiler_errors": errors,
        "phases_s": {"period": wall / jobs}
        | {k: v / jobs for k, v in totals.items()}
        | ({k: v / jobs for k, v in gpu.items()} if cuda else {})
        | {"tail" if k == "tail" else f"tail_{k}": v / jobs for k, v in tail_totals.items()},
    }


# -- main ----------------------------------------------------------------------------------------


def _mean_phases(runs: list[dict]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in runs for k in r["phases_s"])
    return {k: round(1000 * statistics.fmean(r["phases_s"].get(k, 0.0) for r in runs), 3) for k in keys}


def main() -> None:
    from workers.launch import gpu_label, visible_gpus

    gpus_here = visible_gpus()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if gpus_here else "cpu")
    parser.add_argument("--gpu", default=None, help="GPU index for the workers (default: the first nvidia-smi lists)")
    parser.add_argument("--models", default="dit,demo")
    parser.add_argument("--jobs", type=int, default=8, help="counted backlog jobs per run")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/ours pairs per model (ABBA)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a small DiT and small frames (a CPU check of the whole path, about a minute or two)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-kernels", action="store_true", help="CUDA: CUDA-event spans instead of torch.profiler")
    parser.add_argument("--dim", type=int, default=1152)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--decoder-ch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--cpu-threads",
        type=int,
        default=None,
        help="--device cpu: torch threads of each GPU worker (default 1: on a small shared machine OpenMP's "
        "spinning threads made a job up to 10x slower); 0 leaves torch's default",
    )
    parser.add_argument("--job-timeout", type=float, default=120.0, help="seconds a job may take before the run fails")
    parser.add_argument("--keep-logs", default=os.environ.get("DREAMQ_BENCH_KEEP_LOGS"), help="copy worker logs here")
    args = parser.parse_args()
    if args.device == "cuda":
        if not gpus_here:
            raise SystemExit("--device cuda: nvidia-smi lists no GPU here (use --device cpu)")
        gpus = args.gpu if args.gpu is not None else gpus_here[0]
        if gpus not in gpus_here:
            raise SystemExit(f"--gpu {gpus}: nvidia-smi lists {gpus_here}")
    else:
        gpus = ""  # hides every GPU: the workers run on the CPU
    if args.quick:
        args.dim, args.layers, args.heads, args.decoder_ch, args.steps = 128, 2, 4, 16, 8
        args.rounds = min(args.rounds, 2)
    cuda = args.device == "cuda"
    sizes = {
        "dit": {"width": 64, "height": 64, "num_frames": 9}
        if args.quick
        else {"width": 512, "height": 512, "num_frames": 49},
        "demo": {"width": 128, "height": 128, "num_frames": 24}
        if args.quick
        else {"width": 512, "height": 512, "num_frames": 120},
    }
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(names) - set(sizes)
    if unknown:
        raise SystemExit(f"unknown model(s) {sorted(unknown)} (dit, demo)")
    started = time.monotonic()
    prov = provenance(__file__)

    services = Services()
    stack = None
    results: dict[str, dict] = {}
    try:
        services.start()
        stack = Stack(services)
        stack.setup()
        cpu_threads = 0 if cuda else (1 if args.cpu_threads is None else args.cpu_threads)
        bench = Bench(stack, gpus, kernels=cuda and not args.no_kernels, cpu_threads=cpu_threads)
        workdir = Path(tempfile.mkdtemp(prefix="bundles-", dir=services._tmpdir()))
        specs = []
        for name in names:
            if name == "dit":
                net = {"dim": args.dim, "layers": args.layers, "heads": args.heads, "decoder_ch": args.decoder_ch}
                bundle, info = build_dit(workdir, net, args.steps, cuda)
            else:
                bundle, info = build_demo(workdir)
            spec = ModelSpec(name, bundle, sizes[name], info)
            bench.push(spec)
            specs.append(spec)
            log(f"{name}: pushed v{spec.info['version']} {json.dumps(info)}")
        bench.start_workers(specs)
        log(f"stack and {len(bench.workers)} GPU workers ready in {time.monotonic() - started:.0f} s")
        runs: dict[str, dict[str, list[dict]]] = {s.name: {m: [] for m in MODES} for s in specs}
        for rnd in range(args.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for spec in specs:
                for mode in order:
                    res = bench.run(spec, mode, args.jobs, args.job_timeout)
                    res["round"] = rnd
                    runs[spec.name][mode].append(res)
                    log(
                        f"{spec.name} {mode:6s} round {rnd}: busy {100 * res['busy']:.1f}%, "
                        f"{1000 * res['period_s']:.0f} ms a job"
                    )
        label = gpu_label(gpus)
        for spec in specs:
            by_mode = runs[spec.name]
            base = statistics.median(r["busy"] for r in by_mode["inline"])
            ours = statistics.median(r["busy"] for r in by_mode["ours"])
            first = by_mode["ours"][0]
            expected = "cuda:0" if cuda else "cpu"  # the worker's device, as its runtime picked it
            ran_on = {r["device"] for mode in MODES for r in by_mode[mode]}
            if ran_on != {expected}:
                raise RuntimeError(f"the workers ran on {sorted(ran_on)}, asked for {expected}")
            frames = spec.size["width"] * spec.size["height"] * spec.size["num_frames"] * 3
            results[f"gpu_busy_{spec.name}"] = {
                "baseline": base,
                "ours": ours,
                "ratio": ours / base if base else None,
                "unit": "fraction of wall",
                "baseline_name": "the same jobs and worker code with the tail in line (DREAMQ_OVERLAP_TAIL=0)",
                "measure": first["measure"],
                "device": label,
                **({} if cuda else {"cpu_threads": cpu_threads or "torch's default"}),
                "n_jobs": args.jobs,
                "rounds": args.rounds,
                "size": spec.size,
                "frame_bytes": frames,
                "model": spec.info,
                "phases_ms": {"baseline": _mean_phases(by_mode["inline"]), "ours": _mean_phases(by_mode["ours"])},
                "runs": [
                    {
                        "mode": r["mode"],
                        "round": r["round"],
                        "busy": r["busy"],
                        "wall_s": r["wall_s"],
                        "period_ms": 1000 * r["period_s"],
                        **(
                            {"gpu_span_fraction": r["gpu_span_fraction"], "profiler_errors": r["profiler_errors"]}
                            if cuda
                            else {}
                        ),
                    }
                    for mode in MODES
                    for r in by_mode[mode]
                ],
                "total_s": round(time.monotonic() - started, 1),
                **prov,
            }
    finally:
        if stack is not None:
            stack.stop_workers()
            if args.keep_logs:
                shutil.copytree(stack.logs, args.keep_logs, dirs_exist_ok=True)
                shutil.copytree(
                    stack.services._tmpdir() / "phases", Path(args.keep_logs) / "phases", dirs_exist_ok=True
                )
        with contextlib.suppress(Exception):
            services.stop()

    if args.json:
        print(json.dumps(results))
        return
    for name, res in results.items():
        print(
            f"\n{name} {res['size']} on {res['device']}: busy {100 * res['baseline']:.1f}% tail in line -> "
            f"{100 * res['ours']:.1f}% shipped (median of {res['rounds']}; {res['n_jobs']} jobs a run; {res['measure']})"
        )
        base, ours = res["phases_ms"]["baseline"], res["phases_ms"]["ours"]
        print(f"  {'ms a job':28s} {'in line':>10s} {'shipped':>10s}")
        for key in dict.fromkeys([*base, *ours]):
            print(f"  {key:28s} {base.get(key, 0.0):10.1f} {ours.get(key, 0.0):10.1f}")
    print(f"\n{prov['commit']} {prov['measured_at']}")


if __name__ == "__main__":
    main()

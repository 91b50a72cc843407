"""`dreamq`: the stack (up), a GPU worker, the client (generate) and operator commands.

Operator commands read service URLs from the environment, or else from .dreamq/stack.json that
`dreamq up` writes, so they work against a running local stack with no setup.

Each command imports what it needs inside its own body: `dreamq --help` and `dreamq worker`
(which execs Celery at once) must not load the admin, repository, simulator and stack code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from app.core.config import get_settings, reload_settings
from workers.launch import visible_gpus, worker_command


def load_stack_env() -> None:
    """Fill unset service variables from the running local stack (written by `dreamq up`)."""
    path = Path(get_settings().home) / "stack.json"
    if not path.is_file():
        return
    for key, value in json.loads(path.read_text()).get("env", {}).items():
        os.environ.setdefault(key, value)
    reload_settings()


@click.group()
def main() -> None:
    """dreamq: serving system for generative video."""


@main.command()
@click.option(
    "--gpu-workers", type=int, default=None, help="GPU workers to start (default: one per visible GPU, else one on CPU)"
)
@click.option(
    "--grace", type=float, default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL on stop"
)
@click.option(
    "--detach-after-ready", is_flag=True, hidden=True, help="(tests) exit 0 once ready, leaving nothing running"
)
def up(gpu_workers: int | None, grace: float, detach_after_ready: bool) -> None:
    """Start the whole stack (Postgres, Redis, SeaweedFS, API, workers, beat, Flower) until Ctrl-C."""
    from app.stack.up import run_stack

    sys.exit(run_stack(gpu_workers=gpu_workers, grace_s=grace, exit_when_ready=detach_after_ready))


@main.command()
@click.option("--cluster", default=None, help="Cluster name (default: DREAMQ_CLUSTER or 'local')")
@click.option("--model", default=None, help="Model this worker's pool serves (default: DREAMQ_DEFAULT_MODEL)")
@click.option("--gpus", default=None, help="GPU indices for this worker, e.g. 0 or 0,1; 'cpu' or empty for none")
@click.option("--name", default=None, help="Worker name (default: gpu<N> or cpu)")
def worker(cluster: str | None, model: str | None, gpus: str | None, name: str | None) -> None:
    """Run one GPU-pinned Celery worker consuming its pool's tier queues in tier order."""
    load_stack_env()
    settings = get_settings()
    settings.require("database_url", "broker_url")
    if gpus is None:
        visible = visible_gpus()
        gpus = visible[0] if visible else ""
    if gpus == "cpu":
        gpus = ""
    name = name or (f"gpu{gpus.replace(',', '-')}" if gpus else "cpu")
    argv, env = worker_command(cluster or settings.default_cluster, model or settings.default_model, gpus, name)
    os.execvpe(argv[0], argv, env)


@main.command()
@click.argument("prompt")
@click.option(
    "--video",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Input video: makes a modify-video job",
)
@click.option("--wait/--no-wait", default=False, help="Wait for the job, showing progress")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Save the MP4 here (implies --wait)")
@click.option("--model", default=None)
@click.option("--width", type=int)
@click.option("--height", type=int)
@click.option("--frames", "num_frames", type=int)
@click.option("--fps", type=int)
@click.option("--seed", type=int)
@click.option("--timeout", type=float, default=600, show_default=True)
def generate(prompt, video, wait, out, model, width, height, num_frames, fps, seed, timeout) -> None:
    """Submit a job through the HTTP API; with --wait show a progress bar; with --out save the MP4."""
    from app.client import ApiClientError, DreamqClient

    client = DreamqClient()
    try:
        upload_id = None
        if video is not None:
            upload_id = client.upload(video)["id"]
        job = client.submit(
            prompt,
            type="modify_video" if upload_id else "text_to_video",
            upload_id=upload_id,
            model=model,
            width=width,
            height=height,
            num_frames=num_frames,
            fps=fps,
            seed=seed,
        )
        click.echo(
            f"job {job['id']} {job['state']} (tier {job['tier']}, model {job['model']['name']}@{job['model']['version']})",
            err=True,
        )
        if not (wait or out):
            click.echo(json.dumps(job, indent=2))
            return
        with click.progressbar(length=100, label="generating", file=sys.stderr) as bar:
            shown = [0]

            def update(current: dict) -> None:
                pct = int(current["progress"] * 100)
                bar.label = current["state"]
                if pct > shown[0]:
                    bar.update(pct - shown[0])
                    shown[0] = pct

            job = client.wait(job["id"], timeout_s=timeout, on_update=update)
        if job["state"] != "succeeded":
            failure = job.get("failure") or {}
            raise click.ClickException(f"job {job['id']} {job['state']}: {failure.get('message', '')}")
        if out:
            size = client.download(job["assets"]["video"], out)
            click.echo(f"saved {out} ({size} bytes)", err=True)
        click.echo(json.dumps(job, indent=2))
    except ApiClientError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        client.close()


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """alembic upgrade head."""
    from app.db.migrate import upgrade

    load_stack_env()
    get_settings().require("database_url")
    upgrade(get_settings().database_url)
    click.echo("schema at head")


@main.group()
def models() -> None:
    """Model repository: push, list, verify versions."""


@models.command("push")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", required=True, help="Model name")
@click.option("--by", "created_by", default=lambda: os.environ.get("USER", "cli"), help="Recorded as the pusher")
@click.option("--version", "number", type=int, default=None, help="Version number (default: the next one)")
def models_push(bundle: Path, name: str, created_by: str, number: int | None) -> None:
    """Upload BUNDLE (model.json, code/, weights/*.safetensors, env/) as the next immutable version."""
    from app.core.storage import ensure_buckets
    from app.db.session import transaction
    from workers.repository import RepositoryError, push_version

    load_stack_env()
    get_settings().require("database_url")
    ensure_buckets()
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    try:
        with click.progressbar(length=total, label=f"pushing {name}", file=sys.stderr) as bar:
            with transaction() as session:
                pushed = push_version(session, bundle, name, created_by=created_by, progress=bar.update, number=number)
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "name": pushed.name,
                "version": pushed.number,
                "digest": pushed.digest,
                "size_bytes": pushed.size_bytes,
                "files": pushed.files,
            },
            indent=2,
        )
    )


@models.command("list")
def models_list() -> None:
    """Every model, its versions and aliases."""
    from sqlalchemy import select

    from app.db.models import Model, ModelAlias, ModelVersion
    from app.db.session import transaction

    load_stack_env()
    with transaction() as session:
        aliases = {(a.model_id, a.version_id): a.alias for a in session.scalars(select(ModelAlias))}
        for model in session.scalars(select(Model).order_by(Model.name)):
            click.echo(model.name)
            for v in session.scalars(
                select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.number)
            ):
                tag = aliases.get((model.id, v.id), "")
                click.echo(
                    f"  v{v.number:<4} {v.digest[:23]}…  {v.size_bytes:>10} B  {v.created_at:%Y-%m-%d %H:%M}  {tag}"
                )


def _version_digest(name: str, version: int) -> str:
    """The digest of NAME VERSION, or a CLI error when there is no such version."""
    from sqlalchemy import select

    from app.db.models import Model, ModelVersion
    from app.db.session import transaction

    with transaction() as session:
        row = session.scalar(select(ModelVersion).join(Model).where(Model.name == name, ModelVersion.number == version))
        if row is None:
            raise click.ClickException(f"{name} has no version {version}")
        return row.digest


@models.command("verify")
@click.argument("name")
@click.argument("version", type=int)
def models_verify(name: str, version: int) -> None:
    """Re-hash every file of a version in object storage against its manifest."""
    from workers.repository import verify_remote

    load_stack_env()
    digest = _version_digest(name, version)
    problems = verify_remote(name, version, digest)
    if problems:
        for problem in problems:
            click.echo(f"MISMATCH {problem}", err=True)
        raise click.ClickException(f"{name} v{version} failed verification ({len(problems)} problem(s))")
    click.echo(f"{name} v{version} {digest}: every file matches its manifest")


@models.command("pull")
@click.argument("name")
@click.argument("version", type=int)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Model cache to fill (default: the workers' cache, DREAMQ_MODEL_CACHE)",
)
def models_pull(name: str, version: int, cache_dir: Path | None) -> None:
    """Download NAME VERSION into this host's model cache, verified, so workers start warm."""
    from workers.cache import ModelCache
    from workers.repository import RepositoryError

    load_stack_env()
    digest = _version_digest(name, version)
    cache = ModelCache(cache_dir)
    try:
        missing = cache.missing_bytes(name, version, digest)
        # Same cache, locks and verification as the workers: a pull here is a download they skip.
        with click.progressbar(length=missing, label=f"pulling {name} v{version}", file=sys.stderr) as bar:
            path = cache.ensure(name, version, digest, progress=bar.update)
    except RepositoryError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        json.dumps(
            {
                "name": name,
                "version": version,
                "digest": digest,
                "path": str(path),
                "downloaded_bytes": missing,
                "cache": cache.stats(),
            },
            indent=2,
        )
    )


def _model_admin(action, *args, **kwargs) -> None:
    """Run one alias operation in a transaction and print the model; errors as CLI errors."""
    from app.admin.models import ModelAdminError
    from app.db.session import transaction
    from app.wiring import connect_listeners

    load_stack_env()
    connect_listeners()  # an operator's change to jobs reaches webhooks and metrics as any other
    try:
        with transaction() as session:
            click.echo(json.dumps(action(session, *args, **kwargs), indent=2))
    except ModelAdminError as exc:
        raise click.ClickException(exc.reason) from None


def _cli_actor() -> str:
    return f"cli:{os.environ.get('USER', '?')}"


@models.command("show")
@click.argument("name")
def models_show(name: str) -> None:
    """Versions (digest, size, environment), aliases and the audit history of NAME."""
    from app.admin.models import get_model, model_view

    _model_admin(lambda session: model_view(session, get_model(session, name)))


@models.command("promote")
@click.argument("name")
@click.argument("version", type=int)
def models_promote(name: str, version: int) -> None:
    """Point prod at VERSION; new jobs that pin no version get it."""
    from app.admin.models import promote

    _model_admin(promote, name, version, actor=_cli_actor())


@models.command("canary")
@click.argument("name")
@click.argument("version", type=int, required=False)
@click.option("--percent", type=float, help="Share of new jobs the canary gets (0-100]")
@click.option("--clear", is_flag=True, help="Remove the canary")
def models_canary(name: str, version: int | None, percent: float | None, clear: bool) -> None:
    """Give VERSION --percent of new jobs, or --clear the canary."""
    from app.admin.models import clear_canary, set_canary

    if clear:
        _model_admin(clear_canary, name, actor=_cli_actor())
        return
    if version is None or percent is None:
        raise click.UsageError("give VERSION and --percent, or --clear")
    _model_admin(set_canary, name, version, percent, actor=_cli_actor())


@models.command("rollback")
@click.argument("name")
def models_rollback(name: str) -> None:
    """Point prod back at the previous prod version (and clear the canary)."""
    from app.admin.models import rollback

    _model_admin(rollback, name, actor=_cli_actor())


@main.group()
def tiers() -> None:
    """Customer tiers: SLO (W), rate limits, floors, caps. Changes apply without restarts."""


@tiers.command("list")
def tiers_list() -> None:
    from app.admin.tiers import list_tiers
    from app.db.session import transaction

    load_stack_env()
    with transaction() as session:
        click.echo(
            f"{'tier':<11}{'W (s)':>8}{'rate/min':>10}{'burst':>7}{'tier rate':>11}{'cap':>6}{'floor':>7}{'quota':>7}{'keep d':>8}"
        )
        for t in list_tiers(session):
            click.echo(
                f"{t.name:<11}{t.slo_s:>8g}{t.rate_per_min:>10g}{t.burst:>7}{t.tier_rate_per_min or '-':>11}"
                f"{t.concurrency_cap:>6}{t.min_share:>7g}{t.monthly_quota or '-':>7}{t.retention_days:>8}"
            )


def _none_or(convert):
    def parse(value):
        return None if value in (None, "none", "null", "") else convert(value)

    return parse


@tiers.command("set")
@click.argument("name")
@click.option("--slo", "slo_s", type=float, help="W, the promised worst-case wait, in seconds")
@click.option("--rate", "rate_per_min", type=float, help="Per-user submissions per minute")
@click.option("--burst", type=int, help="Per-user bucket size")
@click.option("--tier-rate", "tier_rate_per_min", help="Whole-tier submissions per minute, or 'none'")
@click.option("--tier-burst", help="Whole-tier bucket size, or 'none'")
@click.option("--cap", "concurrency_cap", type=int, help="Jobs dispatched or running per user")
@click.option("--min-share", type=float, help="Starvation guard: floor on the tier's share of dispatches")
@click.option("--quota", "monthly_quota", help="Jobs per user per month, or 'none'")
@click.option("--retention", "retention_days", type=int, help="Days outputs and uploads are kept")
def tiers_set(name: str, **options) -> None:
    """Change tier NAME; validated exactly like PATCH /v1/admin/tiers/NAME."""
    from pydantic import ValidationError

    from app.admin.tiers import TierChangeError, tier_view, update_tier
    from app.api.schemas import TierPatch
    from app.db.session import transaction

    load_stack_env()
    parsers = {"tier_rate_per_min": _none_or(float), "tier_burst": _none_or(int), "monthly_quota": _none_or(int)}
    given = {k: parsers.get(k, lambda v: v)(v) for k, v in options.items() if v is not None}
    try:
        patch = TierPatch.model_validate(given)
        with transaction() as session:
            tier = update_tier(session, name, patch.changes(), actor=f"cli:{os.environ.get('USER', '?')}")
            click.echo(json.dumps(tier_view(tier), indent=2))
    except ValidationError as exc:
        raise click.ClickException(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        )
    except LookupError:
        raise click.ClickException(f"no tier named {name!r}") from None
    except TierChangeError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []})
@click.pass_context
def simulate(ctx) -> None:
    """Discrete-event simulation of a dispatch policy on a trace (--help for options)."""
    from app.scheduling.sim.simulator import main as simulator_main

    sys.exit(simulator_main(ctx.args))


def _validated(schema_name: str, **data):
    """Validate CLI input with the API's schema (one set of rules); errors name the field."""
    from pydantic import ValidationError

    from app.api import schemas

    try:
        return getattr(schemas, schema_name).model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        raise click.ClickException(
            "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        ) from None


def _admin_call(action, *args, **kwargs):
    """Run one app/admin operation in a transaction; its AdminError becomes a CLI error naming the field."""
    from app.admin.errors import AdminError
    from app.db.session import transaction
    from app.wiring import connect_listeners

    load_stack_env()
    connect_listeners()  # an operator's change to jobs reaches webhooks and metrics as any other
    get_settings().require("database_url")
    try:
        with transaction() as session:
            return action(session, *args, **kwargs)
    except AdminError as exc:
        raise click.ClickException(f"{exc.field}: {exc.reason}") from None


def _echo_json(value) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON (the numbers of /v1/admin/status)")
@click.option("--watch", type=float, default=None, metavar="N", help="Refresh every N seconds until Ctrl-C")
def status(as_json: bool, watch: float | None) -> None:
    """Tiers against their SLO, pools against their limits, workers, recent failures."""
    import time

    from app.admin.status import render
    from app.observability.snapshot import take_snapshot

    if watch is not None and watch <= 0:
        raise click.BadParameter("must be > 0", param_hint="--watch")
    while True:
        snapshot = _admin_call(take_snapshot)
        if as_json:
            _echo_json(snapshot.to_dict())
        else:
            if watch:
                click.clear()
            click.echo(render(snapshot))
        if not watch:
            return
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            return


@main.group()
def users() -> None:
    """Users: create (with a first key, shown once), list, change tier."""


@users.command("create")
@click.argument("name")
@click.option("--tier", required=True, help="Tier of the user (dreamq tiers list)")
@click.option("--admin", is_flag=True, help="Give the first key the admin scope")
def users_create(name: str, tier: str, admin: bool) -> None:
    """Create NAME in --tier with a first key; the key is printed this once."""
    from app.admin.users import create_user

    body = _validated("UserCreate", name=name, tier=tier, admin=admin)
    created = _admin_call(create_user, body.name, body.tier, admin=body.admin, actor=_cli_actor())
    click.echo(
        f"user {created['name']} created in tier {created['tier']}; its key (shown once, store it now):", err=True
    )
    click.echo(created["key"])


@users.command("list")
@click.option("--tier", default=None, help="Only users of this tier")
@click.option("--json", "as_json", is_flag=True)
def users_list(tier: str | None, as_json: bool) -> None:
    from app.admin.users import list_users

    rows = _admin_call(list_users, tier=tier, limit=1000)
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'user':<32}{'tier':<12}{'state':<10}{'keys (prefix, scopes)'}")
    for u in rows:
        keys = ", ".join(
            f"{k['prefix']}({'+'.join(k['scopes'])}{', revoked' if k['revoked_at'] else ''})" for k in u["keys"]
        )
        click.echo(f"{u['name']:<32}{u['tier']:<12}{'disabled' if u['disabled'] else 'active':<10}{keys or '-'}")


@users.command("set-tier")
@click.argument("name")
@click.argument("tier")
def users_set_tier(name: str, tier: str) -> None:
    """Move NAME to TIER: its next submission gets the new tier's limits and SLO."""
    from app.admin.users import update_user

    patch = _validated("UserPatch", tier=tier)
    _echo_json(_admin_call(update_user, name, patch.changes(), actor=_cli_actor()))


@main.group()
def keys() -> None:
    """API keys: create (shown once), list by prefix, revoke."""


@keys.command("create")
@click.argument("user")
@click.option("--scope", "scopes", multiple=True, type=click.Choice(["user", "admin"]), help="Scopes (user always)")
@click.option("--name", "key_name", default="", help="A label for the key")
def keys_create(user: str, scopes: tuple[str, ...], key_name: str) -> None:
    """A new key for USER; printed this once."""
    from app.admin.users import create_key

    body = _validated("KeyCreate", scopes=list(scopes) or ["user"], name=key_name)
    created = _admin_call(create_key, user, list(body.scopes), key_name=body.name, actor=_cli_actor())
    click.echo(
        f"key {created['prefix']} for {user} ({'+'.join(created['scopes'])}); shown once, store it now:", err=True
    )
    click.echo(created["key"])


@keys.command("list")
@click.argument("user")
def keys_list(user: str) -> None:
    """USER's keys by prefix (the keys themselves are never stored)."""
    from app.admin.users import list_keys

    click.echo(f"{'prefix':<14}{'scopes':<13}{'created':<18}{'revoked':<18}name")
    for k in _admin_call(list_keys, user):
        click.echo(
            f"{k['prefix']:<14}{'+'.join(k['scopes']):<13}{k['created_at'][:16]:<18}"
            f"{(k['revoked_at'] or '-')[:16]:<18}{k['name']}"
        )


@keys.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key starting with PREFIX: it fails from the next request on."""
    from app.admin.users import revoke_key

    key = _admin_call(revoke_key, prefix, actor=_cli_actor())
    click.echo(f"key {key['prefix']} of {key['user']} revoked at {key['revoked_at']}")


@main.group()
def clusters() -> None:
    """Clusters (inference, burst): list, add, set, drain, enable."""


def _print_clusters(rows: list[dict]) -> None:
    click.echo(f"{'cluster':<20}{'kind':<11}{'state':<9}{'max workers':>12}{'pools':>7}{'live':>6}{'draining':>10}")
    for c in rows:
        click.echo(
            f"{c['name']:<20}{c['kind']:<11}{'enabled' if c['enabled'] else 'DRAINED':<9}"
            f"{c['max_workers'] if c['max_workers'] is not None else '-':>12}{c['pools']:>7}"
            f"{c['live_workers']:>6}{c['draining_workers']:>10}"
        )


@clusters.command("list")
@click.option("--json", "as_json", is_flag=True)
def clusters_list(as_json: bool) -> None:
    from app.admin.clusters import list_clusters

    rows = _admin_call(list_clusters)
    _echo_json(rows) if as_json else _print_clusters(rows)


@clusters.command("add")
@click.argument("name")
@click.option("--kind", required=True, help="inference (standing workers) or burst (borrowed GPUs)")
@click.option("--max-workers", type=int, default=None, help="Capacity limit in workers")
def clusters_add(name: str, kind: str, max_workers: int | None) -> None:
    from app.admin.clusters import add_cluster

    body = _validated("ClusterCreate", name=name, kind=kind, max_workers=max_workers)
    _echo_json(_admin_call(add_cluster, body.name, body.kind, max_workers=body.max_workers, actor=_cli_actor()))


@clusters.command("set")
@click.argument("name")
@click.option("--max-workers", required=True, help="Capacity limit in workers, or 'none'")
def clusters_set(name: str, max_workers: str) -> None:
    from app.admin.clusters import update_cluster

    try:
        value = _none_or(int)(max_workers)
    except ValueError:
        raise click.BadParameter("a whole number or 'none'", param_hint="--max-workers") from None
    if value is None:
        changes = {"max_workers": None}  # clears the limit
    else:
        changes = _validated("ClusterPatch", max_workers=value).changes()
    _echo_json(_admin_call(update_cluster, name, changes, actor=_cli_actor()))


@clusters.command("drain")
@click.argument("name")
@click.option("--now", is_flag=True, help="Also requeue running jobs at their next step (default: let them finish)")
def clusters_drain(name: str, now: bool) -> None:
    """Stop releasing work to NAME's pools."""
    from app.admin.clusters import drain_cluster

    _echo_json(_admin_call(drain_cluster, name, now=now, actor=_cli_actor()))


@clusters.command("reclaim")
@click.argument("name")
def clusters_reclaim(name: str) -> None:
    """Give NAME back now: running jobs are requeued, burst workers stopped by the controller."""
    from app.admin.clusters import reclaim_cluster

    _echo_json(_admin_call(reclaim_cluster, name, actor=_cli_actor()))


@clusters.command("enable")
@click.argument("name")
def clusters_enable(name: str) -> None:
    from app.admin.clusters import enable_cluster

    _echo_json(_admin_call(enable_cluster, name, actor=_cli_actor()))


@main.group()
def pools() -> None:
    """Pools (a model on a cluster): list, add, set the dispatch limit, drain, enable."""


@pools.command("list")
@click.option("--json", "as_json", is_flag=True)
def pools_list(as_json: bool) -> None:
    from app.admin.pools import list_pools

    rows = _admin_call(list_pools)
    if as_json:
        _echo_json(rows)
        return
    click.echo(
        f"{'pool':<32}{'kind':<11}{'state':<9}{'limit':>7}{'effective':>10}{'dispatched':>11}{'running':>9}"
        f"{'workers':>9}"
    )
    for p in rows:
        state = "enabled" if p["enabled"] and p["cluster_enabled"] else "DRAINED"
        click.echo(
            f"{p['name']:<32}{p['cluster_kind']:<11}{state:<9}{p['dispatch_limit']:>7}{p['effective_limit']:>10}"
            f"{p['dispatched']:>11}{p['running']:>9}{p['live_workers']:>9}"
        )


@pools.command("add")
@click.argument("cluster")
@click.argument("model")
@click.option("--dispatch-limit", type=int, required=True, help="Most jobs dispatched-but-not-started at once")
def pools_add(cluster: str, model: str, dispatch_limit: int) -> None:
    from app.admin.pools import add_pool

    body = _validated("PoolCreate", cluster=cluster, model=model, dispatch_limit=dispatch_limit)
    _echo_json(_admin_call(add_pool, body.cluster, body.model, body.dispatch_limit, actor=_cli_actor()))


@pools.command("set")
@click.argument("cluster")
@click.argument("model")
@click.option("--dispatch-limit", type=int, required=True)
def pools_set(cluster: str, model: str, dispatch_limit: int) -> None:
    """Change the dispatch limit (applies at the next dispatch pass)."""
    from app.admin.pools import update_pool

    patch = _validated("PoolPatch", dispatch_limit=dispatch_limit)
    _echo_json(_admin_call(update_pool, cluster, model, patch.changes(), actor=_cli_actor()))


@pools.command("drain")
@click.argument("cluster")
@click.argument("model")
@click.option("--now", is_flag=True, help="Also requeue running jobs at their next step (default: let them finish)")
def pools_drain(cluster: str, model: str, now: bool) -> None:
    """Stop releasing work to the pool."""
    from app.admin.pools import drain_pool

    _echo_json(_admin_call(drain_pool, cluster, model, now=now, actor=_cli_actor()))


@pools.command("enable")
@click.argument("cluster")
@click.argument("model")
def pools_enable(cluster: str, model: str) -> None:
    from app.admin.pools import enable_pool

    _echo_json(_admin_call(enable_pool, cluster, model, actor=_cli_actor()))


@main.group("dream-machine")
def dream_machine() -> None:
    """Luma's Dream Machine API (/dream-machine/v1): which dreamq model serves each model name."""


@dream_machine.group("models")
def dream_machine_models() -> None:
    """Model names Luma's clients send (ray-2, ...) -> dreamq models: list, set, remove."""


@dream_machine_models.command("list")
@click.option("--json", "as_json", is_flag=True)
def dream_machine_models_list(as_json: bool) -> None:
    from app.admin.dream_machine import list_mappings

    rows = _admin_call(list_mappings)
    if as_json:
        _echo_json(rows)
        return
    click.echo(f"{'name':<20}{'dreamq model':<20}{'updated by':<24}note")
    for row in rows:
        click.echo(f"{row['name']:<20}{row['model']:<20}{row['updated_by']:<24}{row['note']}")


@dream_machine_models.command("set")
@click.argument("name")
@click.argument("model")
@click.option("--note", default="", help="Why (shown in the list)")
def dream_machine_models_set(name: str, model: str, note: str) -> None:
    """Serve the Luma model name NAME with the dreamq model MODEL (new submissions)."""
    from app.admin.dream_machine import set_mapping

    body = _validated("DreamMachineModelIn", model=model, note=note)
    _echo_json(_admin_call(set_mapping, name, body.model, note=body.note, actor=_cli_actor()))


@dream_machine_models.command("remove")
@click.argument("name")
def dream_machine_models_remove(name: str) -> None:
    """Stop serving NAME: its submissions get a 400 naming it."""
    from app.admin.dream_machine import remove_mapping

    _admin_call(remove_mapping, name, actor=_cli_actor())
    click.echo(f"removed {name}")


if __name__ == "__main__":  # pragma: no cover
    main()

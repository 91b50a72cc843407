"""/v1/admin: operator routes (admin scope). Tiers here; models, users and pools grow here too."""

from __future__ import annotations

from flask import Blueprint, Response

from app.admin import clusters as clusters_admin
from app.admin import dream_machine as dream_machine_admin
from app.admin import models as model_admin
from app.admin import pools as pools_admin
from app.admin import users as users_admin
from app.admin.errors import AdminError
from app.admin.tiers import TierChangeError, list_tiers, tier_view, update_tier
from app.api import schemas
from app.api.routing import Context, endpoint
from app.core.errors import ApiError, NotFound, field_error
from app.observability.snapshot import take_snapshot
from workers.repository import verify_remote

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


@endpoint(
    bp,
    "/tiers",
    methods=["GET"],
    auth="admin",
    response=schemas.TierList,
    summary="Every tier with its SLO (W), limits, floor and cap",
    errors=[401, 403],
)
def get_tiers(ctx: Context):
    return {"object": "list", "data": [tier_view(t) for t in list_tiers(ctx.session)]}


@endpoint(
    bp,
    "/status",
    methods=["GET"],
    auth="admin",
    session_auth=True,
    response=schemas.StatusOut,
    summary="The operator's picture: tiers against their SLO, pools against their limits, workers, failures",
    errors=[401, 403],
)
def get_status(ctx: Context):
    # Also read by the /dashboard page every few seconds, with its login cookie (session_auth).
    return take_snapshot(ctx.session).to_dict()


@endpoint(
    bp,
    "/tiers/<name>",
    methods=["PATCH"],
    auth="admin",
    body=schemas.TierPatch,
    response=schemas.TierOut,
    summary="Change a tier at run time (takes effect within seconds, no restart)",
    errors=[401, 403, 404, 422],
)
def patch_tier(ctx: Context, name: str):
    try:
        tier = update_tier(ctx.session, name, ctx.body.changes(), actor=ctx.user.key_prefix)
    except LookupError:
        raise NotFound(f"no tier named '{name}'") from None
    except TierChangeError as exc:
        raise field_error(exc.field, exc.reason) from None
    return tier_view(tier)


def _model_error(exc: model_admin.ModelAdminError) -> ApiError:
    codes = {404: "not_found", 409: "conflict", 422: "validation_error"}
    return ApiError(
        exc.reason, status=exc.status, code=codes[exc.status], fields=[{"field": exc.field, "reason": exc.reason}]
    )


def _actor(ctx: Context) -> str:
    return f"{ctx.user.user_name} ({ctx.user.key_prefix})"


@endpoint(
    bp,
    "/models",
    methods=["GET"],
    auth="admin",
    response=schemas.ModelList,
    summary="Every model with its versions, aliases and recent alias moves",
    errors=[401, 403],
)
def get_models(ctx: Context):
    return {"object": "list", "data": model_admin.list_models(ctx.session)}


@endpoint(
    bp,
    "/models/<name>",
    methods=["GET"],
    auth="admin",
    response=schemas.ModelOut,
    summary="One model: versions (digest, size, environment), aliases, audit history",
    errors=[401, 403, 404],
)
def get_model(ctx: Context, name: str):
    try:
        return model_admin.model_view(ctx.session, model_admin.get_model(ctx.session, name))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(
    bp,
    "/models/<name>/promote",
    methods=["POST"],
    auth="admin",
    body=schemas.PromoteBody,
    response=schemas.ModelOut,
    summary="Point prod at a version (audited); new jobs get it",
    errors=[401, 403, 404, 409, 422],
)
def promote_model(ctx: Context, name: str):
    try:
        return model_admin.promote(ctx.session, name, ctx.body.version, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(
    bp,
    "/models/<name>/canary",
    methods=["POST"],
    auth="admin",
    body=schemas.CanaryBody,
    response=schemas.ModelOut,
    summary="Give a version a percentage of new jobs (audited)",
    errors=[401, 403, 404, 409, 422],
)
def canary_model(ctx: Context, name: str):
    try:
        return model_admin.set_canary(ctx.session, name, ctx.body.version, ctx.body.percent, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(
    bp,
    "/models/<name>/canary",
    methods=["DELETE"],
    auth="admin",
    response=schemas.ModelOut,
    summary="Remove the canary (audited)",
    errors=[401, 403, 404, 409],
)
def clear_canary_model(ctx: Context, name: str):
    try:
        return model_admin.clear_canary(ctx.session, name, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(
    bp,
    "/models/<name>/rollback",
    methods=["POST"],
    auth="admin",
    response=schemas.ModelOut,
    summary="Point prod back at the previous prod version and clear the canary (audited)",
    errors=[401, 403, 404, 409],
)
def rollback_model(ctx: Context, name: str):
    try:
        return model_admin.rollback(ctx.session, name, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(
    bp,
    "/models/<name>/versions/<int(max=2147483647):number>/verify",
    methods=["POST"],
    auth="admin",
    response=schemas.VerifyOut,
    summary="Re-hash every file of a version in object storage against its manifest",
    errors=[401, 403, 404],
)
def verify_model_version(ctx: Context, name: str, number: int):
    try:
        model = model_admin.get_model(ctx.session, name)
        version = model_admin.get_version(ctx.session, model, number)
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None
    problems = verify_remote(name, number, version.digest)
    return {"name": name, "version": number, "digest": version.digest, "ok": not problems, "problems": problems}


# --- users and keys, clusters and pools: app/admin/users.py, clusters.py, pools.py ---------------


def _admin_error(exc: AdminError) -> ApiError:
    codes = {404: "not_found", 409: "conflict", 422: "validation_error"}
    return ApiError(
        f"{exc.field}: {exc.reason}",
        status=exc.status,
        code=codes[exc.status],
        fields=[{"field": exc.field, "reason": exc.reason}],
    )


def _run(action, *args, **kwargs):
    try:
        return action(*args, **kwargs)
    except AdminError as exc:
        raise _admin_error(exc) from None


@endpoint(
    bp,
    "/users",
    methods=["GET"],
    auth="admin",
    query=schemas.UserListQuery,
    response=schemas.UserList,
    summary="Users with their tier and keys (by prefix; never a key)",
    errors=[401, 403],
)
def get_users(ctx: Context):
    return {"object": "list", "data": users_admin.list_users(ctx.session, tier=ctx.query.tier, limit=ctx.query.limit)}


@endpoint(
    bp,
    "/users",
    methods=["POST"],
    auth="admin",
    body=schemas.UserCreate,
    response=schemas.UserCreated,
    status=201,
    summary="Create a user in a tier with a first key (the key is in this response only)",
    errors=[401, 403, 409, 422],
)
def post_user(ctx: Context):
    body = ctx.body
    return _run(
        users_admin.create_user,
        ctx.session,
        body.name,
        body.tier,
        admin=body.admin,
        key_name=body.key_name,
        actor=_actor(ctx),
    )


@endpoint(
    bp,
    "/users/<name>",
    methods=["GET"],
    auth="admin",
    response=schemas.UserOut,
    summary="One user: tier, state, keys by prefix",
    errors=[401, 403, 404],
)
def get_user(ctx: Context, name: str):
    return _run(lambda: users_admin.user_view(ctx.session, users_admin.get_user(ctx.session, name)))


@endpoint(
    bp,
    "/users/<name>",
    methods=["PATCH"],
    auth="admin",
    body=schemas.UserPatch,
    response=schemas.UserOut,
    summary="Change a user's tier (from the next submission) or disable the user",
    errors=[401, 403, 404, 422],
)
def patch_user(ctx: Context, name: str):
    return _run(users_admin.update_user, ctx.session, name, ctx.body.changes(), actor=_actor(ctx))


@endpoint(
    bp,
    "/users/<name>/keys",
    methods=["GET"],
    auth="admin",
    response=schemas.KeyList,
    summary="A user's keys by prefix (never the key itself)",
    errors=[401, 403, 404],
)
def get_user_keys(ctx: Context, name: str):
    return {"object": "list", "data": _run(users_admin.list_keys, ctx.session, name)}


@endpoint(
    bp,
    "/users/<name>/keys",
    methods=["POST"],
    auth="admin",
    body=schemas.KeyCreate,
    response=schemas.KeyCreated,
    status=201,
    summary="A new key for a user (the key is in this response only)",
    errors=[401, 403, 404, 422],
)
def post_user_key(ctx: Context, name: str):
    return _run(
        users_admin.create_key, ctx.session, name, list(ctx.body.scopes), key_name=ctx.body.name, actor=_actor(ctx)
    )


@endpoint(
    bp,
    "/keys/<prefix>/revoke",
    methods=["POST"],
    auth="admin",
    response=schemas.KeyOut,
    summary="Revoke a key by its prefix: it fails from the next request on",
    errors=[401, 403, 404, 409],
)
def revoke_key(ctx: Context, prefix: str):
    return _run(users_admin.revoke_key, ctx.session, prefix, actor=_actor(ctx))


@endpoint(
    bp,
    "/clusters",
    methods=["GET"],
    auth="admin",
    response=schemas.ClusterList,
    summary="Clusters (inference, burst) with capacity limits, pools and workers",
    errors=[401, 403],
)
def get_clusters(ctx: Context):
    return {"object": "list", "data": clusters_admin.list_clusters(ctx.session)}


@endpoint(
    bp,
    "/clusters",
    methods=["POST"],
    auth="admin",
    body=schemas.ClusterCreate,
    response=schemas.ClusterOut,
    status=201,
    summary="Add a cluster",
    errors=[401, 403, 409, 422],
)
def post_cluster(ctx: Context):
    body = ctx.body
    return _run(
        clusters_admin.add_cluster,
        ctx.session,
        body.name,
        body.kind,
        max_workers=body.max_workers,
        enabled=body.enabled,
        actor=_actor(ctx),
    )


@endpoint(
    bp,
    "/clusters/<name>",
    methods=["GET"],
    auth="admin",
    response=schemas.ClusterOut,
    summary="One cluster",
    errors=[401, 403, 404],
)
def get_cluster(ctx: Context, name: str):
    return _run(lambda: clusters_admin.cluster_view(ctx.session, clusters_admin.get_cluster(ctx.session, name)))


@endpoint(
    bp,
    "/clusters/<name>",
    methods=["PATCH"],
    auth="admin",
    body=schemas.ClusterPatch,
    response=schemas.ClusterOut,
    summary="Change a cluster's capacity limit",
    errors=[401, 403, 404, 422],
)
def patch_cluster(ctx: Context, name: str):
    return _run(clusters_admin.update_cluster, ctx.session, name, ctx.body.changes(), actor=_actor(ctx))


@endpoint(
    bp,
    "/clusters/<name>/drain",
    methods=["POST"],
    auth="admin",
    query=schemas.DrainQuery,
    response=schemas.ClusterDrained,
    errors=[401, 403, 404],
    summary="Stop releasing work to the cluster's pools; ?now=true also requeues running jobs at their next step",
)
def drain_cluster(ctx: Context, name: str):
    return _run(clusters_admin.drain_cluster, ctx.session, name, now=ctx.query.now, actor=_actor(ctx))


@endpoint(
    bp,
    "/clusters/<name>/reclaim",
    methods=["POST"],
    auth="admin",
    response=schemas.ClusterDrained,
    errors=[401, 403, 404],
    summary="Give the cluster back now: stop dispatch, requeue running jobs at their next step, stop burst workers",
)
def reclaim_cluster(ctx: Context, name: str):
    return _run(clusters_admin.reclaim_cluster, ctx.session, name, actor=_actor(ctx))


@endpoint(
    bp,
    "/clusters/<name>/enable",
    methods=["POST"],
    auth="admin",
    response=schemas.ClusterOut,
    summary="Release work to the cluster again (and revive workers an operator drained)",
    errors=[401, 403, 404],
)
def enable_cluster(ctx: Context, name: str):
    return _run(clusters_admin.enable_cluster, ctx.session, name, actor=_actor(ctx))


@endpoint(
    bp,
    "/pools",
    methods=["GET"],
    auth="admin",
    response=schemas.PoolList,
    summary="Pools (cluster x model): dispatch limit, effective limit, in flight, workers, queues",
    errors=[401, 403],
)
def get_pools(ctx: Context):
    return {"object": "list", "data": pools_admin.list_pools(ctx.session)}


@endpoint(
    bp,
    "/pools",
    methods=["POST"],
    auth="admin",
    body=schemas.PoolCreate,
    response=schemas.PoolOut,
    status=201,
    summary="Add a pool: a model served by a cluster, with its dispatch limit",
    errors=[401, 403, 409, 422],
)
def post_pool(ctx: Context):
    body = ctx.body
    return _run(
        pools_admin.add_pool,
        ctx.session,
        body.cluster,
        body.model,
        body.dispatch_limit,
        enabled=body.enabled,
        actor=_actor(ctx),
    )


@endpoint(
    bp,
    "/pools/<cluster>/<model>",
    methods=["GET"],
    auth="admin",
    response=schemas.PoolOut,
    summary="One pool",
    errors=[401, 403, 404],
)
def get_pool(ctx: Context, cluster: str, model: str):
    return _run(lambda: pools_admin.pool_view(ctx.session, pools_admin.get_pool(ctx.session, cluster, model)))


@endpoint(
    bp,
    "/pools/<cluster>/<model>",
    methods=["PATCH"],
    auth="admin",
    body=schemas.PoolPatch,
    response=schemas.PoolOut,
    summary="Change a pool's dispatch limit (applies at the next dispatch pass)",
    errors=[401, 403, 404, 422],
)
def patch_pool(ctx: Context, cluster: str, model: str):
    return _run(pools_admin.update_pool, ctx.session, cluster, model, ctx.body.changes(), actor=_actor(ctx))


@endpoint(
    bp,
    "/pools/<cluster>/<model>/drain",
    methods=["POST"],
    auth="admin",
    query=schemas.DrainQuery,
    response=schemas.PoolDrained,
    errors=[401, 403, 404],
    summary="Stop releasing work to the pool; ?now=true also requeues its running jobs at their next step",
)
def drain_pool(ctx: Context, cluster: str, model: str):
    return _run(pools_admin.drain_pool, ctx.session, cluster, model, now=ctx.query.now, actor=_actor(ctx))


@endpoint(
    bp,
    "/pools/<cluster>/<model>/enable",
    methods=["POST"],
    auth="admin",
    response=schemas.PoolOut,
    summary="Release work to the pool again",
    errors=[401, 403, 404],
)
def enable_pool(ctx: Context, cluster: str, model: str):
    return _run(pools_admin.enable_pool, ctx.session, cluster, model, actor=_actor(ctx))


# --- the Dream Machine model table (Luma model names -> dreamq models; app/admin/dream_machine.py) ---


@endpoint(
    bp,
    "/dream-machine/models",
    methods=["GET"],
    auth="admin",
    response=schemas.DreamMachineModelList,
    summary="Luma model names (ray-2, ...) and the dreamq model serving each on /dream-machine/v1",
    errors=[401, 403],
)
def get_dream_machine_models(ctx: Context):
    return {"object": "list", "data": dream_machine_admin.list_mappings(ctx.session)}


@endpoint(
    bp,
    "/dream-machine/models/<name>",
    methods=["PUT"],
    auth="admin",
    body=schemas.DreamMachineModelIn,
    response=schemas.DreamMachineModelOut,
    summary="Serve a Luma model name with a dreamq model (audited)",
    errors=[401, 403, 422],
)
def put_dream_machine_model(ctx: Context, name: str):
    return _run(
        dream_machine_admin.set_mapping, ctx.session, name, ctx.body.model, note=ctx.body.note, actor=_actor(ctx)
    )


@endpoint(
    bp,
    "/dream-machine/models/<name>",
    methods=["DELETE"],
    auth="admin",
    status=204,
    summary="Stop serving a Luma model name (its submissions then get a 400 naming it)",
    errors=[401, 403, 404],
)
def delete_dream_machine_model(ctx: Context, name: str):
    _run(dream_machine_admin.remove_mapping, ctx.session, name, actor=_actor(ctx))
    return Response(status=204)

"""/v1/admin: operator routes (admin scope). Tiers here; models, users and pools grow here too."""

from __future__ import annotations

from flask import Blueprint

from app.admin import models as model_admin
from app.admin.tiers import TierChangeError, list_tiers, tier_view, update_tier
from app.api import schemas
from app.api.errors import ApiError, NotFound, field_error
from app.api.routing import Context, endpoint

bp = Blueprint("admin", __name__, url_prefix="/v1/admin")


@endpoint(bp, "/tiers", methods=["GET"], auth="admin", response=schemas.TierList,
          summary="Every tier with its SLO (W), limits, floor and cap", errors=[401, 403])
def get_tiers(ctx: Context):
    return {"object": "list", "data": [tier_view(t) for t in list_tiers(ctx.session)]}


@endpoint(bp, "/tiers/<name>", methods=["PATCH"], auth="admin", body=schemas.TierPatch, response=schemas.TierOut,
          summary="Change a tier at run time (takes effect within seconds, no restart)", errors=[401, 403, 404, 422])
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
    return ApiError(exc.reason, status=exc.status, code=codes[exc.status], fields=[{"field": exc.field, "reason": exc.reason}])


def _actor(ctx: Context) -> str:
    return f"{ctx.user.user_name} ({ctx.user.key_prefix})"


@endpoint(bp, "/models", methods=["GET"], auth="admin", response=schemas.ModelList,
          summary="Every model with its versions, aliases and recent alias moves", errors=[401, 403])
def get_models(ctx: Context):
    return {"object": "list", "data": model_admin.list_models(ctx.session)}


@endpoint(bp, "/models/<name>", methods=["GET"], auth="admin", response=schemas.ModelOut,
          summary="One model: versions (digest, size, environment), aliases, audit history", errors=[401, 403, 404])
def get_model(ctx: Context, name: str):
    try:
        return model_admin.model_view(ctx.session, model_admin.get_model(ctx.session, name))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(bp, "/models/<name>/promote", methods=["POST"], auth="admin", body=schemas.PromoteBody,
          response=schemas.ModelOut, summary="Point prod at a version (audited); new jobs get it",
          errors=[401, 403, 404, 409, 422])
def promote_model(ctx: Context, name: str):
    try:
        return model_admin.promote(ctx.session, name, ctx.body.version, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(bp, "/models/<name>/canary", methods=["POST"], auth="admin", body=schemas.CanaryBody,
          response=schemas.ModelOut, summary="Give a version a percentage of new jobs (audited)",
          errors=[401, 403, 404, 409, 422])
def canary_model(ctx: Context, name: str):
    try:
        return model_admin.set_canary(ctx.session, name, ctx.body.version, ctx.body.percent, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(bp, "/models/<name>/canary", methods=["DELETE"], auth="admin", response=schemas.ModelOut,
          summary="Remove the canary (audited)", errors=[401, 403, 404, 409])
def clear_canary_model(ctx: Context, name: str):
    try:
        return model_admin.clear_canary(ctx.session, name, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(bp, "/models/<name>/rollback", methods=["POST"], auth="admin", response=schemas.ModelOut,
          summary="Point prod back at the previous prod version and clear the canary (audited)",
          errors=[401, 403, 404, 409])
def rollback_model(ctx: Context, name: str):
    try:
        return model_admin.rollback(ctx.session, name, actor=_actor(ctx))
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None


@endpoint(bp, "/models/<name>/versions/<int(max=2147483647):number>/verify", methods=["POST"], auth="admin",
          response=schemas.VerifyOut, summary="Re-hash every file of a version in object storage against its manifest",
          errors=[401, 403, 404])
def verify_model_version(ctx: Context, name: str, number: int):
    from workers.repository import verify_remote

    try:
        model = model_admin.get_model(ctx.session, name)
        version = model_admin.get_version(ctx.session, model, number)
    except model_admin.ModelAdminError as exc:
        raise _model_error(exc) from None
    problems = verify_remote(name, number, version.digest)
    return {"name": name, "version": number, "digest": version.digest, "ok": not problems, "problems": problems}

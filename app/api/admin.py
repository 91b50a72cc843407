"""/v1/admin: operator routes (admin scope). Tiers here; models, users and pools grow here too."""

from __future__ import annotations

from flask import Blueprint

from app.admin.tiers import TierChangeError, list_tiers, tier_view, update_tier
from app.api import schemas
from app.api.errors import NotFound, field_error
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

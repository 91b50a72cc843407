"""Model aliases: promote, canary, rollback, each audited (who, when, from which version to which).

`prod` is what a job gets when it names no version; `canary` (with a percentage) takes that
share of those jobs. Moving an alias changes what *new* jobs resolve to: a job records the exact
version it resolved at submission (app/jobs/submit.py), so a rollback never changes what a queued
or running job uses. Shared by the admin HTTP routes and the CLI.
"""

from __future__ import annotations

import datetime as dt
import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import Model, ModelAlias, ModelAliasEvent, ModelVersion

log = logging.getLogger(__name__)

PROD, CANARY = "prod", "canary"


class ModelAdminError(ValueError):
    def __init__(self, field: str, reason: str, status: int = 422):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason, self.status = field, reason, status


def get_model(session: Session, name: str, *, lock: bool = False) -> Model:
    query = select(Model).where(Model.name == name)
    if lock:
        # Alias moves of one model are serialised: rollback reads the history it then extends.
        query = query.with_for_update()
    model = session.scalar(query)
    if model is None:
        raise ModelAdminError("name", f"no model named '{name}'", status=404)
    return model


def get_version(session: Session, model: Model, number: int) -> ModelVersion:
    version = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.number == number)
    )
    if version is None:
        raise ModelAdminError("version", f"model '{model.name}' has no version {number}", status=404)
    return version


def set_alias(
    session: Session,
    model: Model,
    alias: str,
    version: ModelVersion | None,
    *,
    action: str,
    actor: str,
    percent: float | None = None,
) -> None:
    current = session.get(ModelAlias, (model.id, alias))
    previous = current.version_id if current else None
    now = dt.datetime.now(dt.timezone.utc)
    if version is None:
        if current is not None:
            session.delete(current)
    elif current is None:
        session.add(
            ModelAlias(
                model_id=model.id,
                alias=alias,
                version_id=version.id,
                percent=percent or 100,
                updated_by=actor,
                updated_at=now,
            )
        )
    else:
        current.version_id, current.percent, current.updated_by, current.updated_at = (
            version.id,
            percent or 100,
            actor,
            now,
        )
    session.add(
        ModelAliasEvent(
            model_id=model.id,
            alias=alias,
            action=action,
            from_version_id=previous,
            to_version_id=version.id if version else None,
            percent=percent,
            actor=actor,
            at=now,
        )
    )
    session.flush()
    log.info(
        "model alias moved",
        extra={
            "model": model.name,
            "alias": alias,
            "action": action,
            "actor": actor,
            "version": version.number if version else None,
            "percent": percent,
        },
    )


def promote(session: Session, name: str, number: int, *, actor: str) -> dict[str, Any]:
    model = get_model(session, name, lock=True)
    version = get_version(session, model, number)
    prod = session.get(ModelAlias, (model.id, PROD))
    if prod is not None and prod.version_id == version.id:
        raise ModelAdminError("version", f"v{number} is already prod", status=409)
    set_alias(session, model, PROD, version, action="promote", actor=actor)
    canary = session.get(ModelAlias, (model.id, CANARY))
    if canary is not None and canary.version_id == version.id:
        # The canary graduated: it no longer needs a share of its own.
        set_alias(session, model, CANARY, None, action="clear", actor=actor)
    return model_view(session, model)


def set_canary(session: Session, name: str, number: int, percent: float, *, actor: str) -> dict[str, Any]:
    if not 0 < percent <= 100:
        raise ModelAdminError("percent", "must be in (0, 100]; use clear to remove the canary")
    model = get_model(session, name, lock=True)
    version = get_version(session, model, number)
    prod = session.get(ModelAlias, (model.id, PROD))
    if prod is None:
        raise ModelAdminError("version", "the model has no prod version to share traffic with", status=409)
    if prod.version_id == version.id:
        raise ModelAdminError("version", f"v{number} is prod already; a canary must be another version", status=409)
    set_alias(session, model, CANARY, version, action="canary", actor=actor, percent=percent)
    return model_view(session, model)


def clear_canary(session: Session, name: str, *, actor: str) -> dict[str, Any]:
    model = get_model(session, name, lock=True)
    if session.get(ModelAlias, (model.id, CANARY)) is None:
        raise ModelAdminError("alias", "the model has no canary", status=409)
    set_alias(session, model, CANARY, None, action="clear", actor=actor)
    return model_view(session, model)


def prod_history(session: Session, model: Model) -> list[uuid.UUID]:
    """The stack of prod versions: a promote pushes, a rollback pops; the top is prod now."""
    stack: list[uuid.UUID] = []
    events = session.scalars(
        select(ModelAliasEvent)
        .where(ModelAliasEvent.model_id == model.id, ModelAliasEvent.alias == PROD)
        .order_by(ModelAliasEvent.id)
    )
    for event in events:
        if not stack and event.from_version_id is not None:
            stack.append(event.from_version_id)  # prod before the first audited move
        if event.action == "rollback":
            if stack:
                stack.pop()
        elif event.to_version_id is not None:
            stack.append(event.to_version_id)
    current = session.get(ModelAlias, (model.id, PROD))
    if current is not None and (not stack or stack[-1] != current.version_id):
        stack.append(current.version_id)  # prod set outside the audited paths (older data)
    return stack


def rollback(session: Session, name: str, *, actor: str) -> dict[str, Any]:
    """prod -> the prod before the current one (repeatable: each rollback steps further back);
    the canary is cleared, since it was tested against the prod being abandoned."""
    model = get_model(session, name, lock=True)
    stack = prod_history(session, model)
    if not stack:
        raise ModelAdminError("alias", "the model has no prod version", status=409)
    if len(stack) < 2:
        raise ModelAdminError("alias", "there is no earlier prod version to roll back to", status=409)
    target = session.get(ModelVersion, stack[-2])
    set_alias(session, model, PROD, target, action="rollback", actor=actor)
    if session.get(ModelAlias, (model.id, CANARY)) is not None:
        set_alias(session, model, CANARY, None, action="clear", actor=actor)
    return model_view(session, model)


def model_view(session: Session, model: Model, *, events: int = 20) -> dict[str, Any]:
    versions = list(
        session.scalars(select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.number))
    )
    by_id = {v.id: v.number for v in versions}
    aliases = {a.alias: a for a in session.scalars(select(ModelAlias).where(ModelAlias.model_id == model.id))}
    history = session.scalars(
        select(ModelAliasEvent)
        .where(ModelAliasEvent.model_id == model.id)
        .order_by(ModelAliasEvent.id.desc())
        .limit(events)
    )
    return {
        "name": model.name,
        "description": model.description,
        "aliases": {
            name: {
                "version": by_id.get(a.version_id),
                "percent": a.percent if name == CANARY else None,
                "updated_by": a.updated_by,
                "updated_at": a.updated_at.isoformat(),
            }
            for name, a in sorted(aliases.items())
        },
        "versions": [
            {
                "version": v.number,
                "digest": v.digest,
                "size_bytes": v.size_bytes,
                "files": len(v.manifest.get("files", [])),
                "environment": v.manifest.get("environment", {}),
                "created_by": v.created_by,
                "created_at": v.created_at.isoformat(),
            }
            for v in versions
        ],
        "history": [
            {
                "alias": e.alias,
                "action": e.action,
                "from_version": by_id.get(e.from_version_id),  # type: ignore[arg-type]  # None looks up None
                "to_version": by_id.get(e.to_version_id),  # type: ignore[arg-type]  # None looks up None
                "percent": e.percent,
                "actor": e.actor,
                "at": e.at.isoformat(),
            }
            for e in history
        ],
    }


def list_models(session: Session) -> list[dict[str, Any]]:
    return [model_view(session, m, events=5) for m in session.scalars(select(Model).order_by(Model.name))]

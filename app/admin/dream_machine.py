"""The Dream Machine model table as data: which dreamq model serves `ray-2`, `ray-flash-2`, ...

Luma's clients name Luma's models; an operator decides what each name runs here. Shared by the
admin routes (/v1/admin/dream-machine/models) and the CLI (`dreamq dream-machine models`).
"""

from __future__ import annotations

import re
from typing import cast

from sqlalchemy import CursorResult, delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from app.admin.errors import AdminError, audit
from app.db.models import DreamMachineModel, Model

# The names Luma's clients send today (`ray-1-6` is the older Ray 1.6).
SEED_NAMES = ("ray-2", "ray-flash-2", "ray-1-6")
NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")


def mapping_view(row: DreamMachineModel, model_name: str) -> dict:
    return {
        "name": row.name,
        "model": model_name,
        "note": row.note,
        "updated_by": row.updated_by,
        "updated_at": row.updated_at.isoformat(),
    }


def list_mappings(session: Session) -> list[dict]:
    rows = session.execute(
        select(DreamMachineModel, Model.name)
        .join(Model, Model.id == DreamMachineModel.model_id)
        .order_by(DreamMachineModel.name)
    ).all()
    return [mapping_view(row, model) for row, model in rows]


def set_mapping(session: Session, name: str, model: str, *, note: str = "", actor: str) -> dict:
    """Point a Luma model name at a dreamq model (creating or replacing the entry)."""
    if not NAME.fullmatch(name):
        raise AdminError("name", "must be lower-case letters, digits, '.', '_' or '-' (at most 100)")
    model_id = session.scalar(select(Model.id).where(Model.name == model))
    if model_id is None:
        raise AdminError("model", f"no dreamq model named '{model}' (dreamq models list)")
    before = session.execute(
        select(Model.name)
        .join(DreamMachineModel, DreamMachineModel.model_id == Model.id)
        .where(DreamMachineModel.name == name)
    ).scalar()
    statement = insert(DreamMachineModel).values(name=name, model_id=model_id, note=note, updated_by=actor)
    session.execute(
        statement.on_conflict_do_update(
            index_elements=[DreamMachineModel.name],
            set_={"model_id": model_id, "note": note, "updated_by": actor, "updated_at": func.now()},
        )
    )
    audit("dream_machine.set_model", actor=actor, target=name, before=before, after=model)
    row = session.scalars(
        select(DreamMachineModel).where(DreamMachineModel.name == name).execution_options(populate_existing=True)
    ).one()
    return mapping_view(row, model)


def remove_mapping(session: Session, name: str, *, actor: str) -> None:
    removed = cast(
        CursorResult, session.execute(delete(DreamMachineModel).where(DreamMachineModel.name == name))
    ).rowcount
    if not removed:
        raise AdminError("name", f"no Dream Machine model named '{name}'", status=404)
    audit("dream_machine.remove_model", actor=actor, target=name)


def seed_mappings(session: Session, model: str) -> list[str]:
    """On a stack whose table is empty (a fresh one), map the seed names to `model` if it exists.

    Only an empty table is seeded, so a name an admin removed does not come back at the next start.
    """
    model_id = session.scalar(select(Model.id).where(Model.name == model))
    if model_id is None or session.scalar(select(func.count()).select_from(DreamMachineModel)):
        return []
    for name in SEED_NAMES:
        session.add(DreamMachineModel(name=name, model_id=model_id, note="seed", updated_by="dreamq up"))
    session.flush()
    return list(SEED_NAMES)

"""Which dreamq model serves a Luma model name: the admin's table `dream_machine_models`."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.models import DreamMachineModel, Model


def served_by(session: Session, name: str) -> str | None:
    """The dreamq model name behind a Luma model name, or None when the table has no such name."""
    return session.scalar(
        select(Model.name)
        .join(DreamMachineModel, DreamMachineModel.model_id == Model.id)
        .where(DreamMachineModel.name == name)
    )


def known_names(session: Session) -> list[str]:
    return list(session.scalars(select(DreamMachineModel.name).order_by(DreamMachineModel.name)))

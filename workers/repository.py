"""Model repository client: immutable, content-addressed versions in object storage.

    s3://<models bucket>/models/<name>/<number>/manifest.json   written last: it commits the version
                                               /weights/*.safetensors
                                               /code/...            the model's Python package
                                               /env/requirements.lock
                                               /model.json          entrypoint, defaults, limits

The manifest lists every file with its size and sha256; the sha256 of the manifest's bytes is
the version's identity (`digest`). A version is written once: the push takes a per-model
advisory lock in Postgres, allocates the next number, refuses if that number's manifest already
exists, uploads the files, writes the manifest, and only then commits the registry row. A push
interrupted before the manifest leaves no visible version (files without a manifest are
ignored and overwritten by the next push of that number).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import platform
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.admin.models import set_alias
from app.core.config import get_settings
from app.core.storage import TRANSFER, s3_client
from app.db.models import Model, ModelAlias, ModelVersion

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
BUNDLE_PARTS = ("model.json", "code", "weights", "env")
_CHUNK = 1024 * 1024


class RepositoryError(RuntimeError):
    pass


class VersionExists(RepositoryError):
    pass


class IntegrityError(RepositoryError):
    """What is in storage (or the cache) does not match the manifest's digests."""


class BundleError(RepositoryError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def version_prefix(name: str, number: int) -> str:
    return f"models/{name}/{number}/"


@dataclass(frozen=True)
class PushedVersion:
    name: str
    number: int
    digest: str
    size_bytes: int
    files: int


def _bundle_files(bundle: Path) -> list[Path]:
    if not (bundle / "model.json").is_file():
        raise BundleError(f"{bundle}: model.json is missing (it names the entrypoint)")
    if not list((bundle / "weights").glob("*.safetensors")):
        raise BundleError(f"{bundle}: weights/*.safetensors is missing (checkpoints are never pickled)")
    if not (bundle / "env" / "requirements.lock").is_file():
        raise BundleError(f"{bundle}: env/requirements.lock is missing")
    if not (bundle / "code").is_dir():
        raise BundleError(f"{bundle}: code/ (the model's Python package) is missing")
    files: list[Path] = [bundle / "model.json"]
    for part in ("code", "weights", "env"):
        for path in sorted((bundle / part).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                files.append(path)
    for path in files:
        if path.suffix in {".pt", ".pth", ".pkl", ".bin", ".ckpt"} and "weights" in path.parts:
            raise BundleError(f"{path}: pickled checkpoints are refused; convert to safetensors")
    return files


def build_manifest(bundle: Path, name: str, number: int, created_by: str) -> tuple[bytes, list[tuple[Path, str]]]:
    files = _bundle_files(bundle)
    entries: list[dict[str, Any]] = []
    uploads = []
    for path in files:
        rel = path.relative_to(bundle).as_posix()
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": sha256_file(path)})
        uploads.append((path, rel))
    model_info = json.loads((bundle / "model.json").read_text())
    if "entrypoint" not in model_info or ":" not in model_info["entrypoint"]:
        raise BundleError("model.json: entrypoint must look like 'package.module:ClassName'")
    import torch  # only for the version string the bundle was pushed with

    manifest = {
        "schema": 1,
        "name": name,
        "version": number,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        "created_by": created_by,
        "model": model_info,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__.split("+")[0],
            "requirements_lock": (bundle / "env" / "requirements.lock").read_text().splitlines(),
        },
        "files": entries,
        "content_digest": _content_digest((e["path"], e["sha256"]) for e in entries),
    }
    return json.dumps(manifest, indent=2, sort_keys=True).encode(), uploads


def manifest_digest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def _content_digest(pairs: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for rel, sha in sorted(pairs):
        digest.update(f"{rel}\0{sha}\n".encode())
    return "sha256:" + digest.hexdigest()


def bundle_fingerprint(bundle: Path) -> str:
    """Hash of a bundle's files alone (a manifest also has a date): lets seeding skip a re-push."""
    return _content_digest((p.relative_to(bundle).as_posix(), sha256_file(p)) for p in _bundle_files(bundle))


def push_version(
    session: Session,
    bundle: Path,
    name: str,
    *,
    created_by: str = "cli",
    description: str | None = None,
    set_prod_if_missing: bool = True,
    progress: Callable[[int], None] | None = None,
    number: int | None = None,
) -> PushedVersion:
    """Upload `bundle` as version `number` (default: the next) of `name` and register it.

    The caller commits. Pushes of one model are serialised by an advisory lock held until
    that commit, taken before anything else (even creating the model row), so of two
    concurrent pushes of the same number exactly one writes it and the other is refused
    before it uploads a byte.
    """
    settings = get_settings()
    bucket = settings.models_bucket
    client = s3_client()
    bundle = bundle.resolve()

    session.execute(text("SELECT pg_advisory_xact_lock(hashtext('dreamq.push.' || :name))"), {"name": name})
    model = session.scalar(select(Model).where(Model.name == name))
    if model is None:
        model = Model(id=uuid.uuid4(), name=name, description=description or "")
        session.add(model)
        session.flush()
    latest = session.scalar(select(func.max(ModelVersion.number)).where(ModelVersion.model_id == model.id)) or 0
    if number is None:
        number = latest + 1
    elif number <= latest:
        raise VersionExists(
            f"{name} version {number} exists or is older than the latest (v{latest}); "
            "versions are immutable and numbers only grow"
        )
    prefix = version_prefix(name, number)
    if _object_exists(client, bucket, prefix + MANIFEST):
        raise VersionExists(
            f"{name} version {number} already exists in s3://{bucket}/{prefix} (versions are immutable)"
        )

    manifest_bytes, uploads = build_manifest(bundle, name, number, created_by)
    digest = manifest_digest(manifest_bytes)
    total = 0
    for path, rel in uploads:
        client.upload_file(str(path), bucket, prefix + rel, Config=TRANSFER, Callback=progress)
        total += path.stat().st_size
    # The manifest goes last: until it exists, readers see no version. If-None-Match makes the
    # store itself refuse a second manifest for this number (a writer outside our lock).
    try:
        client.put_object(
            Bucket=bucket, Key=prefix + MANIFEST, Body=manifest_bytes, ContentType="application/json", IfNoneMatch="*"
        )
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"PreconditionFailed", "412"}:
            raise VersionExists(f"{name} version {number} was written by another push meanwhile") from None
        raise
    manifest = json.loads(manifest_bytes)
    version = ModelVersion(
        id=uuid.uuid4(),
        model_id=model.id,
        number=number,
        digest=digest,
        manifest=manifest,
        size_bytes=total,
        created_by=created_by,
    )
    session.add(version)
    session.flush()
    if set_prod_if_missing and session.get(ModelAlias, (model.id, "prod")) is None:
        # The first version becomes prod, audited like any later promote.
        set_alias(session, model, "prod", version, action="promote", actor=created_by)
    log.info("pushed model version", extra={"model": name, "version": number, "digest": digest, "bytes": total})
    return PushedVersion(name, number, digest, total, len(uploads))


def _object_exists(client: Any, bucket: str, key: str) -> bool:
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except client.exceptions.ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return False
        raise


def fetch_manifest_bytes(name: str, number: int, digest: str) -> bytes:
    """A version's manifest exactly as stored, after checking it is the one the registry recorded.

    The exact bytes (not a re-serialisation) let a local copy be checked against `digest` later.
    """
    settings = get_settings()
    body = (
        s3_client()
        .get_object(Bucket=settings.models_bucket, Key=version_prefix(name, number) + MANIFEST)["Body"]
        .read()
    )
    actual = manifest_digest(body)
    if actual != digest:
        raise IntegrityError(f"{name} v{number}: manifest digest is {actual}, registry says {digest}")
    return body


def fetch_manifest(name: str, number: int, digest: str) -> dict[str, Any]:
    """Read a version's manifest from storage and check it is the one the registry recorded."""
    return json.loads(fetch_manifest_bytes(name, number, digest))


def verify_remote(name: str, number: int, digest: str) -> list[str]:
    """Re-hash every file of a version in storage; returns the problems found (empty = intact)."""
    settings = get_settings()
    client = s3_client()
    prefix = version_prefix(name, number)
    problems = []
    try:
        manifest = fetch_manifest(name, number, digest)
    except IntegrityError as exc:
        return [str(exc)]
    for entry in manifest["files"]:
        hasher = hashlib.sha256()
        size = 0
        try:
            body = client.get_object(Bucket=settings.models_bucket, Key=prefix + entry["path"])["Body"]
        except client.exceptions.NoSuchKey:
            problems.append(f"{entry['path']}: missing")
            continue
        for chunk in body.iter_chunks(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        if size != entry["size"] or hasher.hexdigest() != entry["sha256"]:
            problems.append(
                f"{entry['path']}: sha256 {hasher.hexdigest()[:16]}… size {size}, "
                f"manifest says {entry['sha256'][:16]}… size {entry['size']}"
            )
    return problems


def iter_versions(session: Session, name: str) -> Iterable[ModelVersion]:
    return session.scalars(select(ModelVersion).join(Model).where(Model.name == name).order_by(ModelVersion.number))

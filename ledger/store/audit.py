"""The append-only audit record, on one Connection: who ran which command, on what, when."""
from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Connection, Row, select

from .blobs import now
from .schema import AuditEvent


def record(conn: Connection, actor: str, command: str, revision: int | None, edit: int | None,
           details: dict[str, Any]) -> None:
    conn.execute(AuditEvent.__table__.insert().values(
        created_at=now(), actor=actor, command=command, revision_id=revision,
        edit_id=edit, details_json=json.dumps(details, sort_keys=True)))


def events(conn: Connection, *, revision: int | None = None, edit: int | None = None, actor: str | None = None,
           since: str | None = None, until: str | None = None, command: str | None = None,
           limit: int = 100) -> list[Row]:
    """Events newest first, filtered. `since` and `until` are inclusive bounds in the stored
    form (UTC, `%Y-%m-%dT%H:%M:%S.%fZ`, see history.audit_time): that text is fixed-width, so
    it orders as the times do."""
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if revision is not None:
        q = q.where(AuditEvent.revision_id == revision)
    if edit is not None:
        q = q.where(AuditEvent.edit_id == edit)
    if actor:
        q = q.where(AuditEvent.actor == actor)
    if since is not None:
        q = q.where(AuditEvent.created_at >= since)
    if until is not None:
        q = q.where(AuditEvent.created_at <= until)
    if command:
        q = q.where(AuditEvent.command == command)
    return conn.execute(q).all()

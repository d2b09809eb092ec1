"""The append-only audit record, on one Connection: who ran which command, on what, when."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from .blobs import now
from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection


def record(conn: Connection, actor: str, command: str, revision: int | None, edit: int | None,
           details: dict[str, Any]) -> None:
    from .schema import AuditEvent
    conn.execute(AuditEvent.__table__.insert().values(
        created_at=now(), actor=actor, command=command, revision_id=revision,
        edit_id=edit, details_json=json.dumps(details, sort_keys=True)))


def events(conn: Conn | Connection, *, revision: int | None = None, edit: int | None = None,
           actor: str | None = None, since: str | None = None, until: str | None = None, command: str | None = None,
           limit: int = 100) -> list[Any]:
    """Events newest first, filtered. `since` and `until` are inclusive bounds in the stored
    form (UTC, `%Y-%m-%dT%H:%M:%S.%fZ`, see history.audit_time): that text is fixed-width, so
    it orders as the times do. Rows: every column of the audit record."""
    filters = {"revision_id = :revision": revision, "edit_id = :edit": edit, "actor = :actor": actor or None,
               "created_at >= :since": since, "created_at <= :until": until, "command = :command": command or None}
    used = [f for f, value in filters.items() if value is not None]
    params = {f.rsplit(":", 1)[1]: filters[f] for f in used}
    where = f"WHERE {' AND '.join(used)} " if used else ""
    return on(conn).rows("SELECT id, created_at, actor, command, revision_id, edit_id, details_json "
                         f"FROM audit_events {where}ORDER BY id DESC LIMIT :limit", limit=limit, **params)

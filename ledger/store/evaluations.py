"""Stored observations, on one Connection: evaluations of fact sets at a revision, and edits
measured again after a revert. Neither is history: both stay outside the chain hash.
Reads are SQL text (sql.py), on a plain driver connection or a SQLAlchemy Connection alike;
writes go through SQLAlchemy's tables."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Iterable

from .blobs import now
from .sql import Conn, on

if TYPE_CHECKING:
    from sqlalchemy import Connection

# An evaluation row's columns, in the table's order, without and with its per-fact rows.
COLUMNS = "id, revision_id, created_at, author, label, dataset_sha256, n, means_json, results_json, options_json"
SUMMARY_COLUMNS = "id, revision_id, created_at, author, label, dataset_sha256, n, means_json, options_json"


def write(conn: Connection, *, revision: int, created_at: str, author: str, label: str | None,
           dataset_sha256: str, n: int, means: dict[str, float], per_fact: list[dict[str, float]],
           options: dict[str, Any]) -> int:
    """Store one evaluation; its id."""
    from .schema import Evaluation
    return conn.execute(Evaluation.__table__.insert().values(
        revision_id=revision, created_at=created_at, author=author, label=label, dataset_sha256=dataset_sha256,
        n=n, means_json=json.dumps(means, sort_keys=True),
        results_json=json.dumps(per_fact, sort_keys=True), options_json=json.dumps(options, sort_keys=True))
    ).inserted_primary_key[0]


def of_revision(conn: Conn | Connection, revision: int, *, per_fact: bool) -> list[Any]:
    """The evaluations of a revision, oldest first (COLUMNS); without per_fact, without their
    per-fact rows (SUMMARY_COLUMNS)."""
    return on(conn).rows(f"SELECT {COLUMNS if per_fact else SUMMARY_COLUMNS} FROM evaluations "
                         "WHERE revision_id = :rev ORDER BY id", rev=revision)


def summaries_at(conn: Conn | Connection, revisions: Iterable[int]) -> list[Any]:
    """(id, revision_id, dataset_sha256, n, label, means_json) of the evaluations of these
    revisions, oldest first."""
    q = on(conn)
    where, ids = q.among("revision_id", set(revisions))
    return q.rows("SELECT id, revision_id, dataset_sha256, n, label, means_json FROM evaluations "
                  f"WHERE {where} ORDER BY id", ids=ids)


def newest(conn: Conn | Connection, limit: int) -> list[Any]:
    """The newest `limit` evaluations of any revision, newest first, without their per-fact
    rows (SUMMARY_COLUMNS)."""
    return on(conn).rows(f"SELECT {SUMMARY_COLUMNS} FROM evaluations ORDER BY id DESC LIMIT :limit", limit=limit)


def write_remeasures(conn: Connection, revision: int, metrics: dict[int, dict[str, float]]) -> None:
    """Metrics of edits measured again at `revision`."""
    from .schema import Measurement
    if metrics:
        conn.execute(Measurement.__table__.insert(), [
            {"revision_id": revision, "edit_id": e, "kind": "remeasure",
             "metrics_json": json.dumps(m, sort_keys=True), "created_at": now()}
            for e, m in metrics.items()])


def remeasures_of(conn: Conn | Connection, edits: Iterable[int]) -> list[tuple[int, int, str]]:
    """(edit, revision, metrics JSON) of every later measurement of these edits, oldest first."""
    q = on(conn)
    where, ids = q.among("edit_id", edits)
    return [tuple(r) for r in q.rows(
        f"SELECT edit_id, revision_id, metrics_json FROM measurements WHERE {where} ORDER BY id", ids=ids)]

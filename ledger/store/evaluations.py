"""Stored observations, on one Connection: evaluations of fact sets at a revision, and edits
measured again after a revert. Neither is history: both stay outside the chain hash."""
from __future__ import annotations

import json
from typing import Any, Iterable

from sqlalchemy import Connection, Row, select

from .blobs import now
from .engine import among
from .schema import Evaluation, Measurement


def write(conn: Connection, *, revision: int, created_at: str, author: str, label: str | None,
           dataset_sha256: str, n: int, means: dict[str, float], per_fact: list[dict[str, float]],
           options: dict[str, Any]) -> int:
    """Store one evaluation; its id."""
    return conn.execute(Evaluation.__table__.insert().values(
        revision_id=revision, created_at=created_at, author=author, label=label, dataset_sha256=dataset_sha256,
        n=n, means_json=json.dumps(means, sort_keys=True),
        results_json=json.dumps(per_fact, sort_keys=True), options_json=json.dumps(options, sort_keys=True))
    ).inserted_primary_key[0]


def of_revision(conn: Connection, revision: int, *, per_fact: bool) -> list[Row]:
    """The evaluations of a revision, oldest first; without per_fact, without their per-fact rows."""
    cols = [c for c in Evaluation.__table__.columns if per_fact or c.name != "results_json"]
    return conn.execute(select(*cols).where(Evaluation.revision_id == revision).order_by(Evaluation.id)).all()


def summaries_at(conn: Connection, revisions: Iterable[int]) -> list[Row]:
    """(id, revision_id, dataset_sha256, n, label, means_json) of the evaluations of these
    revisions, oldest first."""
    return conn.execute(select(Evaluation.id, Evaluation.revision_id, Evaluation.dataset_sha256,
                               Evaluation.n, Evaluation.label, Evaluation.means_json)
                        .where(Evaluation.revision_id.in_(set(revisions))).order_by(Evaluation.id)).all()


def write_remeasures(conn: Connection, revision: int, metrics: dict[int, dict[str, float]]) -> None:
    """Metrics of edits measured again at `revision`."""
    if metrics:
        conn.execute(Measurement.__table__.insert(), [
            {"revision_id": revision, "edit_id": e, "kind": "remeasure",
             "metrics_json": json.dumps(m, sort_keys=True), "created_at": now()}
            for e, m in metrics.items()])


def remeasures_of(conn: Connection, edits: Iterable[int]) -> list[tuple[int, int, str]]:
    """(edit, revision, metrics JSON) of every later measurement of these edits, oldest first."""
    return [tuple(r) for r in conn.execute(
        select(Measurement.edit_id, Measurement.revision_id, Measurement.metrics_json)
        .where(among(Measurement.edit_id, edits, conn)).order_by(Measurement.id)).all()]

"""The edits table, on one Connection: an edit is written once, with a content hash over
every stored field, and read by id."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from sqlalchemy import Connection, Row, func, select

from .engine import among
from .schema import Edit


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def edit_payload(e: Any) -> dict[str, Any]:
    """What an edit's content hash covers: every column but the hash itself."""
    return {"id": e.id, "fact": json.loads(e.fact_json), "subject": e.subject, "relation": e.relation,
            "method": e.method, "layer": e.layer, "rank": e.rank, "config": json.loads(e.config_json),
            "blob": e.blob_sha256, "metrics": json.loads(e.metrics_json), "stats": json.loads(e.stats_json),
            "versions": json.loads(e.versions_json), "trained_on": e.trained_on, "author": e.author,
            "created_at": e.created_at}


def edit_hash(e: Any) -> str:
    return hashlib.sha256(canonical(edit_payload(e))).hexdigest()


def write(conn: Connection, columns: dict[str, Any]) -> int:
    """Write one edit (every column but id and content_hash) and its content hash; its id."""
    edit = Edit(**columns, content_hash="")
    edit_id = conn.execute(Edit.__table__.insert().values(
        {c.name: getattr(edit, c.name) for c in Edit.__table__.columns if c.name != "id"})).inserted_primary_key[0]
    edit.id = edit_id
    conn.execute(Edit.__table__.update().where(Edit.id == edit_id).values(content_hash=edit_hash(edit)))
    return edit_id


def content_hashes(conn: Connection, ids: list[int]) -> dict[int, str]:
    return dict(conn.execute(select(Edit.id, Edit.content_hash).where(Edit.id.in_(ids))).all())


def get(conn: Connection, edit_id: int) -> Row | None:
    return conn.execute(select(Edit).where(Edit.id == edit_id)).one_or_none()


def rows(conn: Connection, ids: Iterable[int]) -> list[Row]:
    """The full rows of these edits, by id."""
    ids = list(ids)
    if not ids:
        return []
    return conn.execute(select(Edit).where(among(Edit.id, ids, conn)).order_by(Edit.id)).all()


def facts_of(conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, Any]]:
    """Each edit's fact record, in the order the database returns them."""
    ids = list(ids)
    if not ids:
        return {}
    return {eid: json.loads(fj) for eid, fj in
            conn.execute(select(Edit.id, Edit.fact_json).where(among(Edit.id, ids, conn)))}


def metrics_of(conn: Connection, ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """The metrics each edit was created with."""
    ids = list(ids)
    if not ids:
        return {}
    return {e: json.loads(m) for e, m in conn.execute(select(Edit.id, Edit.metrics_json).where(Edit.id.in_(ids)))}


def retrain_inputs(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[dict[str, Any], dict[str, Any], int]]:
    """(fact record, stored config, layer) of each edit: what it was trained from."""
    ids = list(ids)
    if not ids:
        return {}
    return {e: (json.loads(f), json.loads(c), layer) for e, f, c, layer in conn.execute(
        select(Edit.id, Edit.fact_json, Edit.config_json, Edit.layer).where(among(Edit.id, ids, conn)))}


def trained_on(conn: Connection, ids: Iterable[int]) -> list[tuple[int, int | None]]:
    """(edit, the revision it was trained on) for each of these edits."""
    ids = list(ids)
    if not ids:
        return []
    return [tuple(r) for r in conn.execute(select(Edit.id, Edit.trained_on).where(among(Edit.id, ids, conn)))]


def block_addresses(conn: Connection, ids: Iterable[int]) -> list[tuple[int, int, str]]:
    """(edit, layer, blob address) of each of these edits."""
    return [tuple(r) for r in conn.execute(select(Edit.id, Edit.layer, Edit.blob_sha256)
                                           .where(among(Edit.id, ids, conn)))]


def stating(conn: Connection, subject: str, relation: str) -> list[int]:
    """Every edit, active or not, that states this subject and relation."""
    return list(conn.execute(select(Edit.id).where(Edit.subject == subject, Edit.relation == relation)).scalars())


def summaries(conn: Connection, ids: Iterable[int]) -> dict[int, tuple[int, int, dict[str, Any], str, float | None]]:
    """(layer, rank, fact record, blob address, tensor norm at creation) of each edit."""
    ids = list(ids)
    if not ids:
        return {}
    return {e: (layer, rank, json.loads(f), blob, json.loads(st).get("tensor_norm"))
            for e, layer, rank, f, blob, st in conn.execute(
                select(Edit.id, Edit.layer, Edit.rank, Edit.fact_json, Edit.blob_sha256, Edit.stats_json)
                .where(among(Edit.id, ids, conn)))}


def layer_totals(conn: Connection, ids: Iterable[int]) -> list[tuple[int, int, int]]:
    """(layer, number of blocks, total rank) over these edits, per layer."""
    ids = list(ids)
    if not ids:
        return []
    return [(layer, int(n), int(total or 0)) for layer, n, total in conn.execute(
        select(Edit.layer, func.count(), func.sum(Edit.rank)).where(among(Edit.id, ids, conn)).group_by(Edit.layer))]

